"""Dataset loaders: RecBole atomic files, pre-split UniSRec folders and CSV/Parquet tables.

Every source is turned into one canonical `Dataset`:

- ``interactions``: ``user_id`` (str), ``item_id`` (str), ``timestamp`` (int64), deduplicated,
  k-core filtered and sorted by (user, time, original file order);
- ``items``: the catalog of interacted items (``item_id``, ``title`` and other text columns, "" when
  missing), sorted by item id;
- ``users``: optional user profiles of the surviving users;
- ``sequences``: one chronological item list per user (leave-one-out: valid target = ``[-2]``,
  test target = ``[-1]``).

Every input problem raises `DataError` with one line naming the file, the column or row, and what to
do about it; no pandas traceback leaks out.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pandas as pd

from sidrec.config import DataConfig
from sidrec.errors import DataError
from sidrec.data.readers import (  # noqa: F401
    check_ids,
    clean_ids,
    found_columns,
    parse_timestamps,
    read_any,
    read_text_table,
    require_column,
    short_path,
    sort_frame_by_id,
    sort_ids,
    strip_types,
    text_frame,
)


# RecBole MovieLens column names -> canonical text column names
_RECBOLE_RENAME = {"movie_title": "title", "release_year": "year", "class": "genres"}
_MIN_SEQ = 3  # train prefix + valid target + test target
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: Optional[pd.DataFrame]
    sequences: pd.DataFrame
    text_fields: list[str]
    presplit: bool
    # fingerprint() memo: (the identity of what it hashed, the digest). A Dataset's frames are never
    # modified in place by sidrec (cleaning builds new frames), so identity stands for content.
    _fingerprint_memo: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    # -- splits --------------------------------------------------------------------------------
    def split(self, part: Literal["train", "valid", "test"], max_history: Optional[int]) -> pd.DataFrame:
        """Leave-one-out examples: columns user_id, history (last `max_history` items; None: every item
        before the target), target."""
        if max_history is not None and max_history < 1:
            raise ValueError("max_history must be >= 1")
        H = len(self.interactions) + 1 if max_history is None else int(max_history)
        users, hists, targets = [], [], []
        if part == "train":
            for u, seq in zip(self.sequences["user_id"], self.sequences["item_ids"]):
                train = seq[:-2]
                for t in range(1, len(train)):
                    users.append(u)
                    hists.append(list(train[max(0, t - H):t]))
                    targets.append(train[t])
        elif part in ("valid", "test"):
            cut = 2 if part == "valid" else 1
            for u, seq in zip(self.sequences["user_id"], self.sequences["item_ids"]):
                if len(seq) < cut + 1:
                    continue
                hists.append(list(seq[:-cut][-H:]))
                targets.append(seq[-cut])
                users.append(u)
        else:
            raise ValueError(f"unknown split {part!r}: use 'train', 'valid' or 'test'")
        return pd.DataFrame(
            {
                "user_id": pd.Series(users, dtype="str"),
                "history": pd.Series(hists, dtype=object),
                "target": pd.Series(targets, dtype="str"),
            }
        )

    def train_sequences(self) -> dict[str, list[str]]:
        return {u: list(seq[:-2]) for u, seq in zip(self.sequences["user_id"], self.sequences["item_ids"])}

    def item_index(self) -> dict[str, int]:
        return {iid: i for i, iid in enumerate(self.items["item_id"].tolist())}

    # -- identity / persistence -----------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 (16 hex chars) over the canonical content; stable across runs and processes.

        Hashing renders every frame as text (seconds on a catalog with ~1M interactions), and one run
        asks for it several times (ingest metadata, the artifact's meta.json, the MLflow tags, the
        registry), so the digest is kept until a frame or the text fields are replaced."""
        frames = (self.interactions, self.items, self.users)
        settings = (tuple(self.text_fields), bool(self.presplit))
        memo = self._fingerprint_memo
        if memo is not None and all(a is b for a, b in zip(memo[0], frames)) and memo[1] == settings:
            return memo[2]
        digest = self._content_digest()
        self._fingerprint_memo = (frames, settings, digest)
        return digest

    def _content_digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"v": _FORMAT_VERSION, "text_fields": self.text_fields, "presplit": bool(self.presplit)}).encode())
        for label, df in (("interactions", self.interactions), ("items", self.items), ("users", self.users)):
            h.update(f"\n#{label}\n".encode())
            if df is None:
                h.update(b"<none>")
                continue
            h.update(df.to_csv(index=False, sep="\t", lineterminator="\n").encode("utf-8"))
        return h.hexdigest()[:16]

    def save(self, directory: Path) -> None:
        """Write Parquet files + meta.json atomically (temp folder, then rename)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            self.interactions.to_parquet(tmp / "interactions.parquet", index=False)
            self.items.to_parquet(tmp / "items.parquet", index=False)
            if self.users is not None:
                self.users.to_parquet(tmp / "users.parquet", index=False)
            self.sequences.to_parquet(tmp / "sequences.parquet", index=False)
            meta = {
                "format_version": _FORMAT_VERSION,
                "name": self.name,
                "text_fields": list(self.text_fields),
                "presplit": bool(self.presplit),
                "fingerprint": self.fingerprint(),
                "stats": self.stats(),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
            old = None
            if directory.exists():
                old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(directory, old)
            os.replace(tmp, directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path) -> "Dataset":
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{short_path(directory)}: not a saved dataset (no meta.json); run the data step again")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            inter = pd.read_parquet(directory / "interactions.parquet")
            items = pd.read_parquet(directory / "items.parquet")
            users = pd.read_parquet(directory / "users.parquet") if (directory / "users.parquet").is_file() else None
            seqs = pd.read_parquet(directory / "sequences.parquet")
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{short_path(directory)}: saved dataset is damaged ({type(e).__name__}); run the data step again") from None
        inter = pd.DataFrame(
            {
                "user_id": inter["user_id"].astype("str"),
                "item_id": inter["item_id"].astype("str"),
                "timestamp": inter["timestamp"].astype("int64"),
            }
        )
        items = items.reset_index(drop=True).astype("str")
        if users is not None:
            users = users.reset_index(drop=True).astype("str")
        seqs = pd.DataFrame(
            {
                "user_id": seqs["user_id"].astype("str"),
                "item_ids": pd.Series([[str(x) for x in v] for v in seqs["item_ids"]], dtype=object),
            }
        )
        return cls(
            name=str(meta["name"]),
            interactions=inter,
            items=items,
            users=users,
            sequences=seqs,
            text_fields=[str(f) for f in meta["text_fields"]],
            presplit=bool(meta["presplit"]),
        )

    def stats(self) -> dict:
        n_users = int(self.interactions["user_id"].nunique())
        n_items = int(self.interactions["item_id"].nunique())
        n_inter = int(len(self.interactions))
        return {
            "n_users": n_users,
            "n_items": n_items,
            "n_interactions": n_inter,
            "avg_seq_len": float(n_inter / n_users) if n_users else 0.0,
            "density": float(n_inter / (n_users * n_items)) if n_users and n_items else 0.0,
        }


def _sequences_from(inter: pd.DataFrame) -> pd.DataFrame:
    """interactions are already sorted by (user, time, order): group keeps that order."""
    if inter.empty:
        return pd.DataFrame({"user_id": pd.Series([], dtype="str"), "item_ids": pd.Series([], dtype=object)})
    users = inter["user_id"].to_numpy()
    items = inter["item_id"].to_numpy(dtype=object)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    return pd.DataFrame(
        {
            "user_id": pd.Series(users[starts], dtype="str"),
            "item_ids": pd.Series([items[a:b].tolist() for a, b in zip(starts, ends)], dtype=object),
        }
    )


# ----------------------------------------------------------------------------------------------
# shared processing for non-presplit sources
# ----------------------------------------------------------------------------------------------
def _kcore(inter: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iterative k-core: drop users and items with < k interactions until none is left."""
    if k <= 1:
        return inter
    u_codes, _ = pd.factorize(inter["user_id"])
    i_codes, _ = pd.factorize(inter["item_id"])
    alive = np.ones(len(inter), dtype=bool)
    while True:
        uc = np.bincount(u_codes[alive], minlength=u_codes.max() + 1 if len(u_codes) else 0)
        ic = np.bincount(i_codes[alive], minlength=i_codes.max() + 1 if len(i_codes) else 0)
        keep = alive & (uc[u_codes] >= k) & (ic[i_codes] >= k)
        if keep.sum() == alive.sum():
            return inter[alive]
        alive = keep


