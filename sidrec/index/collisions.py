"""Unique semantic IDs from raw quantizer codes, and statistics of a code table.

``resolve_collisions`` appends a disambiguation level; ``spread_collisions`` (``nearest_free``) moves
colliding items to the nearest free code of the last level(s); ``append_disambiguated`` gives new
entities free codes in an existing index. Works on any state with ``codebooks``, ``latent`` and
``residual_assign`` (:class:`sidrec.index.quantize.QuantizerState`), without importing it."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from sidrec.errors import IndexCapacityError
from sidrec.index.kmeans import sq_dists


def _group_ids(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group id of every row (identical rows share one) and the group sizes."""
    if rows.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, inv, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    return inv.reshape(-1).astype(np.int64), counts.astype(np.int64)


def _rank_in_group(inv: np.ndarray, n_groups: int) -> np.ndarray:
    """Position of every row inside its group, in row order."""
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty_like(inv)
    rank[order] = np.arange(inv.shape[0]) - starts[inv[order]]
    return rank


def resolve_collisions(raw_codes: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Make code rows unique by appending one level when needed.

    Returns ``(codes, extra_level_sizes)``: if every raw row is already unique the
    codes come back unchanged and ``extra_level_sizes == []``; otherwise one column
    is appended holding each item's index within its group of identical raw
    codes (row order), and ``extra_level_sizes == [max group size]``.
    """
    raw = np.asarray(raw_codes, dtype=np.int64)
    if raw.ndim != 2:
        raise ValueError(f"raw_codes must be 2-D [n, M], got shape {raw.shape}")
    inv, counts = _group_ids(raw)
    if counts.size == 0 or counts.max() <= 1:
        return raw.copy(), []
    rank = _rank_in_group(inv, counts.size)
    return np.concatenate([raw, rank[:, None]], 1), [int(counts.max())]


def nearest_free_last(key: tuple, residual: torch.Tensor, last_book: torch.Tensor, taken: set) -> Optional[tuple]:
    """``key`` with its last code moved to the nearest last-level codeword (to ``residual`` [1, d], the
    residual entering the last level) whose full tuple is not in ``taken``; None when all are taken."""
    dist = sq_dists(residual, last_book)[0]
    for c in torch.argsort(dist, stable=True).tolist():
        cand = key[:-1] + (int(c),)
        if cand not in taken:
            return cand
    return None


def spread_collisions(state: "QuantizerState", x: np.ndarray, raw_codes: np.ndarray) -> np.ndarray:
    """Unique ``M``-level codes without an extra level (``index.collisions: nearest_free``).

    In each group of items with the same raw codes, the item nearest its codeword keeps the code;
    every other one (nearest first) moves to the free full code that reconstructs it best among
    (a) the last level's codewords under its prefix and, when all of those are taken, (b) every
    (second-to-last, last) codeword pair under its first ``M - 2`` codes. Only colliding items are
    re-encoded. Raises ValueError when even (b) is full (a codebook too small for the catalog)."""
    raw = np.asarray(raw_codes, dtype=np.int64)
    capacity = int(np.prod([int(cb.shape[0]) for cb in state.codebooks], dtype=np.float64))
    if raw.shape[0] > capacity:
        raise IndexCapacityError(f"index.collisions nearest_free: {raw.shape[0]} items but only {capacity} distinct codes "
                         f"({' x '.join(str(cb.shape[0]) for cb in state.codebooks)}); use a larger codebook_size, more levels "
                         "or collisions: extra_level")
    inv, counts = _group_ids(raw)
    if counts.size == 0 or counts.max() <= 1:
        return raw.copy()
    rows = np.nonzero(counts[inv] > 1)[0]
    z = state.latent(np.asarray(x)[rows])
    _, residuals = state.residual_assign(z)
    books = [torch.from_numpy(cb) for cb in state.codebooks]
    m = len(books)
    err = (residuals[-1] - books[-1][torch.from_numpy(raw[rows, -1])]).pow(2).sum(1).numpy()
    order = np.lexsort((err, inv[rows]))  # by group, nearest first
    codes = raw.copy()
    taken = {tuple(r) for r in raw.tolist()}
    last_group = -1
    for j in order:
        i = int(rows[j])
        if inv[i] != last_group:  # the nearest member of each group keeps its code
            last_group = inv[i]
            continue
        key = tuple(raw[i].tolist())
        choice = nearest_free_last(key, residuals[-1][j : j + 1], books[-1], taken)
        if choice is None and m >= 2:
            r2 = residuals[-2][j : j + 1] - books[-2]  # [N2, d]: residual after each second-to-last codeword
            pair = sq_dists(r2, books[-1])  # [N2, N]
            n_last = books[-1].shape[0]
            for flat in torch.argsort(pair.view(-1), stable=True).tolist():
                cand = key[:-2] + (flat // n_last, flat % n_last)
                if cand not in taken:
                    choice = cand
                    break
        if choice is None:
            raise IndexCapacityError(f"index.collisions nearest_free: every code near item {i}'s prefix {key[:-2]} is taken; "
                             "use a larger codebook_size or collisions: extra_level")
        codes[i] = choice
        taken.add(choice)
    return codes


def count_duplicates(codes: np.ndarray) -> int:
    """Number of rows that repeat an earlier row."""
    codes = np.asarray(codes)
    if codes.shape[0] == 0:
        return 0
    return int(codes.shape[0] - np.unique(codes, axis=0).shape[0])


def raw_collision_rate(raw_codes: np.ndarray) -> float:
    """1 - (#distinct rows) / n."""
    raw = np.asarray(raw_codes)
    n = raw.shape[0]
    return 0.0 if n == 0 else float(count_duplicates(raw) / n)


def prefix_cells(raw_codes: np.ndarray, last_size: int) -> dict[str, float]:
    """Where raw collisions can come from, on codes of two or more levels: items sharing all codes but the
    last form a prefix cell. ``overfull``: share of the items in a cell holding more than ``last_size``
    items (no last-level assignment separates them: the earlier levels' doing); ``in_room``: share of the
    items that repeat an earlier item's code although their cell has room (the last level's doing; the
    raw collision rate is this plus the repeats inside overfull cells);
    ``prefix_cells``: distinct cells per item; ``largest_cell``: items in the largest cell."""
    raw = np.asarray(raw_codes, dtype=np.int64)
    n = raw.shape[0]
    if n == 0:
        return {"overfull": 0.0, "in_room": 0.0, "prefix_cells": 0.0, "largest_cell": 0.0}
    cell, cell_counts = _group_ids(raw[:, :-1])
    code, _ = _group_ids(raw)
    overfull = cell_counts[cell] > last_size
    duplicate = np.ones(n, dtype=bool)
    duplicate[np.unique(code, return_index=True)[1]] = False  # the first holder of a code does not collide
    return {"overfull": float(overfull.mean()), "in_room": float((duplicate & ~overfull).mean()),
            "prefix_cells": float(cell_counts.size / n), "largest_cell": float(cell_counts.max())}


def code_stats(codes: np.ndarray, level_sizes: list[int], raw_levels: Optional[int] = None) -> dict[str, float]:
    """Usage statistics per level.

    ``utilization_level_i``: share of the level's codes used by at least one row;
    ``perplexity_level_i``: exp(entropy) of the code usage distribution;
    ``max_group_size``: largest group of rows sharing the first ``raw_levels``
    columns (default: all columns, i.e. 1 for unique codes).
    """
    codes = np.asarray(codes, dtype=np.int64)
    n = codes.shape[0]
    out: dict[str, float] = {"num_entities": float(n), "num_levels": float(codes.shape[1])}
    for i, size in enumerate(level_sizes):
        counts = np.bincount(codes[:, i], minlength=size).astype(np.float64) if n else np.zeros(size)
        out[f"utilization_level_{i}"] = float((counts > 0).sum() / max(size, 1))
        p = counts[counts > 0] / max(n, 1)
        out[f"perplexity_level_{i}"] = float(np.exp(-(p * np.log(p)).sum())) if n else 0.0
    k = codes.shape[1] if raw_levels is None else raw_levels
    _, counts = _group_ids(codes[:, :k])
    out["max_group_size"] = float(counts.max()) if counts.size else 0.0
    return out


def append_disambiguated(existing_codes: np.ndarray, level_sizes: list[int], raw: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Full codes for new entities whose first ``M`` codes are ``raw``, given an index with a
    disambiguation level (``M + 1`` levels): each new entity takes the next free extra index in its raw
    group (``max existing + 1 + its rank among the new ones``); the last level grows when needed.
    Existing codes never change. Returns ``(codes [m, M + 1], new_level_sizes)``."""
    sizes = [int(s) for s in level_sizes]
    m = len(sizes) - 1
    existing = np.asarray(existing_codes, dtype=np.int64).reshape(-1, len(sizes))
    raw = np.asarray(raw, dtype=np.int64).reshape(-1, m)
    next_free: dict[tuple, int] = {}
    for row in existing:
        key = tuple(row[:m].tolist())
        next_free[key] = max(next_free.get(key, 0), int(row[m]) + 1)
    inv, counts = _group_ids(raw)
    rank = _rank_in_group(inv, counts.size)
    base = np.array([next_free.get(tuple(r.tolist()), 0) for r in raw], dtype=np.int64)
    extra = base + rank
    codes = np.concatenate([raw, extra[:, None]], 1)
    if len(raw):
        sizes[m] = max(sizes[m], int(extra.max()) + 1)
    return codes, sizes
