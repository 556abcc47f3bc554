"""Batched constrained beam search over SIDs with the KV cache.

One prefill of the (left-padded) prompts, then one incremental step per SID level for all
``batch x beams`` hypotheses at once. At level ``t`` logits are computed over level ``t``'s SID
token rows only; the prefix trie (``PrefixTrie.allowed``) masks every hypothesis in one tensor
operation, so only SIDs that exist can be emitted. With ``trie=None`` the same search runs
unconstrained (used by the benchmark to measure the cost of the constraint and the invalid rate).
A model with an item head (``sidrec.model.item_head``) re-ranks the finished beams of a constrained search
by ``beam score + fusion * log p_item``, the item head's log-probability from the state after the prompt;
with ``candidates`` set on the head, its own top items join the beams first, each scored by the SID head
exactly as the search would have scored it (``sid_log_prob``, teacher forcing from the prompt's cache).

Neither the search nor the teacher forcing copies the prompt's cache once per hypothesis. The hypotheses of one
prompt are a tree whose trunk is the prompt: their tokens are appended after the prompt in one sequence, each at the
position it would have right after the prompt, and a 4-D attention mask lets a token see the prompt's real tokens,
its own ancestors and itself, nothing else (``path`` in the search, :func:`tree_mask` for given SIDs). A step costs
one pass over ``batch x beams`` new tokens against ``batch`` caches that only grow, instead of ``batch x beams``
copies of the cache reordered at every level; the result is the same (tests compare it with one pass per SID).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from sidrec.runtime import autocast

NEG_INF = float("-inf")


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


@dataclass
class Prefill:
    """The prompts after one forward pass: their KV ``cache``, attention ``mask`` [B, P] (left padding is 0),
    the ``next_pos`` [B] an item's first token takes, the last prompt state ``h`` [B, H] (what the first SID level
    and the item head read) and the compute ``dtype``. Whoever needs the cache changed works on a copy."""

    cache: object
    mask: torch.Tensor
    next_pos: torch.Tensor
    h: torch.Tensor
    dtype: torch.dtype


@torch.no_grad()
def prefill(model, prompts: list[list[int]], pad_id: int = 0, dtype: torch.dtype = torch.bfloat16) -> Prefill:
    """One forward pass over the (left-padded) prompts."""
    dev = next(model.parameters()).device
    ids, mask = (t.to(dev) for t in _left_pad(prompts, pad_id))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with autocast(dev, dtype):
        h, cache = model.hidden(ids, attention_mask=mask, position_ids=pos, use_cache=True)
    return Prefill(cache, mask, pos[:, -1] + 1, h[:, -1], dtype)


@torch.no_grad()
def beam_search_batch(
    model, prompts: list[list[int]], num_levels: int, beams: int, trie=None, pad_id: int = 0,
    dtype: torch.dtype = torch.bfloat16, pool: bool = False, state: Optional[Prefill] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(codes [B, beams, L], scores [B, beams])``, best first; dead beams score -inf.

    With a trie the codes always form an existing SID (a dead beam only appears when the
    catalog has fewer than ``beams`` entries). ``pool``: keep the item head's candidates too (the whole
    re-ranked pool of ``beams + candidates``, best first, not cut to ``beams``; ``sidrec.model.fusion``).
    ``state``: the prompts' :func:`prefill`, if the caller already has it (it is left unchanged; ``prompts``,
    ``pad_id`` and ``dtype`` are then not read: the state's dtype is the search's).
    """
    vocab = model.vocab
    B = len(prompts) if state is None else state.mask.shape[0]
    dev = next(model.parameters()).device
    if trie is not None and trie.device != dev:
        trie = trie.to(dev)
    head = getattr(model, "item_head", None) if trie is not None else None
    extra = head.candidates if head is not None else 0
    reuse = state is not None or extra > 0  # the prompts' state outlives the search (left as it was)
    if state is None:
        state = prefill(model, prompts, pad_id, dtype)
    dtype = state.dtype
    cache = copy.deepcopy(state.cache) if reuse else state.cache  # the search appends the hypotheses' tokens to it
    h = h_prompt = state.h  # [B, H] the state before the item: what the item head (if any) scores every item from
    # every hypothesis's tokens stay in one tree per prompt: level t appends the k hypotheses' level-t tokens after the
    # prompt, and ``path`` [B, k, T] marks which appended tokens lie on each hypothesis's path (tree_mask's idea)
    path = torch.zeros(B, 1, 0, dtype=torch.bool, device=dev)

    scores = torch.zeros(B, 1, device=dev)  # one live hypothesis per prompt to start
    nodes = torch.zeros(B, 1, dtype=torch.long, device=dev)
    codes = torch.zeros(B, 1, 0, dtype=torch.long, device=dev)
    for level in range(num_levels):
        k_in = scores.shape[1]
        with autocast(dev, dtype):
            logits = model.sid_logits(h.reshape(B * k_in, -1), level)
        logp = torch.log_softmax(logits.float(), dim=-1).view(B, k_in, -1)
        n_codes = logp.shape[-1]
        if trie is not None:
            alive = nodes >= 0
            allowed = trie.allowed(level, nodes.clamp(min=0).view(-1)).view(B, k_in, n_codes)
            logp = logp.masked_fill(~(allowed & alive.unsqueeze(-1)), NEG_INF)
        cand = (scores.unsqueeze(-1) + logp).view(B, k_in * n_codes)
        k_out = min(beams, k_in * n_codes)
        top, flat = cand.topk(k_out, dim=-1)
        src = torch.div(flat, n_codes, rounding_mode="floor")  # which hypothesis each came from
        code = flat % n_codes
        if trie is not None:
            parent = nodes.gather(1, src)
            child = trie.advance(level, parent.clamp(min=0).view(-1), code.view(-1)).view(B, k_out)
            nodes = torch.where((parent >= 0) & torch.isfinite(top), child, torch.full_like(child, -1))
        codes = torch.cat([codes.gather(1, src.unsqueeze(-1).expand(-1, -1, codes.shape[-1])), code.unsqueeze(-1)], -1)
        scores = top
        if level == num_levels - 1:
            break
        # advance the model by one token for every surviving hypothesis: its token sees the prompt, its path, itself
        path = torch.cat([path.gather(1, src.unsqueeze(-1).expand(-1, -1, path.shape[-1])),
                          torch.eye(k_out, dtype=torch.bool, device=dev).expand(B, -1, -1)], -1)  # [B, k_out, T]
        attn = _additive(torch.cat([state.mask.bool()[:, None, :].expand(-1, k_out, -1), path], -1), dtype)
        tok = vocab.code_ids(level, code)  # [B, k_out]
        pos = (state.next_pos + level)[:, None].expand(-1, k_out)
        with autocast(dev, dtype):
            h, cache = model.hidden(tok, attention_mask=attn, position_ids=pos, cache=cache, use_cache=True)
        # h [B, k_out, H]: the state after each hypothesis's latest token
    if head is not None:  # re-rank the candidates with the item head (sidrec.model.item_head)
        from sidrec.model.item_head import fuse_beams, head_candidates, item_log_prob

        with autocast(dev, dtype):
            # once, for the candidates and the fusion (neither needs it with fusion 0 and no candidates)
            item_logp = item_log_prob(head, h_prompt) if extra > 0 or float(head.fusion) != 0.0 else None
            if extra > 0:  # the head's own top items join the beams, scored by the SID head as a search would score them
                more, real = head_candidates(head, item_logp, codes, extra)
                more_scores = sid_log_prob(model, state, more).masked_fill(~real, NEG_INF)
                codes, scores = torch.cat([codes, more], 1), torch.cat([scores, more_scores], 1)
            codes, scores = fuse_beams(head, h_prompt, codes, scores, sort=extra > 0, item_logp=item_logp)
            if not pool:
                codes, scores = codes[:, :beams], scores[:, :beams]
    if scores.shape[1] < beams:  # tiny catalogs: pad to the requested width
        pad = beams - scores.shape[1]
        scores = torch.cat([scores, torch.full((B, pad), NEG_INF, device=dev)], 1)
        codes = torch.cat([codes, torch.zeros(B, pad, codes.shape[-1], dtype=torch.long, device=dev)], 1)
    return codes.cpu(), scores.cpu()


