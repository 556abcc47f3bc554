"""TS-Rec: keywords characteristic of the items under each SID token, SA-Init and TS-Align.

Keywords come from the item texts' vocabulary (sklearn's TF-IDF tokenizer, English stop words
removed): for a SID prefix (``<a_3>``, ``<a_3><b_1>``, ...) a term scores
``share_in_group * log(share_in_group / share_in_catalog)`` -- frequent among the items under the
prefix *and* characteristic of them (terms common everywhere, or rare one-offs, do not win). SA-Init sets each SID token's embedding to the mean *pretrained* input
embedding of the keyword tokens of its (level, code) group; TS-Align is the ``ts_align`` task
(prefix -> keywords) rendered by ``sidrec.data.tasks``.
"""
from __future__ import annotations

import numpy as np
import torch


def prefix_keywords(index, texts: list[str], top_k: int = 5) -> dict[str, list[str]]:
    """SID prefix string (every level but the last) -> its ``top_k`` keywords."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b", min_df=2, max_features=20000)
    try:
        X = vec.fit_transform(texts)
    except ValueError:  # empty vocabulary (no usable text)
        return {}
    terms = np.array(vec.get_feature_names_out())
    X = (X > 0).astype(np.float32).tocsr()  # presence per item
    global_mean = np.asarray(X.mean(0)).ravel() + 1e-9
    out: dict[str, list[str]] = {}
    for level in range(index.num_levels - 1):
        keys = [tuple(r) for r in index.codes[:, : level + 1].tolist()]
        groups: dict[tuple, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        for key, rows in groups.items():
            score = _score(X, rows, global_mean)
            best = [b for b in np.argsort(-score, kind="stable")[:top_k] if score[b] > 0]
            prefix = "".join(index.token(lv, int(c)) for lv, c in enumerate(key))
            out[prefix] = [str(terms[b]) for b in best]
    return out


def _score(X, rows, global_share: np.ndarray) -> np.ndarray:
    share = np.asarray(X[rows].mean(0)).ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        score = share * np.log(np.where(share > 0, share / global_share, 1.0))
    return np.where(share > 0, score, 0.0)


def token_keywords(index, texts: list[str], top_k: int = 5) -> dict[str, list[str]]:
    """Per SID *token* (level, code) regardless of prefix: keywords of all items carrying it."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b", min_df=2, max_features=20000)
    try:
        X = vec.fit_transform(texts)
    except ValueError:
        return {}
    terms = vec.get_feature_names_out()
    X = (X > 0).astype(np.float32).tocsr()  # presence per item
    global_mean = np.asarray(X.mean(0)).ravel() + 1e-9
    out: dict[str, list[str]] = {}
    for level in range(index.num_levels):
        for code in np.unique(index.codes[:, level]):
            rows = np.where(index.codes[:, level] == code)[0]
            score = _score(X, rows, global_mean)
            best = [b for b in np.argsort(-score, kind="stable")[:top_k] if score[b] > 0]
            out[index.token(level, int(code))] = [str(terms[b]) for b in best]
    return out


def sa_init(vocab, tokens_kw: dict[str, list[str]], tokenizer, base_embeddings: torch.Tensor,
            fallback: torch.Tensor) -> tuple[torch.Tensor, float]:
    """SID token embedding table: mean pretrained embedding of each token's keyword tokens.

    Tokens without keywords keep their ``fallback`` row. Returns (table, share of tokens initialised).
    """
    table = fallback.clone()
    hit = 0
    for i, tok in enumerate(vocab.tokens):
        kws = tokens_kw.get(tok)
        if not kws:
            continue
        ids = [t for kw in kws for t in tokenizer(" " + kw, add_special_tokens=False)["input_ids"]]
        if ids:
            table[i] = base_embeddings[torch.tensor(ids)].float().mean(0)
            hit += 1
    return table, hit / max(len(vocab.tokens), 1)
