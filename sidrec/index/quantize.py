"""Semantic-ID quantizers: residual k-means (RQ-KMeans), RQ-VAE and LSH, their saved state, and the
one entry point :func:`quantize` (fit, assign, make unique). K-means and chunked nearest-codeword search
live in :mod:`sidrec.index.kmeans`, collision handling and code statistics in :mod:`sidrec.index.collisions`; both
are re-exported here.

Both turn an embedding matrix ``x [n, d]`` into ``M`` code levels of ``N`` codes
each. Identical raw code tuples are made unique by appending one extra level
(the index of the item inside its group of identical raw codes), so every
entity gets a distinct semantic ID.

The fitted quantizer is kept as a :class:`QuantizerState` (codebooks, input
standardisation and, for RQ-VAE, the MLP weights) so that new items can be
assigned later without retraining (:func:`assign_new`). States are saved as
safetensors + JSON only (no pickle).

Everything is deterministic given a seed on CPU.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from sidrec.index.collisions import (  # noqa: F401 -- re-exported: sidrec.index.quantize is where callers find them
    append_disambiguated,
    code_stats,
    count_duplicates,
    nearest_free_last,
    prefix_cells,
    raw_collision_rate,
    resolve_collisions,
    spread_collisions,
)
from sidrec.config import IndexConfig, RQVAEConfig
from sidrec.index.kmeans import (  # noqa: F401
    _CHUNK,
    MAX_POINTS_PER_CENTROID,  # read here by fit_rq_kmeans (module global, so a test can lower it)
    as_matrix,
    balance_prices,
    nearest,
    sq_dists,
    subtract_nearest_,
    kmeans,
)

STATE_FILE = "quantizer.safetensors"
META_FILE = "quantizer.json"
FORMAT_VERSION = 1
_ASSIGN_BLOCK = 65536  # rows standardised / encoded at a time by QuantizerState.assign


# --------------------------------------------------------------------------- helpers


def auto_codebook_size(n: int, levels: int) -> int:
    """Codebook size N for a catalog of ``n`` items and ``levels`` levels.

    Smallest power of two >= 4 * ceil(n ** (1/levels)), clamped to [4, 256], so N^M >= 4^M x the catalog
    (64x at M = 3) up to N's cap: with 3 levels, 64 codes up to 4,096 items, 128 up to 32,768, 256 above
    (MovieLens-100k's 1,682 items -> 64; Amazon Scientific's 4,385 -> 128). The root is computed exactly on
    integers. Room to spare keeps raw collisions low as catalogs grow (issue 14; BENCHMARKS.md, "Scale":
    "The same on Amazon Scientific").
    """
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    n = max(int(n), 1)
    root = max(int(round(n ** (1.0 / levels))), 1)
    while root**levels < n:  # exact integer ceil of the root
        root += 1
    while root > 1 and (root - 1) ** levels >= n:
        root -= 1
    target = 4 * root
    size = 1
    while size < target:
        size *= 2
    return int(min(max(size, 4), 256))


class _MLP(nn.Module):
    """Linear layers with ReLU in between (none after the last)."""

    def __init__(self, dims: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "_MLP":
        n_layers = len({k.split(".")[1] for k in state})
        dims = [state[f"layers.{i}.weight"].shape[1] for i in range(n_layers)]
        dims.append(state[f"layers.{n_layers - 1}.weight"].shape[0])
        m = cls(dims)
        m.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
        return m.eval()


def _mlp_state(m: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32).copy() for k, v in m.state_dict().items()}


# public names: the dynamic index's learned quantizer (sidrec.index.dynamic) builds and saves its MLPs with them
MLP = _MLP
mlp_state = _mlp_state


# --------------------------------------------------------------------------- state


@dataclass(eq=False)
class QuantizerState:
    """Everything needed to assign new vectors to codes later (no retraining).

    ``codebooks[l]`` is ``[N, d_code]``; inputs are standardised with
    ``(x - mean) / scale`` first. For ``rq_vae`` the standardised input goes
    through the ``encoder`` MLP before residual quantization and ``decoder``
    maps summed codewords back to the standardised input space. With ``residual`` both MLPs are
    skip connections (``z = x + encoder(x)``, ``x_hat = q + decoder(q)``): the dynamic index's learned
    quantizer (:mod:`sidrec.index.dynamic`), which starts as the identity on an RQ-KMeans state.
    ``prices`` (empty, or one ``[N]`` array per level) are added to the squared distances before each
    level's argmin: a balanced index (``index.balance``, :func:`sidrec.index.kmeans.balance_prices`).
    """

    kind: str  # "rq_kmeans" | "rq_vae"
    codebooks: list[np.ndarray]
    mean: np.ndarray
    scale: np.ndarray
    encoder: dict[str, np.ndarray] = field(default_factory=dict)
    decoder: dict[str, np.ndarray] = field(default_factory=dict)
    residual: bool = False
    prices: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self):
        if self.kind not in ("rq_kmeans", "rq_vae", "lsh"):
            raise ValueError(f"unknown quantizer kind {self.kind!r} (expected 'rq_kmeans', 'rq_vae' or 'lsh')")
        if self.kind == "lsh" and len(self.encoder) != len(self.codebooks):
            raise ValueError("an lsh state needs one hyperplane matrix per level (encoder['level_i'])")
        if not self.codebooks:
            raise ValueError("a quantizer needs at least one codebook")
        if self.kind == "rq_vae" and (not self.encoder or not self.decoder):
            raise ValueError("an rq_vae state needs encoder and decoder weights")
        self.codebooks = [np.asarray(c, dtype=np.float32) for c in self.codebooks]
        self.mean = np.asarray(self.mean, dtype=np.float32)
        self.scale = np.asarray(self.scale, dtype=np.float32)
        self.prices = [np.asarray(p, dtype=np.float32) for p in self.prices]
        if self.prices and [p.shape for p in self.prices] != [(c.shape[0],) for c in self.codebooks]:
            raise ValueError("prices need one [N] array per codebook")

    # -- shape info
    @property
    def levels(self) -> int:
        return len(self.codebooks)

    @property
    def codebook_sizes(self) -> list[int]:
        return [int(c.shape[0]) for c in self.codebooks]

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    # -- encoding
    def standardise(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / scale`` (float32): the space the codebooks of an ``rq_kmeans`` state live in."""
        x = as_matrix(x)
        if x.shape[1] != self.input_dim:
            raise ValueError(f"x has dimension {x.shape[1]} but the quantizer was fitted on {self.input_dim}")
        return _scaled(x, self.mean, self.scale)

    def latent(self, x: np.ndarray, encoder: Optional[nn.Module] = None) -> torch.Tensor:
        """Standardised input (a fresh tensor), through the encoder for rq_vae."""
        x = as_matrix(x)
        if x.shape[1] != self.input_dim:
            raise ValueError(f"x has dimension {x.shape[1]} but the quantizer was fitted on {self.input_dim}")
        z = torch.from_numpy(_scaled(x, self.mean, self.scale))
        if self.kind == "rq_vae":
            with torch.no_grad():
                e = (encoder or _MLP.from_state(self.encoder))(z)
                z = z + e if self.residual else e
        return z

    def residual_assign(self, z: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Greedy residual assignment: codes ``[n, M]`` and the residual entering each level."""
        r = z.clone()
        codes, residuals = [], []
        for cb, price in zip(self.codebooks, self._price_tensors()):
            c = torch.from_numpy(cb)
            residuals.append(r)
            idx = nearest(r, c, price)
            codes.append(idx)
            r = r - c[idx]
        return torch.stack(codes, 1), residuals

    def assign(self, x: np.ndarray) -> np.ndarray:
        """Raw ``[n, M]`` int64 codes (before collision resolution)."""
        if self.kind == "lsh":
            z = self.latent(x).numpy()
            return np.stack([lsh_codes(z, self.encoder[f"level_{l}"]) for l in range(self.levels)], 1)
        x = as_matrix(x)
        books = [torch.from_numpy(cb) for cb in self.codebooks]
        prices = self._price_tensors()
        encoder = _MLP.from_state(self.encoder) if self.kind == "rq_vae" else None
        out = np.empty((x.shape[0], self.levels), dtype=np.int64)
        # block by block, one residual buffer updated in place: the extra memory is one block, not the catalog
        for s in range(0, x.shape[0], _ASSIGN_BLOCK):
            r = self.latent(x[s : s + _ASSIGN_BLOCK], encoder)
            for level, (c, price) in enumerate(zip(books, prices)):
                out[s : s + _ASSIGN_BLOCK, level] = subtract_nearest_(r, c, price).numpy()
        return out

    def _price_tensors(self) -> list[Optional[torch.Tensor]]:
        return [torch.from_numpy(p) for p in self.prices] if self.prices else [None] * self.levels

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        """Standardised-space reconstruction from ``[n, >=M]`` codes (extra levels ignored)."""
        codes = np.asarray(codes, dtype=np.int64)
        if self.kind == "lsh":  # buckets are not residual: the reconstruction is the mean of bucket means
            return np.asarray(sum(self.codebooks[l][codes[:, l]] for l in range(self.levels)) / self.levels, dtype=np.float32)
        q = sum(self.codebooks[l][codes[:, l]] for l in range(self.levels))
        if self.kind == "rq_vae":
            with torch.no_grad():
                qt = torch.from_numpy(np.asarray(q, dtype=np.float32))
                out = _MLP.from_state(self.decoder)(qt)
                q = (qt + out if self.residual else out).numpy()
        return np.asarray(q, dtype=np.float32)

    def reconstruction_error(self, x: np.ndarray) -> float:
        """MSE between the standardised input and its reconstruction from its codes."""
        x = as_matrix(x)
        target = (x - self.mean) / self.scale
        return float(np.mean((self.reconstruct(self.assign(x)) - target) ** 2))

    # -- persistence
    def save(self, directory) -> Path:
        """Write ``quantizer.safetensors`` + ``quantizer.json`` into ``directory`` (atomically per file)."""
        from safetensors.numpy import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"codebook.{i}": np.ascontiguousarray(c) for i, c in enumerate(self.codebooks)}
        tensors["mean"] = np.ascontiguousarray(self.mean)
        tensors["scale"] = np.ascontiguousarray(self.scale)
        for k, v in self.encoder.items():
            tensors[f"encoder.{k}"] = np.ascontiguousarray(v)
        for k, v in self.decoder.items():
            tensors[f"decoder.{k}"] = np.ascontiguousarray(v)
        for i, v in enumerate(self.prices):
            tensors[f"price.{i}"] = np.ascontiguousarray(v)
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "levels": self.levels,
            "codebook_sizes": self.codebook_sizes,
            "input_dim": self.input_dim,
            "residual": bool(self.residual),
        }
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".quantizer-", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata={"kind": self.kind})
        os.replace(tmp, d / STATE_FILE)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".quantizer-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, d / META_FILE)
        return d

    @classmethod
    def load(cls, directory) -> "QuantizerState":
        from safetensors.numpy import load_file

        d = Path(directory)
        if not (d / STATE_FILE).is_file() or not (d / META_FILE).is_file():
            raise FileNotFoundError(f"{d}: no saved quantizer ({STATE_FILE} + {META_FILE}) found")
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{d / META_FILE}: unsupported quantizer format {meta.get('format_version')!r}")
        t = load_file(str(d / STATE_FILE))
        books = [t[f"codebook.{i}"] for i in range(int(meta["levels"]))]
        enc = {k[len("encoder."):]: v for k, v in t.items() if k.startswith("encoder.")}
        dec = {k[len("decoder."):]: v for k, v in t.items() if k.startswith("decoder.")}
        prices = [t[f"price.{i}"] for i in range(int(meta["levels"]))] if "price.0" in t else []
        return cls(kind=meta["kind"], codebooks=books, mean=t["mean"], scale=t["scale"], encoder=enc, decoder=dec,
                   residual=bool(meta.get("residual", False)), prices=prices)  # states saved before the flag existed: plain MLPs


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and scale (std; 1 where ~0) of ``x``, two passes in float64 over row chunks, so no
    temporary as large as ``x`` is made (``np.std`` makes one)."""
    n, d = x.shape
    total = np.zeros(d)
    for s in range(0, n, _CHUNK):
        total += x[s : s + _CHUNK].sum(0, dtype=np.float64)
    mean = total / n
    sq = np.zeros(d)
    for s in range(0, n, _CHUNK):
        dev = x[s : s + _CHUNK] - mean
        sq += np.einsum("ij,ij->j", dev, dev)
    std = np.sqrt(sq / n).astype(np.float32)
    return mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32)


