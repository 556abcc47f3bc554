"""K-means and chunked nearest-codeword search (torch, CPU, deterministic given a generator): the
arithmetic under every residual quantizer (:mod:`sidrec.index.quantize`) and the collision handling
(:mod:`sidrec.index.collisions`)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

_CHUNK = 16384  # rows per distance computation chunk
MAX_POINTS_PER_CENTROID = 256  # k-means fits on at most this many rows per centroid (faiss's default)


def as_matrix(x, name: str = "x") -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, d], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{name} has {bad} rows with NaN/inf values")
    return arr


def nearest(x: torch.Tensor, c: torch.Tensor, price: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Index of the nearest row of ``c`` for every row of ``x`` (first on ties); with ``price`` (one number
    per row of ``c``) the row minimising squared distance + price (:func:`balance_prices`)."""
    out = torch.empty(x.shape[0], dtype=torch.long)
    c_sq = (c * c).sum(1)
    if price is not None:
        c_sq = c_sq + price
    for s in range(0, x.shape[0], _CHUNK):
        xb = x[s : s + _CHUNK]
        d = c_sq[None, :] - 2.0 * (xb @ c.T)  # ||x||^2 is constant per row
        out[s : s + _CHUNK] = d.argmin(1)
    return out


def subtract_nearest_(r: torch.Tensor, c: torch.Tensor, price: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In place, chunk by chunk: ``r[i] -= c[nearest(r[i], c, price)]``; returns the nearest indices.

    Chunking keeps the gathered codewords to ``_CHUNK`` rows (a full ``c[idx]`` is as big as ``r``)."""
    out = torch.empty(r.shape[0], dtype=torch.long)
    for s in range(0, r.shape[0], _CHUNK):
        rb = r[s : s + _CHUNK]
        idx = nearest(rb, c, price)
        rb.sub_(c[idx])
        out[s : s + _CHUNK] = idx
    return out


def balance_prices(x: torch.Tensor, c: torch.Tensor, iters: int = 200, step: float = 0.1) -> torch.Tensor:
    """``[k]`` prices that balance the assignment of ``x`` to ``c``: ``argmin_j ||x - c_j||^2 + price_j``
    gives every code close to ``n / k`` rows. A code holding more rows than its share raises its price, one
    holding fewer lowers it, by ``step`` times the mean squared distance times the relative excess, the
    step decaying as ``1/sqrt(t)`` (a dual-ascent / auction view of size-constrained k-means). The
    prices are a deterministic function of ``x`` and ``c``; storing them with the codebook assigns new
    rows by the same rule."""
    d = sq_dists(x, c)
    k = c.shape[0]
    target = x.shape[0] / k
    scale = float(d.mean())
    price = torch.zeros(k, dtype=d.dtype)
    for t in range(iters):
        counts = torch.bincount((d + price).argmin(1), minlength=k).to(d.dtype)
        price += step * scale * (counts - target) / target / (1.0 + t) ** 0.5
    return price - price.min()  # the assignment only sees differences


def sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    return d.clamp_min_(0.0)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int,
    generator: torch.Generator,
    max_points_per_centroid: Optional[int] = MAX_POINTS_PER_CENTROID,
) -> torch.Tensor:
    """Lloyd k-means with k-means++ init; returns ``[k, d]`` centroids.

    If ``x`` has more than ``k * max_points_per_centroid`` rows, the centroids are
    fitted on a random sample of that many rows (as faiss does; 256 per centroid
    is its default): the fit cost stops growing with the catalog, and only the
    final assignment (done by the caller) sees every row. ``None`` fits on all rows.

    If ``x`` has fewer than ``k`` distinct rows, only that many centroids are
    fitted and the remaining slots repeat the first centroid (``argmin`` picks
    the first of equal distances, so the repeats are never assigned).
    Empty clusters are re-seeded with the points farthest from their centroid.
    """
    x = x.float()
    if max_points_per_centroid and x.shape[0] > k * max_points_per_centroid:
        x = x[torch.randperm(x.shape[0], generator=generator)[: k * max_points_per_centroid]]
    n, d = x.shape
    n_distinct = int(torch.unique(x, dim=0).shape[0])
    k_eff = max(1, min(k, n_distinct))

    # k-means++ init
    x_sq = (x * x).sum(1)

    def d2_to(i: int) -> torch.Tensor:
        d = x_sq - 2.0 * (x @ x[i]) + x_sq[i]
        d[i] = 0.0
        return d.clamp_min_(0.0)

    first = int(torch.randint(n, (1,), generator=generator))
    idx = [first]
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[first] = True
    d2 = d2_to(first)
    for _ in range(1, k_eff):
        d2 = d2.masked_fill(chosen, 0.0)
        total = d2.sum()
        if float(total) <= 0:
            break
        nxt = int(torch.multinomial(d2 / total, 1, generator=generator))
        idx.append(nxt)
        chosen[nxt] = True
        d2 = torch.minimum(d2, d2_to(nxt))
    c = x[idx].clone()
    k_eff = c.shape[0]

    assign = None
    for _ in range(iters):
        new_assign = nearest(x, c)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros(k_eff, d, dtype=x.dtype).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k_eff)
        empty = (counts == 0).nonzero().flatten()
        nonempty = counts > 0
        c[nonempty] = sums[nonempty] / counts[nonempty, None].float()
        if empty.numel():
            # re-seed empty clusters with the worst-fitted points
            err = ((x - c[assign]) ** 2).sum(1)
            far = torch.argsort(err, descending=True, stable=True)[: empty.numel()]
            c[empty] = x[far]
            assign = None  # force another pass
    if k_eff < k:
        c = torch.cat([c, c[:1].expand(k - k_eff, -1)], 0)
    return c
