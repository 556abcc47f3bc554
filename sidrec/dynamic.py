"""Dynamic (ED2-style) indexing: the SID index is learned together with the LLM.

- An ``IndexGenerator`` per entity family (items; users for the dual index) maps the backbone's
  pooled representation of an entity's text to a ``code_dim`` vector and quantizes it residually
  with learned codebooks (k-means initialised).
- SID token embeddings are *derived* from the codewords through a learned projection
  (``token = P_level(codeword) + delta``), so the recommendation loss back-propagates into the
  codebooks -- the index receives gradient from the LLM side, not only from its own losses.
- The multi-granular token regulator: token-level alignment (each level's quantizer input vs its
  chosen codeword, a commitment + codebook loss) and index-level alignment (InfoNCE between the
  LLM's representation of an entity's SID token sequence and of its text).
- Every ``refresh_every`` steps the backbone (with its current LoRA weights) re-encodes all entity
  texts, assignments are recomputed with the current codebooks and made collision-free again,
  and training examples are re-rendered from entity ids -- targets always follow the current index.
- After ``freeze_after`` of the steps the index is frozen (one last refresh, made collision-free); the
  remaining steps train on it, and the model is saved in the same format as a static run, so
  evaluation is the same constrained decoding.
- At each refresh unused codewords are restarted on members of crowded codes (dead-code restart).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from sidrec.index import SIDIndex
from sidrec.model import SIDRecModel, SIDVocab, inner_model
from sidrec.quantize import auto_codebook_size, code_stats, kmeans, raw_collision_rate, resolve_collisions
from sidrec.train import TrainHooks


class IndexGenerator(nn.Module):
    """Residual quantizer heads on backbone representations + codeword -> token-embedding projection."""

    def __init__(self, in_dim: int, hidden: int, code_dim: int, levels: int, codebook_size: int, extra_cap: int,
                 emb_std: float, seed: int = 0, kind: str = "rq"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.kind = kind  # "rq": learned residual codebooks; "lsh": D-LSH, fixed random hyperplanes per level
        bits = max(1, int(math.log2(codebook_size)))
        self.register_buffer("planes", torch.randn(levels, bits, code_dim, generator=g))
        self.levels, self.codebook_size, self.extra_cap = levels, codebook_size, extra_cap
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        self.proj_in = nn.Linear(in_dim, code_dim)
        self.codebooks = nn.ParameterList([nn.Parameter(torch.randn(codebook_size, code_dim, generator=g) * 0.1)
                                           for _ in range(levels)])
        self.proj_out = nn.ModuleList([nn.Linear(code_dim, hidden) for _ in range(levels)])
        self.delta = nn.Parameter(torch.zeros(levels * codebook_size, hidden))
        self.extra = nn.Parameter(torch.randn(extra_cap, hidden, generator=g) * emb_std)
        self.emb_std = emb_std

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_in((x - self.mean) / self.scale)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, iters: int, seed: int) -> None:
        """Standardise on ``x``, PCA-like init of proj_in is left random; residual k-means for codebooks."""
        self.mean.copy_(x.mean(0))
        self.scale.copy_(x.std(0).clamp(min=1e-6))
        z = self.encode(x)
        g = torch.Generator().manual_seed(seed)
        r = z
        if self.kind == "lsh":  # codebooks start as bucket means (they are the token vectors' source)
            codes, _ = self.quantize(z)
            for lv in range(self.levels):
                for k in codes[:, lv].unique():
                    self.codebooks[lv][k] = z[codes[:, lv] == k].mean(0)
        for lv in range(self.levels if self.kind == "rq" else 0):
            c = kmeans(r, self.codebook_size, iters, g)
            self.codebooks[lv].copy_(c)
            r = r - c[torch.cdist(r, c).argmin(1)]
        # scale the output projection so token embeddings start at the backbone's embedding scale
        for lv in range(self.levels):
            w = self.proj_out[lv].weight
            nn.init.normal_(w, std=self.emb_std / math.sqrt(max(1.0, float((self.codebooks[lv] ** 2).sum(1).mean()))))
            nn.init.zeros_(self.proj_out[lv].bias)

    def quantize(self, z: torch.Tensor, codes: Optional[torch.Tensor] = None):
        """Residual quantization. Returns (codes [n, M], token-level alignment loss).

        ``codes`` forces the assignment (the current frozen-between-refresh index); otherwise nearest.
        """
        if self.kind == "lsh":
            weights = 2 ** torch.arange(self.planes.shape[1])
            bits = (torch.einsum("nd,lbd->nlb", z.detach(), self.planes) > 0).long()
            lsh = (bits * weights).sum(-1) if codes is None else codes[:, : self.levels]
            return lsh, z.new_zeros(())  # no token-level alignment for hashing
        r = z
        loss = z.new_zeros(())
        out = []
        for lv in range(self.levels):
            cb = self.codebooks[lv]
            c = torch.cdist(r.detach(), cb.detach()).argmin(1) if codes is None else codes[:, lv]
            q = cb[c]
            # codebook term moves codewords to inputs; commitment term keeps inputs near codewords
            # (mean over dimensions, so the term's scale does not grow with code_dim)
            loss = loss + ((q - r.detach()) ** 2).mean() + 0.25 * ((r - q.detach()) ** 2).mean()
            out.append(c)
            r = r - q.detach()
        return torch.stack(out, 1), loss

    def token_table(self) -> torch.Tensor:
        """[levels * N + extra_cap, hidden]: level tokens from codewords (+ delta), then disambiguation tokens."""
        rows = [self.proj_out[lv](self.codebooks[lv]) for lv in range(self.levels)]
        return torch.cat([torch.cat(rows, 0) + self.delta, self.extra], 0)


class DynamicSIDRecModel(SIDRecModel):
    """SIDRecModel whose SID token table is computed from index generators (items, then users)."""

    def __init__(self, lm, vocab: SIDVocab, generators: list[IndexGenerator]):
        super().__init__(lm, vocab, init=torch.zeros(len(vocab), 1))
        del self.sid_embeddings
        self.generators = nn.ModuleList(generators)
        self._table: Optional[torch.Tensor] = None

    def sid_table(self) -> torch.Tensor:
        if self._table is None:
            self._table = torch.cat([g.token_table() for g in self.generators], 0)
        return self._table

    def reset_table(self) -> None:
        self._table = None

    @property
    def hidden_size(self) -> int:
        return self.generators[0].delta.shape[1]

    def frozen(self) -> SIDRecModel:
        """A plain SIDRecModel with the current token table (what gets saved and evaluated)."""
        with torch.no_grad():
            table = torch.cat([g.token_table() for g in self.generators], 0).detach().clone()
        return SIDRecModel(self.lm, self.vocab, init=table)


def vocab_for(index_items: SIDIndex, base_vocab: int, user_index: Optional[SIDIndex] = None) -> SIDVocab:
    return SIDVocab.from_index(index_items, base_vocab, extra_indices=(user_index,) if user_index is not None else ())


@torch.no_grad()
def encode_texts(model, ids: list[list[int]], pad_id: int, batch_size: int = 64, dtype=torch.bfloat16,
                 progress: bool = False, desc: str = "re-encode") -> torch.Tensor:
    """Mean-pooled last hidden states of token id lists (current LoRA weights), length-sorted batches."""
    inner = inner_model(model.lm)
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = torch.zeros(len(ids), model.hidden_size)
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch", leave=False):
        idx = order[s:s + batch_size]
        h, m = _pooled_input(ids, idx, pad_id)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            hs = inner(input_ids=h, attention_mask=m).last_hidden_state.float()
        out[torch.as_tensor(idx)] = (hs * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)
    return out


def _pooled_input(ids, idx, pad_id):
    width = max(len(ids[i]) for i in idx)
    x = torch.full((len(idx), width), pad_id, dtype=torch.long)
    m = torch.zeros((len(idx), width))
    for j, i in enumerate(idx):
        x[j, : len(ids[i])] = torch.tensor(ids[i])
        m[j, : len(ids[i])] = 1
    return x, m


def pooled_with_grad(model, ids: list[list[int]], rows: np.ndarray, pad_id: int) -> torch.Tensor:
    """Pooled text representations of some entities, with gradient through the (LoRA) backbone."""
    x, m = _pooled_input(ids, rows, pad_id)
    hs, _ = model.hidden(x, attention_mask=m.long())
    return (hs.float() * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)


def assign(gen: IndexGenerator, reps: torch.Tensor, entity_ids: list[str], prefix: str) -> tuple[SIDIndex, float]:
    """Nearest-codeword assignment + collision resolution -> a unique SIDIndex with a fixed-size extra level.

    When the backbone's representations drift faster than the codebooks, many entities can land on one
    code. Groups larger than ``extra_cap`` are rebalanced instead of failing a long run: their surplus
    members move, at the last quantizer level, to the nearest codeword whose group still has room.
    """
    with torch.no_grad():
        z = gen.encode(reps)
        raw, _ = gen.quantize(z)
        last = gen.levels - 1
        r = z.clone()
        if gen.kind == "rq":
            for lv in range(last):
                r = r - gen.codebooks[lv][raw[:, lv]]
        dist = torch.cdist(r, gen.codebooks[last]).numpy()  # [n, N] distances at the last level
    raw = raw.numpy().copy()
    rate = raw_collision_rate(raw)
    raw = _rebalance(raw, dist, gen.extra_cap)
    codes, extra = resolve_collisions(raw)
    if not extra:
        codes = np.concatenate([codes, np.zeros((len(codes), 1), dtype=np.int64)], 1)
    sizes = [gen.codebook_size] * gen.levels + [gen.extra_cap]
    return SIDIndex(entity_ids=list(entity_ids), codes=codes, level_sizes=sizes, prefix=prefix), rate


def _rebalance(raw: np.ndarray, dist: np.ndarray, cap: int) -> np.ndarray:
    """Move members of over-full code groups (beyond ``cap``, farthest first) to the nearest last-level
    code whose group has room. Raises only if every last-level code under a prefix is full."""
    from collections import Counter

    counts = Counter(map(tuple, raw.tolist()))
    if max(counts.values()) <= cap:
        return raw
    for key, n in list(counts.items()):
        if n <= cap:
            continue
        members = np.where((raw == np.array(key)).all(1))[0]
        members = members[np.argsort(dist[members, key[-1]], kind="stable")]  # keep the closest ones
        for i in members[cap:]:
            for c in np.argsort(dist[i], kind="stable"):
                cand = key[:-1] + (int(c),)
                if counts.get(cand, 0) < cap:
                    counts[key] -= 1
                    counts[cand] = counts.get(cand, 0) + 1
                    raw[i, -1] = c
                    break
            else:
                raise ValueError(f"index.dynamic.extra_level_cap={cap}: more than {cap} x codebook_size entities "
                                 f"share the prefix {key[:-1]}; raise extra_level_cap or index.codebook_size")
    return raw


@torch.no_grad()
def restart_dead_codes(gen: IndexGenerator, reps: torch.Tensor, seed: int) -> int:
    """VQ dead-code restart: at each level, codewords no entity is nearest to are moved onto the
    residuals of members of crowded codes (sampled in proportion to crowding). Returns how many moved.

    Dead codes carry no training targets, so moving them changes no entity's SID by itself; it gives
    the re-assignment room to split crowded groups (the collapse measured in BENCHMARKS.md)."""
    if gen.kind != "rq":
        return 0
    g = torch.Generator().manual_seed(seed)
    r, moved = gen.encode(reps), 0
    for lv in range(gen.levels):
        cb = gen.codebooks[lv]
        c = torch.cdist(r, cb).argmin(1)
        counts = torch.bincount(c, minlength=gen.codebook_size)
        dead = (counts == 0).nonzero().flatten()
        weight = (counts[c] - 1).float().clamp(min=0)  # a singleton's member is never moved
        k = min(len(dead), int((weight > 0).sum()))
        if k:
            pick = torch.multinomial(weight, k, replacement=False, generator=g)
            cb.data[dead[:k]] = r[pick]
            moved += k
            c = torch.cdist(r, cb).argmin(1)
        r = r - cb[c]
    return moved


def churn(old: SIDIndex, new: SIDIndex) -> float:
    return float((old.codes != new.codes).any(1).mean())


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    logits = a @ b.T / temperature
    labels = torch.arange(len(a))
    return 0.5 * (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels))


@dataclass
class DynamicResult:
    model: SIDRecModel  # frozen, saveable
    items: SIDIndex
    users: Optional[SIDIndex]
    rows: pd.DataFrame  # final rendered instruction set (train as last rendered + valid/test)
    generators: list = field(default_factory=list)  # trained IndexGenerator(s): items[, users]
    log: list[dict] = field(default_factory=list)  # per refresh: churn, collisions, utilization
    losses: list[tuple[int, float]] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def train_dynamic(ds, features, cfg, lm, tok, log: Optional[Callable[[int, dict], None]] = None,
                  progress: bool = True) -> DynamicResult:
    """Joint training of the index generator(s) and LoRA; returns the frozen model + final index."""
    from sidrec.model import Encoder
    from sidrec.tasks import PromptFormat, Renderer, eval_specs, sample_specs
    from sidrec.text import item_texts as make_item_texts
    from sidrec.text import user_texts as make_user_texts

    dcfg, icfg, tcfg = cfg.index.dynamic, cfg.index, cfg.train
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    torch.manual_seed(cfg.seed)
    dual = icfg.entities == "items+users"
    base_vocab = lm.get_input_embeddings().weight.shape[0]
    hidden = lm.get_input_embeddings().weight.shape[1]
    emb_std = lm.get_input_embeddings().weight.detach().float().std().item()

    items = ds.items["item_id"].tolist()
    itexts = make_item_texts(ds)
    item_tok = [tok(t, add_special_tokens=False, truncation=True, max_length=dcfg.text_tokens)["input_ids"] or [0] for t in itexts]
    uids, utexts = make_user_texts(ds, cfg.features.user_history_titles)
    user_tok = [tok(t, add_special_tokens=False, truncation=True, max_length=dcfg.text_tokens)["input_ids"] or [0] for t in utexts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def make_gen(n, seed):
        N = auto_codebook_size(n, icfg.levels) if icfg.codebook_size == "auto" else int(icfg.codebook_size)
        return IndexGenerator(hidden, hidden, dcfg.code_dim, icfg.levels, N, min(dcfg.extra_level_cap, max(n, 2)), emb_std, seed,
                              kind="lsh" if icfg.quantizer == "lsh" else "rq")

    gens = [make_gen(len(items), cfg.seed)]
    item_reps = torch.as_tensor(features.item_embeddings, dtype=torch.float32)
    gens[0].init_from(item_reps, icfg.kmeans_iters, cfg.seed)
    user_reps = None
    if dual:
        user_reps = torch.as_tensor(features.user_embeddings, dtype=torch.float32) if features.user_embeddings is not None \
            else encode_texts(SIDRecModel(lm, SIDVocab([], [], [], base_vocab)), user_tok, pad, dtype=dtype)
        gens.append(make_gen(len(uids), cfg.seed + 1))
        gens[1].init_from(user_reps, icfg.kmeans_iters, cfg.seed + 1)

    item_index, rate_i = assign(gens[0], item_reps, items, "")
    user_index, rate_u = assign(gens[1], user_reps, uids, "u_") if dual else (None, 0.0)
    vocab = vocab_for(item_index, base_vocab, user_index)
    model = DynamicSIDRecModel(lm, vocab, gens)
    encoder = Encoder(tok, vocab)

    n_train = cfg.tasks.max_train_examples or tcfg.steps * tcfg.batch_size
    specs = sample_specs(ds, cfg.tasks, n_train, cfg.data.max_history, cfg.seed, dual=dual)
    utext_map = dict(zip(uids, utexts))
    fmt = PromptFormat.from_config(cfg.tasks, cfg.data.max_history)

    def render(ii, ui):
        return Renderer(ds, ii, ui, item_texts=itexts, user_texts=utext_map, user_in_prompt=dual, prompt_format=fmt).render(specs)

    rows = render(item_index, user_index)
    from sidrec.train import train, train_steps

    tcfg = tcfg.model_copy(update={"steps": train_steps(tcfg, len(rows)), "epochs": None})
    hooks = DynamicIndexHooks(
        gens=gens, cfg=cfg, items=items, item_tok=item_tok, uids=uids, user_tok=user_tok, pad=pad, dtype=dtype,
        render=render, item_index=item_index, user_index=user_index, n_steps=tcfg.steps, log=log)
    hooks.rows = rows
    losses: list[tuple[int, float]] = []

    def _log(step: int, metrics: dict) -> None:
        if "train/loss" in metrics:
            losses.append((step, metrics["train/loss"]))
        if log is not None:
            log(step, metrics)

    res = train(model, encoder, rows, tcfg, cfg.seed, dtype, _log, progress, hooks=hooks)
    item_index, user_index, rows, frozen_at = hooks.item_index, hooks.user_index, hooks.rows, hooks.frozen_at
    model.eval()
    model.reset_table()
    frozen = model.frozen()
    final = Renderer(ds, item_index, user_index, item_texts=itexts, user_texts=utext_map, user_in_prompt=dual, prompt_format=fmt)
    ev = [final.render(eval_specs(ds, p, cfg.data.max_history, fmt.history)) for p in ("valid", "test")]
    all_rows = pd.concat([rows] + ev, ignore_index=True)
    summary = {**res.summary(), "dynamic/refreshes": len(hooks.refresh_log), "dynamic/frozen_at_step": frozen_at,
               "dynamic/initial_collision_rate_raw": rate_i}
    return DynamicResult(model=frozen, items=item_index, users=user_index, rows=all_rows, generators=list(gens),
                         log=hooks.refresh_log, losses=losses, summary=summary)


class DynamicIndexHooks(TrainHooks):
    """The dynamic index inside the one training loop (:func:`sidrec.train.train`):

    * trains the index generators (projection at ``train.embedding_lr``, codebooks at
      ``index.dynamic.codebook_lr``) and LoRA, no weight decay;
    * before each step rebuilds the SID table from the codewords; every ``refresh_every`` steps
      re-encodes the entity texts with the current backbone, restarts dead codes, re-assigns SIDs and
      hands the loop the training rows re-rendered on the new index; at ``freeze_after`` of the steps
      one last refresh freezes the index, and the rest of the run trains on it;
    * adds ED2's regulator losses (token- and index-level alignment) to the recommendation loss.

    Not resumable: the index assignments change during the run and are not part of a checkpoint."""

    resumable = False
    sid_warmup = False

    def __init__(self, *, gens, cfg, items, item_tok, uids, user_tok, pad, dtype, render, item_index, user_index,
                 n_steps: int, log=None):
        self.gens, self.cfg, self.dcfg = gens, cfg, cfg.index.dynamic
        self.items, self.item_tok, self.uids, self.user_tok, self.pad, self.dtype = items, item_tok, uids, user_tok, pad, dtype
        self.render, self.item_index, self.user_index = render, item_index, user_index
        self.dual = user_index is not None
        self.rows = None
        self.log = log
        self.refresh_log: list[dict] = []
        self.rng = np.random.default_rng(cfg.seed)
        # the index is frozen at freeze_step (one last refresh); the steps after it train on the final SIDs,
        # so the evaluated model has seen its own index (freezing only after the last step re-assigned ~95%
        # of item SIDs the model never trained on: BENCHMARKS.md)
        self.freeze_step = min(n_steps, max(1, round(self.dcfg.freeze_after * n_steps)))
        self.frozen_at: Optional[int] = None

    def parameters(self, model):
        named = [(f"gen{i}.{n}", p) for i, g in enumerate(self.gens) for n, p in g.named_parameters() if not n.startswith("codebooks")]
        named += [(f"gen{i}.codebook{j}", p) for i, g in enumerate(self.gens) for j, p in enumerate(g.codebooks)]
        return named + [(n, p) for n, p in model.lm.named_parameters() if p.requires_grad]

    def param_groups(self, model, cfg):
        gen_params = [p for g in self.gens for n, p in g.named_parameters() if not n.startswith("codebooks")]
        codebooks = [p for g in self.gens for p in g.codebooks]
        lora = [p for _, p in model.lm.named_parameters() if p.requires_grad]
        groups = [{"params": gen_params, "lr": cfg.embedding_lr, "weight_decay": 0.0},
                  {"params": codebooks, "lr": self.dcfg.codebook_lr, "weight_decay": 0.0}]
        if lora:
            groups.append({"params": lora, "lr": cfg.lr, "weight_decay": 0.0})
        return groups

    def before_step(self, step, model):
        new_rows = None
        if step > 0 and step == self.freeze_step:
            new_rows = self.refresh(model, step, final=True)
        elif step > 0 and step % self.dcfg.refresh_every == 0 and self.frozen_at is None:
            new_rows = self.refresh(model, step)
        model.reset_table()
        return new_rows

    def extra_loss(self, model, step):
        reg = regulator_losses(model, self.gens, self.dcfg, self.item_index, self.item_tok, self.pad, self.rng,
                               (self.user_index, self.user_tok) if self.dual else None)
        return reg["total"], {"train/token_align": reg["token_align"].item(), "train/index_align": reg["index_align"].item()}

    def after_training(self, model, steps):
        if self.frozen_at is None:  # freeze_after = 1.0: final assignment with the final backbone and codebooks
            self.refresh(model, steps, final=True)

    def refresh(self, model, step: int, final: bool = False) -> pd.DataFrame:
        """Re-encode, re-assign and re-render; returns the training rows on the new index."""
        seed = self.cfg.seed
        model.eval()
        reps_i = encode_texts(model, self.item_tok, self.pad, dtype=self.dtype)
        moved = restart_dead_codes(self.gens[0], reps_i, seed + step) if self.dcfg.restart_dead_codes else 0
        new_items, ri = assign(self.gens[0], reps_i, self.items, "")
        entry = {"step": step, "frozen": int(final), "churn/items": churn(self.item_index, new_items),
                 "collision_rate_raw/items": ri, "restarted_codes/items": moved}
        entry.update({f"utilization/items/level_{k}": v for k, v in _util(new_items, self.gens[0]).items()})
        if self.dual:
            reps_u = encode_texts(model, self.user_tok, self.pad, dtype=self.dtype)
            moved_u = restart_dead_codes(self.gens[1], reps_u, seed + step + 1) if self.dcfg.restart_dead_codes else 0
            new_users, ru = assign(self.gens[1], reps_u, self.uids, "u_")
            entry.update({"churn/users": churn(self.user_index, new_users), "collision_rate_raw/users": ru,
                          "restarted_codes/users": moved_u})
            self.user_index = new_users
        self.item_index = new_items
        self.rows = self.render(self.item_index, self.user_index)  # targets remapped to the current index
        if final:
            self.frozen_at = step
        self.refresh_log.append(entry)
        if self.log is not None:
            self.log(step, {f"dynamic/{k}": v for k, v in entry.items() if k != "step"})
        model.train()
        return self.rows


def _util(index: SIDIndex, gen: IndexGenerator) -> dict[str, float]:
    stats = code_stats(index.codes[:, : gen.levels], [gen.codebook_size] * gen.levels)
    return {k.split("_")[-1]: v for k, v in stats.items() if k.startswith("utilization_level_")}


def regulator_losses(model, gens, dcfg, item_index: SIDIndex, item_tok, pad, rng, users=None) -> dict:
    """ED2's multi-granular token regulator on a sample of entities (items; users for the dual index)."""
    zero = torch.zeros(())
    out = {"token_align": zero, "index_align": zero, "total": zero}
    if dcfg.token_align <= 0 and dcfg.index_align <= 0:
        return out
    fams = [(gens[0], item_index, item_tok)]
    if users is not None:
        fams.append((gens[1], users[0], users[1]))
    tok_loss, idx_loss = zero, zero
    for gen, index, toks in fams:
        rows = rng.choice(len(toks), size=min(dcfg.entity_batch, len(toks)), replace=False)
        text_rep = pooled_with_grad(model, toks, rows, pad)  # through the LoRA backbone
        if dcfg.token_align > 0:
            codes = torch.as_tensor(index.codes[rows, : gen.levels])
            _, tl = gen.quantize(gen.encode(text_rep), codes)
            tok_loss = tok_loss + tl
        if dcfg.index_align > 0:
            sid_ids = torch.stack([model.vocab.code_ids(lv, torch.as_tensor(index.codes[rows, lv]))
                                   + _family_offset(model.vocab, index, lv) for lv in range(index.num_levels)], 1)
            hs, _ = model.hidden(sid_ids)
            idx_loss = idx_loss + info_nce(hs.float().mean(1), text_rep, dcfg.temperature)
    out["token_align"], out["index_align"] = tok_loss, idx_loss
    out["total"] = dcfg.token_align * tok_loss + dcfg.index_align * idx_loss
    return out


def _family_offset(vocab: SIDVocab, index: SIDIndex, level: int) -> int:
    """code_ids(level) indexes the item family; user levels follow the item levels in the vocab."""
    if not index.prefix:
        return 0
    n_item_levels = len(vocab.level_sizes) - index.num_levels
    return vocab.level_offsets[n_item_levels + level] - vocab.level_offsets[level]
