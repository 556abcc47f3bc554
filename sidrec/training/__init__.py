"""Fine-tuning: ``loop`` (THE training loop: batching, collate, loss, LR schedule, checkpoints,
TrainHooks), ``ema`` (the moving average of the trained weights) and ``parallel`` (data-parallel
primitives and the torchrun launcher). May import: foundations, ``model``.
"""
from sidrec.exports import lazy_exports

MODULES = ['ema', 'loop', 'parallel']
__getattr__, __dir__, __all__ = lazy_exports(__name__, MODULES, {
    'Encoded': 'loop',
    'TrainHooks': 'loop',
    'TrainResult': 'loop',
    'WeightAverage': 'ema',
    'average_gradients': 'parallel',
    'broadcast_parameters': 'parallel',
    'bucketed_batches': 'loop',
    'checksum': 'parallel',
    'collate': 'loop',
    'encode_rows': 'loop',
    'finetune_distributed': 'parallel',
    'launch': 'parallel',
    'load_checkpoint': 'loop',
    'run_key': 'loop',
    'save_checkpoint': 'loop',
    'target_loss': 'loop',
    'train': 'loop',
    'train_steps': 'loop',
    'table_parameters': 'loop',
    'trainable_parameters': 'loop',
    'world_info': 'parallel',
})