def _process(
    inter: pd.DataFrame,
    inter_path: Path,
    cols: tuple[str, str, str | None],
    cfg: DataConfig,
) -> pd.DataFrame:
    """Raw interactions (str columns) -> canonical, filtered, sorted interactions."""
    ucol, icol, tcol = cols
    if len(inter) == 0:
        raise DataError(f"{short_path(inter_path)}: no interaction rows (only a header); add data rows")
    df = pd.DataFrame(
        {
            "user_id": clean_ids(inter[ucol]),
            "item_id": clean_ids(inter[icol]),
        },
        index=inter.index,
    )
    fractional = set(inter.attrs.get("fractional_columns", ()))
    for col, canon_col in ((ucol, "user_id"), (icol, "item_id")):
        check_ids(df[canon_col], inter[col], inter_path, col, col in fractional)
    if tcol is None:
        df["timestamp"] = np.arange(len(df), dtype="int64")
    else:
        df["timestamp"] = parse_timestamps(inter[tcol], inter_path, tcol).to_numpy()
    df["_order"] = np.arange(len(df), dtype="int64")
    df = df[df["user_id"].notna() & df["item_id"].notna()]
    if df.empty:
        raise DataError(f"{short_path(inter_path)}: every row has an empty '{ucol}' or '{icol}'; fill in the ids")
    df = df.astype({"user_id": "str", "item_id": "str"})
    df = df.drop_duplicates(["user_id", "item_id", "timestamp"], keep="first")
    if cfg.max_users is not None:
        keep_users = set(sort_ids(df["user_id"])[: cfg.max_users])
        df = df[df["user_id"].isin(keep_users)]
    n_before = df["user_id"].nunique()
    df = _kcore(df, cfg.kcore)
    if cfg.kcore < _MIN_SEQ:
        counts = df["user_id"].map(df["user_id"].value_counts())
        df = df[(counts >= _MIN_SEQ).to_numpy()]
    if df.empty:
        raise DataError(
            f"{short_path(inter_path)}: 0 users left after {cfg.kcore}-core filtering (of {n_before}; each user needs "
            f">= {max(cfg.kcore, _MIN_SEQ)} interactions); lower data.kcore or add data"
        )
    df = sort_frame_by_id(df, "user_id", ["timestamp", "_order"])
    return df[["user_id", "item_id", "timestamp"]].reset_index(drop=True)


