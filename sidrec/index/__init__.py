"""The SID index: how entities get semantic IDs.

``sid_index`` (SIDIndex: entity <-> code tuple, the prefix trie), ``kmeans`` and ``collisions`` (the
arithmetic under every residual quantizer), ``quantize`` (RQ-KMeans, RQ-VAE, LSH; fit, assign, new items),
``collab`` (co-occurrence vectors for a hybrid index), ``keywords`` (TS-Rec), ``dynamic`` (the learned,
churn-bounded index trained with the LLM). May import: foundations, ``model``, ``training``.
"""
from sidrec.exports import lazy_exports

MODULES = ['collab', 'collisions', 'dynamic', 'keywords', 'kmeans', 'quantize', 'sid_index']
__getattr__, __dir__, __all__ = lazy_exports(__name__, MODULES, {
    'DynamicIndexHooks': 'dynamic',
    'FORMAT_VERSION': 'sid_index',
    'Family': 'dynamic',
    'INDEX_FILE': 'sid_index',
    'LEVEL_LETTERS': 'sid_index',
    'LearnedIndexModel': 'dynamic',
    'LearnedQuantizer': 'dynamic',
    'META_FILE': 'sid_index',
    'Phase': 'dynamic',
    'PrefixTrie': 'sid_index',
    'QuantizationResult': 'quantize',
    'QuantizerState': 'quantize',
    'SIDIndex': 'sid_index',
    'align': 'collab',
    'append_disambiguated': 'collisions',
    'assign_new': 'quantize',
    'auto_codebook_size': 'quantize',
    'code_stats': 'collisions',
    'cooccurrence_matrix': 'collab',
    'cooccurrence_vectors': 'collab',
    'count_duplicates': 'collisions',
    'fit_lsh': 'quantize',
    'fit_rq_kmeans': 'quantize',
    'fit_rq_vae': 'quantize',
    'hybrid_inputs': 'collab',
    'info_nce': 'dynamic',
    'lsh_codes': 'quantize',
    'nearest_free_last': 'collisions',
    'phase_plan': 'dynamic',
    'plot_code_usage': 'quantize',
    'ppmi': 'collab',
    'prefix_keywords': 'keywords',
    'raw_collision_rate': 'collisions',
    'reassign': 'dynamic',
    'resolve_collisions': 'collisions',
    'sa_init': 'keywords',
    'spread_collisions': 'collisions',
    'token_keywords': 'keywords',
})
