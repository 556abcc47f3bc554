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
    """The autocast dtype of ``model.dtype`` on this run's device (``dtype_named``)."""
    import torch

    cuda = cfg.model.device == "cuda" or (cfg.model.device == "auto" and torch.cuda.is_available())
    return dtype_named(cfg.model.dtype, "cuda" if cuda else "cpu")


def autocast(device, dtype: "torch.dtype"):
    """The compute-dtype context of a forward pass on ``device`` (a ``torch.device`` or its type): autocast to
    ``dtype``, off for float32."""
    import torch

    kind = device if isinstance(device, str) else device.type
    return torch.autocast(kind, dtype=dtype, enabled=dtype != torch.float32)


def compute_dtype_name(cfg: RunConfig) -> str:
    """:func:`compute_dtype` as a plain name (``float32``, ``bfloat16``): what run metadata, tags and cache keys record."""
    return str(compute_dtype(cfg)).removeprefix("torch.")


def dtype_named(name: str, device: str = "cpu") -> "torch.dtype":
    """``float32``, ``bfloat16``, or ``auto``: bfloat16 where this hardware computes it natively (a CUDA GPU that
    supports it; a CPU whose bfloat16 matmul is at most ``BF16_SLOWDOWN_LIMIT`` x the float32 one, measured once per
    process), else float32. A CPU without native bfloat16 (AVX2 only) emulates it at ~1 GFLOP/s, 100x and more below
    float32 (BENCHMARKS, "bfloat16 on a CPU without it"), which turns the quickstart's minutes into hours. An explicit
    ``bfloat16`` is obeyed, with a warning where it is that slow."""
    import torch

    if name == "float32":
        return torch.float32
    if device == "cuda":
        fast = torch.cuda.is_bf16_supported()
    else:
        fast = cpu_bf16_slowdown() <= BF16_SLOWDOWN_LIMIT
    if name == "bfloat16":
        if not fast:
            _warn_slow_bf16(device)
        return torch.bfloat16
    if name != "auto":
        raise ValueError(f"model.dtype: unknown value {name!r} (float32, bfloat16 or auto)")
    return torch.bfloat16 if fast else torch.float32


BF16_SLOWDOWN_LIMIT = 2.0  # natively 0.3-1x float32's time; emulated on AVX2, 100x and more
_BF16_SLOWDOWN: list[float] = []
_WARNED: set[str] = set()


def cpu_bf16_slowdown() -> float:
    """bfloat16 matmul time / float32 matmul time on this CPU ([128 x 512] @ [512 x 512], best of 3), measured once
    per process (~5 ms with native bfloat16, ~0.3 s without)."""
    if not _BF16_SLOWDOWN:
        import time

        import torch

        a, b = torch.randn(128, 512), torch.randn(512, 512)
        best = {}
        for dt in (torch.float32, torch.bfloat16):
            x, y = a.to(dt), b.to(dt)
            x @ y  # warm-up
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                x @ y
                times.append(time.perf_counter() - t0)
            best[dt] = max(min(times), 1e-9)
        _BF16_SLOWDOWN.append(best[torch.bfloat16] / best[torch.float32])
    return _BF16_SLOWDOWN[0]


def _warn_slow_bf16(device: str) -> None:
    if device in _WARNED:
        return
    _WARNED.add(device)
    import logging

    what = "this GPU does not support bfloat16" if device == "cuda" else (
        f"bfloat16 matmuls run {cpu_bf16_slowdown():.0f}x slower than float32 on this CPU (no native bfloat16)")
    logging.getLogger("sidrec").warning("model.dtype: bfloat16, but %s; set model.dtype: auto (or float32) to train and "
                                        "decode in float32 here", what)


def resolve_device(cfg: RunConfig) -> "torch.device":
    """``model.device``: cpu, cuda (the process's LOCAL_RANK GPU under torchrun), or auto (cuda when visible)."""
    import torch

    from sidrec.errors import ModelError

    if cfg.model.device == "cpu" or (cfg.model.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ModelError("model.device: 'cuda' but no GPU is visible (torch.cuda.is_available() is False); use 'auto' or 'cpu'")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch, and set :func:`deterministic_kernels` (``train.deterministic``)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    deterministic_kernels(deterministic)


def deterministic_kernels(on: bool = True) -> None:
    """``train.deterministic``: torch's deterministic kernels, so one seed gives one model in every process.

    With more than one CPU thread, the backward of advanced indexing (``x[index]``; ``index_put_`` with
    ``accumulate=True``) sums the gradients of repeated rows in an order that depends on thread timing: two
    processes with the same seed, data and first loss part after a few steps, and on the quickstart recipe the
    trained models differed by about +-7% test Recall@10 (BENCHMARKS, session 36). The deterministic kernel sorts
    the indices first. ``warn_only``: an op with no deterministic kernel warns instead of failing the run; on CUDA
    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` set before its first call (set here unless the user set it)."""
    import torch

    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)


def progress_enabled() -> bool:
    return os.environ.get("SIDREC_PROGRESS", "1") != "0"


__all__ = ["autocast", "compute_dtype", "cpu_bf16_slowdown", "deterministic_kernels", "dtype_named", "progress_enabled", "resolve_device", "seed_everything", "set_threads", "state_home"]


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
