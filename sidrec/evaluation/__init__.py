"""Offline evaluation: ``metrics`` (Recall/NDCG@K), ``evaluate`` (constrained decoding of the LLM on
valid/test, model selection), ``baselines`` (SASRec, popularity). May import: everything below
``stages`` except ``ops``.
"""
from sidrec.exports import lazy_exports

MODULES = ['baselines', 'evaluate', 'metrics']
__getattr__, __dir__, __all__ = lazy_exports(__name__, MODULES, {
    'SASRec': 'baselines',
    'coverage': 'metrics',
    'evaluate_baselines': 'evaluate',
    'evaluate_llm': 'evaluate',
    'invalid_rate': 'metrics',
    'lift_table': 'evaluate',
    'load_sasrec': 'baselines',
    'per_user_hits': 'metrics',
    'popularity_counts': 'baselines',
    'popularity_ranked': 'baselines',
    'popularity_topk': 'baselines',
    'ranking_metrics': 'metrics',
    'sasrec_scores': 'baselines',
    'sasrec_topk': 'baselines',
    'save_sasrec': 'baselines',
    'target_ranks': 'metrics',
    'train_sasrec': 'baselines',
    'valid_selector': 'evaluate',
})
