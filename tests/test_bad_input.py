"""The bad-input corpus: every case goes through the CLI in-process (`main([...])`) and must

- return exit code 2 with exactly one `error: ...` line naming the file or field and what to do,
- show no traceback (unless --debug, checked once at the end),
- leave nothing behind: no metrics file, no MLflow run, and -- for problems the pre-flight catches --
  no ZenML pipeline run either.

Two data problems are by design caught by the data-validation gate inside the pipeline (items missing
from the items table, too little item text): they start a ZenML run that stops at `quality_gate`,
before any training, and still leave no MLflow run.

Accepted-with-a-defined-behaviour inputs (duplicates, huge ids, equal timestamps, tiny catalogs...)
are tested below the corpus.
"""
from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import yaml

from sidrec.config import DataConfig
from sidrec.data.dataset import load_dataset

N_USERS, N_ITEMS, T0 = 8, 6, 1_600_000_000


# ----------------------------------------------------------------------------------------------
# a small valid `table` dataset, mutated per case
# ----------------------------------------------------------------------------------------------
def _inter_rows() -> list[tuple[str, str, int]]:
    return [(f"u{u}", f"i{(u + k) % N_ITEMS}", T0 + u * 100 + k) for u in range(N_USERS) for k in range(N_ITEMS)]


def _write_csv(path: Path, header: str, rows, sep: str = ",") -> None:
    path.write_text(header.replace(",", sep) + "\n" + "".join(sep.join(map(str, r)) + "\n" for r in rows), encoding="utf-8")


