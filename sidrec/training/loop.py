"""LoRA fine-tuning of the backbone on instruction rows: the one training loop (:func:`train`).

A static-index model trains its SID table and LoRA; the dynamic index plugs its phases, learned
quantizers, index refreshes and regulator losses in through :class:`TrainHooks` (``sidrec.index.dynamic``).

The loss covers the target span only. At a position whose target is a SID token of level ``t``
the logits are computed over level ``t``'s SID rows only (the same distribution decoding uses);
at text targets (SID -> title) over the full vocabulary. Batches are length-bucketed.

Checkpoints (``cfg.checkpoint_every``, ``checkpoint_dir``): every N steps the trainable tensors
(LoRA + SID embeddings), the AdamW moments and the RNG states go to ``state.safetensors`` and the
scalars (step, AdamW step counts, loss history, counters) to ``state.json`` -- no pickle anywhere.
A checkpoint is written to a temp folder and renamed into place, so a kill at any moment leaves
either the previous or the new checkpoint. Checkpoints live under ``checkpoint_dir/<key>/`` where
``key`` hashes everything that determines the run (config, seed, rows, parameter shapes): a rerun of
the same training resumes from the latest one and ends bit-identical (CPU, same threads) to an
uninterrupted run; any other training never sees them. They are deleted when training completes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sidrec.model.item_head import item_head_loss
from sidrec.runtime import autocast, deterministic_kernels
from sidrec.training.ema import WeightAverage

log_ = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


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


def collate(enc: Encoded, idx: np.ndarray, pad_id: int):
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


def target_loss(model, h: torch.Tensor, ids: torch.Tensor, tgt: torch.Tensor,
                label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over target tokens: SID tokens against their level's rows (``label_smoothing``
    spreads that share of each SID token's target over its level's other codes), text against the vocab;
    with an item head, plus its weight times the mean item-level cross-entropy of the batch's target items."""
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
                total = total + torch.nn.functional.cross_entropy(logits, rel[sel] - sl.start, reduction="sum",
                                                                  label_smoothing=label_smoothing)
    if (~is_sid).any():
        logits = model.text_logits(hs[~is_sid]).float()
        total = total + torch.nn.functional.cross_entropy(logits, labels[~is_sid], reduction="sum")
    loss = total / max(n, 1)
    item = item_head_loss(model, h, ids, tgt)  # the item-level head's full softmax (sidrec.model.item_head), if any
    if item is not None:
        loss = loss + model.item_head.loss_weight * item
    return loss, n


def _distill_log(model) -> dict:
    """``train/distill_kl``: the item head's distillation term (``model.item_head_distill``) averaged since the last
    log line, when it has a teacher."""
    teacher = getattr(getattr(model, "item_head", None), "teacher", None)
    kl = teacher.pop_mean() if teacher is not None else None
    return {} if kl is None else {"train/distill_kl": kl}


def train_steps(cfg, n_rows: int) -> int:
    """Optimizer steps of a run: ``ceil(epochs * rows / batch_size)`` when ``cfg.epochs`` is set, else ``cfg.steps``."""
    epochs = getattr(cfg, "epochs", None)
    if epochs:
        return max(1, math.ceil(float(epochs) * n_rows / cfg.batch_size))
    return int(cfg.steps)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    examples: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0  # step of the checkpoint this run resumed from (0: fresh start)
    first_loss: float = float("nan")
    planned_steps: int = 0
    select_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, valid score) of model selection
    best_step: int = 0  # the step whose weights were kept (0: no selection, the last step)
    best_score: float = float("nan")
    select_seconds: float = 0.0  # wall time of the model-selection decoding (inside `seconds`)
    rows: int = 0  # training rows (one epoch)

    def record(self, loss: float, examples: int, mask: torch.Tensor) -> None:
        """Account one optimizer step: its loss, examples and (real / padded) tokens."""
        if not self.losses:
            self.first_loss = loss
        self.losses.append(loss)
        self.steps += 1
        self.examples += examples
        self.tokens += int(mask.sum())
        self.padded_tokens += mask.numel()

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
            "train/resumed_from_step": self.resumed_from,
            "train/first_loss": round(self.first_loss, 4) if self.losses else float("nan"),
            "train/epochs": round(self.examples / max(self.rows, 1), 3),
            "train/select_seconds": round(self.select_seconds, 1),
            **({"train/best_step": self.best_step, "train/best_valid_recall_at_10": round(self.best_score, 4)}
               if self.select_curve else {}),
        }


