"""Great Expectations data-quality suites on real and deliberately broken datasets."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from sidrec.config import DataConfig, ValidationConfig
from sidrec.data.dataset import Dataset, _sequences_from, load_dataset
from sidrec.errors import DataError, ValidationFailed
from sidrec.data.validation import QualityReport, raise_on_failure, validate_dataset


def make_ds(rows, items=None, text_fields=("title",)) -> Dataset:
    """rows: (user, item, timestamp) in canonical order; items: (item_id, title)."""
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).astype(
        {"user_id": "str", "item_id": "str", "timestamp": "int64"}
    )
    if items is None:
        items = [(i, f"Title {i}") for i in sorted(set(inter["item_id"]))]
    items_df = pd.DataFrame(items, columns=["item_id", "title"]).astype("str")
    return Dataset(
        name="toy",
        interactions=inter,
        items=items_df,
        users=None,
        sequences=_sequences_from(inter),
        text_fields=list(text_fields),
        presplit=False,
    )


GOOD = [(u, i, t) for u in ("u1", "u2") for t, i in enumerate(("a", "b", "c", "d"))]


@pytest.fixture(scope="module")
def ml100k(ml100k_dir) -> Dataset:
    return load_dataset(DataConfig(format="recbole", path=str(ml100k_dir)))


def test_ml100k_passes_and_writes_docs(ml100k, tmp_path):
    docs = tmp_path / "docs"
    report = validate_dataset(ml100k, ValidationConfig(), docs)
    assert report.success, report.summary()
    assert report.summary() == f"data validation passed ({len(report.results)} expectations)"
    assert len(report.results) == 9 and report.failures() == []
    assert {r["suite"] for r in report.results} == {"interactions", "items", "users"}
    for r in report.results:
        assert set(r) >= {"suite", "expectation", "column", "success", "critical", "observed"}
        assert r["critical"] is True and r["success"] is True
    in_set = [r for r in report.results if r["suite"] == "interactions" and r["expectation"] == "expect_column_values_to_be_in_set"]
    assert in_set[0]["column"] == "item_id" and in_set[0]["observed"] == f"0 unexpected of {len(ml100k.interactions)}"
    site = docs.resolve() / "gx" / "uncommitted" / "data_docs" / "sidrec_data_docs"
    assert report.docs_dir == str(site)
    index = site / "index.html"
    assert index.is_file() and "ml-100k" in index.read_text(encoding="utf-8")
    assert list(site.glob("validations/**/*.html"))
    # the file Data Context keeps one checkpoint per suite
    assert {p.stem for p in (docs / "gx" / "checkpoints").glob("*.json")} >= {"ml-100k.interactions", "ml-100k.items", "ml-100k.users"}
    raise_on_failure(report)  # no exception
    # JSON round-trip
    again = QualityReport.from_json(json.loads(json.dumps(report.to_json())))
    assert again == report


def test_item_missing_from_items(tmp_path):
    ds = make_ds(GOOD, items=[("a", "A"), ("b", "B"), ("c", "C")])  # d has no row
    report = validate_dataset(ds, ValidationConfig(), tmp_path / "docs")
    assert not report.success
    assert [(r["suite"], r["column"]) for r in report.failures()] == [("interactions", "item_id")]
    assert report.summary() == (
        "data validation failed: interactions.item_id values in items table (2 unexpected of 8, e.g. 'd', 'd')"
    )
    assert (Path(report.docs_dir) / "index.html").is_file()  # docs are written for a failed run too
    with pytest.raises(ValidationFailed, match=r"^data validation failed: interactions\.item_id values in items table"):
        raise_on_failure(report)
    assert issubclass(ValidationFailed, DataError)


def test_short_user_and_unordered_user():
    rows = GOOD + [("u3", "a", 5)] + [("u4", "b", 9), ("u4", "a", 3), ("u4", "c", 10)]
    report = validate_dataset(make_ds(rows), ValidationConfig(min_history=3), None)
    assert report.docs_dir is None
    fails = {(r["suite"], r["column"]): r for r in report.failures()}
    assert set(fails) == {("users", "n_interactions"), ("users", "ordered")}
    assert fails[("users", "n_interactions")]["observed"] == "1 unexpected of 4, e.g. user 'u3' (1)"
    assert fails[("users", "ordered")]["observed"] == "1 unexpected of 4, e.g. user 'u4'"
    s = report.summary()
    assert "users.n_interactions >= 3 per user (1 unexpected of 4, e.g. user 'u3' (1))" in s
    assert "users.ordered timestamps non-decreasing per user" in s
    # a lower bar passes the history check
    ok = validate_dataset(make_ds(GOOD + [("u3", "a", 5)]), ValidationConfig(min_history=1), None)
    assert ok.success


def test_items_text_share_and_unique_ids():
    items = [("a", "A"), ("b", ""), ("c", ""), ("d", "D")]
    half = validate_dataset(make_ds(GOOD, items=items), ValidationConfig(min_text_share=0.9), None)
    assert [(r["suite"], r["column"]) for r in half.failures()] == [("items", "text")]
    assert "items.text non-empty for >= 90% of items (2 unexpected of 4" in half.summary()
    assert validate_dataset(make_ds(GOOD, items=items), ValidationConfig(min_text_share=0.5), None).success

    dup = make_ds(GOOD, items=[("a", "A"), ("b", "B"), ("b", "B again"), ("c", "C"), ("d", "D")])
    report = validate_dataset(dup, ValidationConfig(), None)
    assert [(r["suite"], r["column"], r["expectation"]) for r in report.failures()] == [
        ("items", "item_id", "expect_column_values_to_be_unique")
    ]
    assert "items.item_id unique (2 unexpected of 5" in report.summary()


def test_null_ids_fail():
    ds = make_ds(GOOD)
    ds.interactions.loc[0, "user_id"] = None
    report = validate_dataset(ds, ValidationConfig(min_history=1), None)
    assert ("interactions", "user_id") in [(r["suite"], r["column"]) for r in report.failures()]


def test_data_docs_keep_every_run_and_render_offline(tmp_path):
    """Two validations in one file Data Context: the Data Docs index lists both runs of every suite (a
    failed one marked failed), as a plain HTML table with links, and no page loads anything from the network."""
    import re

    project = tmp_path / "state"
    ok = validate_dataset(make_ds(GOOD), ValidationConfig(min_history=1), project)
    bad = validate_dataset(make_ds(GOOD, items=[("a", "A"), ("b", "B"), ("c", "C")]), ValidationConfig(min_history=1), project)
    assert ok.success and not bad.success and ok.docs_dir == bad.docs_dir
    site = Path(bad.docs_dir)
    index = (site / "index.html").read_text(encoding="utf-8")
    pages = sorted(site.glob("validations/**/*.html"))
    assert len(pages) == 6  # 3 suites x 2 runs
    rows = re.findall(r"<tr><td><a href=\"(validations/[^\"]+\.html)\">", index)
    assert len(rows) == 6 and all((site / r).is_file() for r in rows)  # every run listed, each link resolves
    assert index.count("text-danger") >= 1 and index.count("text-success") >= 5  # the failed run of 'interactions'
    for page in [site / "index.html", *pages, *site.glob("expectations/**/*.html")]:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"<(link|script)\b[^>]*(href|src)=\"https?://", text), page
        assert "<script" not in text and 'id="sidrec-offline"' in text, page
