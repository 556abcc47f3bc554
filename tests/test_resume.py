"""Crash and resume of fine-tuning: a training process is SIGKILLed after it wrote a checkpoint, the
same training is started again, resumes from the checkpoint, and ends with exactly the parameters
and losses of an uninterrupted run with the same seed (tiny backbone, float32, CPU, 1 thread).

Also: checkpoints hold no pickle (safetensors + JSON only), a damaged newest checkpoint falls back
to an older one, and a different config never resumes from another run's checkpoint.

This file doubles as the child process: ``python tests/test_resume.py CHECKPOINT_DIR OUT_DIR``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ML100K = REPO / "data" / "ml-100k"
STEPS = 300
EVERY = 10


def setup(ckpt_dir: Path, steps: int = STEPS, **train_over):
    """A small instruction set + SID index (random item embeddings: no backbone pass needed)."""
    import numpy as np

    from sidrec.artifacts import EntityFeatures
    from sidrec.config import parse_config
    from sidrec.stages import build_index, ingest, instruct

    cfg = parse_config({
        "seed": 3,
        "data": {"format": "recbole", "path": str(ML100K), "max_users": 20, "kcore": 3},
        "index": {"codebook_size": 8, "levels": 2, "kmeans_iters": 5},
        "tasks": {"sid_to_text": 0.0},  # SID-only targets: no 49k-row softmax per step
        "model": {"backbone": "tiny", "dtype": "float32", "lora": {"r": 2, "dropout": 0.1}},
        "train": {"steps": steps, "batch_size": 2, "warmup_steps": 2, "threads": 1, "log_every": 5,
                  "checkpoint_every": EVERY, "checkpoint_dir": str(ckpt_dir), **train_over},
    })
    ds = ingest(cfg)
    rng = np.random.default_rng(0)
    feats = EntityFeatures(item_ids=ds.items["item_id"].tolist(), item_texts=[""] * len(ds.items),
                           item_embeddings=rng.normal(size=(len(ds.items), 16)).astype("float32"))
    bundle = build_index(feats, cfg)
    return instruct(ds, bundle, cfg), bundle, cfg


def run_finetune(ckpt_dir: Path, out_dir: Path, **train_over):
    from sidrec.stages import finetune

    instructions, bundle, cfg = setup(ckpt_dir, **train_over)
    return finetune(instructions, bundle, cfg, out_dir)


def _params(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {f"sid/{k}": v for k, v in load_file(str(model_dir / "sid_embeddings.safetensors")).items()}
    out.update({f"lora/{k}": v for k, v in load_file(str(model_dir / "adapter" / "adapter_model.safetensors")).items()})
    return out


def _checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob("*/ckpt-*") if (p / "state.json").is_file())


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    import torch

    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "SIDREC_PROGRESS": "0", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, __file__, str(ckpt), str(tmp_path / "killed")], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        # kill once the second checkpoint exists: training is then mid-way, well before STEPS
        while time.time() < deadline and child.poll() is None:
            cks = _checkpoints(ckpt)
            if cks and int(cks[-1].name[5:]) >= 2 * EVERY:
                break
            time.sleep(0.05)
        assert child.poll() is None, "the child finished or crashed before it could be killed:\n" + child.stdout.read().decode()[-3000:]
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "meta.json").exists()  # it really died mid-training
    cks = _checkpoints(ckpt)
    assert cks, "no checkpoint survived the kill"
    step_at_kill = int(cks[-1].name[5:])
    assert 2 * EVERY <= step_at_kill < STEPS
    # no pickle in a checkpoint: safetensors + JSON only
    assert {p.name for p in cks[-1].iterdir()} == {"state.safetensors", "state.json"}

    resumed = run_finetune(ckpt, tmp_path / "resumed")
    assert resumed.meta["train"]["train/resumed_from_step"] == step_at_kill
    assert resumed.meta["train"]["train/steps"] == STEPS
    assert not any(ckpt.glob("*/ckpt-*")), "checkpoints are removed once training completes"

    fresh = run_finetune(tmp_path / "ckpt-fresh", tmp_path / "fresh")
    assert fresh.meta["train"]["train/resumed_from_step"] == 0
    a, b = _params(tmp_path / "resumed"), _params(tmp_path / "fresh")
    assert a.keys() == b.keys() and len(a) > 1
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert resumed.meta["train"]["train/final_loss"] == fresh.meta["train"]["train/final_loss"]
    assert resumed.meta["loss_curve"] == fresh.meta["loss_curve"]


def test_damaged_checkpoint_falls_back_and_other_config_does_not_resume(tmp_path):
    """Unit-level: checkpoint every 2 of 6 steps, keep them (no completion), corrupt the newest."""
    import torch

    from sidrec.stages import build_model, compute_dtype
    from sidrec.training.loop import load_checkpoint, run_key, save_checkpoint, train

    instructions, bundle, cfg = setup(tmp_path / "ck", steps=6, checkpoint_every=2)
    torch.manual_seed(0)
    model, _, encoder = build_model(cfg, bundle)
    rows = instructions.part("train")
    key = run_key(model, rows, cfg.train, cfg.seed, compute_dtype(cfg))
    other = run_key(model, rows, cfg.train.model_copy(update={"lr": 0.5}), cfg.seed, compute_dtype(cfg))
    assert key != other
    # same key whatever the checkpoint settings
    assert key == run_key(model, rows, cfg.train.model_copy(update={"checkpoint_every": 3, "checkpoint_dir": "x"}),
                          cfg.seed, compute_dtype(cfg))

    opt = torch.optim.AdamW([model.sid_embeddings])
    from sidrec.training.loop import TrainResult

    run_dir = tmp_path / "manual" / key
    save_checkpoint(run_dir, 2, model, opt, TrainResult(losses=[1.0, 2.0]), key)
    first = run_dir / "ckpt-0000002"
    keep = tmp_path / "keep"
    import shutil

    shutil.copytree(first, keep)
    save_checkpoint(run_dir, 4, model, opt, TrainResult(losses=[1.0, 2.0, 3.0, 4.0]), key)
    assert [p.name for p in run_dir.glob("ckpt-*")] == ["ckpt-0000004"]  # only the newest is kept
    shutil.copytree(keep, first)
    (run_dir / "ckpt-0000004" / "state.safetensors").write_bytes(b"truncated")
    meta = load_checkpoint(run_dir, model, opt, key)
    assert meta is not None and meta["step"] == 2
    assert load_checkpoint(run_dir, model, opt, other) is None  # other run: ignored

    # the full path: a finished run leaves no checkpoint behind
    res = train(model, encoder, rows, cfg.train, cfg.seed, compute_dtype(cfg), progress=False, checkpoint_dir=tmp_path / "ck")
    assert res.steps == 6 and res.resumed_from == 0 and not any((tmp_path / "ck").glob("*/ckpt-*"))


def test_a_checkpoint_from_another_optimizer_layout_is_not_resumed(tmp_path):
    """The optimizer's moments are stored by position; a checkpoint written with the parameters in other groups (another
    order) would put them on the wrong tensors: it is skipped, and the same layout resumes."""
    import torch

    from sidrec.stages import build_model
    from sidrec.training.loop import TrainResult, load_checkpoint, save_checkpoint, trainable_parameters

    _, bundle, cfg = setup(tmp_path / "ck", steps=2, checkpoint_every=1)
    torch.manual_seed(0)
    model, _, _ = build_model(cfg, bundle)
    named = trainable_parameters(model)
    table, lora = named[0][1], next(p for _, p in named if p.shape != named[0][1].shape)
    opt = torch.optim.AdamW([{"params": [table]}, {"params": [lora]}])
    (table.sum() + lora.sum()).backward()
    opt.step()
    save_checkpoint(tmp_path / "run", 1, model, opt, TrainResult(losses=[1.0]), "k", params=named)
    swapped = torch.optim.AdamW([{"params": [lora]}, {"params": [table]}])
    assert load_checkpoint(tmp_path / "run", model, swapped, "k", params=named) is None
    same = torch.optim.AdamW([{"params": [table]}, {"params": [lora]}])
    meta = load_checkpoint(tmp_path / "run", model, same, "k", params=named)
    assert meta is not None and torch.equal(same.state[table]["exp_avg"], opt.state[table]["exp_avg"])


if __name__ == "__main__":  # child process for the kill test
    os.environ.setdefault("SIDREC_PROGRESS", "0")
    m = run_finetune(Path(sys.argv[1]), Path(sys.argv[2]))
    print(json.dumps(m.meta["train"]))
