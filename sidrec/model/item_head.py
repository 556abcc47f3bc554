"""An item-level head beside the SID head: every item scored at once from the state before its first token.

The SID head factorises an item's probability level by level, ``p(c1) p(c2 | c1) p(c3 | c1, c2)``,
and the beam search ranks what it keeps by that product. It is sharp at the top of the list (the
LLM beats SASRec at Recall@1 on Amazon Scientific) and weaker from rank ~5 on, where an item-level
ranker such as SASRec scores every item against one state with a full softmax. The item head gives
the same LLM that second view (as LIGER, "Unifying generative and dense retrieval for sequential
recommendation", 2024, does with a separate dense model):

- an item's vector is the sum of its codes' rows in a table of its own (one row per item-level SID
  token, started from the SID rows) plus a row of the item's own, started at zero. The code rows alone
  would make the head a product of independent per-level scores, weaker than the SID head's chain; the
  item's own row lets it rank items inside a code group, as an ID-based model does, and an item the
  model never saw keeps the vector its SID gives it;
- at the hidden state where the item's first SID token is predicted, its logits over *all* catalog
  items are ``h @ item_vectors.T`` (scaled to unit spread before step 0), trained with a full-softmax
  cross-entropy next to the SID tokens' loss (``model.item_head``, its weight);
- at decoding, the trie-constrained beam search still proposes the candidates; each finished beam's
  score becomes ``log p_SID(item) + fusion * log p_item(item)`` and the beams are re-ranked by it.
  With ``candidates`` (``model.item_head_candidates``) the head's own top items not among the beams join
  them first, each with the SID log-probability the search would have given it, so the fused list is no
  longer capped by what the beams found.
- with ``item_input`` (``model.item_head_input``) the item's own row is also *read*: it is added to the input
  embedding of the last SID token of every complete catalog SID in the input, i.e. at the state that predicts the
  next item, as SASRec's item table is both its input and its output. Zero at step 0 (the rows start at zero), so
  the model starts exactly where it would without it; prompts, training windows and decoding all go through
  ``SIDRecModel.embed``, so they see the same rows.

Only the item index's levels take part (a dual index's user SIDs are never items). With a dynamic index the
head follows every refresh (``set_codes``): an item sums the rows of its new codes and keeps its own row, or (with
``index.dynamic.keep_item_vectors``) its own row absorbs the change, so the head scores it as before the refresh.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class ItemHead(nn.Module):
    """Item vectors composed from per-code rows and per-item rows, over a fixed catalog (``codes``: one SID per item row)."""

    def __init__(self, codes: torch.Tensor, level_sizes: list[int], init_rows: torch.Tensor, fusion: float = 1.0,
                 candidates: int = 0, item_input: bool = False):
        """``codes`` [n_items, levels]; ``init_rows`` [sum(level_sizes), hidden], the code rows to start from;
        ``candidates``: how many of the head's own top items join the beams at decoding (0: the beams alone);
        ``item_input``: add each item's own row to the input at its SID's last token (see :meth:`input_rows`)."""
        super().__init__()
        self.candidates = int(candidates)
        self.item_input = bool(item_input)
        self.teacher = None  # optional soft targets in training (sidrec.model.distill.ItemTeacher); never saved
        codes = torch.as_tensor(codes, dtype=torch.long)
        if codes.ndim != 2 or codes.shape[1] != len(level_sizes):
            raise ValueError(f"item head: codes of shape {tuple(codes.shape)} do not match {len(level_sizes)} levels")
        offsets = [0]
        for s in level_sizes[:-1]:
            offsets.append(offsets[-1] + int(s))
        if init_rows.shape[0] != sum(level_sizes):
            raise ValueError(f"item head: {init_rows.shape[0]} initial rows for {sum(level_sizes)} item SID tokens")
        self.level_sizes = [int(s) for s in level_sizes]
        self.rows = nn.Parameter(init_rows.detach().clone().float())
        self.item_rows = nn.Parameter(torch.zeros(codes.shape[0], init_rows.shape[1]))
        self.register_buffer("codes", codes.clone())
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("fusion", torch.tensor(float(fusion)))
        # code tuple -> item row: sorted mixed-radix keys, looked up with searchsorted
        radix = torch.ones(len(level_sizes), dtype=torch.long)
        for i in range(len(level_sizes) - 2, -1, -1):
            radix[i] = radix[i + 1] * int(level_sizes[i + 1])
        self.register_buffer("_radix", radix, persistent=False)
        self.register_buffer("_keys", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("_order", torch.zeros(0, dtype=torch.long), persistent=False)
        self._index_codes()

    def _index_codes(self) -> None:
        keys = (self.codes * self._radix).sum(1)
        order = torch.argsort(keys)
        self._keys, self._order = keys[order], order

    @torch.no_grad()
    def set_codes(self, codes, keep_vectors: bool = False) -> None:
        """Re-point the head at new SIDs of the same items (a dynamic index's refresh): item ``i`` now sums the rows
        of its new codes. Its own row stays as it is, or, with ``keep_vectors``, absorbs the change of its code rows'
        sum, so that every item's vector (:meth:`item_vectors`, what the head scores it by) is the same after the
        refresh as before."""
        codes = torch.as_tensor(codes, dtype=torch.long).to(self.codes.device)
        if codes.shape != self.codes.shape:
            raise ValueError(f"item head: new codes of shape {tuple(codes.shape)} for a head over {tuple(self.codes.shape)}")
        before = self.rows[self.codes + self.offsets].sum(1) if keep_vectors else None
        self.codes.copy_(codes)
        self._index_codes()
        if before is not None:
            self.item_rows.add_((before - self.rows[self.codes + self.offsets].sum(1)).to(self.item_rows.dtype))

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    def item_vectors(self) -> torch.Tensor:
        """[n_items, hidden]: each item's vector, the sum of its codes' rows plus its own row."""
        return self.rows[self.codes + self.offsets].sum(1) + self.item_rows

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., n_items] item logits from hidden states ``h`` [..., hidden]."""
        w = self.item_vectors()
        return (h @ w.to(h.dtype).T) * self.scale.to(h.dtype)

    def input_rows(self, input_ids: torch.Tensor, base_vocab: int) -> Optional[torch.Tensor]:
        """[B, T, hidden]: at the last token of every complete catalog SID in ``input_ids`` [B, T] (its ``levels``
        tokens consecutive, each in its level's range), that item's own row; zero elsewhere. None when the input is
        shorter than one SID (a decoding step that feeds one token: no SID completes there that is read again)."""
        L = self.num_levels
        if input_ids.shape[1] < L:
            return None
        rows = self.rows_starting(input_ids - base_vocab)  # [B, T - L + 1]: the SID starting at t ends at t + L - 1
        out = torch.zeros(*input_ids.shape, self.item_rows.shape[1], dtype=self.item_rows.dtype, device=input_ids.device)
        found = rows >= 0
        if found.any():
            out[:, L - 1:][found] = self.item_rows[rows[found]]
        return out

    def rows_starting(self, sid: torch.Tensor) -> torch.Tensor:
        """[B, T - levels + 1]: the item row of the SID whose ``levels`` tokens start at each position of ``sid``
        [B, T] (token ids minus the base vocabulary: SID-table offsets, negative for text); -1 where those tokens
        spell no catalog item (text, a partial SID, codes of the wrong levels). ``T >= levels``."""
        windows = sid.unfold(1, self.num_levels, 1)  # [B, T - L + 1, L]
        return self.rows_of(windows - self.offsets)

    def rows_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Item rows of code tuples ``codes`` [..., levels]; -1 where no item carries the tuple."""
        valid = ((codes >= 0) & (codes < torch.tensor(self.level_sizes, device=codes.device))).all(-1)
        keys = (codes.clamp(min=0) * self._radix).sum(-1)
        pos = torch.searchsorted(self._keys, keys).clamp(max=len(self._keys) - 1)
        found = valid & (self._keys[pos] == keys)
        return torch.where(found, self._order[pos], torch.full_like(keys, -1))


def item_targets(ids: torch.Tensor, pred_mask: torch.Tensor, base_vocab: int, head: ItemHead,
                 starts: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the item head is trained in a batch: ``(positions [M, 2], rows [M])``.

    ``ids`` [B, T] are the token ids, ``pred_mask`` [B, T-1] the supervised predictions (position p
    predicts token p + 1). A position counts when it predicts an item-level-0 SID token and the next
    ``levels`` tokens, all supervised, form the SID of a catalog item; its row is that item's. ``starts``:
    ``head.rows_starting(ids - base_vocab)`` when the caller has it."""
    L = head.num_levels
    if ids.shape[1] - 1 < L:
        return torch.zeros(0, 2, dtype=torch.long, device=ids.device), torch.zeros(0, dtype=torch.long, device=ids.device)
    # [B, T - L]: the item whose SID position p starts predicting (its first token is token p + 1)
    rows = head.rows_starting(ids[:, 1:] - base_vocab) if starts is None else starts[:, 1:]
    keep = (rows >= 0) & pred_mask.unfold(1, L, 1).all(-1)  # ... with all L of its tokens supervised
    return keep.nonzero(), rows[keep]


def item_head_loss(model, h: torch.Tensor, ids: torch.Tensor, tgt: torch.Tensor) -> Optional[torch.Tensor]:
    """Mean full-softmax cross-entropy of the item head over a batch's target items (None: no head, or no item); with a
    teacher (``head.teacher``, :class:`sidrec.model.distill.ItemTeacher`) and in training mode, plus its weight times
    the distillation term (:func:`sidrec.model.distill.distill_loss`)."""
    head = getattr(model, "item_head", None)
    if head is None:
        return None
    base = model.vocab.base_vocab
    starts = head.rows_starting(ids - base) if ids.shape[1] > head.num_levels else None  # read by the teacher too
    pos, rows = item_targets(ids, tgt[:, 1:], base, head, starts)
    if rows.numel() == 0:
        return None
    hs = h[pos[:, 0], pos[:, 1]]
    logits = head.logits(hs)
    loss = torch.nn.functional.cross_entropy(logits.float(), rows)
    teacher = getattr(head, "teacher", None)  # model.item_head_distill: soft targets from a teacher (sidrec.model.distill)
    if teacher is not None and head.training:
        from sidrec.model.distill import distill_loss

        kl = distill_loss(teacher, head, ids, pos, logits, base, starts)
        if kl is not None:
            teacher.record(kl.detach())
            loss = loss + teacher.weight * kl
    return loss


def item_log_prob(head: ItemHead, h_prompt: torch.Tensor) -> torch.Tensor:
    """[B, n_items]: the head's log-probability of every item from the states ``h_prompt`` [B, hidden]."""
    return torch.log_softmax(head.logits(h_prompt).float(), dim=-1)


@torch.no_grad()
def head_candidates(head: ItemHead, item_logp: torch.Tensor, beams: torch.Tensor, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The SIDs [B, k, L] of the item head's ``k`` most likely items after each prompt (``item_logp`` [B, n_items], its
    log-probabilities) that are not already among ``beams`` [B, K, L], and [B, k] whether each is one (False only
    when the catalog runs out)."""
    logits = item_logp
    taken = head.rows_of(beams)  # [B, K], -1 for dead beams
    count = torch.zeros(logits.shape, dtype=torch.long, device=logits.device)
    count.scatter_add_(1, taken.clamp(min=0), (taken >= 0).long())  # dead beams add 0
    logits = logits.masked_fill(count > 0, float("-inf"))
    top, rows = logits.topk(min(k, logits.shape[1]), dim=-1)
    return head.codes[rows], torch.isfinite(top)


@torch.no_grad()
def fuse_beams(head: ItemHead, h_prompt: torch.Tensor, codes: torch.Tensor, scores: torch.Tensor, sort: bool = False,
               item_logp: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank finished beams by ``score + fusion * log p_item``: ``codes`` [B, K, L], ``scores`` [B, K],
    ``h_prompt`` [B, hidden] the state after the prompt (or ``item_logp`` [B, n_items], the head's log-probabilities
    from it, when the caller has them). Dead beams (-inf) stay last. With fusion 0 the beams stay as they are, sorted
    by score when ``sort``."""
    if float(head.fusion) == 0.0:
        if not sort:
            return codes, scores
        order = scores.argsort(dim=1, descending=True, stable=True)
        return codes.gather(1, order.unsqueeze(-1).expand_as(codes)), scores.gather(1, order)
    logp = item_log_prob(head, h_prompt) if item_logp is None else item_logp  # [B, n_items]
    rows = head.rows_of(codes)  # [B, K]
    item = logp.gather(1, rows.clamp(min=0))
    fused = torch.where((rows >= 0) & torch.isfinite(scores), scores + float(head.fusion) * item,
                        torch.full_like(scores, float("-inf")))
    order = fused.argsort(dim=1, descending=True, stable=True)
    return codes.gather(1, order.unsqueeze(-1).expand_as(codes)), fused.gather(1, order)
