"""Distilling an item-level teacher into the item head: a KL term toward a sequential model's next-item distribution.

The item head (:mod:`sidrec.model.item_head`) learns a full softmax over the catalog from one-hot targets. A model
that memorises its training windows learns that softmax fast and then overfits (BENCHMARKS.md, Scientific, session 27:
8 epochs score 12% below 4). A teacher trained on the same training split, such as the run's own SASRec, knows which
*other* items are plausible after a history; Hinton et al.'s soft targets carry that to the student. With
``model.item_head_distill`` > 0 the item head's loss at every target item becomes

    CE(student, target) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))

where the teacher reads the same window's earlier items (in the order it was trained on, one forward pass per window)
and the student reads the same window's SID tokens. Only training changes: the teacher is never saved with the model,
never used at decoding, and sees only the training split (``sidrec.stages.build_model`` takes the same-run SASRec,
whose epoch was chosen on valid, never test).

The teacher is duck-typed: any ``torch.nn.Module`` with ``n_items``, ``max_len`` and ``forward(seq [B, L]) -> [B, L, n_items]``
over left-padded shifted item ids (0 = padding), as :class:`sidrec.evaluation.baselines.SASRec`. This module does not
import it (the model package sits below evaluation).
"""
from __future__ import annotations

from typing import Optional

import torch


class ItemTeacher:
    """A frozen next-item model, its weight and temperature, and the map from item-head rows to its item indices.

    Not an ``nn.Module`` on purpose: held as ``ItemHead.teacher`` it is no sub-module, so it is neither trained nor
    saved with the recommender."""

    def __init__(self, model: torch.nn.Module, head_to_teacher, weight: float, temperature: float = 1.0):
        """``head_to_teacher`` [n_items]: the teacher's item index of every item-head row."""
        if weight <= 0 or temperature <= 0:
            raise ValueError(f"item teacher: weight ({weight}) and temperature ({temperature}) must be positive")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.rows = torch.as_tensor(head_to_teacher, dtype=torch.long)
        if getattr(model, "n_items", None) is None:
            raise ValueError("item teacher: the model must say how many items it scores (an n_items attribute)")
        n_teacher = int(model.n_items)
        if self.rows.numel() and (int(self.rows.min()) < 0 or int(self.rows.max()) >= n_teacher):
            raise ValueError(f"item teacher: item indices must lie in [0, {n_teacher})")
        self.weight = float(weight)
        self.temperature = float(temperature)
        self._kl: list[torch.Tensor] = []  # the term's values since the training log last read them (pop_mean)

    def record(self, kl: torch.Tensor) -> None:
        """Keep one step's (detached) term; read back only when the log asks, so a GPU step does not wait on it."""
        self._kl.append(torch.as_tensor(kl).detach().float().reshape(()))

    def pop_mean(self) -> Optional[float]:
        """Mean of the distillation term since the last call (None: none recorded), for the training log."""
        if not self._kl:
            return None
        out, self._kl = float(torch.stack(self._kl).mean()), []
        return out

    def to(self, device) -> "ItemTeacher":
        self.model.to(device)
        self.rows = self.rows.to(device)
        return self

    @torch.no_grad()
    def logits(self, items: torch.Tensor, lengths: torch.Tensor, row: torch.Tensor, col: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's scores where M targets need them: ``(scores [M', n_items] in item-head row order, ok [M])``.
        Target m is the item after ``items[row[m], :col[m] + 1]``; ``items`` [B, W] are item-head rows, left-aligned,
        the first ``lengths`` [B] of each row real. Each row is fed as the teacher was trained (left-padded, its last
        ``max_len`` items), in one forward pass; ``ok`` is False where item ``col[m]`` itself falls before those
        ``max_len`` items, and ``scores`` holds the ``ok`` targets only."""
        b, w = items.shape
        width = min(w, int(getattr(self.model, "max_len", w)))
        seq = torch.zeros(b, width, dtype=torch.long, device=items.device)
        cols = torch.arange(w, device=items.device)
        # item j of row b goes to column width - n_b + j (right-aligned); items cut by max_len are dropped
        dest = width - lengths[:, None] + cols[None]
        keep = (cols[None] < lengths[:, None]) & (dest >= 0)
        rb, rj = keep.nonzero(as_tuple=True)
        seq[rb, dest[rb, rj]] = self.rows[items[rb, rj]] + 1
        at = width - lengths[row] + col  # where the teacher has read item col of the target's row
        ok = at >= 0
        scores = self.model(seq)  # [B, width, n_teacher]
        return scores[row[ok], at[ok]][:, self.rows], ok


def window_items(head, ids: torch.Tensor, base_vocab: int, starts: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The catalog items spelled in each row of ``ids`` [B, T], in order: ``(items [B, W], lengths [B], rank [B, T'])``
    where ``rank[b, s]`` (``T' = T - levels + 1``) is the index in ``items[b]`` of the item whose SID starts at token
    ``s`` (-1 where none starts). ``starts``: ``head.rows_starting(ids - base_vocab)`` when the caller has it."""
    rows = head.rows_starting(ids - base_vocab) if starts is None else starts  # [B, T']
    found = rows >= 0
    rank = torch.where(found, found.long().cumsum(1) - 1, torch.full_like(rows, -1))
    lengths = found.sum(1)
    w = max(int(lengths.max()) if lengths.numel() else 0, 1)
    items = torch.zeros(ids.shape[0], w, dtype=torch.long, device=ids.device)
    rb, rs = found.nonzero(as_tuple=True)
    items[rb, rank[rb, rs]] = rows[rb, rs]
    return items, lengths, rank


def distill_loss(teacher: ItemTeacher, head, ids: torch.Tensor, pos: torch.Tensor, student: torch.Tensor,
                 base_vocab: int, starts: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``T^2 * KL(teacher || student)`` at temperature T, averaged over the targets ``pos`` [M, 2] (as
    :func:`sidrec.model.item_head.item_targets` gives them: row, and the position that predicts the item's first SID
    token) whose item has at least one item before it in its row; ``student`` [M, n_items] are the head's logits there.
    ``starts`` as :func:`window_items` takes it. None when no target has a history."""
    items, lengths, rank = window_items(head, ids, base_vocab, starts)
    j = rank[pos[:, 0], pos[:, 1] + 1]  # the target's index among its row's items (position p predicts token p + 1)
    has = j >= 1
    if not bool(has.any()):
        return None
    t, ok = teacher.logits(items, lengths, pos[has, 0], j[has] - 1)  # the teacher after the items before the target
    if not bool(ok.any()):  # no target's history falls inside the teacher's max_len
        return None
    temp = teacher.temperature
    p_t = torch.log_softmax(t.float() / temp, dim=-1)
    p_s = torch.log_softmax(student[has][ok].float() / temp, dim=-1)
    kl = torch.nn.functional.kl_div(p_s, p_t, log_target=True, reduction="batchmean")
    return kl * temp * temp
