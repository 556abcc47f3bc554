"""Registry and promotion gate: the pure gate, the lock, and train -> register -> promote -> retrain on
appended data -> gate -> forced-worse challenger -> rollback end to end (ZenML pipeline, tiny backbone, ML-100k slice,
a temporary MLflow sqlite store)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from sidrec.config import PromotionConfig, parse_config
from sidrec.ops.registry import decide
from sidrec.runtime import compute_dtype_name


# ------------------------------------------------------------------------------ decide() (pure)
def _m(r, n, inv=0.0, ok=True):
    return {"test/recall_at_10": r, "test/ndcg_at_10": n, "test/invalid_rate": inv, "data_validation_passed": ok}


POP = {"test/recall_at_10": 0.10, "test/ndcg_at_10": 0.05}


def test_first_model_must_beat_popularity():
    cfg = PromotionConfig()
    assert decide(_m(0.12, 0.06), None, POP, cfg).promote
    d = decide(_m(0.08, 0.06), None, POP, cfg)
    assert not d.promote and d.kind == "first" and "beats_popularity" in d.reason
    assert not decide(_m(0.10, 0.05), None, POP, cfg).promote  # equal is not "beats"
    assert decide(_m(0.01, 0.0), None, POP, PromotionConfig(beat_popularity=False)).promote


def test_challenger_vs_champion_with_tolerance():
    champ = _m(0.20, 0.10)
    cfg = PromotionConfig()
    assert decide(_m(0.20, 0.10), champ, POP, cfg).promote  # not worse = promoted
    d = decide(_m(0.19, 0.11), champ, POP, cfg)
    assert not d.promote and "not_worse:test/recall_at_10" in d.reason
    assert decide(_m(0.19, 0.11), champ, POP, PromotionConfig(tolerance=0.02)).promote
    cfg3 = PromotionConfig(metrics=["test/ndcg_at_10"])
    assert decide(_m(0.01, 0.11), champ, POP, cfg3).promote


def test_invalid_rate_validation_and_missing_metrics_block():
    champ = _m(0.1, 0.05)
    assert not decide(_m(0.3, 0.2, inv=0.01), champ, POP, PromotionConfig()).promote
    assert decide(_m(0.3, 0.2, inv=0.01), champ, POP, PromotionConfig(max_invalid_rate=0.05)).promote
    d = decide(_m(0.3, 0.2, ok=False), champ, POP, PromotionConfig())
    assert not d.promote and "data_validation" in d.reason
    assert not decide(_m(0.3, 0.2, ok=None), champ, POP, PromotionConfig()).promote  # not recorded = not passed
    assert decide(_m(0.3, 0.2, ok=None), champ, POP, PromotionConfig(require_validation=False)).promote
    d = decide({"test/invalid_rate": 0.0, "data_validation_passed": True}, champ, POP, PromotionConfig())
    assert not d.promote and "lacks" in d.reason
    assert json.dumps(d.to_json())  # serialisable as is


# ------------------------------------------------------------------------------ lock: two promotions at once
def _fake_registry(tmp: Path, monkeypatch, n_versions: int):
    import mlflow
    from mlflow import MlflowClient

    import sidrec.ops.registry as reg

    cfg = parse_config({"data": {"name": "lock-test"}, "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}})
    client = reg.client_for(cfg)
    name = reg.model_name(cfg)
    client.create_registered_model(name)
    with mlflow.start_run() as run:
        client.set_tag(run.info.run_id, "data_validation", "passed")
    for _ in range(n_versions):
        client.create_model_version(name, source=f"runs:/{run.info.run_id}/x", run_id=run.info.run_id)
    scores = {str(v): 0.1 * v for v in range(1, n_versions + 1)}  # later versions are better
    monkeypatch.setattr(reg, "load_pyfunc_recommender", lambda cfg, v: v)
    monkeypatch.setattr(reg, "score_recommender", lambda v, split, cfg: {
        "test/recall_at_10": scores[v], "test/ndcg_at_10": scores[v], "test/invalid_rate": 0.0})
    monkeypatch.setattr(reg, "popularity_scores", lambda ds, split, cfg: {"test/recall_at_10": 0.0, "test/ndcg_at_10": 0.0})
    monkeypatch.setattr(reg, "_test_users", lambda ds, cfg: [1, 2, 3])

    class _DS:
        def fingerprint(self):
            return "fake"

    return cfg, client, name, _DS()


def test_concurrent_promotions_leave_one_champion_and_rollback(tmp_path, monkeypatch):
    import sidrec.ops.registry as reg

    cfg, client, name, ds = _fake_registry(tmp_path, monkeypatch, 3)
    assert reg.promote(cfg, version="1", dataset=ds)["promoted"]
    results = []
    threads = [threading.Thread(target=lambda v=v: results.append(reg.promote(cfg, version=v, dataset=ds))) for v in ("2", "3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    champion = reg.alias_version(client, name, reg.CHAMPION)
    history = reg._history(client, name)
    assert champion == history[-1] == "3"  # v3 wins whichever order the two ran in
    assert history[0] == "1" and set(history) <= {"1", "2", "3"}
    log = reg.read_log(cfg)
    assert [r["action"] for r in log].count("promote") == 3
    # rollback walks the history back; nothing is deleted
    back = reg.rollback(cfg)
    assert back["from"] == "3" and reg.alias_version(client, name, reg.CHAMPION) == back["to"] != "3"
    assert len(client.search_model_versions(f"name='{name}'")) == 3
    assert client.get_model_version(name, "3").tags["gate.rolled_back"]


# ------------------------------------------------------------------------------ end to end


def _config(tmp: Path, ml100k_dir: Path, **over) -> dict:
    cfg = {
        "name": "registry-test",
        "seed": 0,
        "data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 50, "kcore": 3},
        "index": {"codebook_size": 8, "levels": 2, "kmeans_iters": 10},
        "tasks": {"text_to_sid": 0, "sid_to_text": 0, "titles_to_sid": 0},
        "model": {"backbone": "tiny", "dtype": "float32"},
        "train": {"steps": 24, "batch_size": 8, "warmup_steps": 2, "lr": 0.005, "embedding_lr": 0.05},
        "eval": {"beams": 10, "batch_size": 16, "ks": [1, 5, 10]},
        "baselines": {"sasrec": {"enabled": False}},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "registry-test"},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def _write(tmp: Path, name: str, cfg: dict) -> str:
    import yaml

    p = tmp / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _consistent(rec: dict, cfg: PromotionConfig) -> bool:
    """The decision matches the numbers it reports."""
    m = rec["metrics"]
    ch, cp, pop = m["challenger"], m["champion"], m["popularity"]
    if cp is None:
        want = not cfg.beat_popularity or (all(ch[k] >= pop[k] for k in cfg.metrics) and any(ch[k] > pop[k] for k in cfg.metrics))
    else:
        want = all(ch[k] >= cp[k] - cfg.tolerance for k in cfg.metrics)
    return rec["promoted"] == want


def _appendable_slice(src: Path, dst: Path, n_users: int = 50, share: float = 0.8) -> list[str]:
    """``dst`` gets MovieLens-100k's item/user files and the first ``n_users`` users' interactions up to
    the ``share`` quantile of their timestamps; returns the later rows, to be appended to the file."""
    import shutil

    import pandas as pd

    dst.mkdir(parents=True)
    for suffix in (".item", ".user"):
        shutil.copy2(src / f"ml-100k{suffix}", dst / f"ml-100k{suffix}")
    lines = (src / "ml-100k.inter").read_text().splitlines()
    rows = pd.DataFrame([l.split("\t") for l in lines[1:]], columns=["u", "i", "r", "t"])
    users = sorted(rows["u"].unique(), key=int)[:n_users]
    rows = rows[rows["u"].isin(users)].assign(t=lambda d: d["t"].astype(float)).sort_values("t", kind="stable")
    cut = rows["t"].quantile(share)
    fmt = lambda d: ["\t".join([u, i, r, str(int(t))]) for u, i, r, t in d.itertuples(index=False)]  # noqa: E731
    (dst / "ml-100k.inter").write_text("\n".join([lines[0]] + fmt(rows[rows["t"] <= cut])) + "\n")
    return fmt(rows[rows["t"] > cut])


def _zenml_stage(zenml_run_id: str):
    from zenml.client import Client

    mv = Client().get_pipeline_run(zenml_run_id).model_version
    return None if mv is None else str(mv.stage).rsplit(".", 1)[-1].lower()


def _last_decision(cfg) -> dict:
    import sidrec.ops.registry as reg

    return [r for r in reg.read_log(cfg) if r["action"] == "promote"][-1]


@pytest.mark.slow
def test_train_promote_retrain_on_appended_data_gate_rollback(tmp_path, ml100k_dir):
    """train -> register -> promote (first champion) -> append new interactions to the same file ->
    `run.py retrain` (drift report, new items via the saved quantizer, warm start, register, gate)
    -> a forced worse challenger is rejected -> rollback; registry aliases checked at every stage."""
    from pipelines.cli import _maybe_register, run_retrain, run_training
    from sidrec.config import load_config
    from sidrec.stages import ingest
    import sidrec.ops.registry as reg
    from steps.ops import training_run_artifacts, zenml_production_stage as hook

    data = tmp_path / "data" / "ml-100k"
    later_rows = _appendable_slice(ml100k_dir, data)
    cfg_a = _write(tmp_path, "a.yaml", _config(tmp_path, ml100k_dir, data={"path": str(data), "max_users": None}))
    cfg = load_config(cfg_a)
    name = reg.model_name(cfg)
    assert name == "sidrec-ml-100k"
    client = reg.client_for(cfg)
    old_ds = ingest(cfg)

    # 1. train + register -> v1 is the challenger, no champion yet
    m1 = run_training(cfg_a, None)
    assert _maybe_register(cfg_a, m1, True) == "1"
    assert reg.alias_version(client, name, "challenger") == "1" and reg.alias_version(client, name, "champion") is None
    assert client.get_run(m1["mlflow_run_id"]).data.tags["data_validation"] == "passed"
    # model.dtype as resolved where it trained (auto -> float32 or bfloat16), on the run page
    assert client.get_run(m1["mlflow_run_id"]).data.tags["compute_dtype"] == compute_dtype_name(cfg)
    assert _zenml_stage(m1["zenml_run_id"]) == "staging"  # the ZenML model version follows the challenger alias

    # 2. first model vs popularity: the decision follows the numbers (the tiny random backbone rarely beats it)
    rec = reg.promote(cfg, stage_hook=hook)
    assert rec["kind"] == "first" and _consistent(rec, cfg.promotion)
    assert reg.alias_version(client, name, "champion") == ("1" if rec["promoted"] else None)
    assert client.get_model_version(name, "1").tags["gate.decision"] == ("promoted" if rec["promoted"] else "rejected")
    if not rec["promoted"]:
        # the operator seats the first champion without the popularity check
        cfg_nopop = load_config(_write(tmp_path, "a_nopop.yaml", _config(
            tmp_path, ml100k_dir, data={"path": str(data), "max_users": None}, promotion={"beat_popularity": False})))
        assert reg.promote(cfg_nopop, stage_hook=hook)["promoted"]
    assert reg.alias_version(client, name, "champion") == "1"
    assert _zenml_stage(m1["zenml_run_id"]) == "production"  # the ZenML model version follows the alias

    # 3. new interactions are appended to the same file; the scheduled command retrains on them
    with open(data / "ml-100k.inter", "a") as f:
        f.write("\n".join(later_rows) + "\n")
    new_ds = ingest(cfg)
    assert len(new_ds.interactions) > len(old_ds.interactions)  # (the ingest step must not serve the old data from cache)
    new_items = set(new_ds.items["item_id"]) - set(old_ds.items["item_id"])
    assert new_items, "the appended rows should bring items the champion never saw"
    out = run_retrain(cfg_a)
    drift = out["drift"]
    assert drift["baseline"].startswith("champion v1") and not drift["same_data"]
    assert drift["interaction_ratio"] == pytest.approx(len(new_ds.interactions) / len(old_ds.interactions))
    assert drift["items_added"] == len(new_items)
    assert out["version"] == "2" and reg.alias_version(client, name, "challenger") == "2"
    arts2 = training_run_artifacts(out["zenml_run_id"], "retrain_pipeline")
    assert len(arts2["dataset"].interactions) == len(new_ds.interactions)
    idx2, idx1 = arts2["bundle"].items, training_run_artifacts(m1["zenml_run_id"])["bundle"].items
    assert arts2["bundle"].report["index/new_items_assigned"] == len(new_items)
    assert all(idx2.sid_of(e) == idx1.sid_of(e) for e in idx1.entity_ids)  # the champion's SIDs are kept
    assert set(new_items) <= set(idx2.entity_ids) and len(set(idx2.sids())) == len(idx2.entity_ids)
    warm = arts2["recommender"].meta["warm_start"]
    assert warm["warm"] and warm["from_version"] == "1", warm
    rec2 = _last_decision(cfg)
    assert rec2["challenger"] == "2" and rec2["kind"] == "vs_champion" and rec2["champion"] == "1"
    assert _consistent(rec2, cfg.promotion) and out["decision"]["promoted"] == rec2["promoted"]
    n_test = len(new_ds.split("test", 20))
    assert rec2["metrics"]["challenger"]["test/users"] == rec2["metrics"]["champion"]["test/users"] == n_test
    assert rec2["dataset_hash"] == new_ds.fingerprint()  # re-scored on the newest test set, not the training numbers
    champion = "2" if rec2["promoted"] else "1"
    assert reg.alias_version(client, name, "champion") == champion
    assert client.get_model_version(name, "2").tags["gate.decision"] == ("promoted" if rec2["promoted"] else "rejected")
    assert _zenml_stage(out["zenml_run_id"]) == ("production" if rec2["promoted"] else "staging")
    assert _zenml_stage(m1["zenml_run_id"]) == ("archived" if rec2["promoted"] else "production")

    # 4. a forced worse challenger: the champion's model with a broken catalog (its SID index lost every item
    #    that is a test target, as a botched re-index would) -> every test user is a miss -> must NOT be promoted
    from sidrec.artifacts import IndexBundle
    from sidrec.index.sid_index import SIDIndex

    arts = arts2 if champion == "2" else training_run_artifacts(m1["zenml_run_id"])
    items, targets = arts["bundle"].items, set(new_ds.split("test", 20)["target"])
    keep = [i for i, e in enumerate(items.entity_ids) if e not in targets]
    broken = IndexBundle(items=SIDIndex([items.entity_ids[i] for i in keep], items.codes[keep], items.level_sizes),
                         state=arts["bundle"].state, report=arts["bundle"].report)
    v3 = reg.register_model(cfg, run_id=arts["mlflow_run_id"], recommender_dir=Path(arts["recommender"].path),
                            bundle=broken, dataset=new_ds, quality_passed=True, extra_tags={"forced": "worse"},
                            log_new=True)  # not the run's own LoggedModel: this broken bundle
    assert v3 == "3" and reg.alias_version(client, name, "challenger") == "3"
    rec3 = reg.promote(cfg)
    ch, cp = rec3["metrics"]["challenger"], rec3["metrics"]["champion"]
    assert ch["test/recall_at_10"] == 0.0 and ch["test/scored_share"] < 1.0, ch
    assert cp["test/recall_at_10"] > 0.0, cp  # the trained champion hits at least one test user (fixed seeds)
    assert not rec3["promoted"] and reg.alias_version(client, name, "champion") == champion
    tags = client.get_model_version(name, "3").tags
    assert tags["gate.decision"] == "rejected" and "not_worse" in tags["gate.reason"]
    assert "NOT promoted" in client.get_model_version(name, "3").description

    # 5. rollback: only possible when there was an earlier champion; nothing is deleted
    if champion == "2":
        back = reg.rollback(cfg, stage_hook=hook)
        assert back["to"] == "1" and reg.alias_version(client, name, "champion") == "1"
        assert _zenml_stage(m1["zenml_run_id"]) == "production" and _zenml_stage(out["zenml_run_id"]) == "archived"
    else:
        with pytest.raises(reg.RegistryError, match="no previous champion"):
            reg.rollback(cfg)
    assert len(client.search_model_versions(f"name='{name}'")) == 3
    log = reg.read_log(cfg)
    assert sum(r["action"] == "register" for r in log) == 3 and any(r["action"] == "promote" and not r["promoted"] for r in log)


def test_artifact_root_is_local_only_for_local_stores(tmp_path):
    from sidrec.runtime import state_home
    from sidrec.ops.tracking import local_artifact_location

    for uri in (f"sqlite:///{tmp_path / 'm.db'}", f"file://{tmp_path / 'mlruns'}", str(tmp_path / "mlruns"),
                "postgresql://u@db/mlflow", "mysql+pymysql://u@db/mlflow"):  # this process writes the artifacts
        loc = local_artifact_location(uri, "sidrec-x")
        assert loc is not None and loc.startswith("file://") and loc.endswith("/mlartifacts/sidrec-x")
        assert loc.startswith(state_home().resolve().as_uri())
    # a tracking server keeps its own artifact store: no local path is forced on it
    for uri in ("http://mlflow.internal:5000", "https://mlflow.example.com", "databricks"):
        assert local_artifact_location(uri, "sidrec-x") is None
