"""eval.exclude_history: no method ever ranks an item the user already has, and every method is
scored the same way (the LLM from its beam list, SASRec and popularity masked)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sidrec.config import parse_config
from sidrec.data.tasks import build_instructions
from sidrec.evaluation.baselines import SASRec, popularity_ranked, sasrec_topk
from sidrec.evaluation.metrics import drop_seen
from test_tasks_text import index, ml  # noqa: F401  (the real MovieLens-100k slice, 120 users)


def test_drop_seen_moves_later_items_up_and_pads():
    ranked = np.array([[4, 2, 7, -1], [1, 2, 3, 4]])
    scores = np.array([[0.9, 0.8, 0.7, -np.inf], [0.4, 0.3, 0.2, 0.1]])
    r, s = drop_seen(ranked, [{2}, {1, 4}], scores)
    assert r.tolist() == [[4, 7, -1, -1], [2, 3, -1, -1]]
    assert s[0, :2].tolist() == [0.9, 0.7] and np.isneginf(s[0, 2:]).all() and s[1, :2].tolist() == [0.3, 0.2]
    assert drop_seen(ranked, [set(), set()]).tolist() == ranked.tolist()


def test_eval_rows_carry_every_item_before_the_target(ml, index):  # noqa: F811
    cfg = parse_config({"data": {"path": "unused"}, "tasks": {"seqrec_mode": "window"}}).tasks
    rows = build_instructions(ml, index, cfg, None, 5, seed=0)  # prompts show 5 items, `seen` has all of them
    for part in ("valid", "test"):
        got = rows[rows["split"] == part]
        full = ml.split(part, None)
        assert got["user_id"].tolist() == full["user_id"].tolist()
        assert [list(s) for s in got["seen"]] == [list(h) for h in full["history"]]
        assert max(len(s) for s in got["seen"]) > 5
    assert rows.loc[rows["split"] == "train", "seen"].isna().all()


def test_sasrec_and_popularity_never_rank_a_seen_item():
    torch.manual_seed(0)
    model = SASRec(30, hidden=16, layers=1, heads=1, max_len=10)
    hists = [[1, 2, 3], [5, 6, 7, 8, 9], [0]]
    seen = [set(h) for h in hists]
    plain = sasrec_topk(model, hists, 20)
    masked = sasrec_topk(model, hists, 10, exclude=seen)
    for row, p, s in zip(masked, plain, seen):
        assert not set(row) & s
        assert row.tolist() == [i for i in p if i not in s][:10], "otherwise the same order"
    train = [[0, 1, 1, 2], [1, 2, 3]]
    pop = popularity_ranked(train, 30, 3, 10, exclude=seen)
    assert all(not set(r) & s for r, s in zip(pop, seen)) and (pop >= 0).all()


@pytest.mark.slow
def test_the_llm_never_recommends_a_seen_item_and_selection_follows(ml100k_dir, tmp_path):
    from sidrec import stages

    cfg = parse_config({
        "seed": 0,
        "data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 30, "kcore": 3},
        "index": {"codebook_size": 8, "levels": 2, "kmeans_iters": 5},
        "model": {"backbone": "tiny", "dtype": "float32"},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 2, "select_users": 10, "checkpoint_every": None},
        "eval": {"beams": 10, "batch_size": 16, "ks": [1, 5], "exclude_history": True},
        "baselines": {"sasrec": {"max_epochs": 2, "patience": 1, "hidden": 16, "layers": 1, "heads": 1}},
    })
    ds = stages.ingest(cfg)
    bundle = stages.build_index(stages.featurize(ds, cfg), cfg)
    instr = stages.instruct(ds, bundle, cfg)
    rec = stages.finetune(instr, bundle, cfg, tmp_path / "rec")
    assert rec.meta["select_curve"], "model selection ran (on the same protocol)"
    report = stages.evaluate(rec, instr, bundle, cfg)
    seen = {(r.split, r.user_id): set(r.seen) for r in instr.rows[instr.rows["split"] != "train"].itertuples()}
    preds = report.predictions
    assert all(not set(top) & seen[(s, u)] for s, u, top in zip(preds["split"], preds["user_id"], preds["top10"]))
    # the same model without the filter does recommend seen items here, so the check above can fail
    plain = stages.evaluate(rec, instr, bundle, cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"exclude_history": False})}))
    p = plain.predictions
    assert any(set(top) & seen[(s, u)] for s, u, top in zip(p["split"], p["user_id"], p["top10"]))
    base = stages.baselines(ds, cfg)
    assert 0.0 <= base["baseline/sasrec/test/recall_at_5"] <= 1.0