def _items_table(
    items_raw: pd.DataFrame,
    path: Path,
    key: str,
    key_hint: str,
    title_col: str | None,
    text_cols: list[str] | None,
    rename: dict[str, str],
    keep_ids: pd.Series,
) -> tuple[pd.DataFrame, list[str]]:
    """Validate the raw items table and return (catalog of kept items, text_fields)."""
    if key not in items_raw.columns:
        raise DataError(f"{short_path(path)}: items table has no id column '{key}' (found: {found_columns(items_raw)}); {key_hint}")
    ids = clean_ids(items_raw[key])
    if ids.isna().any():
        row = int(np.flatnonzero(ids.isna().to_numpy())[0]) + 2
        raise DataError(f"{short_path(path)}: row {row}, column '{key}': empty item id; fill it in or delete the row")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise DataError(
            f"{short_path(path)}: duplicate item id '{dup.iloc[0]}' in column '{key}' ({len(dup)} duplicate row(s)); "
            "keep one row per item"
        )
    others = [c for c in items_raw.columns if c != key]
    if text_cols is not None:
        for c in text_cols:
            if c not in items_raw.columns:
                raise DataError(f"{short_path(path)}: missing item text column '{c}' (found: {found_columns(items_raw)}); fix data.columns.text")
        others = list(text_cols)
    if title_col is not None and title_col not in items_raw.columns:
        raise DataError(f"{short_path(path)}: missing title column '{title_col}' (found: {found_columns(items_raw)}); fix data.columns.title")
    out = pd.DataFrame({"item_id": ids.astype("str")})
    for c in others:
        out[c] = items_raw[c].astype("str") if c in items_raw.columns else ""
    out = text_frame(out, others)
    names = {c: rename.get(c, c) for c in others}
    # title: explicit column, a `title`-like column, or the first text column
    if title_col is None:
        renamed = [names[c] for c in others]
        if "title" in renamed:
            title_src = others[renamed.index("title")]
        elif others:
            title_src = others[0]
        else:
            title_src = None
    else:
        title_src = title_col
    if title_src is not None and title_src not in others:
        out[title_src] = text_frame(items_raw[[title_src]], [title_src])[title_src].to_numpy()
        others = [title_src] + others
    if title_src is not None:
        names[title_src] = "title"
        for c in others:
            if c != title_src and names.get(c) == "title":
                names[c] = c  # the explicit title wins the name
    out = out.rename(columns=names)
    text_fields = [names[c] for c in others]
    if title_src is None:
        out["title"] = ""
    if len(set(out.columns)) != len(out.columns):
        dups = sorted({c for c in out.columns if list(out.columns).count(c) > 1})
        raise DataError(f"{short_path(path)}: columns collide after renaming ({', '.join(dups)}); rename them in the file")
    out = out[out["item_id"].isin(set(keep_ids))]
    out = sort_frame_by_id(out, "item_id")
    cols = ["item_id", "title"] + [c for c in out.columns if c not in ("item_id", "title")]
    return out[cols].reset_index(drop=True), text_fields


