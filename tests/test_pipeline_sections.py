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


def test_the_model_is_saved_with_the_prompt_format_it_was_trained_on():
    """A step that writes a model's meta must see the config its prompt format comes from: the Scientific
    run's model once said `history: 20` (the default) while it trained and was tested on 50-item prompts."""
    from pipelines.training import pick
    from sidrec.config import RunConfig
    from sidrec.data.tasks import PromptFormat

    base = _cfg()
    base["data"]["max_history"] = 50
    base["tasks"]["window_prefix"] = "History:"
    want = PromptFormat.from_config(RunConfig.model_validate(base).tasks, 50)
    for step in ("finetune", "dynamic_finetune", "instruction_dataset"):
        cfg = RunConfig.model_validate(pick(base, step))
        assert PromptFormat.from_config(cfg.tasks, cfg.data.max_history) == want, step
