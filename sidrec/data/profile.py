"""What a reader of a data-quality report checks when something looks off: the data's profile.

:func:`profile_dataset` summarises a canonical :class:`sidrec.data.dataset.Dataset` in a small JSON dict
(no per-user or per-item rows, so it can be kept for every run): interactions per user and per item
(quantiles and a log2 histogram: the long tail), activity over time, item-text coverage and
length, and the id / timestamp problems the data still has after ingestion. :func:`change` compares
two profiles; :class:`ProfileHistory` keeps the last profiles of each dataset in the state folder,
so a report can say what changed since the previous run of the same dataset.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

QUANTILES = (0.25, 0.5, 0.75, 0.9, 0.99)
UNIX_1973 = 100_000_000  # timestamps below this (Unix seconds, 1973-03) are an order, not a date


def distribution(counts) -> dict:
    """Quantiles, mean and a log2 histogram of positive counts (bins [1,2), [2,4), [4,8), ...)."""
    x = np.asarray(counts, dtype=np.int64)
    if x.size == 0:
        return {"n": 0}
    qs = np.quantile(x, QUANTILES)
    top = max(int(x.max()), 1)
    edges = [2 ** i for i in range(int(math.floor(math.log2(top))) + 2)]
    hist, _ = np.histogram(x, bins=edges)
    first = int(np.flatnonzero(hist)[0]) if hist.any() else 0  # no empty bins below the smallest count
    edges, hist = edges[first:], hist[first:]
    return {"n": int(x.size), "min": int(x.min()), "mean": round(float(x.mean()), 3), "max": int(x.max()),
            **{f"p{int(q * 100)}": round(float(v), 2) for q, v in zip(QUANTILES, qs)},
            "hist": [[f"{a}-{b - 1}" if b - 1 > a else str(a), int(c)] for a, b, c in zip(edges[:-1], edges[1:], hist)]}


def _activity(ts: pd.Series, max_buckets: int = 24) -> dict:
    """Interactions per calendar month (Unix-second timestamps), else per equal slice of the order."""
    t = ts.to_numpy(dtype=np.int64)
    if t.size == 0:
        return {"unit": "none", "buckets": []}
    if t.min() >= UNIX_1973:
        month = pd.to_datetime(t, unit="s").to_period("M")
        counts = pd.Series(1, index=month).groupby(level=0).size()
        full = pd.period_range(counts.index.min(), counts.index.max(), freq="M")
        counts = counts.reindex(full, fill_value=0)
        if len(counts) > max_buckets:  # coarser: quarters, then years
            for freq in ("Q", "Y"):
                counts = pd.Series(counts.to_numpy(), index=counts.index.asfreq(freq)).groupby(level=0).sum()
                if len(counts) <= max_buckets:
                    break
        return {"unit": "date", "buckets": [[str(p), int(c)] for p, c in counts.items()],
                "first": str(pd.to_datetime(int(t.min()), unit="s").date()), "last": str(pd.to_datetime(int(t.max()), unit="s").date())}
    lo, hi = int(t.min()), int(t.max())
    n = min(max_buckets, hi - lo + 1)
    hist, edges = np.histogram(t, bins=n, range=(lo, hi + 1))
    return {"unit": "order", "buckets": [[f"{int(a)}", int(c)] for a, c in zip(edges[:-1], hist)],
            "note": "timestamps are an order (no dates): activity is shown per slice of that order"}


def text_columns(items: pd.DataFrame, text_fields: list[str]) -> list[str]:
    """The item columns that hold its text: the dataset's text fields present, else ``title`` if there is one."""
    return [c for c in text_fields if c in items.columns] or (["title"] if "title" in items.columns else [])


def _stripped(items: pd.DataFrame, col: str) -> pd.Series:
    return items[col].fillna("").astype(str).str.strip()


def joined_text(items: pd.DataFrame, cols: list[str]) -> pd.Series:
    """Each item's text columns joined by a space, stripped ("" for an item without text)."""
    text = _stripped(items, cols[0])
    for c in cols[1:]:
        text = text.str.cat(_stripped(items, c), sep=" ")
    return text.str.strip()


def _text(items: pd.DataFrame, text_fields: list[str]) -> dict:
    cols = text_columns(items, text_fields)
    if not cols or items.empty:
        return {"fields": cols, "coverage": 0.0, "chars": {"n": 0}, "words": {"n": 0}, "per_field": {}}
    text = joined_text(items, cols)
    has = text != ""
    return {"fields": cols, "coverage": round(float(has.mean()), 4),
            "per_field": {c: round(float((_stripped(items, c) != "").mean()), 4) for c in cols},
            "chars": distribution(text[has].str.len()), "words": distribution(text[has].str.split().str.len())}


