"""Top-K ranking metrics for leave-one-out next-item evaluation.

Conventions shared by every function here:

- ``ranked`` is an int array ``[U, K]`` of item indices, best first; ``-1``
  marks an empty slot (e.g. a generative model that produced fewer than K
  valid items). An empty slot never matches a target.
- ``targets`` is an int array ``[U]``: the single held-out item per user.
- ``recall_at_k`` is the hit rate (one target per user); ``ndcg_at_k`` is
  ``1 / log2(rank + 2)`` with a 0-based rank when the target is in the top k,
  else 0 (the ideal DCG is 1 with one relevant item). Both are averaged over
  users.
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np


def _check_ranked(ranked: np.ndarray) -> np.ndarray:
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be a 2-D [users, K] array, got shape {ranked.shape}")
    if ranked.size and not np.issubdtype(ranked.dtype, np.integer):
        raise ValueError(f"ranked must hold integer item indices, got dtype {ranked.dtype}")
    return ranked


def target_ranks(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based position of each user's target in ``ranked``, or -1 when absent. Shape [U]."""
    ranked = _check_ranked(ranked)
    targets = np.asarray(targets).reshape(-1)
    if targets.shape[0] != ranked.shape[0]:
        raise ValueError(f"ranked has {ranked.shape[0]} users but targets has {targets.shape[0]}")
    if (targets < 0).any():
        raise ValueError("targets must be valid item indices (>= 0)")
    hit = ranked == targets[:, None]  # -1 slots never match a target >= 0
    any_hit = hit.any(axis=1)
    first = hit.argmax(axis=1)
    return np.where(any_hit, first, -1).astype(np.int64)


def per_user_hits(ranked: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Bool [U]: whether each user's target is in its top ``k``."""
    ranked = _check_ranked(ranked)
    _check_k(k, ranked.shape[1])
    r = target_ranks(ranked, targets)
    return (r >= 0) & (r < k)


def _check_k(k: int, width: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > width:
        raise ValueError(f"k={k} is larger than the ranked list width {width}: rank more items (beams/top-k) or lower k")


def ranking_metrics(ranked: np.ndarray, targets: np.ndarray, ks: Iterable[int] = (1, 5, 10, 20)) -> dict[str, float]:
    """``recall_at_{k}`` and ``ndcg_at_{k}`` for every k in ``ks``, averaged over users.

    Raises ValueError when a k exceeds ``ranked.shape[1]``, when the user counts
    differ, or when there are no users.
    """
    ranked = _check_ranked(ranked)
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks must not be empty")
    for k in ks:
        _check_k(k, ranked.shape[1])
    if ranked.shape[0] == 0:
        raise ValueError("no users to evaluate (ranked has 0 rows)")
    r = target_ranks(ranked, targets)
    gains = np.where(r >= 0, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)
    out: dict[str, float] = {}
    for k in ks:
        inside = (r >= 0) & (r < k)
        out[f"recall_at_{k}"] = float(inside.mean())
        out[f"ndcg_at_{k}"] = float(np.where(inside, gains, 0.0).mean())
    return out


def coverage(ranked: np.ndarray, n_items: int, k: int = 10) -> float:
    """Catalog coverage: distinct valid items (0 <= i < n_items) in the top ``k`` across users / n_items."""
    ranked = _check_ranked(ranked)
    _check_k(k, ranked.shape[1])
    if n_items <= 0:
        raise ValueError(f"n_items must be positive, got {n_items}")
    top = ranked[:, :k].reshape(-1)
    top = top[(top >= 0) & (top < n_items)]
    return float(np.unique(top).size / n_items)


def invalid_rate(ranked_valid_mask: np.ndarray, ranked: np.ndarray | None = None) -> float:
    """Share of emitted slots that are not catalog items.

    ``ranked_valid_mask`` is a bool ``[U, K]`` array: True where the slot holds a
    valid catalog item. Without ``ranked``, every slot counts as emitted. With
    ``ranked`` (same shape), slots holding ``-1`` are empty: neither emitted nor
    invalid. Returns ``invalid / emitted``, 0.0 when nothing was emitted.
    """
    mask = np.asarray(ranked_valid_mask, dtype=bool)
    if ranked is None:
        emitted = np.ones_like(mask, dtype=bool)
    else:
        ranked = np.asarray(ranked)
        if ranked.shape != mask.shape:
            raise ValueError(f"ranked shape {ranked.shape} differs from mask shape {mask.shape}")
        emitted = ranked != -1
    n_emitted = int(emitted.sum())
    if n_emitted == 0:
        return 0.0
    return float((emitted & ~mask).sum() / n_emitted)


def drop_seen(ranked: np.ndarray, seen: list, scores: Optional[np.ndarray] = None):
    """Remove each row's ``seen`` item indices from its ranking (later items move up, the end is padded
    with -1; ``scores`` follow, padded with -inf). Returns ``ranked`` or ``(ranked, scores)``."""
    ranked = np.asarray(ranked)
    out = np.full_like(ranked, -1)
    sc = None if scores is None else np.full(np.shape(scores), -np.inf, dtype=np.float64)
    for i, (row, s) in enumerate(zip(ranked, seen)):
        keep = [j for j, r in enumerate(row) if r >= 0 and int(r) not in s]
        out[i, :len(keep)] = row[keep]
        if sc is not None:
            sc[i, :len(keep)] = np.asarray(scores[i])[keep]
    return out if scores is None else (out, sc)
