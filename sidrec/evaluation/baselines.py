"""Classic baselines: most-popular and SASRec (Kang & McAuley, ICDM 2018).

Items are 0-based indices ``0..n_items-1`` everywhere in the public API. Inside
SASRec the embedding table is shifted by one so that row 0 is padding.

SASRec here: item + learned positional embeddings, ``layers`` pre-LayerNorm
causal self-attention blocks (GELU feed-forward of width 4*hidden), dropout, a
final LayerNorm, and scores tied to the item embedding table. Training uses a
full-softmax cross-entropy over all items at every position of each user's
(left-padded, right-aligned) sequence, Adam, and early stopping on valid
NDCG@10 with the best epoch's weights restored.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sidrec.config import SASRecConfig
from sidrec.errors import ModelError
from sidrec.evaluation.metrics import ranking_metrics

# ---------------------------------------------------------------- popularity


def popularity_counts(train_sequences: Sequence[Sequence[int]], n_items: int) -> np.ndarray:
    """[n_items] interaction counts over all training sequences."""
    flat = [int(i) for seq in train_sequences for i in seq]
    arr = np.asarray(flat, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_items):
        raise ValueError(f"item index out of range [0, {n_items}) in train_sequences")
    return np.bincount(arr, minlength=n_items)[:n_items]


def popularity_topk(train_sequences: Sequence[Sequence[int]], n_items: int, k: int) -> np.ndarray:
    """[k] most frequent item indices (ties broken by the lower index)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n_items:
        raise ValueError(f"k={k} is larger than the catalog ({n_items} items)")
    counts = popularity_counts(train_sequences, n_items)
    order = np.lexsort((np.arange(n_items), -counts))  # primary: count desc, secondary: index asc
    return order[:k].astype(np.int64)


def popularity_ranked(train_sequences: Sequence[Sequence[int]], n_items: int, n_users: int, k: int,
                      exclude: Optional[Sequence[set]] = None) -> np.ndarray:
    """[n_users, k]: the same most-popular list for every user; ``exclude`` (one set of item indices per
    user) are dropped from that user's list, which the next most popular items fill."""
    if exclude is None:
        return np.tile(popularity_topk(train_sequences, n_items, k)[None, :], (n_users, 1))
    from sidrec.evaluation.metrics import drop_seen

    longest = max((len(s) for s in exclude), default=0)
    top = popularity_topk(train_sequences, n_items, min(k + longest, n_items))
    return drop_seen(np.tile(top[None, :], (n_users, 1)), exclude)[:, :k]


# ---------------------------------------------------------------- SASRec model


class _Block(nn.Module):
    """Pre-LN transformer block: x + Drop(Attn(LN(x))), then x + Drop(FFN(LN(x)))."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden, eps=1e-8)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-8)
        self.ff1 = nn.Linear(hidden, 4 * hidden)
        self.ff2 = nn.Linear(4 * hidden, hidden)
        self.dropout = dropout
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, l, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, l, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        a = a.transpose(1, 2).reshape(b, l, h)
        x = x + self.drop(self.proj(a))
        x = x + self.drop(self.ff2(F.gelu(self.ff1(self.ln2(x)))))
        return x


class SASRec(nn.Module):
    """Self-attentive sequential recommender with tied output embeddings."""

    def __init__(self, n_items: int, hidden: int = 64, layers: int = 2, heads: int = 2,
                 dropout: float = 0.5, max_len: int = 50):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.config = dict(n_items=int(n_items), hidden=int(hidden), layers=int(layers), heads=int(heads),
                           dropout=float(dropout), max_len=int(max_len))
        self.n_items = int(n_items)
        self.max_len = int(max_len)
        self.item_emb = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([_Block(hidden, heads, dropout) for _ in range(layers)])
        self.final_ln = nn.LayerNorm(hidden, eps=1e-8)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    @classmethod
    def from_config(cls, n_items: int, cfg: SASRecConfig) -> "SASRec":
        return cls(n_items, cfg.hidden, cfg.layers, cfg.heads, cfg.dropout, cfg.max_len)

    def hidden_states(self, seq: torch.Tensor) -> torch.Tensor:
        """seq: [B, L] shifted item ids (0 = padding, left-padded), L <= max_len. Returns [B, L, hidden]."""
        b, l = seq.shape
        if l > self.max_len:
            raise ValueError(f"sequence length {l} > max_len {self.max_len}")
        keep = seq > 0  # [B, L]
        pos = torch.arange(self.max_len - l, self.max_len, device=seq.device)  # right-aligned positions
        x = self.item_emb(seq) + self.pos_emb(pos)[None]
        x = self.emb_drop(x) * keep.unsqueeze(-1)
        causal = torch.ones(l, l, dtype=torch.bool, device=seq.device).tril()
        # query i may attend key j <= i that is a real item; every query also sees itself,
        # so padded queries never get an all-masked (NaN) row.
        mask = (causal[None] & keep[:, None, :]) | torch.eye(l, dtype=torch.bool, device=seq.device)[None]
        mask = mask[:, None]  # [B, 1, L, L] broadcast over heads
        for blk in self.blocks:
            x = blk(x, mask) * keep.unsqueeze(-1)
        return self.final_ln(x)

    def item_weights(self) -> torch.Tensor:
        """[n_items, hidden] output embeddings (tied with the input table, padding row dropped)."""
        return self.item_emb.weight[1:]

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Scores of every item at every position: [B, L, n_items]."""
        return self.hidden_states(seq) @ self.item_weights().T

    def last_scores(self, seq: torch.Tensor) -> torch.Tensor:
        """Scores for the next item after the last position: [B, n_items]."""
        return self.hidden_states(seq)[:, -1] @ self.item_weights().T