def _users_table(users_raw: pd.DataFrame, path: Path, key: str, key_hint: str, keep_ids: pd.Series) -> pd.DataFrame:
    if key not in users_raw.columns:
        raise DataError(f"{short_path(path)}: users table has no id column '{key}' (found: {found_columns(users_raw)}); {key_hint}")
    ids = clean_ids(users_raw[key])
    ok = ids.notna()
    dup = ids[ok & ids.duplicated()]
    if len(dup):
        raise DataError(f"{short_path(path)}: duplicate user id '{dup.iloc[0]}' in column '{key}'; keep one row per user")
    others = [c for c in users_raw.columns if c != key]
    out = pd.DataFrame({"user_id": ids})
    for c in others:
        out[c] = users_raw[c].astype("str")
    out = out[ok.to_numpy()].astype({"user_id": "str"})
    out = text_frame(out, others)
    out = out.rename(columns={c: ("profile_user_id" if c == "user_id" else c) for c in others})
    out = out[out["user_id"].isin(set(keep_ids))]
    return sort_frame_by_id(out, "user_id")


def _finish(name, inter, items, users, text_fields, presplit) -> Dataset:
    seqs = _sequences_from(inter)
    return Dataset(
        name=name,
        interactions=inter,
        items=items,
        users=users,
        sequences=seqs,
        text_fields=text_fields,
        presplit=presplit,
    )


# ----------------------------------------------------------------------------------------------
# formats
# ----------------------------------------------------------------------------------------------
def _folder(cfg: DataConfig) -> Path:
    folder = cfg.resolve(cfg.path)
    if not folder.exists():
        raise DataError(f"{short_path(folder)}: dataset folder not found; check data.path (or run `make fetch`)")
    if not folder.is_dir():
        raise DataError(f"{short_path(folder)}: expected a folder for data.format '{cfg.format}'; check data.path and data.format")
    return folder


def _prefix(cfg: DataConfig, folder: Path, suffix: str, exclude: tuple[str, ...] = ()) -> str:
    """cfg.name, or the folder name, or the only `<prefix><suffix>` file in the folder."""
    name = cfg.dataset_name
    if (folder / f"{name}{suffix}").is_file() or cfg.name:
        return name
    cands = sorted(
        p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}") if p.is_file() and not p.name.endswith(exclude)
    )
    if len(cands) == 1:
        return cands[0]
    if cands:
        raise DataError(f"{short_path(folder / (name + suffix))}: file not found; several candidates ({', '.join(cands)}): set data.name")
    raise DataError(f"{short_path(folder / (name + suffix))}: file not found; check data.path and data.name")