# ----------------------------------------------------------------------------------------------
# the extension points of the one training loop
# ----------------------------------------------------------------------------------------------
class TrainHooks:
    """What a kind of model changes in :func:`train`, the one training loop. The defaults train a
    static-index model (SID table + LoRA); ``sidrec.index.dynamic.DynamicIndexHooks`` overrides them to alternate
    recommender and tokenizer phases, refresh the index between phases and add ED2's regulator losses."""

    def parameters(self, model) -> list[tuple[str, torch.nn.Parameter]]:
        """Named trainable tensors: the optimizer's, the checkpoints' and the data-parallel averaging's."""
        return trainable_parameters(model)

    def param_groups(self, model, cfg) -> list[dict]:
        """AdamW groups; group 0 is the SID table and the item head's rows (the SID-only warm-up trains only it)."""
        params = [p for _, p in self.parameters(model)]
        n_tables = len(table_parameters(model))  # they come first in `parameters`
        groups = [{"params": params[:n_tables], "lr": cfg.embedding_lr, "weight_decay": 0.0}]
        if params[n_tables:]:
            groups.append({"params": params[n_tables:], "lr": cfg.lr, "weight_decay": cfg.weight_decay})
        return groups

    def before_step(self, step: int, model) -> Optional[pd.DataFrame]:
        """Called before every step's forward pass; new training rows (same count, same order of
        examples) replace the encoded ones, e.g. re-rendered after the index changed."""
        return None

    def extra_loss(self, model, step: int, batch=None) -> tuple[Optional[torch.Tensor], dict]:
        """A loss added to the recommendation loss this step, and scalars to log with it. ``batch`` is
        ``(hidden_states, input_ids, target_mask)`` of the step's forward pass."""
        return None, {}

    def settings(self) -> Optional[dict]:
        """JSON-able settings of these hooks that change the run, hashed into the checkpoint key (:func:`run_key`);
        None: nothing beyond the train config."""
        return None

    def selectable(self, step: int) -> bool:
        """Whether model selection may score the model after 0-based ``step`` (e.g. only on a frozen index)."""
        return True

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and JSON-able scalars the hooks need to resume (saved with every checkpoint)."""
        return {}, {}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Take back what :meth:`checkpoint_state` saved (called after the checkpoint's parameters are loaded)."""

    def after_training(self, model, steps: int) -> None:
        """Called once after the last step, before the best weights are restored."""


# ----------------------------------------------------------------------------------------------
# checkpoints: safetensors (tensors) + JSON (scalars)
# ----------------------------------------------------------------------------------------------
def run_key(model, rows: pd.DataFrame, cfg, seed: int, dtype: torch.dtype, params=None,
            hooks_settings: Optional[dict] = None) -> str:
    """Hash of everything that determines a training run (not where/how often it checkpoints).
    ``hooks_settings``: what the training hooks add (:meth:`TrainHooks.settings`, e.g. the dynamic index's resolved
    learning rates), so a checkpoint is never resumed under other settings (or another optimizer-group layout)."""
    h = hashlib.sha256()
    tcfg = cfg.model_dump(mode="json") if hasattr(cfg, "model_dump") else dict(vars(cfg))
    for k in ("checkpoint_every", "checkpoint_dir", "log_every", "threads"):
        tcfg.pop(k, None)
    from sidrec.training.parallel import world_info

    h.update(json.dumps({"format": CHECKPOINT_FORMAT, "train": tcfg, "seed": int(seed), "dtype": str(dtype),
                         "world": world_info()[1]}, sort_keys=True).encode())
    if hooks_settings is not None:  # absent for the static hooks: their keys are unchanged
        h.update(json.dumps({"hooks": hooks_settings}, sort_keys=True).encode())
    cols = [c for c in ("prompt", "target", "target_kind") if c in rows.columns]
    h.update(pd.util.hash_pandas_object(rows[cols].reset_index(drop=True), index=True).to_numpy().tobytes())
    for name, p in params if params is not None else trainable_parameters(model):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes()[:4096])  # the initial values' head
    return h.hexdigest()[:16]


