"""Data-parallel fine-tuning (train.processes > 1): torchrun with the gloo backend on CPU, 2 processes,
tiny backbone. The replicas must end identical (gradients averaged every step), the saved model must be
rank 0's replica, and training must have moved the parameters."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _setup(ml100k_dir, processes: int, **model):
    from sidrec.artifacts import EntityFeatures
    from sidrec.config import parse_config
    from sidrec.stages import build_index, ingest, instruct

    cfg = parse_config({
        "seed": 5,
        "data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 20, "kcore": 3},
        "index": {"codebook_size": 8, "levels": 2, "kmeans_iters": 5},
        "tasks": {"sid_to_text": 0.0},
        "model": {"backbone": "tiny", "dtype": "float32", "device": "cpu", "lora": {"r": 2, "dropout": 0.1}, **model},
        "baselines": {"sasrec": {"hidden": 16, "layers": 1, "heads": 1, "max_epochs": 2}},
        "train": {"steps": 6, "batch_size": 2, "warmup_steps": 1, "threads": 2, "log_every": 1,
                  "checkpoint_every": None, "processes": processes},
    })
    ds = ingest(cfg)
    rng = np.random.default_rng(0)
    feats = EntityFeatures(item_ids=ds.items["item_id"].tolist(), item_texts=[""] * len(ds.items),
                           item_embeddings=rng.normal(size=(len(ds.items), 16)).astype("float32"))
    bundle = build_index(feats, cfg)
    return instruct(ds, bundle, cfg), bundle, cfg, ds


def test_two_process_finetune_keeps_replicas_in_sync(ml100k_dir, tmp_path, monkeypatch):
    import torch

    from sidrec.distributed import checksum
    from sidrec.model.sid_model import load_recommender
    from sidrec.stages import build_model, finetune

    monkeypatch.setenv("SIDREC_PROGRESS", "0")
    instructions, bundle, cfg, ds = _setup(ml100k_dir, 2)
    logged = []
    rec = finetune(instructions, bundle, cfg, tmp_path / "model", ds=ds, log=lambda s, m: logged.append((s, m["train/loss"])))
    meta = rec.meta
    assert meta["train"]["train/processes"] == 2 and meta["train"]["train/global_batch"] == 4
    assert meta["train"]["train/examples"] == 6 * 2 * 2
    a, b = meta["replica_checksums"]
    assert a == b, "replicas diverged: gradients were not averaged"
    assert len(logged) == 6 and all(np.isfinite(l) for _, l in logged)
    # the saved model is rank 0's replica, and training moved it away from the initial parameters
    model, _, _ = load_recommender(rec.path, "tiny", merge=False)
    saved = [model.sid_embeddings] + [p for n, p in model.lm.named_parameters() if "lora_" in n]
    init, _, _ = build_model(cfg, bundle, ds)
    assert not torch.equal(init.sid_embeddings.detach(), model.sid_embeddings.detach())
    assert len(saved) > 1 and checksum(saved) == a


def test_processes_config_is_validated():
    from sidrec.config import parse_config
    from sidrec.errors import ConfigError

    with pytest.raises(ConfigError, match="train.processes"):
        parse_config({"train": {"processes": 0}})
    with pytest.raises(ConfigError, match="model.device"):
        parse_config({"model": {"device": "tpu"}})


def test_two_process_distillation_trains_its_teacher_once_before_the_processes(ml100k_dir, tmp_path, monkeypatch):
    """With ``model.item_head_distill`` the parent trains the SASRec teacher into the store before it starts the
    processes, and gives them the dataset; each process loads that teacher (no process trains another one)."""
    from sidrec.stages import finetune
    from sidrec.training import parallel

    monkeypatch.setenv("SIDREC_PROGRESS", "0")
    monkeypatch.setenv("SIDREC_HOME", str(tmp_path / "home"))
    instructions, bundle, cfg, ds = _setup(ml100k_dir, 2, sid_init="random", item_head=1.0, item_head_distill=1.0)
    store = tmp_path / "home" / "cache" / "sasrec"
    seen = {}
    real = parallel.launch

    def spy(job, processes, *args, **kwargs):
        seen["stored"] = sorted(p.name for p in store.iterdir()) if store.exists() else []
        seen["dataset"] = (job / "dataset").exists()
        return real(job, processes, *args, **kwargs)

    monkeypatch.setattr(parallel, "launch", spy)
    rec = finetune(instructions, bundle, cfg, tmp_path / "model", ds=ds)
    assert seen["dataset"] and len(seen["stored"]) == 1
    assert sorted(p.name for p in store.iterdir()) == seen["stored"]
    a, b = rec.meta["replica_checksums"]
    assert a == b
