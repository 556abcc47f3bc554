"""Loaders, k-core, leave-one-out splits, persistence and one-line data errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sidrec.config import ColumnMap, DataConfig
from sidrec.data.dataset import Dataset, load_dataset
from sidrec.errors import DataError

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def write_table(tmp_path: Path, rows, items=None, name="inter.csv", items_name="items.csv", **cfg) -> DataConfig:
    """rows: (user, item, timestamp); items: (item_id, title, genre) — default: every item."""
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    ipath = tmp_path / name
    if name.endswith(".parquet"):
        inter.to_parquet(ipath, index=False)
    else:
        inter.to_csv(ipath, index=False)
    if items is None:
        ids = sorted({str(r[1]) for r in rows})
        items = [(i, f"Title {i}", "genre") for i in ids]
    pd.DataFrame(items, columns=["item_id", "title", "genre"]).to_csv(tmp_path / items_name, index=False)
    cfg.setdefault("kcore", 1)
    return DataConfig(format="table", path=str(ipath), items_path=str(tmp_path / items_name), **cfg)


def seq_of(ds: Dataset, user: str) -> list[str]:
    row = ds.sequences[ds.sequences["user_id"] == user]
    assert len(row) == 1
    return list(row["item_ids"].iloc[0])


# ----------------------------------------------------------------------------------------------
# MovieLens-100k (RecBole atomic files)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ml100k(ml100k_dir) -> Dataset:
    return load_dataset(DataConfig(format="recbole", path=str(ml100k_dir)))


def test_ml100k_canonical_schema(ml100k_dir, ml100k):
    ds = ml100k
    assert ds.name == "ml-100k" and ds.presplit is False
    assert list(ds.interactions.columns) == ["user_id", "item_id", "timestamp"]
    assert ds.interactions["timestamp"].dtype == np.int64
    assert pd.api.types.is_string_dtype(ds.interactions["user_id"]) and pd.api.types.is_string_dtype(ds.interactions["item_id"])
    assert ds.text_fields == ["title", "year", "genres"]
    assert list(ds.items.columns[:4]) == ["item_id", "title", "year", "genres"]
    toy = ds.items[ds.items["item_id"] == "1"].iloc[0]
    assert toy["title"] == "Toy Story" and toy["year"] == "1995" and "Animation" in toy["genres"]
    # raw file: 943 users, 1682 items, 100k ratings; every user has >= 20 ratings so all survive 5-core
    raw = pd.read_csv(ml100k_dir / "ml-100k.inter", sep="\t")
    assert len(raw) == 100_000
    st = ds.stats()
    assert st["n_users"] == 943
    assert st["n_items"] < 1682 and st["n_items"] == len(ds.items)  # rare items are filtered, catalog = interacted items
    assert st["n_interactions"] == len(ds.interactions) <= 100_000
    assert st["avg_seq_len"] == pytest.approx(st["n_interactions"] / 943)
    assert 0 < st["density"] < 1
    # users: profile columns, surviving users only
    assert ds.users is not None and set(ds.users.columns) >= {"user_id", "age", "gender", "occupation", "zip_code"}
    assert set(ds.users["user_id"]) == set(ds.interactions["user_id"])
    # every item in interactions has exactly one catalog row; items are unique
    assert ds.items["item_id"].is_unique
    assert set(ds.items["item_id"]) == set(ds.interactions["item_id"])


def test_ml100k_kcore_and_order(ml100k):
    inter = ml100k.interactions
    assert inter["user_id"].value_counts().min() >= 5
    assert inter["item_id"].value_counts().min() >= 5
    assert not inter.duplicated(["user_id", "item_id", "timestamp"]).any()
    # chronological within each user, users contiguous
    assert (inter.groupby("user_id", sort=False)["timestamp"].diff().dropna() >= 0).all()
    starts = inter["user_id"].ne(inter["user_id"].shift())
    assert starts.sum() == inter["user_id"].nunique()
    # sequences = interactions grouped in order
    s1 = seq_of(ml100k, "1")
    assert s1 == inter.loc[inter["user_id"] == "1", "item_id"].tolist()
    assert len(ml100k.sequences) == 943


def test_ml100k_splits(ml100k):
    H = 20
    test = ml100k.split("test", H)
    valid = ml100k.split("valid", H)
    train = ml100k.split("train", H)
    assert list(test.columns) == ["user_id", "history", "target"]
    assert len(test) == len(valid) == 943
    seqs = dict(zip(ml100k.sequences["user_id"], ml100k.sequences["item_ids"]))
    for _, r in test.head(50).iterrows():
        s = seqs[r["user_id"]]
        assert r["target"] == s[-1] and r["history"] == s[:-1][-H:]
    for _, r in valid.head(50).iterrows():
        s = seqs[r["user_id"]]
        assert r["target"] == s[-2] and r["history"] == s[:-2][-H:]
    # one training example per position 1..len(train)-1
    assert len(train) == sum(len(s) - 3 for s in seqs.values())
    assert train["history"].map(len).max() == H
    ts = ml100k.train_sequences()
    assert ts["1"] == seqs["1"][:-2]


def test_max_users_before_kcore(ml100k_dir):
    ds = load_dataset(DataConfig(format="recbole", path=str(ml100k_dir), max_users=50))
    # natural order of integer ids: users 1..50
    assert set(ds.interactions["user_id"]) <= {str(i) for i in range(1, 51)}
    assert ds.interactions["item_id"].value_counts().min() >= 5


# ----------------------------------------------------------------------------------------------
# hand-made tables: k-core, split, ordering, timestamps
# ----------------------------------------------------------------------------------------------
def test_kcore_is_iterative(tmp_path):
    rows = []
    for u in ("u1", "u2", "u3"):
        rows += [(u, "a", 1), (u, "b", 2), (u, "c", 3)]
    # d has 2 interactions (< 3): dropping it leaves u4 and u5 with 2 each -> they go in a second round
    rows += [("u4", "a", 1), ("u4", "b", 2), ("u4", "d", 3)]
    rows += [("u5", "d", 1), ("u5", "a", 2), ("u5", "b", 3)]
    cfg = write_table(tmp_path, rows, kcore=3)
    ds = load_dataset(cfg)
    assert set(ds.interactions["user_id"]) == {"u1", "u2", "u3"}
    assert set(ds.interactions["item_id"]) == {"a", "b", "c"}
    assert ds.interactions["user_id"].value_counts().min() >= 3
    assert ds.interactions["item_id"].value_counts().min() >= 3
    assert set(ds.items["item_id"]) == {"a", "b", "c"}  # d is no longer in the catalog
    # a single pass would have kept u4 and u5 (3 interactions each before d was dropped)


def test_split_on_five_item_sequence(tmp_path):
    rows = [("u", f"i{k}", 100 + k) for k in (3, 1, 5, 2, 4)]  # file order != time order
    rows += [("v", "i1", 1), ("v", "i2", 2), ("v", "i3", 3)]
    ds = load_dataset(write_table(tmp_path, rows))
    assert seq_of(ds, "u") == ["i1", "i2", "i3", "i4", "i5"]
    train = ds.split("train", 20)
    tu = train[train["user_id"] == "u"]
    assert tu["history"].tolist() == [["i1"], ["i1", "i2"]]
    assert tu["target"].tolist() == ["i2", "i3"]
    t1 = ds.split("train", 1)
    assert t1[t1["user_id"] == "u"]["history"].tolist() == [["i1"], ["i2"]]
    v = ds.split("valid", 20).set_index("user_id")
    assert v.loc["u", "history"] == ["i1", "i2", "i3"] and v.loc["u", "target"] == "i4"
    t = ds.split("test", 2).set_index("user_id")
    assert t.loc["u", "history"] == ["i3", "i4"] and t.loc["u", "target"] == "i5"
    # the 3-item user has no training example but valid/test ones
    assert (train["user_id"] == "v").sum() == 0  # train part [i1] has no prefix target
    assert v.loc["v", "target"] == "i2" and t.loc["v", "target"] == "i3"
    assert ds.train_sequences() == {"u": ["i1", "i2", "i3"], "v": ["i1"]}
    with pytest.raises(ValueError):
        ds.split("holdout", 5)


def test_ties_dedupe_short_users_and_datetimes(tmp_path):
    rows = [
        ("u", "b", "2021-01-01 10:00:00"),
        ("u", "a", "2021-01-01 10:00:00"),  # tie: file order kept (b before a)
        ("u", "a", "2021-01-01 10:00:00"),  # exact duplicate -> dropped
        ("u", "c", "2021-01-02T00:00:00"),
        ("u", "d", "2020-12-31"),
        ("w", "a", "2021-01-01"),  # 2 interactions: cannot be split -> dropped even with kcore=1
        ("w", "b", "2021-01-02"),
    ]
    ds = load_dataset(write_table(tmp_path, rows))
    assert seq_of(ds, "u") == ["d", "b", "a", "c"]
    assert set(ds.interactions["user_id"]) == {"u"}
    ts = ds.interactions["timestamp"].tolist()
    assert ts[0] == int(pd.Timestamp("2020-12-31", tz="UTC").timestamp())
    assert ts[1] == ts[2] == int(pd.Timestamp("2021-01-01 10:00", tz="UTC").timestamp())


def test_parquet_numeric_ids_and_item_text(tmp_path):
    rows = [(7, 12, 3.0), (7, 13, 1.0), (7, 14, 2.0), (8, 12, 1.0), (8, 13, 2.0), (8, 14, 3.0)]
    items = [("12", "Twelve", "x"), ("13", None, "y"), ("14", "Fourteen", None), ("99", "never", "z")]
    cfg = write_table(tmp_path, rows, items=items, name="inter.parquet")
    ds = load_dataset(cfg)
    assert seq_of(ds, "7") == ["13", "14", "12"]
    assert ds.interactions["timestamp"].dtype == np.int64
    assert ds.items["item_id"].tolist() == ["12", "13", "14"]  # never-interacted 99 dropped
    assert ds.items["title"].tolist() == ["Twelve", "", "Fourteen"]
    assert ds.items["genre"].tolist() == ["x", "y", ""]
    assert ds.text_fields == ["title", "genre"]
    assert ds.users is None


def test_custom_columns(tmp_path):
    pd.DataFrame({"uid": ["a"] * 3 + ["b"] * 3, "iid": ["x", "y", "z"] * 2, "ts": [1, 2, 3, 1, 2, 3]}).to_csv(
        tmp_path / "i.csv", index=False
    )
    pd.DataFrame({"sku": ["x", "y", "z"], "name": ["X", "Y", "Z"], "desc": ["dx", "dy", "dz"]}).to_csv(
        tmp_path / "it.csv", index=False
    )
    pd.DataFrame({"uid": ["a", "b", "c"], "age": [1, 2, 3]}).to_csv(tmp_path / "u.csv", index=False)
    cfg = DataConfig(
        format="table",
        path=str(tmp_path / "i.csv"),
        items_path=str(tmp_path / "it.csv"),
        users_path=str(tmp_path / "u.csv"),
        kcore=1,
        columns=ColumnMap(user="uid", item="iid", timestamp="ts", item_key="sku", user_key="uid", title="name", text=["desc", "name"]),
    )
    ds = load_dataset(cfg)
    assert ds.text_fields == ["desc", "title"]
    assert ds.items["title"].tolist() == ["X", "Y", "Z"]
    assert ds.users["user_id"].tolist() == ["a", "b"] and ds.users["age"].tolist() == ["1", "2"]


# ----------------------------------------------------------------------------------------------
# Amazon Scientific (UniSRec, pre-split)
# ----------------------------------------------------------------------------------------------
def _read_split(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, sep="\t", dtype=str)
    df.columns = ["user_id", "history", "target"]
    df["history"] = df["history"].str.split()
    return df


def test_unisrec_reconstruction(scientific_dir):
    ds = load_dataset(DataConfig(format="unisrec", path=str(scientific_dir)))
    assert ds.presplit is True and ds.name == "Scientific"
    st = ds.stats()
    assert st["n_users"] == 8442
    assert st["n_items"] == 4385 == len(ds.items)
    # published count; 43 items of 3 long users are only recoverable from the training rows (histories cap at 50)
    assert st["n_interactions"] == 59427
    assert ds.text_fields == ["text"]
    assert ds.items["title"].str.len().gt(0).all()
    row = ds.items.iloc[0]
    assert row["text"].startswith(row["title"])
    # positions as timestamps
    first = ds.interactions[ds.interactions["user_id"] == "0"]["timestamp"].tolist()
    assert first == list(range(len(first)))

    H = 50
    for part in ("valid", "test"):
        ours = ds.split(part, H).set_index("user_id")
        theirs = _read_split(scientific_dir / f"Scientific.{part}.inter").set_index("user_id")
        assert len(ours) == len(theirs) == 8442
        theirs = theirs.loc[ours.index]
        assert (ours["target"] == theirs["target"]).all()
        assert all(a == b for a, b in zip(ours["history"], theirs["history"]))
    ours = ds.split("train", H)
    theirs = _read_split(scientific_dir / "Scientific.train.inter")
    assert len(ours) == len(theirs) == 34101
    key = lambda df: sorted(zip(df["user_id"], df["target"], df["history"].map(" ".join)))  # noqa: E731
    assert key(ours) == key(theirs)


def test_unisrec_mismatched_splits(tmp_path, scientific_dir):
    for f in scientific_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    valid = (tmp_path / "Scientific.valid.inter").read_text().splitlines()
    u, hist, target = valid[1].split("\t")
    valid[1] = "\t".join([u, hist, "999999"])
    (tmp_path / "Scientific.valid.inter").write_text("\n".join(valid) + "\n")
    with pytest.raises(DataError, match=r"Scientific\.valid\.inter: user '0': valid target '999999'"):
        load_dataset(DataConfig(format="unisrec", path=str(tmp_path)))


# ----------------------------------------------------------------------------------------------
# persistence and identity
# ----------------------------------------------------------------------------------------------
def test_save_load_roundtrip(tmp_path, ml100k):
    out = tmp_path / "saved" / "ds"
    ml100k.save(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "interactions.parquet", "items.parquet", "meta.json", "sequences.parquet", "users.parquet"
    ]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["name"] == "ml-100k" and meta["text_fields"] == ["title", "year", "genres"] and meta["presplit"] is False
    back = Dataset.load(out)
    pd.testing.assert_frame_equal(back.interactions, ml100k.interactions)
    pd.testing.assert_frame_equal(back.items, ml100k.items)
    pd.testing.assert_frame_equal(back.users, ml100k.users)
    pd.testing.assert_frame_equal(back.sequences, ml100k.sequences)
    assert back.sequences["item_ids"].map(type).eq(list).all()
    assert (back.name, back.text_fields, back.presplit) == (ml100k.name, ml100k.text_fields, ml100k.presplit)
    assert back.fingerprint() == ml100k.fingerprint()
    assert back.item_index() == ml100k.item_index()
    # saving again over an existing folder replaces it, leaving no temp folders
    ml100k.save(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds"]


def test_save_failure_leaves_nothing(tmp_path, ml100k):
    bad = Dataset(
        name="bad",
        interactions=ml100k.interactions,
        items=ml100k.items.assign(broken=[object()] * len(ml100k.items)),  # not serializable
        users=None,
        sequences=ml100k.sequences,
        text_fields=ml100k.text_fields,
        presplit=False,
    )
    with pytest.raises(Exception):
        bad.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_item_index(ml100k):
    idx = ml100k.item_index()
    assert len(idx) == len(ml100k.items)
    assert all(ml100k.items["item_id"].iloc[i] == iid for iid, i in list(idx.items())[:100])
    assert sorted(idx.values()) == list(range(len(idx)))


def test_fingerprint_stable_across_processes(ml100k, ml100k_dir, tmp_path):
    fp = ml100k.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    code = (
        "from sidrec.config import DataConfig; from sidrec.data.dataset import load_dataset; "
        f"print(load_dataset(DataConfig(format='recbole', path={str(ml100k_dir)!r})).fingerprint())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == fp
    # content changes change the fingerprint
    changed = Dataset(
        name=ml100k.name,
        interactions=ml100k.interactions.assign(timestamp=ml100k.interactions["timestamp"] + 1),
        items=ml100k.items,
        users=ml100k.users,
        sequences=ml100k.sequences,
        text_fields=ml100k.text_fields,
        presplit=False,
    )
    assert changed.fingerprint() != fp


def test_fingerprint_is_computed_once_and_follows_replaced_frames(ml100k, monkeypatch):
    import dataclasses

    ds = dataclasses.replace(ml100k)  # a copy whose frames we may replace
    calls = []
    real = Dataset._content_digest
    monkeypatch.setattr(Dataset, "_content_digest", lambda self: calls.append(1) or real(self))
    fp = ds.fingerprint()
    assert ds.fingerprint() == fp and len(calls) == 1  # asked twice, hashed once
    ds.items = ds.items.assign(title=ds.items["title"] + "!")  # a replaced frame is hashed again
    assert ds.fingerprint() != fp and len(calls) == 2
    ds.items = ml100k.items
    assert ds.fingerprint() == fp and len(calls) == 3


# ----------------------------------------------------------------------------------------------
# one-line errors naming the file and column
# ----------------------------------------------------------------------------------------------
def _err(cfg: DataConfig) -> str:
    with pytest.raises(DataError) as ei:
        load_dataset(cfg)
    msg = str(ei.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


ROWS = [(u, i, t) for u in ("u1", "u2", "u3") for t, i in enumerate(("a", "b", "c"))]


def test_error_missing_folder_and_files(tmp_path):
    msg = _err(DataConfig(format="recbole", path=str(tmp_path / "nope")))
    assert "nope" in msg and "folder not found" in msg and "data.path" in msg
    (tmp_path / "d").mkdir()
    msg = _err(DataConfig(format="recbole", path=str(tmp_path / "d")))
    assert "d.inter" in msg and "not found" in msg
    msg = _err(DataConfig(format="table", path=str(tmp_path / "x.csv"), items_path=str(tmp_path / "i.csv")))
    assert "x.csv" in msg and "not found" in msg
    msg = _err(DataConfig(format="table", path=str(tmp_path / "x.csv")))
    assert "data.items_path" in msg


def test_error_missing_column(tmp_path):
    pd.DataFrame({"uid": ["1"], "iid": ["2"], "ts": [3]}).to_csv(tmp_path / "x.csv", index=False)
    pd.DataFrame({"item_id": ["2"], "title": ["t"]}).to_csv(tmp_path / "i.csv", index=False)
    msg = _err(DataConfig(format="table", path=str(tmp_path / "x.csv"), items_path=str(tmp_path / "i.csv")))
    assert msg == f"{tmp_path / 'x.csv'}: missing column 'user_id' (found: uid, iid, ts); set data.columns.user"


def test_error_empty_and_header_only(tmp_path):
    cfg = write_table(tmp_path, ROWS)
    (tmp_path / "inter.csv").write_text("")
    msg = _err(cfg)
    assert "inter.csv" in msg and "empty" in msg
    (tmp_path / "inter.csv").write_text("user_id,item_id,timestamp\n")
    msg = _err(cfg)
    assert "inter.csv" in msg and "no interaction rows" in msg


def test_error_not_utf8(tmp_path):
    cfg = write_table(tmp_path, ROWS)
    (tmp_path / "items.csv").write_bytes("item_id,title,genre\na,Caf\xe9,x\n".encode("latin-1"))
    msg = _err(cfg)
    assert "items.csv" in msg and "UTF-8" in msg and "0xe9" in msg


def test_error_bad_timestamp(tmp_path):
    rows = list(ROWS)
    rows[4] = ("u2", "b", "yesterday-ish")
    msg = _err(write_table(tmp_path, rows))
    assert "inter.csv" in msg and "row 6" in msg and "column 'timestamp'" in msg and "'yesterday-ish'" in msg


def test_error_kcore_leaves_nothing(tmp_path):
    msg = _err(write_table(tmp_path, ROWS, kcore=5))
    assert "inter.csv" in msg and "0 users left after 5-core filtering" in msg and "lower data.kcore" in msg


def test_error_items_table(tmp_path):
    cfg = write_table(tmp_path, ROWS, items=[("a", "A", "g"), ("b", "B", "g"), ("b", "B2", "g"), ("c", "C", "g")])
    msg = _err(cfg)
    assert "items.csv" in msg and "duplicate item id 'b'" in msg and "'item_id'" in msg
    pd.DataFrame({"sku": ["a"], "title": ["A"]}).to_csv(tmp_path / "items.csv", index=False)
    msg = _err(cfg)
    assert "items.csv" in msg and "no id column 'item_id'" in msg and "found: sku, title" in msg and "data.columns.item_key" in msg
    (tmp_path / "items.xlsx").write_text("x")
    msg = _err(cfg.model_copy(update={"items_path": str(tmp_path / "items.xlsx")}))
    assert "items.xlsx" in msg and "unsupported" in msg


def test_error_recbole_missing_item_column(tmp_path):
    d = tmp_path / "toy"
    d.mkdir()
    (d / "toy.inter").write_text("user:token\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    (d / "toy.item").write_text("item_id:token\ttitle:token_seq\n2\tTwo\n")
    msg = _err(DataConfig(format="recbole", path=str(d)))
    assert "toy.inter" in msg and "missing column 'user_id' (found: user, item_id, timestamp)" in msg


def test_source_digest_changes_when_rows_are_appended(tmp_path, ml100k_dir):
    """The ingest step's cache key includes this digest: appended data must not be served from cache."""
    import shutil

    from sidrec.config import DataConfig
    from sidrec.data.dataset import source_digest, source_files

    d = tmp_path / "ml-100k"
    shutil.copytree(ml100k_dir, d)
    cfg = DataConfig(path=str(d))
    assert {p.name for p in source_files(cfg)} >= {"ml-100k.inter", "ml-100k.item"}
    before = source_digest(cfg)
    assert source_digest(cfg) == before  # stable
    with open(d / "ml-100k.inter", "a") as f:
        f.write("1\t1\t5\t893286638\n")
    assert source_digest(cfg) != before
    table = DataConfig(format="table", path=str(d / "ml-100k.inter"), items_path=str(d / "ml-100k.item"))
    assert [p.name for p in source_files(table)] == ["ml-100k.inter", "ml-100k.item"]
    assert source_digest(DataConfig(path=str(tmp_path / "missing"))) == source_digest(DataConfig(path=str(tmp_path / "gone")))
