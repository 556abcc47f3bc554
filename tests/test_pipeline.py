"""The ZenML pipeline end to end on a slice of MovieLens-100k with the tiny random Llama,
under the temporary ZenML store (conftest) and a temporary MLflow store."""
from __future__ import annotations

from pathlib import Path

import pytest

from sidrec.config import parse_config

pytestmark = pytest.mark.slow


def _config(tmp: Path, ml100k_dir: Path, **over) -> dict:
    cfg = {
        "name": "pipeline-test",
        "seed": 0,
        "data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 50, "kcore": 3},
        "index": {"codebook_size": 8, "levels": 2, "kmeans_iters": 10},
        "model": {"backbone": "tiny", "dtype": "float32"},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1},
        "eval": {"beams": 10, "batch_size": 16, "ks": [1, 5, 10]},
        "baselines": {"sasrec": {"max_epochs": 2, "patience": 1}},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "pipeline-test"},
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ml100k_dir):
    import yaml

    from pipelines.cli import run_training

    tmp = tmp_path_factory.mktemp("pipe")
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp, ml100k_dir)))
    metrics = run_training(str(cfg_path), str(tmp / "metrics.json"))
    return tmp, cfg_path, metrics


def test_pipeline_metrics_and_guarantees(first_run):
    tmp, _, m = first_run
    for k in (1, 5, 10):
        assert 0.0 <= m[f"test/recall_at_{k}"] <= 1.0
        assert f"baseline/sasrec/test/recall_at_{k}" in m and f"baseline/popularity/test/recall_at_{k}" in m
    assert m["test/invalid_rate"] == 0.0 and m["valid/invalid_rate"] == 0.0
    assert m["index/collisions"] == 0 and 0.0 <= m["index/collision_rate_raw"] <= 1.0
    assert m["test/users"] == 50  # every test user of the slice
    assert (tmp / "metrics.json").is_file()


def test_mlflow_run_has_artifacts_and_points_to_zenml(first_run):
    import mlflow
    from mlflow import MlflowClient

    tmp, _, m = first_run
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    client = MlflowClient()
    run = client.get_run(m["mlflow_run_id"])
    assert run.data.tags["index_mode"] == "static"
    assert run.data.tags["zenml_run_id"] == m["zenml_run_id"]
    for t in ("quantizer", "backbone", "dataset_hash", "git_commit"):
        assert run.data.tags[t]
    assert run.data.params["index.levels"] == "2"
    for key in ("test/recall_at_10", "test/ndcg_at_10", "test/invalid_rate", "valid/recall_at_10",
                "index/collision_rate_raw", "index/collisions", "index/utilization_level_0",
                "baseline/sasrec/test/recall_at_10", "train/loss"):
        assert key in run.data.metrics, key

    def walk(path=""):
        out = []
        for f in client.list_artifacts(run.info.run_id, path):
            out.extend(walk(f.path) if f.is_dir else [f.path])
        return out

    files = set(walk())
    for needed in ("data_quality/data_quality.html", "data_quality/data_docs/index.html", "index/item_sids.csv",
                   "index/code_usage.png", "model/adapter/adapter_model.safetensors", "model/sid_embeddings.safetensors",
                   "evaluation/predictions.parquet", "plots/train_loss.png", "plots/llm_vs_baselines.png",
                   "evaluation/lift_vs_baselines.json"):
        assert needed in files, needed
    # the servable model is a LoggedModel of this (unregistered) run, with the test metrics linked to it,
    # and the splits it was trained and scored on are the run's datasets
    from sidrec.ops.logged_model import MODEL_ID_TAG

    logged = client.get_logged_model(run.data.tags[MODEL_ID_TAG])
    assert logged.source_run_id == run.info.run_id and logged.name == "recommender"
    linked = {x.key: x.value for x in logged.metrics or []}
    assert linked["test/recall_at_10"] == pytest.approx(m["test/recall_at_10"]) and "valid/ndcg_at_10" in linked
    assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {f"{run.data.tags['dataset']}-{s}" for s in ("train", "valid", "test")}
    assert not client.search_registered_models(), "logging a run registers nothing"
    # and ZenML points back at MLflow
    from zenml.client import Client

    zrun = Client().get_pipeline_run(m["zenml_run_id"])
    meta = zrun.steps["log_to_mlflow"].run_metadata
    assert meta["mlflow_run_id"] == m["mlflow_run_id"]


