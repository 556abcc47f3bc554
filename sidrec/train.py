"""LoRA fine-tuning of the backbone on instruction rows (static index).

The loss covers the target span only. At a position whose target is a SID token of level ``t``
the logits are computed over level ``t``'s SID rows only (the same distribution decoding uses);
at text targets (SID -> title) over the full vocabulary. Batches are length-bucketed.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm


@dataclass
class Encoded:
    input_ids: list[list[int]]
    target_start: list[int]  # index of the first target token in each sequence

    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids])


def encode_rows(encoder, rows: pd.DataFrame) -> Encoded:
    ids, starts = [], []
    for prompt, target, kind in zip(rows["prompt"], rows["target"], rows["target_kind"]):
        p = encoder.encode(prompt)
        t = encoder.encode(target)
        if kind == "text":
            t = t + [encoder.eos_id]
        ids.append(p + t)
        starts.append(len(p))
    return Encoded(ids, starts)


def bucketed_batches(lengths: np.ndarray, batch_size: int, steps: int, seed: int, pool: int = 32) -> list[np.ndarray]:
    """``steps`` batches of indices: shuffled, then sorted by length inside pools of ``pool`` batches."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    out: list[np.ndarray] = []
    while len(out) < steps:
        perm = rng.permutation(n)
        for s in range(0, n, batch_size * pool):
            chunk = perm[s : s + batch_size * pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            group = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            rng.shuffle(group)
            out.extend(group)
    return out[:steps]


def _collate(enc: Encoded, idx: np.ndarray, pad_id: int):
    seqs = [enc.input_ids[i] for i in idx]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    tgt = torch.zeros((len(seqs), width), dtype=torch.bool)
    for j, (s, i) in enumerate(zip(seqs, idx)):
        ids[j, : len(s)] = torch.tensor(s)
        mask[j, : len(s)] = 1
        tgt[j, enc.target_start[i] : len(s)] = True
    return ids, mask, tgt


def target_loss(model, h: torch.Tensor, ids: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over target tokens: SID tokens against their level's rows, text against the vocab."""
    vocab = model.vocab
    # position p predicts token p+1
    pred_mask = tgt[:, 1:]
    hs = h[:, :-1][pred_mask]  # [N, H]
    labels = ids[:, 1:][pred_mask]  # [N]
    n = labels.numel()
    total = hs.new_zeros((), dtype=torch.float32)
    is_sid = labels >= vocab.base_vocab
    if is_sid.any():
        rel = labels - vocab.base_vocab
        for level in range(len(vocab.level_sizes)):
            sl = vocab.level_slice(level)
            sel = is_sid & (rel >= sl.start) & (rel < sl.stop)
            if sel.any():
                logits = model.sid_logits(hs[sel], level).float()
                total = total + torch.nn.functional.cross_entropy(logits, rel[sel] - sl.start, reduction="sum")
    if (~is_sid).any():
        logits = model.text_logits(hs[~is_sid]).float()
        total = total + torch.nn.functional.cross_entropy(logits, labels[~is_sid], reduction="sum")
    return total / max(n, 1), n


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    examples: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0

    @property
    def padding_share(self) -> float:
        return 1.0 - self.tokens / max(self.padded_tokens, 1)

    def summary(self) -> dict[str, float]:
        return {
            "train/steps": self.steps,
            "train/examples": self.examples,
            "train/tokens": self.tokens,
            "train/padding_share": round(self.padding_share, 4),
            "train/seconds": round(self.seconds, 1),
            "train/tokens_per_s": round(self.tokens / max(self.seconds, 1e-9), 1),
            "train/final_loss": float(np.mean(self.losses[-10:])) if self.losses else float("nan"),
        }


def train(
    model, encoder, rows: pd.DataFrame, cfg, seed: int, dtype: torch.dtype = torch.bfloat16,
    log: Optional[Callable[[int, dict], None]] = None, progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` (LoRA params + SID embeddings) for ``cfg.steps`` steps."""
    torch.manual_seed(seed)
    enc = encode_rows(encoder, rows)
    batches = bucketed_batches(enc.lengths(), cfg.batch_size, cfg.steps, seed)
    lora_params = [p for n, p in model.lm.named_parameters() if p.requires_grad]
    groups = [{"params": [model.sid_embeddings], "lr": cfg.embedding_lr, "weight_decay": 0.0}]
    if lora_params:
        groups.append({"params": lora_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    opt = torch.optim.AdamW(groups)
    base_lrs = [g["lr"] for g in groups]

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(cfg.warmup_steps, 1)
        progress_ = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))

    model.train()
    res = TrainResult()
    t0 = time.perf_counter()
    bar = tqdm(batches, desc="fine-tune", disable=not progress, unit="step")
    for step, idx in enumerate(bar):
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * lr_factor(step)
        ids, mask, tgt = _collate(enc, idx, encoder.pad_id)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            h, _ = model.hidden(ids, attention_mask=mask)
            loss, _ = target_loss(model, h, ids, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        res.losses.append(loss.item())
        res.steps += 1
        res.examples += len(idx)
        res.tokens += int(mask.sum())
        res.padded_tokens += mask.numel()
        if step % cfg.log_every == 0 or step == len(batches) - 1:
            avg = float(np.mean(res.losses[-cfg.log_every :]))
            bar.set_postfix(loss=f"{avg:.3f}")
            if log is not None:
                log(step, {"train/loss": avg, "train/lr": opt.param_groups[-1]["lr"]})
    res.seconds = time.perf_counter() - t0
    model.eval()
    return res