def table_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The embedding tables (SID rows, and the item head's rows if any): trained at ``embedding_lr``, first in
    :func:`trainable_parameters`."""
    head = getattr(model, "item_head", None)
    tables = [("sid_embeddings", model.sid_embeddings)]
    if head is not None:
        tables += [("item_head.rows", head.rows), ("item_head.item_rows", head.item_rows)]
    return tables


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return table_parameters(model) + [(n, p) for n, p in model.lm.named_parameters() if p.requires_grad]


def _ckpt_dirs(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.glob("ckpt-*") if p.is_dir() and p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))


def save_checkpoint(run_dir: Path, step: int, model, opt, res: "TrainResult", key: str,
                    best: Optional[dict[str, torch.Tensor]] = None, params=None,
                    hooks_state: Optional[tuple[dict, dict]] = None, ema: Optional[WeightAverage] = None) -> Path:
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in params if params is not None else trainable_parameters(model):
        tensors[f"param/{name}"] = p.detach().cpu().contiguous().clone()
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    opt_steps: dict[str, float] = {}
    for i, p in enumerate(opt_params):
        st = opt.state.get(p)
        if not st:
            continue
        for k, v in st.items():
            if k == "step":
                opt_steps[str(i)] = float(v.item() if torch.is_tensor(v) else v)
            elif torch.is_tensor(v):
                tensors[f"opt/{i}/{k}"] = v.detach().cpu().contiguous().clone()
    for name, t in (best or {}).items():
        tensors[f"best/{name}"] = t.detach().cpu().contiguous().clone()
    hook_tensors, hook_meta = hooks_state or ({}, {})
    for name, t in hook_tensors.items():
        tensors[f"hooks/{name}"] = t.detach().cpu().contiguous().clone()
    ema_tensors, ema_updates = ema.state() if ema is not None else ({}, 0)
    for name, t in ema_tensors.items():
        tensors[f"ema/{name}"] = t.detach().cpu().contiguous().clone()
    tensors["rng/torch"] = torch.get_rng_state().clone()
    np_state = np.random.get_state()
    tensors["rng/numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy())
    py_state = random.getstate()
    meta = {
        "format": CHECKPOINT_FORMAT, "key": key, "step": int(step),
        "opt_steps": opt_steps, "n_params": len(opt_params),
        "numpy_rng": {"pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        "losses": [float(x) for x in res.losses], "examples": res.examples, "tokens": res.tokens,
        "padded_tokens": res.padded_tokens, "seconds": res.seconds, "first_loss": res.first_loss,
        "select_curve": [[int(a), float(b)] for a, b in res.select_curve], "best_step": res.best_step,
        "best_score": res.best_score, "select_seconds": res.select_seconds, "hooks": hook_meta,
        "ema_updates": int(ema_updates),
    }
    tmp = run_dir / f".tmp-ckpt-{step:07d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
        final = run_dir / f"ckpt-{step:07d}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in _ckpt_dirs(run_dir)[:-1]:  # keep the newest only
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path, model, opt, key: str, params=None) -> Optional[dict]:
    """Restore the newest readable checkpoint of ``key`` into model/opt/RNGs; returns its meta or None."""
    from safetensors.torch import load_file

    for ck in reversed(_ckpt_dirs(run_dir)):
        try:
            meta = json.loads((ck / "state.json").read_text(encoding="utf-8"))
            tensors = load_file(str(ck / "state.safetensors"))
        except Exception as e:  # noqa: BLE001 -- damaged (truncated, not safetensors): try an older one
            log_.warning("checkpoint %s is unreadable (%s); trying an older one", ck, type(e).__name__)
            continue
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("key") != key:
            continue
        opt_params = [p for g in opt.param_groups for p in g["params"]]
        if meta["n_params"] != len(opt_params):
            continue
        odd = [i for i, p in enumerate(opt_params) if f"opt/{i}/exp_avg" in tensors and tensors[f"opt/{i}/exp_avg"].shape != p.shape]
        if odd:  # written with another optimizer-group layout: its moments would land on the wrong tensors
            log_.warning("checkpoint %s: its optimizer state does not fit this run's parameters (first at %d); not resumed",
                         ck, odd[0])
            continue
        with torch.no_grad():
            for name, p in params if params is not None else trainable_parameters(model):
                p.copy_(tensors[f"param/{name}"])
        for i, p in enumerate(opt_params):
            if str(i) not in meta["opt_steps"]:
                continue
            st = {"step": torch.tensor(meta["opt_steps"][str(i)], dtype=torch.float32)}
            for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if f"opt/{i}/{k}" in tensors:
                    st[k] = tensors[f"opt/{i}/{k}"].to(p.device).clone()
            opt.state[p] = st
        torch.set_rng_state(tensors["rng/torch"])
        nr = meta["numpy_rng"]
        np.random.set_state(("MT19937", tensors["rng/numpy_keys"].numpy().astype(np.uint32), nr["pos"], nr["has_gauss"], nr["cached_gaussian"]))
        pr = meta["python_rng"]
        random.setstate((pr[0], tuple(pr[1]), pr[2]))
        meta["path"] = str(ck)
        meta["best"] = {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}
        meta["hook_tensors"] = {k[6:]: v for k, v in tensors.items() if k.startswith("hooks/")}
        meta["ema"] = {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")}
        return meta
    return None


class LRSchedule:
    """The one learning-rate schedule of fine-tuning: an optional SID-only warm-up (``cfg.sid_warmup_steps``
    steps: the first parameter group, the SID rows, at ``cfg.sid_warmup_lr``, every other group at 0), then
    a linear warm-up over ``cfg.warmup_steps`` and a cosine decay to 0 at the last step."""

    def __init__(self, opt: torch.optim.Optimizer, cfg, n_steps: int):
        self.opt, self.n_steps, self.warmup = opt, n_steps, cfg.warmup_steps
        self.base = [g["lr"] for g in opt.param_groups]
        self.sid_warm = min(int(getattr(cfg, "sid_warmup_steps", 0) or 0), n_steps)
        self.sid_lr = getattr(cfg, "sid_warmup_lr", None)

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rates at ``step`` (after the SID-only warm-up)."""
        step -= self.sid_warm  # the schedule starts after the SID-only warm-up
        if step < self.warmup:
            return (step + 1) / max(self.warmup, 1)
        progress_ = (step - self.warmup) / max(self.n_steps - self.sid_warm - self.warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress_, 1.0)))

    def apply(self, step: int) -> None:
        if step < self.sid_warm:
            self.opt.param_groups[0]["lr"] = self.sid_lr
            for g in self.opt.param_groups[1:]:
                g["lr"] = 0.0
            return
        for g, lr in zip(self.opt.param_groups, self.base):
            g["lr"] = lr * self.factor(step)


