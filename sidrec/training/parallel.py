"""Data-parallel primitives and the launcher (a leaf: imports nothing from sidrec but errors).

``train.processes > 1``: :func:`finetune_distributed` writes the fine-tuning inputs (config, training
rows, SID index, dataset for SA-Init) to a job folder and :func:`launch` runs ``python -m
torch.distributed.run --standalone --nproc_per_node N -m sidrec.distributed JOB``; the worker side
(``sidrec.distributed``) builds the model through ``sidrec.stages`` and trains it with ``sidrec.training.loop``,
which uses :func:`world_info`, :func:`broadcast_parameters` and :func:`average_gradients` from here.
So the imports point one way: ``sidrec.distributed`` (worker) -> stages / train -> ``sidrec.training.parallel``.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, ``(0, 1)`` otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_parameters(params) -> None:
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def average_gradients(params) -> None:
    """Mean of every parameter's gradient over the processes (a missing gradient counts as zero)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


def checksum(params) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def launch(job: Path, processes: int, timeout: float | None = None) -> None:
    """Run the job with torchrun on this machine; raises ModelError with the failing rank's last lines."""
    from sidrec.errors import ModelError

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "sidrec.distributed", str(job)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, env=env, stdout=None, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-3:]
        raise ModelError(f"distributed fine-tuning ({processes} processes) failed with exit {proc.returncode}: "
                         + " | ".join(tail)[-600:])


def finetune_distributed(instructions, bundle, cfg, out_dir: Path, ds=None, log=None):
    """``sidrec.stages.finetune`` over ``cfg.train.processes`` processes; returns ``(folder, meta)`` of
    the trained recommender (``stages.finetune`` wraps them in a TrainedRecommender)."""
    import shutil
    import tempfile

    job = Path(tempfile.mkdtemp(prefix="sidrec-ddp-"))
    try:
        (job / "config.json").write_text(cfg.model_dump_json())
        instructions.part("train").reset_index(drop=True).to_parquet(job / "train.parquet")
        bundle.save(job / "bundle")
        if ds is not None and (cfg.index.sa_init or cfg.model.sid_init != "random" or cfg.model.item_head_distill > 0):
            ds.save(job / "dataset")
        launch(job, cfg.train.processes)
        meta = json.loads((job / "recommender" / "meta.json").read_text())
        if log is not None:
            for step, loss in meta["loss_curve"]:
                log(step, {"train/loss": loss})
        out_dir = Path(out_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(job / "recommender", out_dir)
        return out_dir, meta
    finally:
        shutil.rmtree(job, ignore_errors=True)


__all__ = ["average_gradients", "broadcast_parameters", "checksum", "finetune_distributed", "launch", "world_info"]
