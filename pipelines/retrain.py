"""The retraining pipeline (`run.py retrain --config CONFIG`):

ingest (newest data) -> validate_data -> quality_gate -> drift_report (vs the champion's data)
  -> text_features -> extend_index (champion SIDs kept, new items via the saved quantizer)
  -> instruction_dataset -> warm_finetune (from the champion adapter when compatible) -> evaluate
  -> log_to_mlflow -> register_challenger -> promotion_gate          (baselines beside, as in training)
"""
from __future__ import annotations

from zenml import pipeline

from pipelines.training import pick
from steps import baselines, evaluate, ingest, instruction_dataset, log_to_mlflow, quality_gate, text_features, validate_data
from steps.ops import drift_report, extend_index, promotion_gate, register_challenger, warm_finetune


@pipeline(enable_cache=True)
def retrain_pipeline(config: dict) -> None:
    dataset = ingest(config=pick(config, "ingest"))
    quality = validate_data(dataset, config=pick(config, "validate_data"))
    passed = quality_gate(quality)
    drift_report(dataset, passed, config=config)
    features = text_features(dataset, passed, config=pick(config, "text_features"))
    index = extend_index(features, config=config)
    instructions = instruction_dataset(dataset, index, config=pick(config, "instruction_dataset"))
    recommender = warm_finetune(dataset, features, instructions, index, config=config)
    report = evaluate(recommender, instructions, index, config=pick(config, "evaluate"))
    base = baselines(dataset, config=pick(config, "baselines"), after="quality_gate")
    metrics = log_to_mlflow(dataset, quality, index, instructions, recommender, report, base, config=config)
    version = register_challenger(dataset, quality, index, recommender, metrics, config=config)
    promotion_gate(version, config=config)
