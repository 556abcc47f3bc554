"""Recommenders on *different* SID indexes, fused at the item level (``train.members`` with ``train.member_index: own``).

Two models trained on the same data with different seeds *and* different SID indexes disagree more than two models on
one index, so fusing them adds more (BENCHMARKS, Scientific, session 26: +7% Recall@10 over the better model, against
+4% for two models on one index). Their SIDs differ, so they cannot share one beam search as a seed ensemble does
(``sidrec.model.ensemble``); they meet at the *item*:

1. each member decodes its own pool: its constrained beams plus its item head's own candidates, each scored
   ``SID log-prob + fusion x item log-prob`` -- what it would recommend alone;
2. every item in the union of the pools gets a score from every member, on that member's own SIDs: an item in the
   member's own pool keeps the score its search gave it; any other is scored exactly as a head candidate is (the SID
   head by teacher forcing from the prompt's KV cache, plus the fused item log-probability);
3. the list is the union ranked by the members' summed scores (a product of their probabilities).

With one member this is the member's own pool, ranked as it ranks it. Members must list the same catalog in the same
order (``entity_ids``); each reads its own prompt (the history in its own SIDs), so every call takes one prompt list
per member.
"""
from __future__ import annotations

import math
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sidrec.errors import ModelError
from sidrec.runtime import autocast

# items teacher-forced per forward pass (batch x items) when the members score each other's items
RESCORE_ROWS = 1024


class IndexEnsemble(nn.Module):
    """K ``SIDRecModel`` members, each with its own ``SIDIndex`` of one catalog (same items, same order), its encoder
    and its trie. ``vocab`` is member 0's (the run a single model would be)."""

    def __init__(self, members: list, indexes: list, tokenizer):
        super().__init__()
        from sidrec.model.sid_model import Encoder

        if not members or len(members) != len(indexes):
            raise ModelError(f"index ensemble: {len(members)} members and {len(indexes)} SID indexes (one per member)")
        for k, ix in enumerate(indexes[1:], 1):
            if list(ix.entity_ids) != list(indexes[0].entity_ids):
                raise ModelError(f"index ensemble: member {k}'s SID index lists another catalog than member 0's "
                                 "(members must index the same items in the same order)")
        self.members = nn.ModuleList(members)
        self.indexes = list(indexes)
        self.encoders = [Encoder(tokenizer, m.vocab) for m in members]
        self.tries = [ix.build_trie() for ix in indexes]
        self.vocab = members[0].vocab

    def __len__(self) -> int:
        return len(self.members)


@torch.no_grad()
def member_pool(model, state, index, trie, beams: int) -> tuple[np.ndarray, np.ndarray]:
    """One member's pool for a batch of prompts (their ``decode.prefill`` ``state``): ``(rows [B, W], scores [B, W])``,
    its ``beams`` constrained beams plus its item head's candidates, fused as its own decoding fuses them (rows of
    ``index``; -1 / -inf: none)."""
    from sidrec.model.decode import beam_search_batch

    codes, scores = beam_search_batch(model, None, index.num_levels, beams, trie, pool=True, state=state)
    found = [[index.row_for_codes(c) for c in b] for b in codes.tolist()]
    rows = np.array([[-1 if r is None else r for r in b] for b in found], dtype=np.int64).reshape(scores.shape)
    scores = scores.float().numpy()
    dead = (rows < 0) | ~np.isfinite(scores)
    return np.where(dead, -1, rows), np.where(dead, -np.inf, scores).astype(np.float32)