class _Selection:
    """Model selection during training: scores the model with ``select`` (valid users only), records the
    curve in the :class:`TrainResult` and keeps a copy of the best-scoring trainable weights. With a weight
    average (``ema``) it is the average that is scored and kept."""

    def __init__(self, select, named, res: "TrainResult", log, ema: Optional[WeightAverage] = None):
        self.select, self.named, self.res, self.log, self.ema = select, named, res, log, ema
        self.best: dict[str, torch.Tensor] = {}

    def __call__(self, model, step: int) -> None:
        if self.ema is None:
            self._score(model, step)
        else:
            with self.ema.applied():
                self._score(model, step)

    def _score(self, model, step: int) -> None:
        res = self.res
        t_sel = time.perf_counter()
        score = float(self.select(model))
        model.train()
        res.select_seconds += time.perf_counter() - t_sel
        res.select_curve.append((step, score))
        if not res.best_step or score > res.best_score:
            res.best_step, res.best_score = step, score
            self.best.clear()
            self.best.update({name: p.detach().clone() for name, p in self.named})
        if self.log is not None:
            self.log(step, {"valid/select_recall_at_10": score})

    def restore_best(self, n_steps: int) -> None:
        """Put the best-scoring weights back (when a step before the last one won)."""
        if self.best and self.res.best_step < n_steps:
            with torch.no_grad():
                for name, p in self.named:
                    p.copy_(self.best[name])
            log_.info("fine-tune: kept step %d (valid Recall@10 %.4f) of %d", self.res.best_step, self.res.best_score, n_steps)