# ---------------------------------------------------------------- batching


def _pad_histories(histories: Sequence[Sequence[int]], max_len: int) -> torch.Tensor:
    """Left-padded [U, L] tensor of shifted ids (item+1) of each history's last max_len items.

    L is the longest (truncated) history in the batch, at least 1.
    """
    tails = [list(h)[-max_len:] for h in histories]
    width = max(1, max((len(t) for t in tails), default=1))
    out = np.zeros((len(tails), width), dtype=np.int64)
    for r, t in enumerate(tails):
        if t:
            out[r, width - len(t):] = np.asarray(t, dtype=np.int64) + 1
    return torch.from_numpy(out)


def _training_arrays(train_sequences: Sequence[Sequence[int]], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [N, max_len] and targets [N, max_len] (shifted ids, 0 = ignored) per sequence.

    Each sequence is truncated to its last max_len + 1 items; input = seq[:-1],
    target = seq[1:], both left-padded. Sequences with fewer than 2 items are dropped.
    """
    rows = [list(s)[-(max_len + 1):] for s in train_sequences if len(s) >= 2]
    inp = np.zeros((len(rows), max_len), dtype=np.int64)
    tgt = np.zeros((len(rows), max_len), dtype=np.int64)
    for r, s in enumerate(rows):
        a = np.asarray(s, dtype=np.int64) + 1
        n = len(a) - 1
        inp[r, max_len - n:] = a[:-1]
        tgt[r, max_len - n:] = a[1:]
    return torch.from_numpy(inp), torch.from_numpy(tgt)


# ---------------------------------------------------------------- inference


def _last_scores(model: SASRec, histories: Sequence[Sequence[int]], batch_size: int):
    """``(start, [B, n_items] scores)`` for each batch of histories, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for s in range(0, len(histories), batch_size):
            yield s, model.last_scores(_pad_histories(histories[s:s + batch_size], model.max_len).to(device))
    finally:
        model.train(was_training)


@torch.no_grad()
def sasrec_scores(model: SASRec, histories: Sequence[Sequence[int]], batch_size: int = 512) -> torch.Tensor:
    """[U, n_items] full-ranking scores for the next item after each history (eval mode, no grad)."""
    outs = [scores.float().cpu() for _, scores in _last_scores(model, histories, batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, model.n_items)


@torch.no_grad()
def sasrec_topk(model: SASRec, histories: Sequence[Sequence[int]], k: int, batch_size: int = 512,
                exclude: Optional[Sequence[set]] = None) -> np.ndarray:
    """[U, k] item indices ranked over the full catalog; ``exclude`` (one set of item indices per
    history) are never ranked (history items are not excluded by default)."""
    if k < 1 or k > model.n_items:
        raise ValueError(f"k must be in [1, {model.n_items}], got {k}")
    outs = []
    for s, scores in _last_scores(model, histories, batch_size):
        for r, items in enumerate(exclude[s:s + len(scores)] if exclude is not None else ()):
            if items:
                scores[r, list(items)] = -torch.inf
        outs.append(torch.topk(scores, k, dim=1).indices.cpu())
    return torch.cat(outs).numpy().astype(np.int64) if outs else np.zeros((0, k), dtype=np.int64)


def _valid_ndcg10(model: SASRec, valid: tuple[Sequence[Sequence[int]], np.ndarray]) -> float:
    histories, targets = valid
    k = min(10, model.n_items)
    ranked = sasrec_topk(model, histories, k)
    return ranking_metrics(ranked, np.asarray(targets), ks=(k,))[f"ndcg_at_{k}"]


# ---------------------------------------------------------------- training


def _train_epoch(model: SASRec, opt: torch.optim.Optimizer, inp: torch.Tensor, tgt: torch.Tensor, batch_size: int,
                 gen: torch.Generator) -> float:
    """One pass over the training sequences in a random order: full-softmax cross-entropy at every
    non-padding position. Returns the epoch's mean loss per supervised position."""
    model.train()
    perm = torch.randperm(inp.shape[0], generator=gen)
    tot, cnt = 0.0, 0
    for s in range(0, len(perm), batch_size):
        idx = perm[s:s + batch_size]
        loss, n = train_step(model, opt, inp[idx], tgt[idx])
        tot += loss * n
        cnt += n
    return tot / max(cnt, 1)


def train_step(model: SASRec, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """One optimiser step on a batch of (inputs, targets) rows: full-softmax cross-entropy at every
    non-padding position. Returns ``(mean loss, supervised positions)``."""
    # drop all-padding leading columns of this batch (cheaper attention)
    first = int((x > 0).any(0).float().argmax())
    x, y = x[:, first:], y[:, first:]
    h = model.hidden_states(x)
    sel = y > 0
    logits = h[sel] @ model.item_weights().T
    loss = F.cross_entropy(logits, y[sel] - 1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach()), int(sel.sum())


class _EarlyStopping:
    """Keeps the weights of the best valid NDCG@10 so far and counts the epochs since it improved."""

    def __init__(self, patience: int):
        self.patience, self.best, self.best_epoch, self.best_state, self.bad = patience, -math.inf, 0, None, 0

    def update(self, model: SASRec, epoch: int, score: float) -> bool:
        """Record one epoch's score; True when ``patience`` epochs in a row did not improve it."""
        if score > self.best:
            self.best, self.best_epoch, self.bad = score, epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad += 1
        return self.bad >= self.patience


def train_sasrec(
    train_sequences: Sequence[Sequence[int]],
    n_items: int,
    cfg: SASRecConfig,
    seed: int,
    valid: Optional[tuple[Sequence[Sequence[int]], np.ndarray]] = None,
    progress: bool = True,
    max_minutes: Optional[float] = None,
) -> tuple[SASRec, dict]:
    """Train SASRec with full-softmax CE at every position; early-stop on valid NDCG@10.

    Without ``valid`` it trains ``cfg.max_epochs`` epochs (or until ``max_minutes``)
    and keeps the last weights. Returns ``(model, info)`` with info keys
    ``best_epoch``, ``epochs_run``, ``best_valid_ndcg_at_10``, ``train_seconds``
    (plus ``stopped`` = "early_stopping" | "max_epochs" | "time_cap", ``final_loss``).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SASRec.from_config(n_items, cfg)
    inp, tgt = _training_arrays(train_sequences, cfg.max_len)
    if inp.shape[0] == 0:
        raise ValueError("no training sequence has at least 2 items")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    t0 = time.perf_counter()
    stop = _EarlyStopping(cfg.patience)
    epochs_run, stopped, loss_val = 0, "max_epochs", float("nan")
    bar = tqdm(range(1, cfg.max_epochs + 1), desc="SASRec", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        loss_val = _train_epoch(model, opt, inp, tgt, cfg.batch_size, gen)
        epochs_run = epoch
        post = {"loss": f"{loss_val:.4f}"}
        patience_spent = False
        if valid is not None:
            ndcg = _valid_ndcg10(model, valid)
            post["valid_ndcg@10"] = f"{ndcg:.4f}"
            patience_spent = stop.update(model, epoch, ndcg)
        bar.set_postfix(post)
        if patience_spent:
            stopped = "early_stopping"
            break
        if max_minutes is not None and time.perf_counter() - t0 > max_minutes * 60:
            stopped = "time_cap" if epoch < cfg.max_epochs else "max_epochs"
            break
    bar.close()
    if stop.best_state is not None:
        model.load_state_dict(stop.best_state)
    model.eval()
    info = {
        "best_epoch": int(stop.best_epoch if stop.best_state is not None else epochs_run),
        "epochs_run": int(epochs_run),
        "best_valid_ndcg_at_10": float(stop.best) if valid is not None else None,
        "train_seconds": float(time.perf_counter() - t0),
        "stopped": stopped,
        "final_loss": float(loss_val),
    }
    return model, info


# ---------------------------------------------------------------- persistence


def save_sasrec(model: SASRec, path: str | Path) -> Path:
    """Write ``<path>/model.safetensors`` and ``<path>/config.json``; returns the folder."""
    from safetensors.torch import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(p / "model.safetensors"))
    (p / "config.json").write_text(json.dumps({"type": "sasrec", **model.config}, indent=2), encoding="utf-8")
    return p


def load_sasrec(path: str | Path) -> SASRec:
    """Load a model written by :func:`save_sasrec` (eval mode, CPU)."""
    from safetensors.torch import load_file

    p = Path(path)
    cfg_path, w_path = p / "config.json", p / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise ModelError(f"{p}: not a saved SASRec (expected config.json and model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg.pop("type", None)
        model = SASRec(**cfg)
        model.load_state_dict(load_file(str(w_path)))
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        raise ModelError(f"{p}: cannot load SASRec: {e}") from None
    model.eval()
    return model
