"""The dynamic index: SIDs learned together with the LLM, without forgetting what it learned.

A dynamic run starts *exactly* where a static run starts -- the static RQ-KMeans index, the same SID
table, the same training rows -- and then learns the index in alternating phases (ETEGRec's recipe,
ED2's dual index and regulator):

* **The learned quantizer** (:class:`LearnedQuantizer`, one per entity family: items; users for the
  dual index) sees the static quantizer's input ``x`` (standardised as RQ-KMeans saw it) through a
  residual encoder ``z = x + MLP(x)`` whose last layer starts at zero, and quantizes ``z`` residually
  with codebooks copied from RQ-KMeans: at step 0 it *is* the static quantizer.
* **The SID table follows the codebooks** (:class:`LearnedIndexModel`): a token's embedding is its free
  row (what static training trains) plus a learned projection of how far its codeword has moved since
  the start -- zero at step 0 -- so the recommendation loss reaches the codebooks.
* **Phases** (:func:`phase_plan`): recommender phases (index frozen; LoRA and SID rows train) and
  tokenizer phases (LLM frozen; encoder and projections train at ``tokenizer_lr``, the codebooks at
  ``codeword_lr``, a tenth of it by default (codewords that move fast re-sort the entities of a prefix cell), on the
  recommendation loss, ED2's token-level alignment, a reconstruction term, ED2's index-level alignment
  and the recommender's feedback -- the LLM's hidden state before an item aligned with the item's
  encoding), then a last recommender phase on the frozen index. Model selection runs only in that
  last phase (the index is fixed there).
* **Codes are recomputed only at the end of a tokenizer phase**, and churn is bounded
  (:func:`reassign`): an entity moves only if its new code's quantization error is lower by
  ``churn_margin`` of the old one, at most ``max_churn`` of a family per refresh, largest gains first,
  and only to a free code -- the index stays unique.

Everything runs inside the one training loop (:func:`sidrec.training.loop.train`) through
:class:`DynamicIndexHooks`, checkpointed and resumable like a static run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn

from sidrec.index.collisions import nearest_free_last, prefix_cells
from sidrec.index.kmeans import balance_prices, subtract_nearest_
from sidrec.index.sid_index import SIDIndex
from sidrec.model.sid_model import SIDRecModel
from sidrec.index.quantize import MLP, QuantizerState, code_stats, mlp_state, raw_collision_rate
from sidrec.training.loop import TrainHooks, table_parameters, trainable_parameters


# ---------------------------------------------------------------------------------------------- phases
@dataclass(frozen=True)
class Phase:
    kind: str  # "rec" (index frozen, recommender trains) | "tok" (LLM frozen, index trains) | "final"
    start: int
    end: int  # exclusive


def phase_plan(n_steps: int, cycles: int, tokenizer_share: float, final_share: float) -> list[Phase]:
    """``cycles`` x (recommender phase, tokenizer phase), then the final recommender phase.

    ``n_steps`` is the recommender's budget -- what a static run of the same config trains -- and the
    recommender phases share exactly that; the tokenizer phases (``tokenizer_share`` of it, the LLM
    frozen) come on top, so the dynamic run's LLM sees as many training batches as the static run's."""
    n_final = max(1, round(final_share * n_steps))
    n_tok = max(cycles, round(tokenizer_share * n_steps))
    n_rec = n_steps - n_final
    if n_rec < cycles:
        raise ValueError(f"index.dynamic: {n_steps} training steps are too few for {cycles} cycles with final_share "
                         f"{final_share}; train longer or use fewer cycles")
    phases, s = [], 0
    for c in range(cycles):
        r = n_rec // cycles + (c < n_rec % cycles)
        t = n_tok // cycles + (c < n_tok % cycles)
        phases += [Phase("rec", s, s + r), Phase("tok", s + r, s + r + t)]
        s += r + t
    phases.append(Phase("final", s, s + n_final))
    return phases


# ---------------------------------------------------------------------------------------------- quantizer
def _zero_last(m: MLP) -> MLP:
    nn.init.zeros_(m.layers[-1].weight)
    nn.init.zeros_(m.layers[-1].bias)
    return m


class LearnedQuantizer(nn.Module):
    """``z = x + enc(x)`` on the standardised static input, residual codebooks, ``x_hat = q + dec(q)``.

    Starts as the static RQ-KMeans state ``state`` (both MLPs' last layers are zero, the codebooks are
    copies), so :meth:`greedy` gives exactly ``state.assign(x)`` before any training. A balanced state
    (``index.balance: last``) brings its per-code prices: the assignment adds them to the squared distances
    as the static one does, and :meth:`rebalance` refits them under the moved codebooks at each refresh."""

    def __init__(self, state: QuantizerState, x: np.ndarray, hidden_dim: int, seed: int):
        super().__init__()
        if state.kind != "rq_kmeans":
            raise ValueError(f"the learned quantizer starts from an rq_kmeans state, not {state.kind!r}")
        self.mean, self.scale = state.mean.copy(), state.scale.copy()
        self.register_buffer("x", torch.from_numpy(np.ascontiguousarray(state.standardise(x))))
        d = self.x.shape[1]
        with torch.random.fork_rng():  # own init stream: the rest of the run sees the static run's RNG
            torch.manual_seed(seed)
            self.encoder = _zero_last(MLP([d, hidden_dim, d]))
            self.decoder = _zero_last(MLP([d, hidden_dim, d]))
        self.codebooks = nn.ParameterList([nn.Parameter(torch.from_numpy(cb.copy())) for cb in state.codebooks])
        for lv, cb in enumerate(state.codebooks):
            self.register_buffer(f"start_{lv}", torch.from_numpy(cb.copy()))
        self.balanced = bool(state.prices)
        for lv, cb in enumerate(state.codebooks):
            price = state.prices[lv] if state.prices else np.zeros(cb.shape[0], dtype=np.float32)
            self.register_buffer(f"price_{lv}", torch.from_numpy(np.asarray(price, dtype=np.float32).copy()))

    @property
    def levels(self) -> int:
        return len(self.codebooks)

    def start(self, level: int) -> torch.Tensor:
        return getattr(self, f"start_{level}")

    def price(self, level: int) -> torch.Tensor:
        """Level ``level``'s per-code prices (zeros unless the index is balanced)."""
        return getattr(self, f"price_{level}")

    def encode(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.x if rows is None else self.x[rows]
        return x + self.encoder(x)

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        return q + self.decoder(q)

    def quantized(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of each row's codewords (``codes`` [n, >= levels]; extra levels ignored)."""
        return sum(cb[codes[:, lv]] for lv, cb in enumerate(self.codebooks))

    @torch.no_grad()
    def greedy(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-codeword residual assignment (squared distance + price, the static quantizer's rule):
        codes [n, levels] and the residual entering the last level."""
        r, out = z.clone(), []
        for lv, cb in enumerate(self.codebooks):
            if lv == self.levels - 1:
                last = r.clone()
            out.append(subtract_nearest_(r, cb.detach(), self.price(lv) if self.balanced else None))
        return torch.stack(out, 1), last

    @torch.no_grad()
    def rebalance(self, z: torch.Tensor) -> None:
        """Refit the last level's prices (:func:`sidrec.index.kmeans.balance_prices`) on the residuals of ``z``
        under the current codebooks: the prices fitted on the start codebooks stop balancing once they move.
        A deterministic function of the encoder and codebooks, so an unmoved quantizer keeps its prices."""
        if not self.balanced:
            return
        _, last = self.greedy(z)
        self.price(self.levels - 1).copy_(balance_prices(last, self.codebooks[-1].detach()))

    def regulator(self, rows: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token-level alignment, reconstruction) on some entities with their current ``codes``.

        Token level (ED2): each level's codeword is pulled to its residual input, and the input kept near
        the codeword (commitment, 0.25). Reconstruction: the decoder maps the codewords' sum (straight-through
        to the encoder) back to the standardised input, so the encoder cannot forget the input."""
        z = self.encode(rows)
        r, tok = z, z.new_zeros(())
        for lv, cb in enumerate(self.codebooks):
            q = cb[codes[:, lv]]
            tok = tok + ((q - r.detach()) ** 2).mean() + 0.25 * ((r - q.detach()) ** 2).mean()
            r = r - q.detach()
        q_sum = self.quantized(codes)
        q_st = q_sum + (z - z.detach())  # value: the codewords; gradient: to codebooks and encoder
        recon = ((self.decode(q_st) - self.x[rows]) ** 2).mean()
        return tok, recon

    def state(self) -> QuantizerState:
        """The trained quantizer as a saveable state (assigns new entities later: ``state.assign``)."""
        return QuantizerState(kind="rq_vae", codebooks=[cb.detach().float().cpu().numpy().copy() for cb in self.codebooks],
                              mean=self.mean, scale=self.scale, encoder=mlp_state(self.encoder),
                              decoder=mlp_state(self.decoder), residual=True,
                              prices=[self.price(lv).numpy().copy() for lv in range(self.levels)] if self.balanced else [])


# ---------------------------------------------------------------------------------------------- re-assignment
def _free_code(key: tuple, taken: dict, extra_size: int, residual: torch.Tensor, last_book: torch.Tensor) -> Optional[tuple]:
    """A free full code for raw code ``key``: with an extra level, the first free slot under ``key``;
    without, ``key`` itself or the nearest free last-level codeword under its prefix."""
    if extra_size:
        for slot in range(extra_size):
            if key + (slot,) not in taken:
                return key + (slot,)
        return None
    return key if key not in taken else nearest_free_last(key, residual[None], last_book, taken)


def reassign(q: LearnedQuantizer, index: SIDIndex, max_churn: float, margin: float) -> tuple[SIDIndex, dict]:
    """Churn-bounded refresh of ``index`` under the current quantizer.

    An entity moves only if the quantization error of its new code is below ``(1 - margin)`` of its
    current code's, at most ``floor(max_churn * n)`` entities move (largest error reductions first),
    and only to a code no other entity holds. A balanced quantizer refits its prices first
    (:meth:`LearnedQuantizer.rebalance`), so the new codes are balanced under the current codebooks.
    Returns the new index and its refresh statistics."""
    n, m = index.codes.shape[0], q.levels
    with torch.no_grad():
        z = q.encode()
        q.rebalance(z)
        old = index.codes.copy()
        err_old = ((z - q.quantized(torch.from_numpy(old))) ** 2).sum(1)
        raw, last_res = q.greedy(z)
        err_raw = ((z - q.quantized(raw)) ** 2).sum(1)
    raw_np, err_old_np = raw.numpy(), err_old.numpy()
    gain = err_old_np - err_raw.numpy()
    eligible = np.nonzero(gain > margin * err_old_np)[0]
    order = eligible[np.argsort(-gain[eligible], kind="stable")]
    limit = int(np.floor(max_churn * n))
    extra_size = index.level_sizes[m] if old.shape[1] > m else 0
    taken = {tuple(r): i for i, r in enumerate(old.tolist())}
    codes, moved = old.copy(), 0
    last_book = q.codebooks[-1].detach()
    done = np.zeros(n, dtype=bool)
    for _ in range(2):  # a second pass: codes freed by the first pass's moves
        for i in order:
            if moved >= limit:
                break
            if done[i]:
                continue
            new = _free_code(tuple(raw_np[i].tolist()), taken, extra_size, last_res[i], last_book)
            if new is None or new == tuple(codes[i].tolist()):
                continue
            if new[:m] != tuple(raw_np[i].tolist()):  # moved to a neighbouring code: it must still clear the margin
                with torch.no_grad():
                    e = float(((z[i] - q.quantized(torch.tensor([new]))[0]) ** 2).sum())
                if err_old_np[i] - e <= margin * err_old_np[i]:
                    continue
            del taken[tuple(codes[i].tolist())]
            codes[i] = new
            taken[new] = i
            done[i] = True
            moved += 1
    with torch.no_grad():
        quant_error = float(((z - q.quantized(torch.from_numpy(codes))) ** 2).sum(1).mean())
    new_index = SIDIndex(entity_ids=index.entity_ids, codes=codes, level_sizes=index.level_sizes, prefix=index.prefix)
    stats = {"churn": moved / max(n, 1), "collision_rate_raw": raw_collision_rate(raw_np),
             "eligible": len(eligible) / max(n, 1),
             "quant_error": quant_error}
    util = code_stats(codes[:, :m], index.level_sizes[:m])
    stats.update({f"utilization/level_{k.split('_')[-1]}": float(v) for k, v in util.items() if k.startswith("utilization_level_")})
    if m >= 2:  # where the raw collisions come from: the earlier levels (overfull cells) or the last (in_room)
        stats.update({f"raw_{k}": v for k, v in prefix_cells(raw_np, index.level_sizes[m - 1]).items()})
        raw_util = code_stats(raw_np, index.level_sizes[:m])
        stats.update({f"raw_perplexity/level_{lv}": raw_util[f"perplexity_level_{lv}"] for lv in range(m)})
    return new_index, stats


def _family_key(stat: str, family: str) -> str:
    """``churn`` -> ``churn/items``; ``utilization/level_0`` -> ``utilization/items/level_0``."""
    head, _, rest = stat.partition("/")
    return f"{head}/{family}/{rest}" if rest else f"{head}/{family}"


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    a = nn.functional.normalize(a.float(), dim=-1)
    b = nn.functional.normalize(b.float(), dim=-1)
    logits = a @ b.T / temperature
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels))


# ---------------------------------------------------------------------------------------------- model
@dataclass
class Family:
    """One entity family of the dynamic index: its learned quantizer and current index."""

    name: str  # "items" | "users"
    quantizer: LearnedQuantizer
    index: SIDIndex
    first_level: int  # the vocab level of this family's first SID level
    _rows: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.set_index(self.index)

    def set_index(self, index: SIDIndex) -> None:
        self.index = index
        self._rows = {tuple(c): i for i, c in enumerate(index.codes.tolist())}

    def row_for(self, code: tuple) -> int:
        return self._rows.get(code, -1)


class LearnedIndexModel(SIDRecModel):
    """A :class:`SIDRecModel` (the static run's, sharing its backbone and free SID rows) whose SID table
    adds, per quantizer level, ``P_level(codeword - codeword_at_start)``: zero at step 0, and the path
    by which the recommendation loss reaches the codebooks. :meth:`folded` returns the plain model with
    the table baked in (what is saved and evaluated)."""

    def __init__(self, base: SIDRecModel, families: list[Family], seed: int):
        nn.Module.__init__(self)
        self.base = [base]  # not a submodule: its parameters are this model's own (shared)
        self.lm, self.vocab, self.sid_embeddings = base.lm, base.vocab, base.sid_embeddings
        self.item_head = base.item_head  # shared (sidrec.model.item_head); DynamicIndexHooks re-points it at each refresh
        self.register_buffer("sid_logit_scale", base.sid_logit_scale)
        self.families = families
        self.quantizers = nn.ModuleList(f.quantizer for f in families)
        hidden = self.sid_embeddings.shape[1]
        emb_std = float(base.base_embeddings().weight.detach().float().std())
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.ModuleList()
        for f in families:
            levels = nn.ModuleList()
            for lv in range(f.quantizer.levels):
                lin = nn.Linear(f.quantizer.x.shape[1], hidden, bias=False)
                norm = float((f.quantizer.start(lv) ** 2).sum(1).mean().clamp(min=1e-6).sqrt())
                with torch.no_grad():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * emb_std / norm)
                levels.append(lin)
            self.proj.append(levels)
        self._frozen: Optional[torch.Tensor] = None
        # vocab level -> (family, quantizer level); other vocab levels (a disambiguation level) get no offset
        self._owner = {f.first_level + lv: (fi, lv) for fi, f in enumerate(families) for lv in range(f.quantizer.levels)}

    def offsets(self) -> torch.Tensor:
        pieces = []
        for v, size in enumerate(self.vocab.level_sizes):
            if v in self._owner:
                fi, lv = self._owner[v]
                q = self.quantizers[fi]
                pieces.append(self.proj[fi][lv](q.codebooks[lv] - q.start(lv)))
            else:
                pieces.append(self.sid_embeddings.new_zeros(size, self.sid_embeddings.shape[1]))
        return torch.cat(pieces, 0)

    def freeze_offsets(self, frozen: bool) -> None:
        """Index frozen (recommender phases): compute the offsets once instead of at every lookup."""
        if frozen:
            with torch.no_grad():
                self._frozen = self.offsets().detach()
        else:
            self._frozen = None

    def sid_table(self) -> torch.Tensor:
        return self.sid_embeddings + (self._frozen if self._frozen is not None else self.offsets())

    def folded(self) -> SIDRecModel:
        """The plain model with the current table baked into its SID rows (this model's offsets are then
        zero, so its own table stays the same and a second call changes nothing)."""
        base = self.base[0]
        self.freeze_offsets(True)  # from the codebooks as they are now (e.g. after a best-weights restore)
        with torch.no_grad():
            base.sid_embeddings.copy_(self.sid_table())
            for q in self.quantizers:  # the moved codewords are the new starting point: offsets are zero
                for lv, cb in enumerate(q.codebooks):
                    q.start(lv).copy_(cb)
        self.freeze_offsets(True)
        return base


# ---------------------------------------------------------------------------------------------- hooks
class DynamicIndexHooks(TrainHooks):
    """The dynamic index inside the one training loop (:func:`sidrec.training.loop.train`).

    ``render(indices)`` gives the whole instruction set (train, valid, test rows) on the given indices
    (``{"items": SIDIndex, "users": SIDIndex?}``); ``make_select(item_index, valid_rows)`` the model
    selection score on the final index (optional). ``n_steps`` is the recommender's budget; the loop
    runs :attr:`total_steps` (the tokenizer phases on top, :func:`phase_plan`)."""

    def __init__(self, model: LearnedIndexModel, dcfg, n_steps: int, lr: float, seed: int,
                 render: Callable[[dict], pd.DataFrame], rows_all: pd.DataFrame, make_select: Optional[Callable] = None,
                 log: Optional[Callable[[int, dict], None]] = None):
        self.dcfg, self.seed, self.render, self.make_select, self.log = dcfg, seed, render, make_select, log
        self.families = model.families
        self._static = trainable_parameters(model)  # taken now: it filters on requires_grad, which phases toggle
        self.phases = phase_plan(n_steps, dcfg.cycles, dcfg.tokenizer_share, dcfg.final_share)
        self.final_start = self.phases[-1].start
        self.total_steps = self.phases[-1].end
        self.tokenizer_lr = dcfg.tokenizer_lr or lr / 50
        self.codeword_lr = dcfg.codeword_lr or self.tokenizer_lr / 10
        hidden, self.heads = model.sid_embeddings.shape[1], nn.ModuleDict()
        with torch.random.fork_rng():
            torch.manual_seed(seed + 7)
            for f in self.families:  # hidden state -> quantizer space (seq_align); quantizer space -> hidden (index_align)
                d = f.quantizer.x.shape[1]
                self.heads[f"seq_{f.name}"] = nn.Linear(hidden, d)
                self.heads[f"idx_{f.name}"] = nn.Linear(d, hidden)
        self.refresh_log: list[dict] = []
        self.rows = rows_all  # the instruction rows on the current index (at first: the static run's)
        self._kind: Optional[str] = None
        self._restored = False
        self._selector = None

    # -- parameters
    def _index_params(self, model) -> list[tuple[str, nn.Parameter]]:
        return [(f"dynamic.quantizers.{n}", p) for n, p in model.quantizers.named_parameters()] + \
               [(f"dynamic.proj.{n}", p) for n, p in model.proj.named_parameters()]

    def _head_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"dynamic.heads.{n}", p) for n, p in self.heads.named_parameters()]

    def parameters(self, model):
        return self._static + self._index_params(model) + self._head_params()

    def param_groups(self, model, cfg):
        static = [p for _, p in self._static]
        n_tables = len(table_parameters(model))  # the SID rows and the item head's tables lead _static
        groups = [{"params": static[:n_tables], "lr": cfg.embedding_lr, "weight_decay": 0.0}]
        if static[n_tables:]:
            groups.append({"params": static[n_tables:], "lr": cfg.lr, "weight_decay": cfg.weight_decay})
        index = self._index_params(model)
        books = {id(cb) for q in model.quantizers for cb in q.codebooks}  # the codebooks in a group of their own
        groups.append({"params": [p for _, p in index if id(p) not in books], "lr": self.tokenizer_lr, "weight_decay": 0.0})
        groups.append({"params": [p for _, p in index if id(p) in books], "lr": self.codeword_lr, "weight_decay": 0.0})
        groups.append({"params": [p for _, p in self._head_params()], "lr": cfg.lr, "weight_decay": 0.0})
        return groups

    def settings(self) -> dict:
        """The dynamic index's settings with its learning rates resolved (the checkpoint key: a run resumes only under
        the same ones, so never with another optimizer-group layout)."""
        d = self.dcfg.model_dump(mode="json") if hasattr(self.dcfg, "model_dump") else dict(vars(self.dcfg))
        return {"dynamic": {**d, "tokenizer_lr": self.tokenizer_lr, "codeword_lr": self.codeword_lr}}

    # -- phases
    def phase_at(self, step: int) -> Phase:
        for ph in self.phases:
            if ph.start <= step < ph.end:
                return ph
        return self.phases[-1]

    def _set_phase(self, model, kind: str) -> None:
        if kind == self._kind:
            return
        tok = kind == "tok"
        for _, p in self._static:
            p.requires_grad_(not tok)
        for _, p in self._index_params(model):
            p.requires_grad_(tok)
        model.freeze_offsets(not tok)
        self._kind = kind

    def part(self, split: str):
        """The instruction rows of one split, on the current index."""
        return self.rows[self.rows["split"] == split].reset_index(drop=True)

    def before_step(self, step, model):
        rows = None
        if self._restored:
            rows, self._restored = self.part("train"), False
            self._repoint_item_head(model)
        if step > 0 and self.phase_at(step - 1).kind == "tok" and self.phase_at(step).kind != "tok":
            self._set_phase(model, "rec")  # offsets frozen at the tokenizer phase's end state
            rows = self.refresh(step)
            self._repoint_item_head(model, keep_vectors=self.dcfg.keep_item_vectors)
        self._set_phase(model, self.phase_at(step).kind)
        return rows

    def _repoint_item_head(self, model, keep_vectors: bool = False) -> None:
        """The item head (if any) scores the items by their current SIDs (``keep_vectors``: a moved item's own row
        absorbs the change, so the head scores every item as before the refresh; ``ItemHead.set_codes``)."""
        head = getattr(model, "item_head", None)
        if head is not None:  # the item index's SIDs, as the head was built on them
            head.set_codes(self.families[0].index.codes, keep_vectors=keep_vectors)

    def selectable(self, step: int) -> bool:
        return step >= self.final_start

    def select(self, model) -> float:
        """Model selection on the frozen index (the final phase): the score built by ``make_select``."""
        if self._selector is None:
            self._selector = self.make_select(self.families[0].index, self.part("valid"))
        return self._selector(model)

    def after_training(self, model, steps):
        for _, p in self._static:
            p.requires_grad_(True)
        for _, p in self._index_params(model):
            p.requires_grad_(False)
        model.freeze_offsets(True)
        self._kind = None

    # -- losses
    def extra_loss(self, model, step, batch=None):
        d = self.dcfg
        tok = self.phase_at(step).kind == "tok"
        logs, total = {}, None

        def add(name, w, loss):
            nonlocal total
            logs[f"train/{name}"] = float(loss.detach())
            total = w * loss if total is None else total + w * loss

        if d.seq_align > 0 and batch is not None:
            sa = self.seq_align_loss(model, *batch, through_index=tok)
            if sa is not None:
                add("seq_align", d.seq_align, sa)
        if tok:
            g = torch.Generator().manual_seed(self.seed * 100_003 + step)
            for f in self.families:
                n = len(f.index.entity_ids)
                rows = torch.randperm(n, generator=g)[: min(d.entity_batch, n)]
                codes = torch.from_numpy(f.index.codes[rows.numpy()])
                ta, rc = f.quantizer.regulator(rows, codes)
                if d.token_align > 0:
                    add(f"token_align/{f.name}", d.token_align, ta)
                if d.recon > 0:
                    add(f"recon/{f.name}", d.recon, rc)
                if d.index_align > 0:
                    add(f"index_align/{f.name}", d.index_align, self.index_align_loss(model, f, rows, codes))
        return total, logs

    def seq_align_loss(self, model, h, ids, tgt, through_index: bool) -> Optional[torch.Tensor]:
        """InfoNCE between the hidden state predicting an entity's first SID token and the entity's encoding.

        Recommender phases train only the head (hidden states and encodings detached); tokenizer phases
        send the LLM's preference into the quantizer's encoder (the LLM itself is frozen there)."""
        vocab, base = model.vocab, model.vocab.base_vocab
        pred, labels, hs = tgt[:, 1:], ids[:, 1:], h[:, :-1]
        total, n_terms = None, 0
        for f in self.families:
            L = f.index.num_levels
            start = base + vocab.level_offsets[f.first_level]
            is0 = pred & (labels >= start) & (labels < start + vocab.level_sizes[f.first_level])
            b, p = is0.nonzero(as_tuple=True)
            keep = p + L - 1 < labels.shape[1]
            b, p = b[keep], p[keep]
            if len(b) < 2:
                continue
            code = torch.stack([labels[b, p + lv] - (base + vocab.level_offsets[f.first_level + lv]) for lv in range(L)], 1)
            rows = np.array([f.row_for(tuple(c)) for c in code.tolist()])
            _, first = np.unique(rows, return_index=True)
            sel = np.sort(first[rows[first] >= 0])[:256]  # one position per entity (no false negatives)
            if len(sel) < 2:
                continue
            sel_t = torch.from_numpy(sel)
            hh = hs[b[sel_t], p[sel_t]].float()
            z = f.quantizer.encode(torch.from_numpy(rows[sel]))
            a = self.heads[f"seq_{f.name}"](hh if through_index else hh.detach())
            loss = info_nce(a, z if through_index else z.detach(), self.dcfg.temperature)
            total, n_terms = (loss if total is None else total + loss), n_terms + 1
        return None if total is None else total / n_terms

    def index_align_loss(self, model, f: Family, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """ED2 index-level alignment: the LLM's mean hidden state over an entity's SID tokens vs its encoding."""
        vocab = model.vocab
        sid_ids = torch.stack([vocab.code_ids(f.first_level + lv, codes[:, lv]) for lv in range(codes.shape[1])], 1)
        hs, _ = model.hidden(sid_ids)
        z = self.heads[f"idx_{f.name}"](f.quantizer.encode(rows))
        return info_nce(hs.float().mean(1), z, self.dcfg.temperature)

    # -- refresh
    def _indices(self) -> dict:
        return {f.name: f.index for f in self.families}

    def refresh(self, step: int) -> pd.DataFrame:
        """Churn-bounded re-assignment of every family; returns the training rows on the new index."""
        entry: dict = {"step": step, "frozen": int(step >= self.final_start)}
        for f in self.families:
            new, stats = reassign(f.quantizer, f.index, self.dcfg.max_churn, self.dcfg.churn_margin)
            f.set_index(new)
            entry.update({_family_key(k, f.name): v for k, v in stats.items()})
        self.rows = self.render(self._indices())  # targets follow the current index
        self._selector = None
        self.refresh_log.append(entry)
        if self.log is not None:
            self.log(step, {f"dynamic/{k}": v for k, v in entry.items() if k != "step"})
        return self.part("train")

    # -- checkpoints
    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"codes/{f.name}": torch.from_numpy(f.index.codes.copy()) for f in self.families}
        for f in self.families:  # a balanced index refits its prices at each refresh: buffers, not parameters
            if f.quantizer.balanced:
                tensors.update({f"prices/{f.name}/{lv}": f.quantizer.price(lv).clone() for lv in range(f.quantizer.levels)})
        return tensors, {"refresh_log": self.refresh_log}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        for f in self.families:
            f.set_index(SIDIndex(entity_ids=f.index.entity_ids, codes=tensors[f"codes/{f.name}"].numpy(),
                                 level_sizes=f.index.level_sizes, prefix=f.index.prefix))
            for lv in range(f.quantizer.levels):
                if f"prices/{f.name}/{lv}" in tensors:  # checkpoints written before prices were kept have none
                    f.quantizer.price(lv).copy_(tensors[f"prices/{f.name}/{lv}"])
        self.refresh_log = list(meta.get("refresh_log", []))
        self.rows = self.render(self._indices())
        self._restored, self._kind, self._selector = True, None, None