def _load_recbole(cfg: DataConfig) -> Dataset:
    folder = _folder(cfg)
    name = _prefix(cfg, folder, ".inter", exclude=(".train.inter", ".valid.inter", ".test.inter"))
    inter_path = folder / f"{name}.inter"
    item_path = folder / f"{name}.item"
    user_path = folder / f"{name}.user"
    if not inter_path.is_file():
        raise DataError(f"{short_path(inter_path)}: file not found; check data.path and data.name")
    if not item_path.is_file():
        raise DataError(f"{short_path(item_path)}: item file not found; RecBole sources need <name>.item with item text")
    inter = read_text_table(inter_path, "\t", csv.QUOTE_NONE)
    inter.columns = strip_types(inter.columns)
    c = cfg.columns
    require_column(inter, inter_path, c.user, "set data.columns.user")
    require_column(inter, inter_path, c.item, "set data.columns.item")
    tcol = c.timestamp if c.timestamp in inter.columns else None
    canon = _process(inter, inter_path, (c.user, c.item, tcol), cfg)

    items_raw = read_text_table(item_path, "\t", csv.QUOTE_NONE)
    items_raw.columns = strip_types(items_raw.columns)
    items, text_fields = _items_table(
        items_raw, item_path, c.item_key, "set data.columns.item_key", c.title, c.text, _RECBOLE_RENAME, canon["item_id"]
    )
    users = None
    if user_path.is_file():
        users_raw = read_text_table(user_path, "\t", csv.QUOTE_NONE)
        users_raw.columns = strip_types(users_raw.columns)
        users = _users_table(users_raw, user_path, c.user_key, "set data.columns.user_key", canon["user_id"])
    return _finish(name, canon, items, users, text_fields, presplit=False)


def _load_table(cfg: DataConfig) -> Dataset:
    inter_path = cfg.resolve(cfg.path)
    if cfg.items_path is None:
        raise DataError(f"{short_path(inter_path)}: data.items_path is required for data.format 'table' (a CSV/Parquet file of item texts)")
    items_path = cfg.resolve(cfg.items_path)
    users_path = cfg.resolve(cfg.users_path)
    c = cfg.columns
    inter = read_any(inter_path, "interactions")
    require_column(inter, inter_path, c.user, "set data.columns.user")
    require_column(inter, inter_path, c.item, "set data.columns.item")
    require_column(inter, inter_path, c.timestamp, "set data.columns.timestamp")
    canon = _process(inter, inter_path, (c.user, c.item, c.timestamp), cfg)
    items_raw = read_any(items_path, "items")
    if len(items_raw) == 0:
        raise DataError(f"{short_path(items_path)}: items table has no rows; add one row per item")
    items, text_fields = _items_table(
        items_raw, items_path, c.item_key, "set data.columns.item_key", c.title, c.text, {}, canon["item_id"]
    )
    users = None
    if users_path is not None:
        users_raw = read_any(users_path, "users")
        users = _users_table(users_raw, users_path, c.user_key, "set data.columns.user_key", canon["user_id"])
    name = cfg.name or inter_path.stem
    return _finish(name, canon, items, users, text_fields, presplit=False)


def _split_lists(s: pd.Series) -> list[list[str]]:
    return [str(v).split() if isinstance(v, str) else [] for v in s]


def _read_unisrec_split(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{short_path(path)}: file not found; a UniSRec folder needs <name>.train/.valid/.test.inter")
    df = read_text_table(path, "\t", csv.QUOTE_NONE)
    df.columns = strip_types(df.columns)
    for col in ("user_id", "item_id_list", "item_id"):
        require_column(df, path, col, "expected UniSRec columns user_id, item_id_list, item_id")
    if len(df) == 0:
        raise DataError(f"{short_path(path)}: no rows (only a header); the split file is empty")
    for col in ("user_id", "item_id"):
        bad = df[col].isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0]) + 2
            raise DataError(f"{short_path(path)}: row {row}, column '{col}': empty value; fix or delete the row")
    df["user_id"] = df["user_id"].astype("str").str.strip()
    df["item_id"] = df["item_id"].astype("str").str.strip()
    return df


