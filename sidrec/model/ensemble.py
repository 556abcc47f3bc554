"""A seed ensemble: K recommenders fine-tuned on the same index and instructions with different seeds, decoded as one.

Recommenders trained from different seeds make different mistakes (BENCHMARKS, Scientific: two seeds fused into one
list beat the better one by ~7% on Recall@10). Since every member here shares the SID index, they can be fused
*inside* the search rather than over two finished lists: at every SID level the beam search ranks by the members'
mean log-probability (a geometric mean of their distributions, renormalised, as NMT ensembles decode), and the item
head's score of an item is the members' mean item log-probability. With one member this is exactly that member.

:class:`SeedEnsemble` looks to the decoding code like one ``SIDRecModel``: ``hidden`` returns every member's states
side by side on the last axis (so ``h[:, -1]`` and ``h[:, level]`` slice all members at once) and a cache that
reorders every member's cache; ``sid_logits`` and the ``item_head``'s ``logits`` split the states back per member.
Members must share the vocabulary and the item head's catalog SIDs (a ``ModelError`` says which differs).
"""
from __future__ import annotations

import torch
from torch import nn

from sidrec.errors import ModelError


class _Caches:
    """The members' KV caches, reordered together (what the beam search does to one cache)."""

    def __init__(self, caches: list):
        self.caches = caches

    def batch_repeat_interleave(self, k: int) -> None:
        for c in self.caches:
            c.batch_repeat_interleave(k)

    def reorder_cache(self, idx: torch.Tensor) -> None:
        for c in self.caches:
            c.reorder_cache(idx)


def _mean_log_prob(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.log_softmax(p.float(), dim=-1) for p in parts]).mean(0)


class EnsembleHead(nn.Module):
    """The members' item heads as one: an item's log-probability is the members' mean (``logits`` returns it; a
    log-softmax of it renormalises); ``codes``, ``rows_of``, ``candidates`` and ``fusion`` are the shared ones."""

    def __init__(self, heads: list, hidden: int):
        super().__init__()
        first = heads[0]
        for i, h in enumerate(heads[1:], 1):
            if not torch.equal(h.codes, first.codes):
                raise ModelError(f"seed ensemble: member {i}'s item head has other catalog SIDs than member 0's "
                                 "(members must share one index)")
        self.heads = nn.ModuleList(heads)
        self.hidden = int(hidden)
        self.candidates = int(first.candidates)
        self.item_input = False  # each member reads its own rows inside its own ``hidden``
        self.register_buffer("fusion", first.fusion.detach().clone())

    @property
    def codes(self) -> torch.Tensor:
        return self.heads[0].codes

    def rows_of(self, codes: torch.Tensor) -> torch.Tensor:
        return self.heads[0].rows_of(codes)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return _mean_log_prob([head.logits(x) for head, x in zip(self.heads, h.split(self.hidden, dim=-1))])


class SeedEnsemble(nn.Module):
    """K ``SIDRecModel`` members decoded as one (see the module docstring)."""

    def __init__(self, members: list):
        super().__init__()
        if not members:
            raise ModelError("seed ensemble: no members")
        first = members[0]
        for i, m in enumerate(members[1:], 1):
            if m.vocab.tokens != first.vocab.tokens:
                raise ModelError(f"seed ensemble: member {i}'s SID vocabulary differs from member 0's "
                                 "(members must share one index)")
            if (m.item_head is None) != (first.item_head is None):
                raise ModelError(f"seed ensemble: member {i} {'has no' if m.item_head is None else 'has an'} item head, "
                                 "member 0 does not match")
        self.members = nn.ModuleList(members)
        self.vocab = first.vocab
        self.hidden_size = int(first.hidden_size)
        self.item_head = (EnsembleHead([m.item_head for m in members], self.hidden_size)
                          if first.item_head is not None else None)

    def __len__(self) -> int:
        return len(self.members)

    def _split(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return h.split(self.hidden_size, dim=-1)

    def hidden(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False):
        outs = [m.hidden(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=None if cache is None else cache.caches[i], use_cache=use_cache)
                for i, m in enumerate(self.members)]
        h = torch.cat([o[0] for o in outs], dim=-1)
        return h, (_Caches([o[1] for o in outs]) if use_cache else None)

    def sid_logits(self, h: torch.Tensor, level: int) -> torch.Tensor:
        """The members' mean log-probability over ``level``'s codes (the search's log-softmax renormalises it)."""
        return _mean_log_prob([m.sid_logits(x, level) for m, x in zip(self.members, self._split(h))])
