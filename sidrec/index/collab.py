"""Collaborative item vectors for the SID index (``index.embedding: hybrid``).

A text embedding puts two items close when their descriptions are alike; a sequential recommender
also needs items close when the *same users* take them one after the other. This module computes
that second view from the **training split only** (every user's sequence without its valid and test
items, :meth:`sidrec.data.dataset.Dataset.train_sequences`), so no evaluation item leaks into the index:

1. co-occurrence counts of item pairs at most ``window`` positions apart in a training sequence;
2. positive PMI of those counts (with context-distribution smoothing, Levy & Goldberg 2015);
3. a truncated SVD of the PPMI matrix; an item's vector is its row of ``U * sqrt(S)``.

Items with no training interaction get a zero vector: they all share one collaborative position,
and the text part alone tells them apart. :func:`hybrid_inputs` concatenates the text and the
collaborative vectors with column weights that give each part a set share of the quantizer's input
variance (the quantizer standardises every column, so a plain concatenation would weight the parts by
their column counts). Within the collaborative part every SVD component then carries the same
weight (the components are whitened; their singular values order them, they do not weight them).
:func:`user_vectors` gives a user (dual index) the mean of their training items' vectors, so users share the items'
collaborative space. :func:`align` rotates vectors from a later run's SVD into an earlier run's basis (orthogonal
Procrustes on the items both runs know), so a champion's quantizer can place new items.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def cooccurrence_matrix(sequences: Iterable[Sequence[str]], item_ids: Sequence[str], window: int):
    """Symmetric scipy CSR matrix [n, n] of pair counts at distance 1..``window`` (unknown ids ignored)."""
    from scipy import sparse

    if window < 1:
        raise ValueError("window must be >= 1")
    row_of = {str(e): i for i, e in enumerate(item_ids)}
    n = len(row_of)
    rows, cols = [], []
    for seq in sequences:
        idx = np.fromiter((row_of.get(str(e), -1) for e in seq), dtype=np.int64)
        idx = idx[idx >= 0]
        for d in range(1, min(window, len(idx) - 1) + 1):
            a, b = idx[:-d], idx[d:]
            keep = a != b
            rows.append(a[keep])
            cols.append(b[keep])
    if rows:
        r, c = np.concatenate(rows), np.concatenate(cols)
    else:
        r = c = np.zeros(0, dtype=np.int64)
    data = np.ones(2 * len(r), dtype=np.float64)
    m = sparse.coo_matrix((data, (np.concatenate([r, c]), np.concatenate([c, r]))), shape=(n, n))
    return m.tocsr()  # duplicates summed


def ppmi(counts, smoothing: float = 0.75):
    """Positive PMI of a symmetric count matrix; context counts raised to ``smoothing``."""
    from scipy import sparse

    counts = sparse.csr_matrix(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return counts
    row = np.asarray(counts.sum(1)).ravel()
    ctx = row ** smoothing
    ctx = ctx / ctx.sum()
    coo = counts.tocoo()
    pmi = np.log(coo.data / total) - np.log(row[coo.row] / total) - np.log(ctx[coo.col])
    keep = pmi > 0
    return sparse.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=counts.shape)


def cooccurrence_vectors(sequences: Iterable[Sequence[str]], item_ids: Sequence[str], dim: int = 64,
                         window: int = 5, seed: int = 0) -> np.ndarray:
    """[n_items, dim] float32 collaborative vectors (PPMI-SVD); zero rows for items never co-occurring.

    Deterministic for given inputs (fixed ARPACK start vector); ``dim`` is capped at ``n_items - 2``
    (columns beyond it are zero)."""
    from scipy.sparse.linalg import svds

    n = len(item_ids)
    out = np.zeros((n, dim), dtype=np.float32)
    mat = ppmi(cooccurrence_matrix(sequences, item_ids, window))
    k = min(dim, n - 2)
    if k < 1 or mat.nnz == 0:
        return out
    v0 = np.random.default_rng(seed).standard_normal(n)
    u, s, _ = svds(mat, k=k, v0=v0, solver="arpack")
    order = np.argsort(-s)
    u, s = u[:, order], s[order]
    vec = u * np.sqrt(np.maximum(s, 0.0))
    # a sign convention per column (SVD signs are arbitrary): the largest-magnitude entry is positive
    flip = np.sign(vec[np.abs(vec).argmax(0), np.arange(k)])
    out[:, :k] = (vec * np.where(flip == 0, 1.0, flip)).astype(np.float32)
    return out


def hybrid_inputs(text: np.ndarray, collab: np.ndarray, collab_share: float) -> tuple[np.ndarray, np.ndarray]:
    """``(x, column_weights)``: ``[text | collab]`` and per-column weights such that, after the
    quantizer standardises each column, the collaborative columns carry ``collab_share`` of the total
    variance and the text columns the rest."""
    text = np.asarray(text, dtype=np.float32)
    collab = np.asarray(collab, dtype=np.float32)
    if text.shape[0] != collab.shape[0]:
        raise ValueError(f"text has {text.shape[0]} rows, collaborative vectors {collab.shape[0]}")
    if not 0.0 < collab_share < 1.0:
        raise ValueError("collab_share must be strictly between 0 and 1")
    dt, dc = text.shape[1], collab.shape[1]
    # constant columns (an SVD rank below dim on a tiny catalog) are zero after standardising: they get no share
    live = collab.std(0) > 1e-8
    n_live = max(int(live.sum()), 1)
    wc = np.where(live, np.sqrt(collab_share / n_live), 1.0)
    w = np.concatenate([np.full(dt, np.sqrt((1.0 - collab_share) / dt)), wc])
    return np.concatenate([text, collab], axis=1), w.astype(np.float32)


def user_vectors(sequences: Iterable[Sequence[str]], item_ids: Sequence[str], item_vectors: np.ndarray) -> np.ndarray:
    """One row per sequence (a user's *training* items): the mean of its items' rows of ``item_vectors`` (rows in
    ``item_ids`` order; an item repeated in the sequence counts each time, an unknown one is skipped; a sequence with
    no known item gets zeros)."""
    row = {str(e): i for i, e in enumerate(item_ids)}
    vectors = np.asarray(item_vectors, dtype=np.float32)
    zero = np.zeros(vectors.shape[1], dtype=np.float32)
    rows = []
    for seq in sequences:
        idx = [row[str(i)] for i in seq if str(i) in row]
        rows.append(vectors[idx].mean(0) if idx else zero)
    return np.stack(rows) if rows else np.zeros((0, vectors.shape[1]), dtype=np.float32)


def align(reference_ids: Sequence[str], reference: np.ndarray, ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
    """``vectors`` (rows in ``ids`` order) rotated into the basis of ``reference`` (rows in
    ``reference_ids`` order): the orthogonal map that best fits the items both sets share
    (orthogonal Procrustes). ``ValueError`` if fewer than 2 items are shared."""
    ref_row = {str(e): i for i, e in enumerate(reference_ids)}
    pairs = [(i, ref_row[str(e)]) for i, e in enumerate(ids) if str(e) in ref_row]
    if len(pairs) < 2:
        raise ValueError(f"only {len(pairs)} item(s) in common with the reference: cannot align collaborative vectors")
    a = np.asarray(vectors, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"collaborative vectors have {a.shape[1]} columns, the reference {b.shape[1]}")
    mine, theirs = (np.array(p) for p in zip(*pairs))
    u, _, vt = np.linalg.svd(a[mine].T @ b[theirs])
    return (a @ (u @ vt)).astype(np.float32)


__all__ = ["align", "cooccurrence_matrix", "cooccurrence_vectors", "hybrid_inputs", "ppmi"]