def _unisrec_sequences(paths: dict[str, Path]) -> tuple[list[str], list[list[str]]]:
    """Every user's whole sequence from the three UniSRec split files (train rows are one per prefix),
    checked against each other; users with fewer than ``_MIN_SEQ`` items are dropped."""
    tr = _read_unisrec_split(paths["train"])
    va = _read_unisrec_split(paths["valid"])
    te = _read_unisrec_split(paths["test"])
    for part, df in (("valid", va), ("test", te)):
        dup = df["user_id"][df["user_id"].duplicated()]
        if len(dup):
            raise DataError(f"{short_path(paths[part])}: user '{dup.iloc[0]}' has more than one row; a leave-one-out split has one row per user")

    valid_by_user = dict(zip(va["user_id"], zip(_split_lists(va["item_id_list"]), va["item_id"])))
    # training part per user: shortest-history row gives the first items; then targets in time order.
    # Rows are one per prefix; when histories are capped (equal length), later rows come first in the file.
    tr = tr.assign(_len=[len(h) for h in _split_lists(tr["item_id_list"])], _row=np.arange(len(tr)))
    tr = tr.sort_values(["user_id", "_len", "_row"], ascending=[True, True, False], kind="stable")
    train_part: dict[str, list[str]] = {}
    for u, g in tr.groupby("user_id", sort=False):
        first_hist = str(g["item_id_list"].iloc[0]).split()
        train_part[u] = first_hist + g["item_id"].tolist()

    seq_users: list[str] = []
    seq_items: list[list[str]] = []
    for row, (u, hist_s, target) in enumerate(zip(te["user_id"], te["item_id_list"], te["item_id"])):
        hist = str(hist_s).split() if isinstance(hist_s, str) else []
        if u not in valid_by_user:
            raise DataError(f"{short_path(paths['valid'])}: user '{u}' of the test split has no valid row; the split files do not match")
        v_hist, v_target = valid_by_user[u]
        if not hist or hist[-1] != v_target:
            raise DataError(
                f"{short_path(paths['valid'])}: user '{u}': valid target '{v_target}' is not the second-to-last item of the "
                f"test sequence (row {row + 2} of {paths['test'].name}); the split files do not match"
            )
        seq = hist + [target]
        tp = train_part.get(u)
        if tp is not None:
            full = tp + [v_target, target]
            if full[:-1][-len(hist):] != hist or (v_hist and full[:-2][-len(v_hist):] != v_hist):
                raise DataError(
                    f"{short_path(paths['train'])}: user '{u}': training rows do not lead up to the valid/test histories; "
                    "the split files do not match"
                )
            seq = full
        if len(seq) < _MIN_SEQ:
            continue
        seq_users.append(u)
        seq_items.append(seq)
    if not seq_users:
        raise DataError(f"{short_path(paths['test'])}: no user has >= {_MIN_SEQ} items; nothing to split")

    return seq_users, seq_items


def _interactions_of(seqs: pd.DataFrame) -> pd.DataFrame:
    """Canonical interactions of ordered sequences (timestamps are positions: a UniSRec split has no times)."""
    lens = seqs["item_ids"].map(len).to_numpy()
    return pd.DataFrame(
        {
            "user_id": pd.Series(np.repeat(seqs["user_id"].to_numpy(dtype=object), lens), dtype="str"),
            "item_id": pd.Series([i for s in seqs["item_ids"] for i in s], dtype="str"),
            "timestamp": np.concatenate([np.arange(n, dtype="int64") for n in lens]),
        }
    )