class Case:
    """Files + config in `tmp`; mutate them with `edit(case)`."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.inter = tmp / "inter.csv"
        self.items = tmp / "items.csv"
        _write_csv(self.inter, "user_id,item_id,timestamp", _inter_rows())
        _write_csv(self.items, "item_id,title,genre", [(f"i{i}", f"Item {i}", "drama") for i in range(N_ITEMS)])
        self.cfg: dict = {
            "name": "bad-input",
            "data": {"format": "table", "path": str(self.inter), "items_path": str(self.items), "kcore": 3},
            "index": {"codebook_size": 4, "levels": 2, "kmeans_iters": 5},
            "model": {"backbone": "tiny", "dtype": "float32"},
            "train": {"steps": 2, "batch_size": 2, "warmup_steps": 0},
            "eval": {"beams": 5, "ks": [1, 5]},
            "baselines": {"sasrec": {"enabled": False}},
            "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "bad-input"},
        }
        self.config_path = tmp / "config.yaml"
        self.argv_extra: list[str] = []

    def write_config(self) -> None:
        if self.config_path.name == "config.yaml" and not self.config_path.exists():
            self.config_path.write_text(yaml.safe_dump(self.cfg))

    def rows(self, edit: Callable[[list], list]) -> None:
        _write_csv(self.inter, "user_id,item_id,timestamp", edit(_inter_rows()))

    def set(self, section: str, **kv) -> None:
        self.cfg.setdefault(section, {}).update(kv)


def _set_row(i: int, row: tuple) -> Callable[[list], list]:
    def f(rows):
        rows[i] = row
        return rows

    return f


def _bert_folder(c: Case) -> None:
    d = c.tmp / "bert"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 32}')
    (d / "model.safetensors").write_bytes(b"")
    (d / "tokenizer.json").write_text("{}")
    c.set("model", backbone=str(d))


def _pickle_weights_folder(c: Case) -> None:
    d = c.tmp / "llama-bin"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (d / "tokenizer.json").write_text("{}")
    c.set("model", backbone=str(d))


def _parquet_float_ids(c: Case) -> None:
    p = c.tmp / "inter.parquet"
    df = pd.DataFrame(_inter_rows(), columns=["user_id", "item_id", "timestamp"])
    df["item_id"] = df["item_id"].str[1:].astype(float) + 0.5
    df.to_parquet(p)
    c.set("data", path=str(p))


def _non_utf8_items(c: Case) -> None:
    c.items.write_bytes(b"item_id,title,genre\n" + b"".join(f"i{i},Caf".encode() + b"\xe9,drama\n" for i in range(N_ITEMS)))


def _all_one_interaction(c: Case) -> None:
    _write_csv(c.inter, "user_id,item_id,timestamp", [(f"u{u}", f"i{u % N_ITEMS}", T0 + u) for u in range(20)])


def _corrupt_parquet(c: Case) -> None:
    p = c.tmp / "inter.parquet"
    p.write_bytes(b"PAR1 this is not parquet")
    c.set("data", path=str(p))


def _no_items_id_column(c: Case) -> None:
    _write_csv(c.items, "sku,title", [(f"i{i}", f"Item {i}") for i in range(N_ITEMS)])


def _missing_item_rows(c: Case) -> None:  # i5 interacted but absent from the items table
    _write_csv(c.items, "item_id,title,genre", [(f"i{i}", f"Item {i}", "drama") for i in range(N_ITEMS - 1)])


def _all_text_empty(c: Case) -> None:
    _write_csv(c.items, "item_id,title,genre", [(f"i{i}", "", "") for i in range(N_ITEMS)])


# (id, edit, fragments that must all appear in the error line, stage: "preflight" or "gate")
CASES = [
    # --- files: empty, columns, delimiter, encoding, header --------------------------------------
    ("empty-file", lambda c: c.inter.write_text(""), ["inter.csv", "file is empty"], "preflight"),
    ("header-only", lambda c: c.inter.write_text("user_id,item_id,timestamp\n"), ["inter.csv", "no interaction rows"], "preflight"),
    ("empty-items-file", lambda c: c.items.write_text(""), ["items.csv", "file is empty"], "preflight"),
    ("missing-user-column", lambda c: _write_csv(c.inter, "customer,item_id,timestamp", _inter_rows()),
     ["inter.csv", "missing column 'user_id'", "data.columns.user"], "preflight"),
    ("misnamed-timestamp", lambda c: _write_csv(c.inter, "user_id,item_id,time", _inter_rows()),
     ["inter.csv", "missing column 'timestamp'", "data.columns.timestamp"], "preflight"),
    ("wrong-delimiter", lambda c: _write_csv(c.inter, "user_id,item_id,timestamp", _inter_rows(), sep=";"),
     ["inter.csv", "missing column 'user_id'", "semicolon-separated"], "preflight"),
    ("non-utf8-interactions", lambda c: c.inter.write_bytes(b"user_id,item_id,timestamp\nu\xff1,i1,1\n"),
     ["inter.csv", "not UTF-8", "0xff"], "preflight"),
    ("non-utf8-items", _non_utf8_items, ["items.csv", "not UTF-8", "re-save"], "preflight"),
    ("duplicate-header", lambda c: _write_csv(c.inter, "user_id,item_id,item_id", _inter_rows()),
     ["inter.csv", "duplicate column name", "'item_id'"], "preflight"),
    ("items-no-id-column", _no_items_id_column, ["items.csv", "no id column 'item_id'", "data.columns.item_key"], "preflight"),
    ("unsupported-suffix", lambda c: c.set("data", path=str(c.tmp / "inter.xlsx")) or (c.tmp / "inter.xlsx").write_text("x"),
     ["inter.xlsx", "unsupported file type"], "preflight"),
    ("corrupt-parquet", _corrupt_parquet, ["inter.parquet", "not a readable Parquet file"], "preflight"),
    ("data-path-missing", lambda c: c.set("data", path=str(c.tmp / "nope.csv")), ["nope.csv", "data.path does not exist"], "preflight"),
    ("items-path-unset", lambda c: c.cfg["data"].pop("items_path"), ["inter.csv", "data.items_path is required"], "preflight"),
    ("items-file-missing", lambda c: c.set("data", items_path=str(c.tmp / "gone.csv")), ["gone.csv", "items file not found"], "preflight"),
    # --- ids ----------------------------------------------------------------------------------------
    ("empty-user-id", lambda c: c.rows(_set_row(3, ("", "i1", T0))), ["inter.csv", "row 5", "column 'user_id'", "missing id"], "preflight"),
    ("nan-item-id", lambda c: c.rows(_set_row(0, ("u0", "NaN", T0))), ["inter.csv", "row 2", "column 'item_id'", "'NaN'"], "preflight"),
    ("float-ids-parquet", _parquet_float_ids, ["inter.parquet", "column 'item_id'", "non-integer numeric id"], "preflight"),
    ("empty-item-id-in-items", lambda c: _write_csv(c.items, "item_id,title", [("i0", "A"), ("", "B")]),
     ["items.csv", "row 3", "empty item id"], "preflight"),
    ("duplicate-item-rows", lambda c: _write_csv(c.items, "item_id,title", [(f"i{i}", "A") for i in range(N_ITEMS)] + [("i2", "B")]),
     ["items.csv", "duplicate item id 'i2'"], "preflight"),
    # --- timestamps ---------------------------------------------------------------------------------
    ("timestamp-unparsable", lambda c: c.rows(_set_row(4, ("u0", "i4", "yesterday"))),
     ["inter.csv", "row 6", "column 'timestamp'", "cannot parse timestamp 'yesterday'"], "preflight"),
    ("timestamp-negative", lambda c: c.rows(_set_row(2, ("u0", "i2", -1))), ["inter.csv", "row 4", "negative timestamp '-1'"], "preflight"),
    ("timestamp-future", lambda c: c.rows(_set_row(7, ("u1", "i2", 4_102_444_800))),
     ["inter.csv", "row 9", "timestamp in the future"], "preflight"),
    ("timestamp-future-date", lambda c: c.rows(lambda r: [(u, i, "2020-01-01") for u, i, _ in r[:-1]] + [(r[-1][0], r[-1][1], "2999-12-31")]),
     ["inter.csv", f"row {N_USERS * N_ITEMS + 1}", "in the future", "'2999-12-31'"], "preflight"),
    # --- users / items that cannot be used ----------------------------------------------------------
    ("every-user-one-interaction", _all_one_interaction, ["inter.csv", "0 users left", "lower data.kcore"], "preflight"),
    ("items-missing-from-items-table", _missing_item_rows, ["data validation failed", "item_id", "'i5'"], "gate"),
    ("all-item-text-empty", _all_text_empty, ["data validation failed", "text"], "gate"),
    # --- config ------------------------------------------------------------------------------------
    ("config-missing", lambda c: setattr(c, "config_path", c.tmp / "nope.yaml"), ["nope.yaml", "config file not found"], "preflight"),
    ("config-not-yaml", lambda c: c.config_path.write_text("data: [unclosed\n"), ["config.yaml", "not valid YAML"], "preflight"),
    ("config-repeated-key", lambda c: c.config_path.write_text(yaml.safe_dump(c.cfg) + "train: {steps: 3}\n"),
     ["config.yaml", "key 'train' appears twice", "lines"], "preflight"),
    ("config-base-missing", lambda c: c.config_path.write_text(yaml.safe_dump({**c.cfg, "base": "nope.yaml"})),
     ["config.yaml", "field 'base'", "nope.yaml", "not found"], "preflight"),
    ("config-base-circular", lambda c: c.config_path.write_text(yaml.safe_dump({**c.cfg, "base": "config.yaml"})),
     ["config.yaml", "field 'base'", "circular"], "preflight"),
    ("config-unknown-key", lambda c: c.set("train", stepz=3), ["config.yaml", "train.stepz", "unknown key"], "preflight"),
    ("config-wrong-type", lambda c: c.set("train", steps="many"), ["config.yaml", "train.steps", "integer"], "preflight"),
    ("config-levels-zero", lambda c: c.set("index", levels=0), ["config.yaml", "index.levels", "greater than or equal to 1"], "preflight"),
    ("config-codebook-one", lambda c: c.set("index", codebook_size=1), ["config.yaml", "index.codebook_size", ">= 2"], "preflight"),
    ("config-k-above-beams", lambda c: c.set("eval", beams=5, ks=[1, 10]), ["config.yaml", "eval", "larger than beams"], "preflight"),
    ("config-codebook-above-catalog", lambda c: c.set("index", codebook_size=16),
     ["index.codebook_size", "16 codes per level for 6 items", "'auto'"], "preflight"),
    ("config-kcore-zero", lambda c: c.set("data", kcore=0), ["config.yaml", "data.kcore"], "preflight"),
    # --- backbone -----------------------------------------------------------------------------------
    ("backbone-missing", lambda c: c.set("model", backbone=str(c.tmp / "no-model")), ["model.backbone", "no-model", "config.json"], "preflight"),
    ("backbone-not-causal", _bert_folder, ["model.backbone", "BertForMaskedLM", "not a causal LM"], "preflight"),
    ("backbone-pickle-weights", _pickle_weights_folder, ["model.backbone", "no *.safetensors weights"], "preflight"),
    # --- serving (`run.py recommend`; unknown ids against a registered model: tests/test_serving.py) ----
    ("recommend-empty-history", lambda c: setattr(c, "argv_extra", ["recommend", "--config", str(c.config_path), "--history", " , ,"]),
     ["--history", "at least one item id"], "preflight"),
    ("recommend-k-zero", lambda c: setattr(c, "argv_extra", ["recommend", "--config", str(c.config_path), "--history", "i1", "--k", "0"]),
     ["--k", "must be >= 1"], "preflight"),
]


def _ids(case):
    return case[0]


@pytest.fixture(scope="module")
def zenml_runs():
    """Number of pipeline runs in the session's (temporary) ZenML store."""
    from pipelines.cli import setup_environment

    setup_environment()
    from zenml.client import Client

    return lambda: Client().list_pipeline_runs(size=1).total


