"""Same seed, same data, same config -> identical SIDs, adapter weights, predictions and metrics on
CPU: the whole stage chain (sidrec.stages, no ZenML) runs twice on a MovieLens-100k slice with the
tiny backbone; a different seed changes the result (so the comparison is not vacuous)."""
from __future__ import annotations

import numpy as np
import pytest

from sidrec.config import parse_config

pytestmark = pytest.mark.slow


def _cfg(ml100k_dir, tmp, seed=0):
    return parse_config({
        "seed": seed,
        "data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 30, "kcore": 3},
        "index": {"codebook_size": 8, "levels": 2, "kmeans_iters": 10},
        "model": {"backbone": "tiny", "dtype": "float32"},
        "train": {"steps": 6, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "checkpoint_dir": str(tmp / "ck")},
        "eval": {"beams": 10, "batch_size": 16, "ks": [1, 5, 10]},
        "baselines": {"sasrec": {"max_epochs": 2, "patience": 1, "hidden": 16, "layers": 1, "heads": 1}},
    })


def _run(cfg, out):
    from safetensors.torch import load_file

    from sidrec import stages

    ds = stages.ingest(cfg)
    feats = stages.featurize(ds, cfg)
    bundle = stages.build_index(feats, cfg)
    instr = stages.instruct(ds, bundle, cfg)
    rec = stages.finetune(instr, bundle, cfg, out)
    report = stages.evaluate(rec, instr, bundle, cfg)
    base = stages.baselines(ds, cfg, reuse=False)  # trained in each run: its determinism is under test
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    weights["sid"] = load_file(str(out / "sid_embeddings.safetensors"))["sid_embeddings"]
    return {
        "fingerprint": ds.fingerprint(), "emb": feats.item_embeddings, "sids": bundle.items.sids(),
        "index_report": bundle.report, "instructions": instr.rows, "loss": rec.meta["loss_curve"],
        "weights": weights, "metrics": report.metrics, "predictions": report.predictions, "baselines": base,
    }


def _no_timings(m: dict) -> dict:
    return {k: v for k, v in m.items() if not any(t in k for t in ("seconds", "per_s", "minutes"))}


def test_same_seed_same_everything(ml100k_dir, tmp_path):
    import pandas as pd
    import torch

    a = _run(_cfg(ml100k_dir, tmp_path), tmp_path / "a")
    b = _run(_cfg(ml100k_dir, tmp_path), tmp_path / "b")
    assert a["fingerprint"] == b["fingerprint"]
    assert np.array_equal(a["emb"], b["emb"])
    assert a["sids"] == b["sids"] and len(set(a["sids"])) == len(a["sids"])
    assert a["index_report"] == b["index_report"]
    pd.testing.assert_frame_equal(a["instructions"], b["instructions"])
    assert a["loss"] == b["loss"]
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    assert _no_timings(a["metrics"]) == _no_timings(b["metrics"]) and "test/recall_at_10" in a["metrics"]
    pd.testing.assert_frame_equal(a["predictions"], b["predictions"])
    assert _no_timings(a["baselines"]) == _no_timings(b["baselines"])
    assert any(k.startswith("baseline/sasrec/") for k in a["baselines"])

    c = _run(_cfg(ml100k_dir, tmp_path, seed=1), tmp_path / "c")
    assert c["sids"] != a["sids"] or c["loss"] != a["loss"]


def test_repeated_rows_gradients_sum_in_one_order_on_two_threads():
    """The backward of ``x[index]`` with repeated rows (``index_put_`` accumulating; SID and item rows gathered for
    a batch) on two CPU threads summed the repeats in a thread-timed order: same seed, different weights in two
    processes after a few steps. ``train.deterministic`` (on by default, set by ``seed_everything`` and by the
    training loop) sorts them: the same gradient to the bit, every time. (With it off, the six gradients here were
    not all equal on a 2-core machine.)"""
    import torch

    from sidrec.runtime import seed_everything

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seed_everything(0)
        index = torch.randint(0, 200, (6400,))
        upstream = torch.randn(6400, 576)

        def grad():
            table = torch.zeros(50_000, 576, requires_grad=True)
            table[index].backward(upstream)
            return table.grad

        first = grad()
        assert all(torch.equal(first, grad()) for _ in range(5))
    finally:
        torch.set_num_threads(threads)
        seed_everything(0)


def test_the_training_config_turns_the_deterministic_kernels_off_and_on():
    import torch

    from sidrec.config import TrainConfig
    from sidrec.runtime import deterministic_kernels

    try:
        deterministic_kernels(TrainConfig(deterministic=False).deterministic)
        assert not torch.are_deterministic_algorithms_enabled()
        deterministic_kernels(TrainConfig().deterministic)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        deterministic_kernels(True)