def test_the_stacks_mlflow_tracker_logs_finetune_live_into_the_same_run(first_run):
    """The default stack gets sidrec's MLflow experiment tracker on the config's store (for this process
    only); finetune and log_to_mlflow run with it, so the loss curve and system metrics arrive during
    fine-tuning, in the one MLflow run that ZenML links, in the config's experiment."""
    import os
    import subprocess
    import sys

    import mlflow
    from mlflow import MlflowClient
    from zenml.client import Client

    from pipelines.stack import _store_hash
    from sidrec.runtime import state_home

    tmp, _, m = first_run
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    zrun = Client().get_pipeline_run(m["zenml_run_id"])
    tracker = f"sidrec-mlflow-{_store_hash(uri)}"
    for name in ("finetune", "log_to_mlflow"):
        assert zrun.steps[name].config.experiment_tracker == tracker, name
        assert zrun.steps[name].run_metadata["mlflow_run_id"] == m["mlflow_run_id"], name  # the dashboard's link
    assert zrun.stack.name == f"sidrec-local-{_store_hash(uri)}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    run = client.get_run(m["mlflow_run_id"])
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "pipeline-test" and exp.artifact_location.startswith((state_home() / "mlartifacts").resolve().as_uri())
    steps = [x.step for x in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps and len(steps) == len(set(steps)), "each loss point once (logged live, not again at the end)"
    assert "train/lr" in run.data.metrics  # only the live callback logs the learning rate
    assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    # the user's own ZenML configuration still has its active stack: the tracker stack was this process's
    env = {k: v for k, v in os.environ.items() if k != "ZENML_ACTIVE_STACK_ID"}
    out = subprocess.run([sys.executable, "-c", "from zenml.client import Client; print(Client().active_stack_model.name)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "default"


def test_rerun_reuses_cache(first_run):
    from zenml.client import Client

    from pipelines.cli import run_training

    tmp, cfg_path, m1 = first_run
    m2 = run_training(str(cfg_path), None)
    zrun = Client().get_pipeline_run(m2["zenml_run_id"])
    statuses = {name: str(s.status) for name, s in zrun.steps.items()}
    cached = [n for n, s in statuses.items() if "cached" in s.lower()]
    # ingest always re-reads the data; unchanged data (same fingerprint) keeps everything after it cached
    assert "ingest" not in cached, statuses
    assert {"text_features", "sid_quantization", "finetune", "evaluate"} <= set(cached), statuses
    assert m2["test/recall_at_10"] == m1["test/recall_at_10"]
    assert m2["mlflow_run_id"] != m1["mlflow_run_id"]


def test_steps_callable_through_entrypoint(ml100k_dir, tmp_path):
    from steps import ingest, sid_quantization
    from sidrec.artifacts import EntityFeatures
    import numpy as np

    cfg = _config(tmp_path, ml100k_dir)
    ds = ingest.entrypoint(config={"data": cfg["data"]})
    assert ds.stats()["n_users"] == 50
    rng = np.random.default_rng(0)
    feats = EntityFeatures(item_ids=ds.items["item_id"].tolist(), item_texts=[""] * len(ds.items),
                           item_embeddings=rng.normal(size=(len(ds.items), 16)).astype("float32"))
    bundle = sid_quantization.entrypoint(features=feats, config={"index": cfg["index"], "seed": 0})
    codes = bundle.items.codes
    assert len({tuple(c) for c in codes.tolist()}) == len(codes)


def test_failed_validation_stops_before_training(tmp_path):
    import subprocess
    import sys

    import yaml

    inter = tmp_path / "inter.csv"
    rows = ["user_id,item_id,timestamp"] + [f"u{u},i{i},{u * 100 + i}" for u in range(6) for i in range(6)]
    inter.write_text("\n".join(rows) + "\n")
    items = tmp_path / "items.csv"  # i5 is missing from the items table
    items.write_text("item_id,title\n" + "".join(f"i{i},Item {i}\n" for i in range(5)))
    cfg = {"data": {"format": "table", "path": str(inter), "items_path": str(items), "kcore": 3},
           "index": {"codebook_size": "auto"},  # 256 codes for 6 items is refused before the run
           "model": {"backbone": "tiny"}, "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "run.py", "train", "--config", str(tmp_path / "c.yaml")], cwd=repo,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    err = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "data validation failed" in err[0] and "item_id" in err[0]


def test_dynamic_dual_pipeline_logs_its_refreshes(tmp_path, ml100k_dir):
    """index.mode dynamic through ZenML: the dynamic_finetune step replaces quantization, instructions and
    fine-tuning; the MLflow run has the final user and item SIDs, per-refresh metrics and the refresh plot."""
    import mlflow
    import yaml
    from mlflow import MlflowClient

    from pipelines.cli import run_training

    cfg = _config(tmp_path, ml100k_dir, name="pipeline-dynamic",
                  index={"mode": "dynamic", "entities": "items+users", "codebook_size": 8, "levels": 2, "kmeans_iters": 5,
                         "dynamic": {"cycles": 1, "tokenizer_share": 0.25, "final_share": 0.25, "hidden_dim": 8}},
                  tasks={"user_pred": 0.3, "text_to_user": 0.1})
    cfg["train"]["steps"] = 8
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    m = run_training(str(tmp_path / "cfg.yaml"), None)
    assert m["test/invalid_rate"] == 0.0 and m["index/collisions"] == 0 and m["index/users/collisions"] == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    run = client.get_run(m["mlflow_run_id"])
    assert run.data.tags["index_mode"] == "dynamic"
    # one refresh, at the end of the tokenizer phase (8 recommender steps: rec 0-6, tok 6-8, final 8-10)
    assert [h.step for h in client.get_metric_history(run.info.run_id, "index/churn_items")] == [8]
    files = {f.path for f in client.list_artifacts(run.info.run_id, "index")}
    assert {"index/refreshes.png", "index/user_sids.csv", "index/item_sids.csv"} <= files