def _files(*roots: Path) -> set[Path]:
    return {p for r in roots if r.exists() for p in r.rglob("*") if p.is_file()}


def _mlflow_runs(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        try:
            return con.execute("select count(*) from runs").fetchone()[0]
        except sqlite3.OperationalError:  # no runs table: nothing was logged
            return 0


@pytest.mark.parametrize("case_id, edit, fragments, stage", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input_fails_cleanly(case_id, edit, fragments, stage, tmp_path, capsys, zenml_runs):
    import os

    from pipelines.cli import main

    c = Case(tmp_path)
    edit(c)
    c.write_config()
    home = Path(os.environ["SIDREC_HOME"])
    before_files = _files(tmp_path, home)
    before_runs = zenml_runs()
    metrics = tmp_path / "out" / "metrics.json"
    argv = c.argv_extra or ["train", "--config", str(c.config_path), "--metrics-out", str(metrics)]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out + err)[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    for frag in fragments:
        assert frag in line, f"{frag!r} not in {line!r}"
    assert not metrics.exists()
    assert _mlflow_runs(tmp_path / "mlflow.db") == 0
    if stage == "preflight":
        assert "Traceback" not in err
        assert zenml_runs() == before_runs, "a pre-flight failure must not start a ZenML run"
        assert _files(tmp_path, home) == before_files, sorted(map(str, _files(tmp_path, home) - before_files))
    else:  # stopped by the quality gate: one failed run, nothing trained
        from zenml.client import Client

        assert zenml_runs() == before_runs + 1
        run = Client().list_pipeline_runs(sort_by="desc:created", size=1).items[0]
        steps = {s.name: str(s.status).lower() for s in run.steps.values()}
        assert "failed" in steps.get("quality_gate", "") and "finetune" not in steps, steps


def test_debug_shows_the_traceback(tmp_path):
    from pipelines.cli import main
    from sidrec.errors import ConfigError

    c = Case(tmp_path)
    c.set("index", levels=0)
    c.write_config()
    with pytest.raises(ConfigError):
        main(["--debug", "train", "--config", str(c.config_path)])


# ----------------------------------------------------------------------------------------------
# accepted inputs with a defined behaviour
# ----------------------------------------------------------------------------------------------
def _cfg(c: Case) -> DataConfig:
    return DataConfig.model_validate(c.cfg["data"])


def test_duplicate_interactions_are_deduped(tmp_path):
    c = Case(tmp_path)
    c.rows(lambda r: r + r[:10])  # 10 exact duplicate rows
    ds = load_dataset(_cfg(c))
    assert len(ds.interactions) == N_USERS * N_ITEMS
    assert not ds.interactions.duplicated().any()


def test_same_item_at_different_times_is_kept(tmp_path):
    c = Case(tmp_path)
    c.rows(lambda r: r + [("u0", "i0", T0 + 50)])  # a re-watch: a new event, not a duplicate
    ds = load_dataset(_cfg(c))
    assert len(ds.interactions) == N_USERS * N_ITEMS + 1


def test_huge_and_float_exported_ids(tmp_path):
    c = Case(tmp_path)
    huge = "9" * 40
    c.rows(lambda r: [(huge if u == "u0" else u, i, t) for u, i, t in r])
    ds = load_dataset(_cfg(c))
    assert huge in set(ds.interactions["user_id"])
    # ids exported from a float column ('3.0') match the integer ids of the other table
    _write_csv(c.inter, "user_id,item_id,timestamp", [(u, f"{i[1:]}.0", t) for u, i, t in _inter_rows()])
    _write_csv(c.items, "item_id,title", [(str(i), f"Item {i}") for i in range(N_ITEMS)])
    ds = load_dataset(_cfg(c))
    assert sorted(ds.items["item_id"]) == [str(i) for i in range(N_ITEMS)]
    assert set(ds.interactions["item_id"]) == set(ds.items["item_id"])


def test_all_equal_timestamps_warn_and_keep_file_order(tmp_path, caplog):
    c = Case(tmp_path)
    c.rows(lambda r: [(u, i, T0) for u, i, _ in r])
    with caplog.at_level(logging.WARNING, logger="sidrec.data.dataset"):
        ds = load_dataset(_cfg(c))
    assert any("are equal" in r.getMessage() for r in caplog.records)
    assert ds.sequences.set_index("user_id").loc["u1", "item_ids"] == [f"i{(1 + k) % N_ITEMS}" for k in range(N_ITEMS)]


def test_pre_1970_dates_and_millisecond_timestamps_are_accepted(tmp_path):
    c = Case(tmp_path)
    c.rows(lambda r: [(u, i, f"1965-01-{k % 28 + 1:02d}") for k, (u, i, _) in enumerate(r)])
    assert load_dataset(_cfg(c)).interactions["timestamp"].min() < 0
    c.rows(lambda r: [(u, i, t * 1000) for u, i, t in r])  # milliseconds: not "in the future"
    assert load_dataset(_cfg(c)).interactions["timestamp"].max() == _inter_rows()[-1][2] * 1000


def test_user_with_one_interaction_is_dropped(tmp_path):
    c = Case(tmp_path)
    c.rows(lambda r: r + [("lonely", "i0", T0)])
    c.cfg["data"]["kcore"] = 1
    ds = load_dataset(_cfg(c))
    assert "lonely" not in set(ds.interactions["user_id"]) and ds.stats()["n_users"] == N_USERS


def test_items_never_interacted_are_left_out_of_the_catalog(tmp_path):
    c = Case(tmp_path)
    _write_csv(c.items, "item_id,title", [(f"i{i}", f"Item {i}") for i in range(N_ITEMS + 3)])
    ds = load_dataset(_cfg(c))
    assert len(ds.items) == N_ITEMS and "i7" not in set(ds.items["item_id"])


def test_catalog_smaller_than_one_codebook_gets_unique_sids(tmp_path):
    """N=256 codes per level for 6 items: k-means fits only as many centroids as distinct points."""
    from sidrec.artifacts import EntityFeatures
    from sidrec.config import parse_config
    from sidrec.stages import build_index

    c = Case(tmp_path)
    ds = load_dataset(_cfg(c))
    rng = np.random.default_rng(0)
    feats = EntityFeatures(item_ids=ds.items["item_id"].tolist(), item_texts=[""] * len(ds.items),
                           item_embeddings=rng.normal(size=(len(ds.items), 8)).astype("float32"))
    cfg = parse_config({"index": {"codebook_size": 256, "levels": 3, "kmeans_iters": 5}})
    bundle = build_index(feats, cfg)
    sids = bundle.items.sids()
    assert len(set(sids)) == len(sids) == N_ITEMS
    assert bundle.report["index/collisions"] == 0


def test_recommend_with_unknown_history_ids_names_them():
    """The check behind `run.py recommend` (sidrec.ops.serving.Recommender.recommend) runs before any
    decoding: unknown ids -> UnknownItemsError (a DataError: exit 2) naming every unknown id."""
    from sidrec.errors import DataError
    from sidrec.index.sid_index import SIDIndex
    from sidrec.ops.serving import Recommender, UnknownItemsError

    rec = Recommender.__new__(Recommender)  # no model needed for the id check
    rec.index = SIDIndex(entity_ids=["i0", "i1", "i2"], codes=np.array([[0, 0], [0, 1], [1, 0]]), level_sizes=[2, 2])
    rec.default_k = 5
    with pytest.raises(UnknownItemsError) as e:
        rec.recommend([["i1", "nope-1"], ["zz", "i2"]])
    assert isinstance(e.value, DataError)
    assert "nope-1" in str(e.value) and "zz" in str(e.value) and "\n" not in str(e.value)