def tree_mask(mask: torch.Tensor, branches: int, depth: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive 4-D attention mask [B, 1, Q, P + Q] (Q = ``branches x depth``) for ``branches`` token runs of
    ``depth`` tokens each, laid end to end after prompts with 2-D mask ``mask`` [B, P]: a token sees the prompt's
    real tokens, and the earlier tokens of its own run and itself, nothing else (0 = seen, the dtype's minimum = not)."""
    B, P = mask.shape
    q = torch.arange(branches * depth, device=mask.device)
    run, step = q // depth, q % depth
    own = (run[:, None] == run[None, :]) & (step[:, None] >= step[None, :])  # [Q, Q]
    return _additive(torch.cat([mask.bool()[:, None, :].expand(B, len(q), P), own.expand(B, -1, -1)], -1), dtype)


def _additive(seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, Q, K] the additive attention mask of ``seen`` [B, Q, K] (True: the query sees the key): 0 where seen,
    the dtype's minimum where not."""
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(~seen, torch.finfo(dtype).min)[:, None]


@torch.no_grad()
def sid_log_prob(model, state: Prefill, codes: torch.Tensor) -> torch.Tensor:
    """[B, K] the SID head's log-probability of given SIDs ``codes`` [B, K, L] after the prompts of ``state``, level
    by level as the beam search sums it (teacher forcing). The K SIDs of a prompt are one tree over its cache
    (:func:`tree_mask`); ``state`` is left unchanged."""
    B, K, L = codes.shape
    dev = state.h.device
    with autocast(dev, state.dtype):
        score = torch.log_softmax(model.sid_logits(state.h, 0).float(), -1).gather(1, codes[:, :, 0])
        if L == 1 or K == 0:
            return score
        d = L - 1
        tok = torch.stack([model.vocab.code_ids(level, codes[:, :, level]) for level in range(d)], -1).reshape(B, K * d)
        pos = state.next_pos[:, None] + torch.arange(d, device=dev).repeat(K)  # [B, K*d]
        attn = tree_mask(state.mask, K, d, state.dtype)
        h, _ = model.hidden(tok, attention_mask=attn, position_ids=pos, cache=copy.deepcopy(state.cache), use_cache=True)
        h = h.view(B, K, d, -1)
        for level in range(1, L):
            lp = torch.log_softmax(model.sid_logits(h[:, :, level - 1], level).float(), -1)
            score = score + lp.gather(2, codes[:, :, level : level + 1]).squeeze(-1)
    return score


def recommend(
    model, prompts: list[list[int]], index, beams: int, batch_size: int = 16, trie=None, pad_id: int = 0,
    dtype: torch.dtype = torch.bfloat16, progress: bool = True, desc: str = "decode",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode every prompt; returns ``(rows [U, beams], scores [U, beams], valid [U, beams])``.

    ``rows`` are entity rows of ``index`` (-1 where the beam is dead or its SID does not exist).
    Prompts are processed in length-sorted batches to limit padding.
    """
    model.eval()
    if trie is not None:  # move the tables once, not per batch
        trie = trie.to(next(model.parameters()).device)
    U = len(prompts)
    rows = np.full((U, beams), -1, dtype=np.int64)
    scores = np.full((U, beams), -np.inf, dtype=np.float32)
    emitted = np.zeros((U, beams), dtype=bool)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    for start in tqdm(range(0, U, batch_size), desc=desc, disable=not progress, unit="batch",
                      total=math.ceil(U / batch_size)):
        idx = order[start : start + batch_size]
        codes, sc = beam_search_batch(model, [prompts[i] for i in idx], index.num_levels, beams, trie, pad_id, dtype)
        codes = codes.numpy()
        sc = sc.numpy()
        for j, u in enumerate(idx):
            for b in range(beams):
                if np.isfinite(sc[j, b]):
                    emitted[u, b] = True
                    row = index.row_for_codes(codes[j, b])
                    rows[u, b] = -1 if row is None else row
            scores[u] = sc[j]
    return rows, scores, emitted


def generate_codes(
    model, prompts: list[list[int]], num_levels: int, beams: int = 5, batch_size: int = 16, pad_id: int = 0,
    dtype: torch.dtype = torch.bfloat16, progress: bool = False,
) -> np.ndarray:
    """STORE: the LLM as tokenizer. The ``beams`` most likely code tuples (best first) of the first
    ``num_levels`` SID levels for each prompt (e.g. an item's text), any code combination allowed (no
    trie): ``[n, beams, num_levels]``."""
    model.eval()
    out = np.zeros((len(prompts), beams, num_levels), dtype=np.int64)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate SIDs", disable=not progress, unit="batch"):
        idx = order[start : start + batch_size]
        codes, _ = beam_search_batch(model, [prompts[i] for i in idx], num_levels, beams, None, pad_id, dtype)
        out[idx] = codes.numpy()
    return out
