"""Data-parallel LoRA fine-tuning across processes (``train.processes > 1``).

The fine-tuning stage writes its inputs (config, training rows, SID index, dataset for SA-Init) to a
job folder and launches ``python -m torch.distributed.run --standalone --nproc_per_node N -m
sidrec.distributed JOB``. Every process builds the same model (same seed; rank 0's trainable tensors
are broadcast to be sure), takes its own batches (``sidrec.training.loop`` splits a ``steps x N`` batch list
by rank), and averages gradients with ``all_reduce`` after each backward pass, so all replicas stay
identical -- the global batch is ``N x train.batch_size``. Backend: NCCL with one GPU per process when
CUDA is visible, gloo on CPU (what the tests run). Rank 0 saves the recommender and the loss curve;
every rank writes a checksum of its trainable tensors (``replica-<rank>.json``) so that replicas in
sync can be checked.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

# the primitives and the launcher live in sidrec.training.parallel (a leaf); importable from here as before
from sidrec.training.parallel import average_gradients, broadcast_parameters, checksum, finetune_distributed, launch, world_info  # noqa: F401


def _worker(job: Path) -> None:
    import torch.distributed as dist

    from sidrec.artifacts import IndexBundle
    from sidrec.config import RunConfig
    from sidrec.data.dataset import Dataset
    from sidrec.model.sid_model import save_recommender
    from sidrec.runtime import compute_dtype, progress_enabled, seed_everything
    from sidrec.stages import build_model, calibrate, checkpoint_dir, recommender_meta
    from sidrec.training.loop import train

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
        seed_everything(cfg.seed, cfg.train.deterministic)
        bundle = IndexBundle.load(job / "bundle")
        ds = Dataset.load(job / "dataset") if (job / "dataset").exists() else None
        rows = pd.read_parquet(job / "train.parquet")
        model, tok, encoder = build_model(cfg, bundle, ds)
        calibrate(model, encoder, rows, cfg)
        losses: list[tuple[int, float]] = []
        res = train(model, encoder, rows, cfg.train, cfg.seed, compute_dtype(cfg),
                    lambda s, m: losses.append((s, m["train/loss"])), progress_enabled() and rank == 0,
                    checkpoint_dir=checkpoint_dir(cfg))
        from sidrec.training.loop import trainable_parameters

        (job / f"replica-{rank}.json").write_text(json.dumps({"rank": rank, "checksum": checksum(p for _, p in trainable_parameters(model))}))
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