def _resume(meta: dict, res: "TrainResult", selection: _Selection, hooks, log, cfg, schedule: LRSchedule,
            ema: Optional[WeightAverage] = None) -> int:
    """Restore the run's progress from a checkpoint's ``meta`` into ``res`` / ``selection`` / ``hooks``
    (the weights and optimizer were loaded by :func:`load_checkpoint`), replay the logged loss curve up to
    it, and return the step to continue from."""
    start = res.resumed_from = int(meta["step"])
    res.losses = list(meta["losses"])
    res.steps, res.examples, res.tokens = start, int(meta["examples"]), int(meta["tokens"])
    res.padded_tokens, res.seconds = int(meta["padded_tokens"]), float(meta["seconds"])
    res.first_loss = float(meta.get("first_loss", float("nan")))
    res.select_curve = [(int(a), float(b)) for a, b in meta.get("select_curve", [])]
    res.best_step, res.best_score = int(meta.get("best_step", 0)), float(meta.get("best_score", float("nan")))
    res.select_seconds = float(meta.get("select_seconds", 0.0))
    selection.best.update(meta.get("best", {}))
    hooks.restore(meta["hook_tensors"], meta.get("hooks", {}))
    if ema is not None:
        ema.load_state(meta["ema"], meta.get("ema_updates", 0))
    log_.warning("fine-tune: resuming from %s (step %d of %d)", meta["path"], start, schedule.n_steps)
    if log is not None:  # replay the logged curve up to the checkpoint
        for step in range(start):
            if step % cfg.log_every == 0:
                log(step, {"train/loss": float(np.mean(res.losses[max(0, step + 1 - cfg.log_every): step + 1])),
                           "train/lr": schedule.base[-1] * schedule.factor(step)})
    return start