@torch.no_grad()
def member_scores(model, state, index, rows: np.ndarray) -> np.ndarray:
    """[B, K] one member's fused scores of the catalog rows ``rows`` [B, K] (-1: padding, scored -inf) after the
    prompts of ``state`` (``decode.prefill``), on its own SIDs: the SID head's log-probability by teacher forcing
    (``decode.sid_log_prob``), as its search sums it, plus ``fusion x`` its item head's log-probability."""
    from sidrec.model.decode import sid_log_prob
    from sidrec.model.item_head import item_log_prob

    B, K = rows.shape
    out = np.full((B, K), -np.inf, dtype=np.float32)
    if K == 0 or not (rows >= 0).any():
        return out
    dev = state.h.device
    r = torch.from_numpy(rows).to(dev)
    codes = torch.tensor(np.asarray(index.codes), dtype=torch.long, device=dev)[r.clamp(min=0)]  # [B, K, L] (a copy)
    head = getattr(model, "item_head", None)
    with autocast(dev, state.dtype):
        item = (item_log_prob(head, state.h).gather(1, r.clamp(min=0)) * float(head.fusion)
                if head is not None and float(head.fusion) != 0.0 else torch.zeros(B, K, device=dev))
        step = max(1, RESCORE_ROWS // max(B, 1))
        s = torch.cat([sid_log_prob(model, state, codes[:, c0:c0 + step]) for c0 in range(0, K, step)], 1)
    s = s.float() + item.float()
    return torch.where(r >= 0, s, torch.full_like(s, float("-inf"))).cpu().numpy()


def fuse_batch(ens: IndexEnsemble, prompts: list[list[list[int]]], beams: int, dtype: torch.dtype
               ) -> tuple[np.ndarray, np.ndarray]:
    """One batch of users: ``prompts[k]`` are member k's prompts (the same users in the same order). Returns the
    fused top ``beams`` ``(rows [B, beams], scores [B, beams])``, best first (-1 / -inf where the catalog runs out)."""
    from sidrec.model.decode import prefill

    B = len(prompts[0])
    states = [prefill(m, p, enc.pad_id, dtype) for m, p, enc in zip(ens.members, prompts, ens.encoders)]
    pools = [member_pool(m, st, ix, trie, beams)
             for m, st, ix, trie in zip(ens.members, states, ens.indexes, ens.tries)]
    union = [np.unique(np.concatenate([pl[0][u] for pl in pools])) for u in range(B)]
    union = [x[x >= 0] for x in union]
    width = max(1, max(len(x) for x in union))
    cand = np.full((B, width), -1, dtype=np.int64)
    for u, x in enumerate(union):
        cand[u, : len(x)] = x
    total = np.zeros((B, width), dtype=np.float64)
    for k, (rows, scores) in enumerate(pools):
        mine = np.full((B, width), -np.inf, dtype=np.float32)
        missing = np.full((B, width), -1, dtype=np.int64)
        slots = []
        for u in range(B):  # an item of the member's own pool keeps its search's score; the others are scored below
            own = {int(r): float(s) for r, s in zip(rows[u], scores[u]) if r >= 0}
            j_miss = []
            for j, r in enumerate(cand[u, : len(union[u])].tolist()):
                if r in own:
                    mine[u, j] = own[r]
                else:
                    j_miss.append(j)
            missing[u, : len(j_miss)] = cand[u, j_miss]
            slots.append(j_miss)
        n_miss = max(len(j) for j in slots)
        if n_miss:
            got = member_scores(ens.members[k], states[k], ens.indexes[k], missing[:, :n_miss])
            for u, j_miss in enumerate(slots):
                mine[u, j_miss] = got[u, : len(j_miss)]
        total += mine
    total[cand < 0] = -np.inf
    order = np.argsort(-total, axis=1, kind="stable")[:, :beams]
    top, sc = np.take_along_axis(cand, order, 1), np.take_along_axis(total, order, 1).astype(np.float32)
    if top.shape[1] < beams:  # a tiny catalog: pad to the requested width
        pad = beams - top.shape[1]
        top = np.concatenate([top, np.full((B, pad), -1, dtype=np.int64)], 1)
        sc = np.concatenate([sc, np.full((B, pad), -np.inf, dtype=np.float32)], 1)
    sc[top < 0] = -np.inf
    return top, sc


def recommend_fused(ens: IndexEnsemble, prompts: list[list[list[int]]], beams: int, batch_size: int = 16,
                    dtype: torch.dtype = torch.bfloat16, progress: bool = True, desc: str = "decode"
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``decode.recommend`` for an :class:`IndexEnsemble`: ``prompts[k]`` member k's prompts of the same users.
    Returns ``(rows [U, beams], scores [U, beams], emitted [U, beams])``, rows of the members' shared catalog."""
    if len(prompts) != len(ens) or len({len(p) for p in prompts}) != 1:
        raise ModelError(f"index ensemble: {len(ens)} members need one prompt list each, of the same users")
    ens.eval()
    U = len(prompts[0])
    rows = np.full((U, beams), -1, dtype=np.int64)
    scores = np.full((U, beams), -np.inf, dtype=np.float32)
    order = np.argsort([len(p) for p in prompts[0]], kind="stable")
    for start in tqdm(range(0, U, batch_size), desc=desc, disable=not progress, unit="batch",
                      total=math.ceil(U / batch_size)):
        idx = order[start : start + batch_size]
        r, s = fuse_batch(ens, [[p[i] for i in idx] for p in prompts], beams, dtype)
        rows[idx], scores[idx] = r, s
    return rows, scores, rows >= 0
