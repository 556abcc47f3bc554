"""Each step's cache key is the config sections it is given (pipelines.training.pick)."""
from __future__ import annotations

import copy

from sidrec.config import load_config


def _cfg():
    from pathlib import Path

    return load_config(Path(__file__).resolve().parent.parent / "configs" / "scientific.yaml").model_dump(mode="json")


def test_training_budget_does_not_reach_features_or_baselines():
    from pipelines.training import SECTIONS, pick

    base = _cfg()
    longer = copy.deepcopy(base)
    longer["train"]["steps"] *= 4
    longer["train"]["lr"] /= 2
    for step in ("text_features", "baselines", "ingest", "sid_quantization"):
        assert pick(base, step) == pick(longer, step), step
    for step in ("finetune", "instruction_dataset", "evaluate"):
        assert pick(base, step) != pick(longer, step), step
    # the thread count still reaches the baselines (it is the only `train` key they read)
    threads = copy.deepcopy(base)
    threads["train"]["threads"] = 1 if base["train"].get("threads") != 1 else 2
    assert pick(threads, "baselines")["train"] == {"threads": threads["train"]["threads"]}
    assert set(pick(base, "baselines")) == {s.partition(".")[0] for s in SECTIONS["baselines"]}
    assert pick(base, "finetune")["train"] == base["train"]