def _scaled(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(x - mean) / scale`` as one new float32 array (no second full-size temporary)."""
    xs = x - mean
    xs /= scale
    return xs.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- fitting


def _weighted(scale: np.ndarray, column_weights: Optional[np.ndarray]) -> np.ndarray:
    """Column scales with ``column_weights`` folded in: standardised column j is multiplied by w_j."""
    if column_weights is None:
        return scale
    w = np.asarray(column_weights, dtype=np.float32).ravel()
    if w.shape != scale.shape or (w <= 0).any():
        raise ValueError(f"column_weights must be {scale.shape[0]} positive numbers (got shape {w.shape})")
    return (scale / w).astype(np.float32)


def fit_rq_kmeans(x: np.ndarray, levels: int, codebook_size: int, seed: int, iters: int = 50,
                  column_weights: Optional[np.ndarray] = None, balance: str = "none") -> QuantizerState:
    """Residual k-means: standardise ``x``, then k-means per level on the residual.

    ``balance="last"``: the last level's codes get prices (:func:`sidrec.index.kmeans.balance_prices`)
    so that each holds about ``n / N`` items; the earlier levels stay plain k-means (balancing them too
    measured worse: their clusters are what the LLM learns to predict, and raw collisions come from the
    last level's crowding).

    Above ``codebook_size * MAX_POINTS_PER_CENTROID`` rows every level is fitted on one random
    sample of that many rows (their residuals), as faiss trains on a training subset: fit time and
    memory then stop growing with the catalog; ``QuantizerState.assign`` codes every row."""
    x = as_matrix(x)
    gen = torch.Generator().manual_seed(int(seed))
    n_fit = codebook_size * MAX_POINTS_PER_CENTROID
    mean, scale = _moments(x)  # of every row
    scale = _weighted(scale, column_weights)
    if x.shape[0] > n_fit:
        x = x[np.sort(torch.randperm(x.shape[0], generator=gen)[:n_fit].numpy())]
    r = torch.from_numpy(_scaled(x, mean, scale))  # our own copy: the residual is updated in place
    if balance not in ("none", "last"):
        raise ValueError(f"balance must be 'none' or 'last', got {balance!r}")
    books = []
    for level in range(levels):
        c = kmeans(r, codebook_size, iters, gen)
        books.append(c.numpy().copy())
        if level < levels - 1:
            subtract_nearest_(r, c)
    prices = []
    if balance == "last":
        prices = [np.zeros(codebook_size, dtype=np.float32) for _ in range(levels - 1)]
        prices.append(balance_prices(r, torch.from_numpy(books[-1])).numpy())
    return QuantizerState("rq_kmeans", books, mean, scale, prices=prices)


def _kmeans_codebooks(enc, batch: torch.Tensor, levels: int, codebook_size: int, iters: int,
                      gen: torch.Generator) -> nn.ParameterList:
    """RQ-VAE codebooks k-means-initialised on the encoded first batch, level by level on the residual."""
    with torch.no_grad():
        r = enc(batch)
        init = []
        for _ in range(levels):
            c = kmeans(r, codebook_size, iters, gen)
            if torch.unique(r, dim=0).shape[0] < codebook_size:
                # too few distinct points: jitter the padded slots so they can still learn
                c = c + 0.01 * torch.randn(c.shape, generator=gen) * r.std().clamp_min(1e-3)
            init.append(c)
            r = r - c[nearest(r, c)]
    return nn.ParameterList(nn.Parameter(c.clone()) for c in init)


def _rqvae_loss(enc, dec, books, xb: torch.Tensor, beta: float, usage: list) -> tuple[torch.Tensor, list]:
    """One batch: recon MSE + the residual VQ losses (straight-through to the decoder); counts code
    usage per level into ``usage``; returns ``(loss, residual per level)``."""
    z = enc(xb)
    r = z
    q = torch.zeros_like(z)
    vq_loss = z.new_zeros(())
    residuals = []
    for level, cb in enumerate(books):
        with torch.no_grad():
            idx = nearest(r.detach(), cb.detach())
        usage[level] += torch.bincount(idx, minlength=cb.shape[0])
        e = cb[idx]
        vq_loss = vq_loss + ((e - r.detach()) ** 2).mean() + beta * ((r - e.detach()) ** 2).mean()
        residuals.append(r.detach())
        q = q + e
        r = r - e.detach()
    zq = z + (q - z).detach()  # straight-through
    return ((dec(zq) - xb) ** 2).mean() + vq_loss, residuals


def fit_rq_vae(
    x: np.ndarray,
    levels: int,
    codebook_size: int,
    seed: int,
    cfg: Optional[RQVAEConfig] = None,
    kmeans_iters: int = 20,
    progress: bool = True,
    column_weights: Optional[np.ndarray] = None,
) -> QuantizerState:
    """RQ-VAE: MLP encoder -> residual VQ -> MLP decoder.

    Codebooks are k-means-initialised on the first batch's residuals.
    Loss = recon MSE + sum_l (||sg(r_l) - e_l||^2 + beta * ||r_l - sg(e_l)||^2), with the
    straight-through estimator for the decoder's gradient. Codes unused during an
    epoch are re-seeded with random residuals of the last batch (dead-code reset).
    """
    from tqdm.auto import tqdm

    cfg = cfg or RQVAEConfig()
    x = as_matrix(x)
    mean, scale = _moments(x)
    scale = _weighted(scale, column_weights)
    xs = _scaled(x, mean, scale)
    n, d = xs.shape
    data = torch.from_numpy(xs)
    bs = min(cfg.batch_size, n)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        gen = torch.Generator().manual_seed(int(seed))
        enc = _MLP([d, *cfg.hidden_dims, cfg.latent_dim])
        dec = _MLP([cfg.latent_dim, *reversed(cfg.hidden_dims), d])

        perm = torch.randperm(n, generator=gen)
        books = _kmeans_codebooks(enc, data[perm[:bs]], levels, codebook_size, kmeans_iters, gen)

        params = list(enc.parameters()) + list(dec.parameters()) + list(books.parameters())
        opt = torch.optim.Adam(params, lr=cfg.lr)

        bar = tqdm(range(cfg.epochs), desc="rq-vae", leave=False, disable=not progress)
        for epoch in bar:
            order = perm if epoch == 0 else torch.randperm(n, generator=gen)
            usage = [torch.zeros(codebook_size, dtype=torch.long) for _ in range(levels)]
            last_res: list[torch.Tensor] = []
            tot = 0.0
            for s in range(0, n, bs):
                xb = data[order[s : s + bs]]
                loss, last_res = _rqvae_loss(enc, dec, books, xb, cfg.beta, usage)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * xb.shape[0]
            bar.set_postfix(loss=f"{tot / n:.4f}")
            if epoch < cfg.epochs - 1:
                with torch.no_grad():
                    for l in range(levels):
                        dead = (usage[l] == 0).nonzero().flatten()
                        if dead.numel():
                            src = last_res[l]
                            pick = torch.randint(src.shape[0], (dead.numel(),), generator=gen)
                            books[l][dead] = src[pick]
        bar.close()

    return QuantizerState(
        "rq_vae",
        [b.detach().numpy().copy() for b in books],
        mean,
        scale,
        encoder=_mlp_state(enc),
        decoder=_mlp_state(dec),
    )


# --------------------------------------------------------------------------- top level


@dataclass(eq=False)
class QuantizationResult:
    codes: np.ndarray  # [n, L] int64, unique rows
    level_sizes: list[int]
    raw_collision_rate: float
    collisions: int
    recon_error: float
    stats: dict[str, float]
    state: QuantizerState


def lsh_codes(z: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """Bucket of each row: the sign bits of its projections on ``planes`` [b, d], read as an integer."""
    bits = (z @ planes.T > 0).astype(np.int64)
    return (bits << np.arange(planes.shape[0], dtype=np.int64)).sum(1)


def fit_lsh(x: np.ndarray, levels: int, codebook_size: int, seed: int,
            column_weights: Optional[np.ndarray] = None) -> QuantizerState:
    """Random-hyperplane LSH per level (ED2's LSH ablation): log2(N) hyperplanes per level on the
    standardised input; codebooks hold each bucket's mean (for reconstruction error only)."""
    x = as_matrix(x)
    bits = int(np.log2(codebook_size))
    if 2 ** bits != codebook_size:
        raise ValueError(f"index.codebook_size={codebook_size}: LSH needs a power of two (e.g. {2 ** bits} or {2 ** (bits + 1)})")
    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-8] = 1.0
    scale = _weighted(scale, column_weights)
    z = (x - mean) / scale
    rng = np.random.default_rng(seed)
    planes, books = {}, []
    for level in range(levels):
        p = rng.standard_normal((bits, x.shape[1])).astype(np.float32)
        planes[f"level_{level}"] = p
        c = lsh_codes(z, p)
        book = np.zeros((codebook_size, x.shape[1]), dtype=np.float32)
        for k in np.unique(c):
            book[k] = z[c == k].mean(0)
        books.append(book)
    return QuantizerState(kind="lsh", codebooks=books, mean=mean, scale=scale, encoder=planes)


def quantize(x: np.ndarray, cfg: IndexConfig, seed: int, progress: bool = True,
             column_weights: Optional[np.ndarray] = None) -> QuantizationResult:
    """Fit the configured quantizer on ``x``, assign codes and resolve collisions.

    ``column_weights`` (one positive number per column) multiply the standardised columns, so parts of
    a concatenated input get set shares of the variance (:func:`sidrec.index.collab.hybrid_inputs`); they are
    folded into the saved state's scale, so later assignments weight new rows the same way."""
    x = as_matrix(x)
    m = cfg.levels
    n_codes = auto_codebook_size(x.shape[0], m) if cfg.codebook_size == "auto" else int(cfg.codebook_size)
    if cfg.quantizer == "rq_kmeans":
        state = fit_rq_kmeans(x, m, n_codes, seed, cfg.kmeans_iters, column_weights=column_weights,
                              balance=getattr(cfg, "balance", "none"))
    elif cfg.quantizer == "lsh":
        state = fit_lsh(x, m, n_codes, seed, column_weights=column_weights)
    else:
        state = fit_rq_vae(x, m, n_codes, seed, cfg.rqvae, progress=progress, column_weights=column_weights)
    raw = state.assign(x)
    if getattr(cfg, "collisions", "extra_level") == "nearest_free":
        codes, extra = spread_collisions(state, x, raw), []
    else:
        codes, extra = resolve_collisions(raw)
    sizes = [n_codes] * m + extra
    stats = code_stats(codes, sizes, raw_levels=m)
    if m >= 2:  # where the raw collisions come from (the dynamic index logs the same at each refresh)
        stats.update({f"raw_{k}": v for k, v in prefix_cells(raw, n_codes).items()})
    return QuantizationResult(
        codes=codes,
        level_sizes=sizes,
        raw_collision_rate=raw_collision_rate(raw),
        collisions=count_duplicates(codes),
        recon_error=state.reconstruction_error(x),
        stats=stats,
        state=state,
    )


def assign_new(
    state: QuantizerState, existing_codes: np.ndarray, level_sizes: list[int], x_new: np.ndarray
) -> tuple[np.ndarray, list[int]]:
    """Codes for new items, unique against ``existing_codes`` and each other.

    Returns ``(codes [m, L], new_level_sizes)``; existing codes never change.

    * With a disambiguation level (``L == M + 1``) a new item's extra index is
      ``max(existing extra index in its raw group) + 1 + its rank among the new
      items of that group``; the last level size grows when needed.
    * Without one (``L == M``), adding a level would change every existing SID,
      so a new item whose raw tuple is taken moves, at the last level, to the
      nearest codeword whose full tuple is still free. If all ``N`` last-level
      codes under its prefix are taken a ``ValueError`` is raised.
    """
    m = state.levels
    sizes = [int(s) for s in level_sizes]
    existing = np.asarray(existing_codes, dtype=np.int64).reshape(-1, len(sizes))
    L = len(sizes)
    if L not in (m, m + 1):
        raise ValueError(f"existing codes have {L} levels but the quantizer has {m} (expected {m} or {m + 1})")
    if sizes[:m] != state.codebook_sizes:
        raise ValueError(f"level sizes {sizes[:m]} do not match the quantizer's codebook sizes {state.codebook_sizes}")
    z = state.latent(x_new)
    raw_t, residuals = state.residual_assign(z)
    raw = raw_t.numpy().astype(np.int64)
    n_new = raw.shape[0]

    if L == m + 1:
        return append_disambiguated(existing, sizes, raw)

    # L == m: no disambiguation level; move colliding items to the nearest free last-level code
    taken = {tuple(r.tolist()) for r in existing}
    last_cb = torch.from_numpy(state.codebooks[-1])
    codes = raw.copy()
    for i in range(n_new):
        key = tuple(raw[i].tolist())
        if key not in taken:
            taken.add(key)
            continue
        choice = nearest_free_last(key, residuals[-1][i : i + 1], last_cb, taken)
        if choice is not None:
            codes[i] = choice
            taken.add(choice)
        else:
            raise ValueError(
                f"new item {i}: every last-level code under prefix {key[:-1]} is taken; "
                "re-index with a disambiguation level (or a larger codebook)"
            )
    return codes, sizes


def plot_code_usage(codes: np.ndarray, level_sizes: list[int], path) -> None:
    """PNG with one bar chart of code counts per level (Agg canvas; pyplot is not touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    codes = np.asarray(codes, dtype=np.int64)
    n_levels = len(level_sizes)
    fig = Figure(figsize=(8, 2.2 * n_levels), tight_layout=True)
    FigureCanvasAgg(fig)
    for i, size in enumerate(level_sizes):
        ax = fig.add_subplot(n_levels, 1, i + 1)
        counts = np.bincount(codes[:, i], minlength=size) if codes.shape[0] else np.zeros(size, dtype=int)
        ax.bar(np.arange(size), counts, width=1.0, color="C0")
        used = int((counts > 0).sum())
        ax.set_title(f"level {i}: {used}/{size} codes used", fontsize=9)
        ax.set_xlim(-0.5, size - 0.5)
        ax.set_ylabel("items")
    fig.axes[-1].set_xlabel("code")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png", dpi=80)


__all__ = [
    "QuantizationResult",
    "append_disambiguated",
    "QuantizerState",
    "assign_new",
    "auto_codebook_size",
    "code_stats",
    "count_duplicates",
    "fit_rq_kmeans",
    "fit_rq_vae",
    "kmeans",
    "plot_code_usage",
    "quantize",
    "raw_collision_rate",
    "resolve_collisions",
]
