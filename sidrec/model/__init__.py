"""The LLM recommender: backbone + LoRA + SID vocabulary and embeddings.

``sid_model`` (loading, truncation, SID rows, save/load), ``sid_init`` (semantic initialisation of the
SID rows), ``item_head`` (the item-level head: every item scored at once, fused into the beam ranking),
``decode`` (trie-constrained beam search), ``ensemble`` (seed-ensemble members decoded as one), ``fusion``
(members on their own SID indexes, fused at the item level), ``assets``
(fetching the backbone and demo data).
May import: foundations.
"""
from sidrec.exports import lazy_exports

MODULES = ['assets', 'decode', 'ensemble', 'fusion', 'item_head', 'sid_init', 'sid_model']
__getattr__, __dir__, __all__ = lazy_exports(__name__, MODULES, {
    'Encoder': 'sid_model',
    'IndexEnsemble': 'fusion',
    'ItemHead': 'item_head',
    'MODELS_DIR': 'sid_model',
    'REPO_ROOT': 'sid_model',
    'SIDRecModel': 'sid_model',
    'SIDVocab': 'sid_model',
    'SID_TOKEN_RE': 'sid_model',
    'SMOLLM2_DIR': 'sid_model',
    'SMOLLM2_GGUF': 'sid_model',
    'SeedEnsemble': 'ensemble',
    'add_lora': 'sid_model',
    'backbone_folder': 'sid_model',
    'beam_search_batch': 'decode',
    'calibrate_sid_logits': 'sid_model',
    'check_backbone_folder': 'sid_model',
    'convert_gguf': 'sid_model',
    'fetch_all': 'assets',
    'fuse_beams': 'item_head',
    'generate_codes': 'decode',
    'inner_model': 'sid_model',
    'item_head_loss': 'item_head',
    'item_targets': 'item_head',
    'item_text_vectors': 'sid_init',
    'load_backbone': 'sid_model',
    'load_recommender': 'sid_model',
    'recommend': 'decode',
    'recommend_fused': 'fusion',
    'save_ensemble': 'sid_model',
    'save_recommender': 'sid_model',
    'text_init': 'sid_init',
    'truncate_layers': 'sid_model',
})
