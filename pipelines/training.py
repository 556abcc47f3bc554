"""The training pipeline (static index shown; in dynamic mode `dynamic_finetune` replaces the three
steps sid_quantization -> instruction_dataset -> finetune and emits the same three artifacts):

ingest -> validate_data -> quality_gate -> text_features -> sid_quantization -> instruction_dataset
       -> finetune -> evaluate -> log_to_mlflow        (baselines run beside, on the same split)
"""
from __future__ import annotations

from zenml import pipeline

from steps import (
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

# which config sections each step sees (its cache key changes only when these change);
# "section.key" passes one key of a section (text_features and baselines read only the thread count
# from `train`, so changing the training budget does not re-run them)
SECTIONS = {
    "ingest": ("data",),
    "validate_data": ("validation",),
    "text_features": ("features", "model", "index", "train.threads", "seed"),
    "sid_quantization": ("index", "seed"),
    "instruction_dataset": ("tasks", "train", "data", "index", "seed"),
    # eval.batch_size: model selection; tasks + data.max_history: the prompt format saved with the model
    "finetune": ("model", "train", "index", "tasks", "data.max_history", "eval.batch_size", "eval.exclude_history", "seed"),
    "dynamic_finetune": ("index", "tasks", "model", "train", "data", "features", "eval.batch_size", "eval.exclude_history", "seed"),
    "evaluate": ("model", "eval", "train", "seed"),
    "baselines": ("baselines", "eval", "data", "train.threads", "seed"),
}


def pick(config: dict, step: str) -> dict:
    out: dict = {}
    for key in SECTIONS[step]:
        section, _, sub = key.partition(".")
        if section not in config:
            continue
        if not sub:
            out[section] = config[section]
        elif isinstance(config[section], dict) and sub in config[section]:
            out.setdefault(section, {})[sub] = config[section][sub]
    return out


@pipeline(enable_cache=True)
def training_pipeline(config: dict) -> None:
    dataset = ingest(config=pick(config, "ingest"))
    quality = validate_data(dataset, config=pick(config, "validate_data"))
    passed = quality_gate(quality)
    features = text_features(dataset, passed, config=pick(config, "text_features"))
    if config.get("index", {}).get("mode", "static") == "dynamic":
        recommender, index, instructions = dynamic_finetune(dataset, features, config=pick(config, "dynamic_finetune"))
    else:
        index = sid_quantization(features, config=pick(config, "sid_quantization"))
        instructions = instruction_dataset(dataset, index, config=pick(config, "instruction_dataset"))
        recommender = finetune(dataset, features, instructions, index, config=pick(config, "finetune"))
    report = evaluate(recommender, instructions, index, config=pick(config, "evaluate"))
    base = baselines(dataset, config=pick(config, "baselines"), after="quality_gate")
    log_to_mlflow(dataset, quality, index, instructions, recommender, report, base, config=config)
