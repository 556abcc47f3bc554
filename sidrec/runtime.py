"""The process's runtime settings, in one leaf module (imports nothing else from sidrec but config and
errors): CPU threads, compute dtype, device, seeds, whether to show progress bars, and the one place
the state folder is resolved.

The state folder (``$SIDREC_HOME``, default ``<repo>/.sidrec``) holds the local MLflow store and its
artifacts, the ZenML store, fine-tuning checkpoints, the schedule's lock and logs. It is read from the
environment at call time, so a CLI or test that sets ``SIDREC_HOME`` after import is still obeyed.
"""
from __future__ import annotations

import os
from pathlib import Path

from typing import TYPE_CHECKING

from sidrec.config import REPO_ROOT, RunConfig

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI can resolve the state folder cheaply
    import torch


def state_home() -> Path:
    """``$SIDREC_HOME``, else ``<repo>/.sidrec`` (never the current directory)."""
    return Path(os.environ.get("SIDREC_HOME") or REPO_ROOT / ".sidrec")


# third-party deprecation notices a user can do nothing about (issue 14: a clean console)
QUIET_FUTURE_WARNINGS = (r".*is_gradient_checkpointing.* is deprecated", r"You are using a Python version .* google")


def quiet_third_party_warnings() -> None:
    """Hide the FutureWarnings in ``QUIET_FUTURE_WARNINGS`` (the CLI and the benchmarks call it at start)."""
    import warnings

    for message in QUIET_FUTURE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def set_threads(cfg: RunConfig) -> None:
    import torch

    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)


def compute_dtype(cfg: RunConfig) -> "torch.dtype":
    import torch

    return torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32


def resolve_device(cfg: RunConfig) -> "torch.device":
    """``model.device``: cpu, cuda (the process's LOCAL_RANK GPU under torchrun), or auto (cuda when visible)."""
    import torch

    from sidrec.errors import ModelError

    if cfg.model.device == "cpu" or (cfg.model.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ModelError("model.device: 'cuda' but no GPU is visible (torch.cuda.is_available() is False); use 'auto' or 'cpu'")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def progress_enabled() -> bool:
    return os.environ.get("SIDREC_PROGRESS", "1") != "0"


__all__ = ["compute_dtype", "progress_enabled", "resolve_device", "seed_everything", "set_threads", "state_home"]


def file_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (its folder created) for a ``with`` block: one process at a time
    creates or changes a shared store (the ZenML store, a Great Expectations file Data Context). Not POSIX:
    no lock."""
    import contextlib

    try:
        import fcntl
    except ImportError:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def lock():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    return lock()
