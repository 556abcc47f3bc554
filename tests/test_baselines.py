"""Most-popular and SASRec baselines: hand-made cases, a learnable pattern, and MovieLens-100k."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sidrec.evaluation.baselines import (
    SASRec,
    load_sasrec,
    popularity_ranked,
    popularity_topk,
    save_sasrec,
    sasrec_scores,
    sasrec_topk,
    train_sasrec,
)
from sidrec.config import SASRecConfig
from sidrec.evaluation.metrics import ranking_metrics


@pytest.fixture(autouse=True)
def _one_thread():
    # Small models: one thread is as fast and immune to a busy machine; restore afterwards.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------- popularity


def test_popularity_counts_and_tiebreak():
    seqs = [[4, 2, 2], [1, 4, 3], [3, 2], [0]]
    # counts: 0:1, 1:1, 2:3, 3:2, 4:2, 5:0 -> 2, then 3 and 4 tie (lower first), then 0 and 1 tie, then 5
    assert popularity_topk(seqs, n_items=6, k=6).tolist() == [2, 3, 4, 0, 1, 5]
    assert popularity_topk(seqs, n_items=6, k=3).tolist() == [2, 3, 4]
    r = popularity_ranked(seqs, n_items=6, n_users=4, k=2)
    assert r.shape == (4, 2) and (r == np.array([2, 3])).all()
    with pytest.raises(ValueError):
        popularity_topk(seqs, n_items=6, k=7)
    with pytest.raises(ValueError):
        popularity_topk([[6]], n_items=6, k=1)


# ---------------------------------------------------------------- SASRec on a cycle

N_CYCLE = 50
SMALL = SASRecConfig(hidden=32, layers=1, heads=2, dropout=0.1, max_len=12, lr=5e-3, batch_size=64,
                     max_epochs=15, patience=5)


def _cycle_data(n_users=300, seed=0):
    """Each user walks i -> i+1 (mod 50) from a random start; the next item after the walk is held out."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        start, length = int(rng.integers(N_CYCLE)), int(rng.integers(6, 15))
        seqs.append([(start + j) % N_CYCLE for j in range(length + 2)])
    train = [s[:-2] for s in seqs]
    valid = (train, np.array([s[-2] for s in seqs]))
    test = ([s[:-1] for s in seqs], np.array([s[-1] for s in seqs]))
    return train, valid, test


@pytest.fixture(scope="module")
def cycle_model():
    train, valid, test = _cycle_data()
    model, info = train_sasrec(train, N_CYCLE, SMALL, seed=0, valid=valid, progress=False)
    return model, info, train, test


def test_sasrec_learns_cycle(cycle_model):
    model, info, train, (hist, tgt) = cycle_model
    assert set(info) >= {"best_epoch", "epochs_run", "best_valid_ndcg_at_10", "train_seconds"}
    assert 1 <= info["best_epoch"] <= info["epochs_run"] <= SMALL.max_epochs
    sas = ranking_metrics(sasrec_topk(model, hist, 10), tgt, ks=(1, 10))
    pop = ranking_metrics(popularity_ranked(train, N_CYCLE, len(hist), 10), tgt, ks=(1, 10))
    assert sas["recall_at_10"] >= 0.95, sas
    assert sas["recall_at_1"] >= 0.8, sas
    assert sas["recall_at_10"] > pop["recall_at_10"] + 0.5, (sas, pop)


def test_sasrec_shapes_and_topk_consistency(cycle_model):
    model, _, _, (hist, _) = cycle_model
    hist = hist[:7] + [[], [3] * 40]  # an empty and an over-long history
    scores = sasrec_scores(model, hist, batch_size=4)
    assert scores.shape == (9, N_CYCLE) and torch.isfinite(scores).all()
    top = sasrec_topk(model, hist, 5, batch_size=3)
    assert top.shape == (9, 5) and top.dtype == np.int64
    assert (top == torch.topk(scores, 5, dim=1).indices.numpy()).all()
    # batching does not change the scores
    assert torch.allclose(scores, sasrec_scores(model, hist, batch_size=512), atol=1e-5)
    # left padding is inert: scores depend only on the last max_len items
    long_hist = [list(range(30))]
    assert torch.allclose(sasrec_scores(model, long_hist), sasrec_scores(model, [long_hist[0][-SMALL.max_len:]]), atol=1e-5)