def train(
    model, encoder, rows: pd.DataFrame, cfg, seed: int, dtype: torch.dtype = torch.bfloat16,
    log: Optional[Callable[[int, dict], None]] = None, progress: bool = True,
    checkpoint_dir: Optional[Path] = None, select: Optional[Callable[[object], float]] = None,
    hooks: Optional[TrainHooks] = None,
) -> TrainResult:
    """Fine-tune ``model`` (LoRA params + SID embeddings) for :func:`train_steps` steps.

    With ``checkpoint_dir`` and ``cfg.checkpoint_every``, resumes from the latest checkpoint of the
    same run (see the module docstring) and saves one every ``checkpoint_every`` steps.

    SID warm-up: the first ``cfg.sid_warmup_steps`` steps update only the SID rows, at
    ``cfg.sid_warmup_lr``; the LR schedule (linear warm-up, cosine decay) then runs over the rest.
    Model selection: with ``select`` (model -> score, higher is better; built on valid users only,
    see ``sidrec.evaluation.evaluate.valid_selector``) and ``cfg.eval_every``, the model is scored every
    ``eval_every`` steps and after the last one; the best-scoring weights are restored at the end.
    Weight average: with ``cfg.ema`` (a decay per step) the moving average of the trainable weights
    (:class:`sidrec.training.ema.WeightAverage`) is what selection scores and what the model ends with.
    ``hooks`` (:class:`TrainHooks`) adapt the loop to another kind of model (the dynamic index)."""
    from sidrec.training.parallel import average_gradients, broadcast_parameters, world_info

    hooks = hooks or TrainHooks()
    torch.manual_seed(seed)
    deterministic_kernels(cfg.deterministic)
    rank, world = world_info()  # data-parallel (sidrec.training.parallel): each rank takes every world-th batch
    enc = encode_rows(encoder, rows)
    n_steps = train_steps(cfg, len(rows))
    batches = bucketed_batches(enc.lengths(), cfg.batch_size, n_steps * world, seed)[rank::world]
    named = hooks.parameters(model)
    trainable = [p for _, p in named]
    device = trainable[0].device
    if world > 1:
        broadcast_parameters(trainable)  # identical replicas to start with
        torch.manual_seed(seed + rank)  # own dropout masks per replica
    groups = hooks.param_groups(model, cfg)
    opt = torch.optim.AdamW(groups)
    schedule = LRSchedule(opt, cfg, n_steps)
    lora_params = [p for g in groups[1:] for p in g["params"]]  # what the SID-only warm-up holds still
    clipped = [p for g in groups for p in g["params"]]
    eval_every = getattr(cfg, "eval_every", None) if select is not None else None

    model.train()
    res = TrainResult(rows=len(rows), planned_steps=n_steps)
    ema_decay = getattr(cfg, "ema", None)
    ema = WeightAverage(named, ema_decay) if ema_decay else None
    selection = _Selection(select, named, res, log, ema)
    every = getattr(cfg, "checkpoint_every", None)
    run_dir = None
    start = 0
    if checkpoint_dir is not None and every:
        key = run_key(model, rows, cfg, seed, dtype, named, hooks.settings())
        run_dir = Path(checkpoint_dir) / key
        meta = load_checkpoint(run_dir, model, opt, key, named)
        if meta is not None:
            start = _resume(meta, res, selection, hooks, log, cfg, schedule, ema)
    t0 = time.perf_counter() - res.seconds
    bar = tqdm(range(start, len(batches)), desc="fine-tune", disable=not progress, unit="step", initial=start, total=len(batches))
    for step in bar:
        idx = batches[step]
        schedule.apply(step)
        new_rows = hooks.before_step(step, model)
        if new_rows is not None:  # e.g. the dynamic index was refreshed: targets follow the new SIDs
            if len(new_rows) != len(enc.input_ids):
                raise ValueError(f"before_step returned {len(new_rows)} rows for {len(enc.input_ids)} training rows")
            enc = encode_rows(encoder, new_rows)
        ids, mask, tgt = (t.to(device) for t in collate(enc, idx, encoder.pad_id))
        with autocast(device, dtype):
            h, _ = model.hidden(ids, attention_mask=mask)
            loss, _ = target_loss(model, h, ids, tgt, cfg.label_smoothing)
            extra, extra_logs = hooks.extra_loss(model, step, (h, ids, tgt))
        opt.zero_grad(set_to_none=True)
        (loss if extra is None else loss + extra).backward()
        if step < schedule.sid_warm:  # SID-only warm-up: LoRA gets no update (and no AdamW moments)
            for p in lora_params:
                p.grad = None
        if world > 1:
            average_gradients(trainable)
        torch.nn.utils.clip_grad_norm_([p for p in clipped if p.grad is not None], 1.0)
        opt.step()
        if ema is not None:
            ema.update()
        res.record(loss.item(), len(idx), mask)
        if step % cfg.log_every == 0 or step == len(batches) - 1:
            avg = float(np.mean(res.losses[-cfg.log_every :]))
            bar.set_postfix(loss=f"{avg:.3f}")
            if log is not None:
                log(step, {"train/loss": avg, "train/lr": opt.param_groups[-1]["lr"],
                           **{k: float(v) for k, v in extra_logs.items()}, **_distill_log(model)})
        if eval_every and ((step + 1) % eval_every == 0 or step == len(batches) - 1) and hooks.selectable(step):
            selection(model, step + 1)
        if run_dir is not None and rank == 0 and (step + 1) % every == 0 and step + 1 < len(batches):
            res.seconds = time.perf_counter() - t0
            save_checkpoint(run_dir, step + 1, model, opt, res, key, selection.best, named, hooks.checkpoint_state(),
                            ema)
    hooks.after_training(model, len(batches))
    if ema is not None:  # the average is the model (the last selection, if any, scored exactly it)
        ema.copy_to_model()
    res.seconds = time.perf_counter() - t0
    selection.restore_best(len(batches))  # model selection: keep the best-scoring weights
    if run_dir is not None and rank == 0:
        shutil.rmtree(run_dir, ignore_errors=True)  # finished: checkpoints are for resuming only
    model.eval()
    return res
