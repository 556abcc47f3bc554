"""The data-quality report's content: the data's profile, its history, and the rendered pages."""
from __future__ import annotations

import json
import re

import pytest

from sidrec.config import DataConfig, ValidationConfig
from sidrec.data.dataset import load_dataset
from sidrec.data.profile import ProfileHistory, change, distribution, profile_dataset
from sidrec.ops.reports import drift_html, quality_html
from sidrec.data.validation import QualityReport
from test_validation import GOOD, make_ds


@pytest.fixture(scope="module")
def ml_slice(ml100k_dir):
    return load_dataset(DataConfig(format="recbole", path=str(ml100k_dir), max_users=60, kcore=3))


def _offline(page: str) -> None:
    assert page.startswith("<!doctype html>") and "<style>" in page
    assert "<script" not in page
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page), "the page must not load anything from the network"


def test_distribution_quantiles_and_log2_bins():
    d = distribution([1, 2, 3, 4, 8, 9, 100])
    assert (d["n"], d["min"], d["max"], d["p50"]) == (7, 1, 100, 4)
    assert sum(c for _, c in d["hist"]) == 7
    assert d["hist"][0] == ["1", 1] and d["hist"][1] == ["2-3", 2] and d["hist"][-1] == ["64-127", 1]
    assert distribution([5, 6])["hist"][0][0] == "4-7", "no empty bins below the smallest count"
    assert distribution([]) == {"n": 0}


def test_profile_of_a_real_slice_adds_up(ml_slice):
    p = profile_dataset(ml_slice)
    inter = ml_slice.interactions
    assert p["stats"] == ml_slice.stats()
    assert sum(c for _, c in p["per_user"]["hist"]) == inter["user_id"].nunique()
    assert sum(c for _, c in p["per_item"]["hist"]) == inter["item_id"].nunique()
    assert p["per_user"]["max"] == inter.groupby("user_id").size().max()
    # MovieLens timestamps are Unix seconds of 1997-98: activity per month, every interaction counted
    assert p["activity"]["unit"] == "date" and p["activity"]["first"].startswith("199")
    assert sum(c for _, c in p["activity"]["buckets"]) == len(inter)
    assert 0.9 <= p["text"]["coverage"] <= 1.0 and p["text"]["chars"]["min"] >= 1
    counts = inter.groupby("item_id").size().sort_values(ascending=False)
    assert p["long_tail"]["top_items"][0] == [str(counts.index[0]), int(counts.iloc[0])]
    assert all(v == 0 for k, v in p["problems"].items() if k != "catalog_items_never_interacted"), p["problems"]
    json.dumps(p)  # kept in the state folder and in the report's JSON


def test_profile_finds_problems_and_ordinal_time():
    rows = GOOD + [("u3", "a", 0)]  # u3 has one interaction
    items = [(i, f"Title {i}") for i in "abcd"] + [("z", "")]  # z: never interacted, no text
    p = profile_dataset(make_ds(rows, items=items))
    assert p["problems"]["catalog_items_never_interacted"] == 1
    assert p["problems"]["users_with_one_interaction"] == 1
    assert p["text"]["coverage"] == pytest.approx(0.8)
    assert p["activity"]["unit"] == "order" and sum(c for _, c in p["activity"]["buckets"]) == len(rows)
    back = make_ds([("u1", "a", 5), ("u1", "b", 3), ("u2", "a", 1), ("u2", "b", 2)])
    assert profile_dataset(back)["problems"]["users_with_timestamps_out_of_order"] == 1


def test_change_against_the_previous_profile():
    old = profile_dataset(make_ds(GOOD))
    new = profile_dataset(make_ds(GOOD + [("u3", "a", 0), ("u3", "b", 1)]))
    rows = {r["what"]: r for r in change(old, new)}
    assert rows["users"]["previous"] == 2 and rows["users"]["current"] == 3 and rows["users"]["change"] == pytest.approx(0.5)
    assert rows["interactions"]["change"] == pytest.approx(0.25)
    assert rows["problem: users with one interaction"]["change"] == 0 and not rows["problem: users with one interaction"]["relative"]
    assert change(None, new) == []


