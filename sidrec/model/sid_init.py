"""Semantic initialisation of the SID token rows (``model.sid_init: text``).

A SID token's row is both its input embedding and, tied, its output row (``sidrec.model.sid_model``), so at
step 0 a random row means the first loss is that of a uniform guess and the first steps are spent
moving rows apart. Here each code's row starts from what its items say: for token ``(level, c)``,
the mean over the items carrying code ``c`` at that level of each item's mean *input* embedding of
its text tokens. Those means are centred per level (the part all codes share says nothing about a
code) and rescaled so that every row sits as far from the vocabulary mean as a typical vocabulary
row does -- so rows of one level are as distinct as real tokens, not collapsed into one direction
(a plain mean-of-vocabulary init collapses new tokens, see GTI). Codes no item carries keep their
fallback row. Why item texts and not keywords (SA-Init, ``keywords``): every item contributes, so
every used code gets a row, including residual levels whose TF-IDF keywords are often empty.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def item_text_vectors(texts: Sequence[str], tokenizer, base_embeddings: torch.Tensor, max_tokens: int = 64) -> torch.Tensor:
    """[n_items, H]: mean pretrained input embedding of each text's first ``max_tokens`` tokens."""
    E = base_embeddings.detach().float()
    out = torch.zeros(len(texts), E.shape[1])
    for i, text in enumerate(texts):
        ids = tokenizer(text or "", add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
        if ids:
            out[i] = E[torch.tensor(ids)].mean(0)
    return out


def text_init(vocab, index, item_vectors: torch.Tensor, base_embeddings: torch.Tensor,
              fallback: torch.Tensor, first_level: int = 0) -> tuple[torch.Tensor, float]:
    """SID table whose rows of ``index`` come from ``item_vectors`` (rows in ``index.entity_ids`` order), the others
    ``fallback``'s. ``first_level``: where ``index``'s levels start among ``vocab``'s (0: the item index, levels
    first; the items' level count: the dual index's users). Returns (table, share of ``vocab``'s rows set here)."""
    E = base_embeddings.detach().float()
    mu = E.mean(0)
    spread = (E - mu).norm(dim=1).mean()  # a typical vocabulary row's distance from the mean
    table = fallback.detach().clone().float()
    codes = torch.tensor(np.array(index.codes, dtype=np.int64))
    set_rows = 0
    for level in range(index.num_levels):
        size = int(index.level_sizes[level])
        c = codes[:, level]
        counts = torch.bincount(c, minlength=size).float()
        sums = torch.zeros(size, item_vectors.shape[1]).index_add_(0, c, item_vectors.float())
        used = counts > 0
        if not used.any():
            continue
        means = sums[used] / counts[used, None]
        d = means - means.mean(0)
        rms = d.norm(dim=1).pow(2).mean().sqrt()
        if rms <= 1e-8:  # one code (or identical texts): nothing distinguishes the rows
            continue
        rows = mu + d * (spread / rms)
        start = vocab.level_offsets[first_level + level]
        table[start + torch.nonzero(used).view(-1)] = rows
        set_rows += int(used.sum())
    return table, set_rows / max(len(vocab.tokens), 1)