def test_sasrec_deterministic():
    train, valid, (hist, _) = _cycle_data(n_users=80, seed=1)
    cfg = SMALL.model_copy(update={"max_epochs": 2})
    a, ia = train_sasrec(train, N_CYCLE, cfg, seed=7, valid=valid, progress=False)
    b, ib = train_sasrec(train, N_CYCLE, cfg, seed=7, valid=valid, progress=False)
    assert torch.equal(sasrec_scores(a, hist), sasrec_scores(b, hist))
    assert ia["best_valid_ndcg_at_10"] == ib["best_valid_ndcg_at_10"]
    c, _ = train_sasrec(train, N_CYCLE, cfg, seed=8, valid=valid, progress=False)
    assert not torch.equal(sasrec_scores(a, hist), sasrec_scores(c, hist))


def test_sasrec_without_valid_and_time_cap():
    train, _, _ = _cycle_data(n_users=40, seed=2)
    model, info = train_sasrec(train, N_CYCLE, SMALL.model_copy(update={"max_epochs": 3}), seed=0, progress=False,
                               max_minutes=0.0)
    assert info["epochs_run"] == 1 and info["best_valid_ndcg_at_10"] is None
    assert isinstance(model, SASRec) and not model.training


def test_save_load_roundtrip(cycle_model, tmp_path):
    model, _, _, (hist, _) = cycle_model
    save_sasrec(model, tmp_path / "sasrec")
    assert (tmp_path / "sasrec" / "model.safetensors").is_file()
    loaded = load_sasrec(tmp_path / "sasrec")
    assert loaded.config == model.config
    assert torch.equal(sasrec_scores(model, hist), sasrec_scores(loaded, hist))


def test_load_missing_raises(tmp_path):
    from sidrec.errors import ModelError

    with pytest.raises(ModelError):
        load_sasrec(tmp_path)


# ---------------------------------------------------------------- MovieLens-100k


def test_sasrec_beats_popularity_on_ml100k(ml100k_dir):
    df = pd.read_csv(ml100k_dir / "ml-100k.inter", sep="\t")
    df.columns = [c.split(":")[0] for c in df.columns]
    df = df.sort_values(["user_id", "timestamp"], kind="stable")
    items = {v: i for i, v in enumerate(sorted(df["item_id"].unique()))}
    seqs = [[items[i] for i in g] for _, g in df.groupby("user_id", sort=True)["item_id"]]
    assert len(seqs) == 943 and len(items) == 1682
    train = [s[:-2] for s in seqs]
    valid = (train, np.array([s[-2] for s in seqs]))
    test_hist, test_tgt = [s[:-1] for s in seqs], np.array([s[-1] for s in seqs])

    cfg = SASRecConfig(hidden=64, layers=2, heads=2, dropout=0.2, max_len=20, lr=3e-3, batch_size=64,
                       max_epochs=10, patience=3)
    model, info = train_sasrec(train, len(items), cfg, seed=0, valid=valid, progress=False, max_minutes=1.0)
    sas = ranking_metrics(sasrec_topk(model, test_hist, 10), test_tgt, ks=(10,))
    pop = ranking_metrics(popularity_ranked(train, len(items), len(seqs), 10), test_tgt, ks=(10,))
    assert pop["ndcg_at_10"] == pytest.approx(0.0224, abs=2e-3)
    assert sas["ndcg_at_10"] > 1.2 * pop["ndcg_at_10"], (sas, pop, info)