def _unisrec_items(folder: Path, name: str, text_path: Path, inter_items: set) -> pd.DataFrame:
    """Items (item_id, title, text[, orig_id]) of ``<name>.text``; ids there may be original ids (ASIN)
    mapped to the split's indices by ``<name>.item2index``. Only items that occur in a sequence."""
    text_raw = read_text_table(text_path, "\t", csv.QUOTE_NONE)
    text_raw.columns = strip_types(text_raw.columns)
    require_column(text_raw, text_path, "item_id", "expected UniSRec columns item_id, text")
    require_column(text_raw, text_path, "text", "expected UniSRec columns item_id, text")
    ids = clean_ids(text_raw["item_id"])
    if ids.isna().any():
        row = int(np.flatnonzero(ids.isna().to_numpy())[0]) + 2
        raise DataError(f"{short_path(text_path)}: row {row}, column 'item_id': empty item id; fill it in or delete the row")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise DataError(f"{short_path(text_path)}: duplicate item id '{dup.iloc[0]}' in column 'item_id'; keep one row per item")
    map_path = folder / f"{name}.item2index"
    orig = ids.astype("str")
    if not orig.isin(inter_items).any() and map_path.is_file():
        try:
            m = pd.read_csv(map_path, sep="\t", header=None, names=["orig", "index"], dtype=str,
                            keep_default_na=False, quoting=csv.QUOTE_NONE, encoding="utf-8")
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError):
            raise DataError(f"{short_path(map_path)}: cannot read the id mapping (expected 'original_id<TAB>index' rows)") from None
        mapping = dict(zip(m["orig"].str.strip(), m["index"].str.strip()))
        mapped = orig.map(mapping)
        if mapped.isna().any():
            bad = orig[mapped.isna()].iloc[0]
            raise DataError(f"{short_path(map_path)}: item '{bad}' of {text_path.name} has no index; the mapping is incomplete")
        items = pd.DataFrame({"item_id": mapped.astype("str"), "orig_id": orig})
    else:
        items = pd.DataFrame({"item_id": orig})
    text = text_raw["text"].fillna("").astype("str").str.strip()
    title = text.str.split(". ", n=1, regex=False).str[0].str.strip()
    items.insert(1, "title", title.to_numpy())
    items.insert(2, "text", text.to_numpy())
    items = items.astype("str")
    items = items[items["item_id"].isin(inter_items)]
    return sort_frame_by_id(items, "item_id")


def _load_unisrec(cfg: DataConfig) -> Dataset:
    folder = _folder(cfg)
    name = _prefix(cfg, folder, ".text")
    text_path = folder / f"{name}.text"
    paths = {p: folder / f"{name}.{p}.inter" for p in ("train", "valid", "test")}
    seq_users, seq_items = _unisrec_sequences(paths)
    seqs = pd.DataFrame({"user_id": pd.Series(seq_users, dtype="str"), "item_ids": pd.Series(seq_items, dtype=object)})
    seqs = sort_frame_by_id(seqs, "user_id")
    inter = _interactions_of(seqs)
    items = _unisrec_items(folder, name, text_path, set(inter["item_id"].unique()))
    return Dataset(
        name=name,
        interactions=inter,
        items=items,
        users=None,
        sequences=seqs,
        text_fields=["text"],
        presplit=True,
    )


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load `cfg` into the canonical `Dataset`; raises DataError with a one-line message."""
    loaders = {"recbole": _load_recbole, "unisrec": _load_unisrec, "table": _load_table}
    try:
        return loaders[cfg.format](cfg)
    except DataError:
        raise
    except MemoryError:
        raise
    except (KeyError, ValueError, TypeError, OSError, pd.errors.ParserError) as e:  # last-resort: one line, no traceback
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{short_path(cfg.resolve(cfg.path))}: cannot load {cfg.format} data ({type(e).__name__}: {first})") from None


def source_files(cfg: DataConfig) -> list[Path]:
    """The files a load of ``cfg`` may read: every file directly in the folder (recbole/unisrec), or the
    interactions/items/users files (table). Missing paths are skipped (loading reports them)."""
    root = cfg.resolve(cfg.path)
    if cfg.format in ("recbole", "unisrec"):
        return sorted(p for p in root.iterdir() if p.is_file()) if root is not None and root.is_dir() else []
    paths = [cfg.resolve(p) for p in (cfg.path, cfg.items_path, cfg.users_path)]
    return [p for p in paths if p is not None and p.is_file()]


def source_digest(cfg: DataConfig) -> str:
    """sha256 (16 hex chars) of the source files' names and bytes.

    Part of the ingest step's cache key: an appended or replaced interactions file under the same
    config is new data, so ``ingest`` must not be served from the cache.
    """
    h = hashlib.sha256()
    for p in source_files(cfg):
        h.update(f"\n#{p.name}\n".encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