def profile_dataset(ds) -> dict:
    """The profile of one dataset (see the module doc); JSON-serialisable and small."""
    inter = ds.interactions
    per_user = inter.groupby("user_id", sort=False).size()
    per_item = inter.groupby("item_id", sort=False).size().sort_values(ascending=False)
    catalog = set(ds.items["item_id"].astype(str))
    seen = set(per_item.index.astype(str))
    n_inter = int(len(inter))
    top = max(1, int(math.ceil(0.1 * len(per_item))))
    back = inter["timestamp"].groupby(inter["user_id"], sort=False).diff() < 0
    problems = {
        "missing_user_id": int(inter["user_id"].isna().sum()),
        "missing_item_id": int(inter["item_id"].isna().sum()),
        "missing_timestamp": int(inter["timestamp"].isna().sum()),
        "interacted_items_not_in_items_table": len(seen - catalog),
        "duplicate_item_ids": int(ds.items["item_id"].duplicated().sum()),
        "duplicate_interactions": int(inter.duplicated(["user_id", "item_id", "timestamp"]).sum()),
        "users_with_timestamps_out_of_order": int(inter.loc[back.to_numpy(), "user_id"].nunique()),
        "users_with_one_interaction": int((per_user == 1).sum()),
        "catalog_items_never_interacted": len(catalog - seen),
    }
    return {
        "dataset": ds.name, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "stats": ds.stats(),
        "per_user": distribution(per_user.to_numpy()),
        "per_item": distribution(per_item.to_numpy()),
        "long_tail": {
            "top10pct_items_share_of_interactions": round(float(per_item.iloc[:top].sum() / max(n_inter, 1)), 4),
            "items_with_under_5_interactions": round(float((per_item < 5).mean()), 4) if len(per_item) else 0.0,
            "top_items": [[str(i), int(c)] for i, c in per_item.iloc[:10].items()],
        },
        "activity": _activity(inter["timestamp"]),
        "text": _text(ds.items, list(ds.text_fields)),
        "problems": problems,
    }


# what a change report compares: (label, path into the profile)
TRACKED = [
    ("users", ("stats", "n_users")), ("items", ("stats", "n_items")), ("interactions", ("stats", "n_interactions")),
    ("interactions per user (median)", ("per_user", "p50")), ("interactions per item (median)", ("per_item", "p50")),
    ("top 10% items' share of interactions", ("long_tail", "top10pct_items_share_of_interactions")),
    ("items with < 5 interactions", ("long_tail", "items_with_under_5_interactions")),
    ("item text coverage", ("text", "coverage")), ("item text length (median chars)", ("text", "chars", "p50")),
]


def _get(d: dict, path: tuple):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def change(previous: Optional[dict], current: dict) -> list[dict]:
    """Rows ``{what, previous, current, change}`` for the tracked figures and every problem count
    (``change`` relative where both are non-zero numbers, else absolute). Empty without a previous profile."""
    if not previous:
        return []
    rows = []
    tracked = TRACKED + [(f"problem: {k.replace('_', ' ')}", ("problems", k)) for k in current.get("problems", {})]
    for label, path in tracked:
        a, b = _get(previous, path), _get(current, path)
        if a is None and b is None:
            continue
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            rel = (b - a) / abs(a) if a else None
            rows.append({"what": label, "previous": a, "current": b, "change": round(rel, 4) if rel is not None else b - a,
                         "relative": rel is not None})
        else:
            rows.append({"what": label, "previous": a, "current": b, "change": None, "relative": False})
    return rows


class ProfileHistory:
    """The last ``keep`` profiles of each dataset, one JSON file per dataset under ``root``
    (``$SIDREC_HOME/quality`` by default), rewritten atomically."""

    def __init__(self, root: Optional[Path] = None, keep: int = 20):
        if root is None:
            from sidrec.runtime import state_home

            root = state_home() / "quality"
        self.root = Path(root)
        self.keep = int(keep)

    def _path(self, dataset: str) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in dataset) or "dataset"
        return self.root / f"{safe}.json"

    def load(self, dataset: str) -> list[dict]:
        p = self._path(dataset)
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            return []  # none yet, or damaged: a report without a comparison, never a failed run
        return data if isinstance(data, list) else []

    def latest(self, dataset: str) -> Optional[dict]:
        runs = self.load(dataset)
        return runs[-1] if runs else None

    def append(self, profile: dict) -> None:
        runs = (self.load(profile["dataset"]) + [profile])[-self.keep:]
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".profile-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(runs, f, indent=1)
        os.replace(tmp, self._path(profile["dataset"]))