def test_same_run_baseline_says_whether_it_converged(ml100k_dir):
    """A SASRec stopped by its time cap before its patience ran out is reported as not converged, in the
    metrics, the run's tags/notes and the console (issue 14: a capped baseline flatters the LLM)."""
    from sidrec.config import BaselinesConfig, DataConfig
    from sidrec.data.dataset import load_dataset
    from sidrec.evaluation.evaluate import evaluate_baselines
    from sidrec.ops.reports import baseline_notes

    ds = load_dataset(DataConfig(format="recbole", path=str(ml100k_dir), max_users=60, kcore=3))
    small = {"hidden": 16, "layers": 1, "heads": 1, "max_len": 20, "batch_size": 64}
    capped = BaselinesConfig(popularity=False, sasrec={**small, "max_epochs": 50, "max_minutes": 1e-6})
    m = evaluate_baselines(ds, capped, [10], seed=0, max_history=20, progress=False)
    assert m["baseline/sasrec/epochs_run"] == 1 and m["baseline/sasrec/converged"] == 0.0
    assert "not converged" in " ".join(baseline_notes(m))
    patient = BaselinesConfig(popularity=False, sasrec={**small, "max_epochs": 200, "patience": 1})
    m = evaluate_baselines(ds, patient, [10], seed=0, max_history=20, progress=False)
    assert m["baseline/sasrec/converged"] == 1.0 and m["baseline/sasrec/epochs_run"] < 200
    assert baseline_notes(m) == []


def test_same_run_sasrec_is_trained_once_per_data_and_settings(ml100k_dir, tmp_path):
    """The hybrid index's ``source: sasrec`` and the baselines step ask for the same SASRec: the store
    trains it once; another seed, other data or a damaged entry train anew; a time-capped run is not kept."""
    from sidrec.config import SASRecConfig, DataConfig
    from sidrec.data.dataset import load_dataset
    from sidrec.evaluation.evaluate import same_run_sasrec
    from sidrec.evaluation.sasrec_store import SasrecStore

    ds = load_dataset(DataConfig(format="recbole", path=str(ml100k_dir), max_users=60, kcore=3))
    cfg = SASRecConfig(hidden=16, layers=1, heads=1, max_len=20, batch_size=64, max_epochs=3, patience=2)
    store = SasrecStore(tmp_path / "sasrec")
    first, info = same_run_sasrec(ds, cfg, 0, 20, progress=False, store=store)
    assert not info.get("reused") and len(list(store.root.iterdir())) == 1
    again, info2 = same_run_sasrec(ds, cfg, 0, 20, progress=False, store=store)
    assert info2["reused"] and info2["best_epoch"] == info["best_epoch"]
    assert torch.equal(again.item_weights(), first.item_weights())
    other, info3 = same_run_sasrec(ds, cfg, 1, 20, progress=False, store=store)  # another seed: another model
    assert not info3.get("reused") and not torch.equal(other.item_weights(), first.item_weights())
    fewer = load_dataset(DataConfig(format="recbole", path=str(ml100k_dir), max_users=50, kcore=3))
    assert not same_run_sasrec(fewer, cfg, 0, 20, progress=False, store=store)[1].get("reused")
    assert len(list(store.root.iterdir())) == 3
    for entry in store.root.iterdir():  # damaged weights: retrained, never trusted
        (entry / "model.safetensors").write_bytes(b"not a model")
    assert not same_run_sasrec(ds, cfg, 0, 20, progress=False, store=store)[1].get("reused")
    assert same_run_sasrec(ds, cfg, 0, 20, progress=False, store=store)[1]["reused"]  # stored again, whole
    capped = cfg.model_copy(update={"max_epochs": 50, "max_minutes": 1e-6})
    store2 = SasrecStore(tmp_path / "capped")
    assert same_run_sasrec(ds, capped, 0, 20, progress=False, store=store2)[1]["stopped"] == "time_cap"
    assert not store2.root.exists() or not any(store2.root.iterdir())
