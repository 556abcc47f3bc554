"""Thin ZenML steps: parse their slice of the run config, call `sidrec.stages`, return typed artifacts."""
from steps.training import (
    baselines,
    dynamic_finetune,
    evaluate,
    finetune,
    ingest,
    instruction_dataset,
    log_to_mlflow,
    quality_gate,
    sid_quantization,
    text_features,
    validate_data,
)

__all__ = [
    "baselines", "dynamic_finetune", "evaluate", "finetune", "ingest", "instruction_dataset", "log_to_mlflow",
    "quality_gate", "sid_quantization", "text_features", "validate_data",
]
