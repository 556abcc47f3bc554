"""Retraining building blocks: drift report, new-item SIDs without re-fitting the quantizer, warm start,
and the cron/flock schedule line. (The full `run.py retrain` pipeline is not exercised here.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sidrec.config import parse_config


def _profile(users, items, counts, cov=1.0, fp="x"):
    return {"name": "d", "fingerprint": fp, "stats": {"n_interactions": sum(counts.values()), "n_users": len(users)},
            "users": users, "items": items, "item_counts": counts, "text_coverage": cov}


def test_drift_compare_and_html():
    from sidrec.ops.drift import compare, report_html

    old = _profile(["u1", "u2"], ["a", "b", "c"], {"a": 5, "b": 3, "c": 1}, fp="old")
    new = _profile(["u2", "u3", "u4"], ["a", "b", "d"], {"a": 1, "b": 3, "d": 8}, cov=0.5, fp="new")
    s = compare(old, new, top_k=2)
    assert (s["users_added"], s["users_removed"], s["items_added"], s["items_removed"]) == (2, 1, 1, 1)
    assert s["items_added_sample"] == ["d"] and s["interaction_ratio"] == pytest.approx(12 / 9)
    assert 0 < s["popularity_tvd"] <= 1 and s["top2_overlap"] == 0.5
    assert s["text_coverage_change"] == pytest.approx(-0.5) and not s["same_data"]
    assert compare(old, old)["popularity_tvd"] == 0.0 and compare(old, old)["same_data"]
    first = compare(None, new)
    assert first["baseline"] == "none" and "items_added" not in first
    html = report_html(s)
    assert html.startswith("<!doctype html>") and "popularity_tvd" in html and "<script" not in html


def test_data_profile_on_real_slice(ml100k_dir):
    from sidrec.config import DataConfig
    from sidrec.data.dataset import load_dataset
    from sidrec.ops.registry import data_profile

    ds = load_dataset(DataConfig(path=str(ml100k_dir), max_users=30, kcore=3))
    p = data_profile(ds)
    assert len(p["items"]) == len(ds.items) and sum(p["item_counts"].values()) == len(ds.interactions)
    assert 0.9 <= p["text_coverage"] <= 1.0 and p["fingerprint"] == ds.fingerprint()


def _bundle(n=60, d=8, seed=0):
    from sidrec.config import IndexConfig
    from sidrec.stages import build_index
    from sidrec.artifacts import EntityFeatures

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    cfg = parse_config({"index": {"codebook_size": 4, "levels": 2, "kmeans_iters": 5}})
    feats = EntityFeatures(item_ids=[f"i{i}" for i in range(n)], item_texts=[""] * n, item_embeddings=x)
    return build_index(feats, cfg), x


def test_extend_index_keeps_existing_sids_and_adds_new_items():
    from sidrec.ops.drift import extend_index

    bundle, x = _bundle()
    old_sids = dict(zip(bundle.items.entity_ids, bundle.items.sids()))
    rng = np.random.default_rng(1)
    new_x = rng.normal(size=(7, x.shape[1])).astype("float32")
    ids = bundle.items.entity_ids[:5] + [f"new{i}" for i in range(7)]
    emb = np.vstack([x[:5], new_x])
    ext, n_new = extend_index(bundle, ids, emb)
    assert n_new == 7 and len(ext.items) == len(bundle.items) + 7
    for e, sid in old_sids.items():
        assert ext.items.sid_of(e) == sid  # existing SIDs never change
    sids = ext.items.sids()
    assert len(set(sids)) == len(sids)  # still collision-free
    assert ext.state is bundle.state and ext.report["index/new_items_assigned"] == 7
    same, n0 = extend_index(bundle, bundle.items.entity_ids, x)
    assert n0 == 0 and same is bundle


def test_warm_start_copies_adapter_and_sid_rows(tmp_path):
    import torch

    from sidrec.ops.drift import extend_index, warm_start_model
    from sidrec.model.sid_model import save_recommender
    from sidrec.stages import build_model

    cfg = parse_config({"model": {"backbone": "tiny", "dtype": "float32"}})
    bundle, x = _bundle()
    champ, tok, _ = build_model(cfg, bundle)
    with torch.no_grad():
        for n, p in champ.lm.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)  # distinguishable from a fresh (zero) LoRA B
    save_recommender(champ, tok, tmp_path / "champ", {"backbone": "tiny", "lora": cfg.model.lora.model_dump()})
    ext, _ = extend_index(bundle, bundle.items.entity_ids + ["n1", "n2"],
                          np.vstack([x, np.random.default_rng(3).normal(size=(2, x.shape[1])).astype("float32")]))
    fresh, _, _ = build_model(cfg, ext)
    info = warm_start_model(fresh, tmp_path / "champ", cfg)
    assert info["warm"], info
    lora_b = [p for n, p in fresh.lm.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.all(p == 0.5) for p in lora_b)
    rows = [fresh.vocab.tokens.index(t) for t in champ.vocab.tokens]
    assert torch.equal(fresh.sid_embeddings[rows], champ.sid_embeddings.detach())
    other = parse_config({"model": {"backbone": "tiny", "dtype": "float32", "lora": {"r": 4}}})
    assert not warm_start_model(fresh, tmp_path / "champ", other)["warm"]


def test_schedule_cron_line_and_merge(tmp_path):
    from sidrec.errors import ConfigError
    from sidrec.ops.schedule import MARKER, cron_line, merge_crontab

    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    line = cron_line(str(cfg), "0 3 * * 1", tmp_path, python="/py", lock_file="/l/retrain.lock", log_file="/l/r.log")
    assert line.startswith("0 3 * * 1 cd ") and "flock -n /l/retrain.lock /py run.py retrain --config" in line
    assert line.endswith(f"{MARKER}{cfg}")
    table = merge_crontab("MAILTO=x\n5 * * * * other\n", line)
    again = merge_crontab(table, line.replace("0 3 * * 1", "0 4 * * *", 1))
    assert again.count(MARKER) == 1 and "0 4 * * *" in again and "5 * * * * other" in again and "MAILTO=x" in again
    with pytest.raises(ConfigError):
        cron_line(str(cfg), "every monday", tmp_path)
    with pytest.raises(ConfigError):
        cron_line(str(cfg), "0 3 * * 1; rm -rf /", tmp_path)


def test_zenml_schedule_cron_per_orchestrator(tmp_path):
    import subprocess
    import sys

    from sidrec.errors import ConfigError
    from sidrec.ops.schedule import orchestrator_cron

    assert orchestrator_cron("0 3 * * 1", "kubeflow") == "0 0 3 * * 1"  # KFP recurring runs: seconds first
    assert orchestrator_cron("0 3 * * 1", "kubernetes") == "0 3 * * 1"  # a Kubernetes CronJob: crontab form
    with pytest.raises(ConfigError, match="does not run schedules"):
        orchestrator_cron("0 3 * * 1", "local")
    with pytest.raises(ConfigError, match="5-field"):
        orchestrator_cron("0 0 3 * * 1", "kubeflow")  # --cron takes the crontab form only
    # through the CLI on the default (local) stack: one error line, exit 2, nothing scheduled
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "run.py", "schedule", "--zenml", "--config", "configs/smoke.yaml"], cwd=repo,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    err = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "local" in err[0] and "does not run schedules" in err[0], out.stderr[-2000:]


def test_store_new_item_sids_generated_by_the_llm():
    """retrain.new_item_sids=llm: new items take the SID the model generates from their text (its best
    beam over the raw levels, then the next free disambiguation index); existing SIDs never change."""
    import torch

    from sidrec.model.decode import beam_search_batch
    from sidrec.ops.drift import extend_index_by_generation
    from sidrec.stages import build_model
    from sidrec.data.tasks import TEMPLATES

    cfg = parse_config({"model": {"backbone": "tiny", "dtype": "float32"}})
    bundle, x = _bundle()
    assert bundle.items.num_levels == bundle.state.levels + 1  # this index has a disambiguation level
    model, tok, enc = build_model(cfg, bundle)
    ids = bundle.items.entity_ids + ["n1", "n2", "n3"]
    texts = [""] * len(bundle.items) + ["red fantasy novel", "red fantasy novel", "kitchen scale"]
    ext, n = extend_index_by_generation(bundle, model, enc, ids, texts, beams=4)
    assert n == 3 and ext.report["index/new_items_generated_by_llm"] == 3
    for e in bundle.items.entity_ids:
        assert ext.items.sid_of(e) == bundle.items.sid_of(e)
    codes = ext.items.codes
    assert len({tuple(c) for c in codes.tolist()}) == len(codes)  # collision-free
    prompt = enc.encode(TEMPLATES["text_to_sid"][0].format(text="kitchen scale"))
    best, _ = beam_search_batch(model, [prompt], bundle.state.levels, 4, None, enc.pad_id, torch.float32)
    assert codes[-1, : bundle.state.levels].tolist() == best[0, 0].tolist()  # the model's own best beam
    # the same text -> the same raw SID, told apart by the disambiguation level
    assert codes[-3, :-1].tolist() == codes[-2, :-1].tolist() and codes[-3, -1] != codes[-2, -1]
    same, zero = extend_index_by_generation(bundle, model, enc, bundle.items.entity_ids, [""] * len(bundle.items))
    assert zero == 0 and same is bundle


def test_llm_new_item_sids_need_the_text_to_sid_task():
    from sidrec.errors import ConfigError

    with pytest.raises(ConfigError, match="text_to_sid"):
        parse_config({"retrain": {"new_item_sids": "llm"}, "tasks": {"text_to_sid": 0}})
    assert parse_config({"retrain": {"new_item_sids": "llm"}}).tasks.text_to_sid > 0
