"""Data-parallel LoRA fine-tuning across processes (``train.processes > 1``).

The fine-tuning stage writes its inputs (config, training rows, SID index, dataset for SA-Init) to a
job folder and launches ``python -m torch.distributed.run --standalone --nproc_per_node N -m
sidrec.distributed JOB``. Every process builds the same model (same seed; rank 0's trainable tensors
are broadcast to be sure), takes its own batches (``sidrec.train`` splits a ``steps x N`` batch list
by rank), and averages gradients with ``all_reduce`` after each backward pass, so all replicas stay
identical -- the global batch is ``N x train.batch_size``. Backend: NCCL with one GPU per process when
CUDA is visible, gloo on CPU (what the tests run). Rank 0 saves the recommender and the loss curve;
every rank writes a checksum of its trainable tensors (``replica-<rank>.json``) so that replicas in
sync can be checked.
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
    """``sidrec.stages.finetune`` over ``cfg.train.processes`` processes; returns a TrainedRecommender."""
    import shutil
    import tempfile

    from sidrec.artifacts import TrainedRecommender

    job = Path(tempfile.mkdtemp(prefix="sidrec-ddp-"))
    try:
        (job / "config.json").write_text(cfg.model_dump_json())
        instructions.part("train").reset_index(drop=True).to_parquet(job / "train.parquet")
        bundle.save(job / "bundle")
        if ds is not None and (cfg.index.sa_init or cfg.model.sid_init != "random"):
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
        return TrainedRecommender(path=out_dir, meta=meta)
    finally:
        shutil.rmtree(job, ignore_errors=True)


def _worker(job: Path) -> None:
    import torch.distributed as dist

    from sidrec.artifacts import IndexBundle
    from sidrec.config import RunConfig
    from sidrec.data import Dataset
    from sidrec.model import save_recommender
    from sidrec.stages import build_model, calibrate, checkpoint_dir, compute_dtype, progress_enabled, recommender_meta, seed_everything
    from sidrec.train import train

    import pandas as pd

    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rank, world = world_info()
        cfg = RunConfig.model_validate_json((job / "config.json").read_text())
        torch.set_num_threads(max(1, (cfg.train.threads or os.cpu_count() or 1) // world))
        seed_everything(cfg.seed)
        bundle = IndexBundle.load(job / "bundle")
        ds = Dataset.load(job / "dataset") if (job / "dataset").exists() else None
        rows = pd.read_parquet(job / "train.parquet")
        model, tok, encoder = build_model(cfg, bundle, ds)
        calibrate(model, encoder, rows, cfg)
        losses: list[tuple[int, float]] = []
        res = train(model, encoder, rows, cfg.train, cfg.seed, compute_dtype(cfg),
                    lambda s, m: losses.append((s, m["train/loss"])), progress_enabled() and rank == 0,
                    checkpoint_dir=checkpoint_dir(cfg))
        from sidrec.train import _trainable

        (job / f"replica-{rank}.json").write_text(json.dumps({"rank": rank, "checksum": checksum(p for _, p in _trainable(model))}))
        dist.barrier()
        if rank == 0:
            replicas = [json.loads((job / f"replica-{r}.json").read_text())["checksum"] for r in range(world)]
            summary = res.summary()
            summary.update({"train/processes": world, "train/global_batch": cfg.train.batch_size * world,
                            "train/examples": summary["train/examples"] * world})  # rank 0 counted its own share
            meta = recommender_meta(cfg, model, summary, losses, replica_checksums=replicas)
            save_recommender(model, tok, job / "recommender", meta)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