def test_history_keeps_the_last_runs_and_survives_damage(tmp_path):
    h = ProfileHistory(tmp_path, keep=2)
    assert h.latest("toy") is None
    for n in (1, 2, 3):
        h.append({"dataset": "toy", "created": str(n)})
    assert [r["created"] for r in h.load("toy")] == ["2", "3"] and h.latest("toy")["created"] == "3"
    assert h.latest("other") is None
    (tmp_path / "toy.json").write_text("{not json")
    assert h.latest("toy") is None, "a damaged history gives a report without a comparison, not a failed run"
    h.append({"dataset": "toy", "created": "4"})
    assert [r["created"] for r in h.load("toy")] == ["4"]
    assert not list(tmp_path.glob(".profile-*")), "no temp file left behind"


def test_validate_stage_compares_with_the_previous_run(ml_slice, tmp_path):
    from sidrec import stages
    from sidrec.config import RunConfig

    cfg = RunConfig.model_validate({"name": "t", "data": {"path": "unused"}})
    h = ProfileHistory(tmp_path / "quality")
    first = stages.validate(ml_slice, cfg, tmp_path / "docs1", history=h)
    assert first.previous is None and first.profile["stats"] == ml_slice.stats()
    second = stages.validate(ml_slice, cfg, tmp_path / "docs2", history=h)
    assert second.previous == first.profile
    again = QualityReport.from_json(json.loads(json.dumps(second.to_json())))
    assert again.profile == second.profile and again.previous == first.profile


def test_quality_page_is_styled_offline_and_says_what_a_reader_checks(ml_slice, tmp_path):
    from sidrec.data.validation import validate_dataset

    report = validate_dataset(ml_slice, ValidationConfig(), None)
    report.profile = profile_dataset(ml_slice)
    page = quality_html(report)
    _offline(page)
    assert "PASSED" in page and page.count("<svg") == 4
    for r in report.results:
        assert r["observed"] in page.replace("&#x27;", "'")
    for heading in ("Expectations", "Distributions", "Id and timestamp problems found", "Change since the previous run"):
        assert heading in page
    assert "No previous run" in page
    report.previous = dict(report.profile, created="2026-11-30 09:00:00",
                           stats=dict(report.profile["stats"], n_interactions=report.profile["stats"]["n_interactions"] - 100))
    page = quality_html(report)
    assert "2026-11-30 09:00:00" in page and "+" in page.split("Change since the previous run")[1]
    failed = QualityReport(success=False, results=[dict(report.results[0], success=False, observed="3 unexpected of 9")])
    page = quality_html(failed)
    _offline(page)
    assert "FAILED" in page and "3 unexpected of 9" in page and "<svg" not in page  # an old report without a profile


def test_drift_page_is_styled_offline():
    from sidrec.ops.drift import compare, report_html

    def prof(users, items, counts, fp):
        return {"fingerprint": fp, "stats": {"n_interactions": sum(counts.values()), "n_users": len(users)},
                "users": users, "items": items, "item_counts": counts, "text_coverage": 1.0}

    s = compare(prof(["u1"], ["a", "b"], {"a": 3, "b": 1}, "x"), prof(["u1", "u2"], ["a", "c"], {"a": 1, "c": 5}, "y"))
    page = report_html(s)
    assert page == drift_html(s)
    _offline(page)
    assert "items added" in page and "<code>c</code>" in page and "popularity shift" in page
    assert "no champion yet" in drift_html(compare(None, prof(["u1"], ["a"], {"a": 1}, "z")))
    assert "same data" in drift_html(compare(prof(["u1"], ["a"], {"a": 1}, "z"), prof(["u1"], ["a"], {"a": 1}, "z")))
