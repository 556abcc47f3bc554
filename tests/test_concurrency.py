"""Two pipeline runs at the same time against the same local stores (one ZenML store, one
SIDREC_HOME, one MLflow sqlite file): both finish, both MLflow runs exist and are complete, and
the shared artifact store holds no pickle."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_two_concurrent_runs_share_the_stores(tmp_path, ml100k_dir):
    db = tmp_path / "mlflow.db"
    cfg = {
        "name": "concurrent", "seed": 0,
        "data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 20, "kcore": 3},
        "index": {"codebook_size": 4, "levels": 2, "kmeans_iters": 5},
        "model": {"backbone": "tiny", "dtype": "float32"},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 0, "threads": 1},
        "eval": {"beams": 5, "batch_size": 16, "ks": [1, 5]},
        "baselines": {"sasrec": {"enabled": False}},
        "tracking": {"tracking_uri": f"sqlite:///{db}", "experiment": "concurrent"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZENML_", "SIDREC_"))}
    env.update({"SIDREC_HOME": str(tmp_path / "home"), "ZENML_CONFIG_PATH": str(tmp_path / "zen"),
                "SIDREC_PROGRESS": "0", "OMP_NUM_THREADS": "1"})
    procs = []
    for i in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, "run.py", "train", "--config", str(tmp_path / "c.yaml"), "--run-name", f"concurrent-{i}",
             "--metrics-out", str(tmp_path / f"m{i}.json")],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(0.5)
    outs = [p.communicate(timeout=540) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, (out[-2000:], err[-4000:])
        # a clean console when piped: no colour codes, no third-party deprecation notices
        assert "\x1b[" not in out + err, [ln for ln in (out + err).splitlines() if "\x1b[" in ln][:3]
        assert "FutureWarning" not in err, [ln for ln in err.splitlines() if "FutureWarning" in ln][:3]
        assert "INFO mlflow" not in err, [ln for ln in err.splitlines() if "INFO mlflow" in ln][:3]

    metrics = [json.loads((tmp_path / f"m{i}.json").read_text()) for i in range(2)]
    assert metrics[0]["mlflow_run_id"] != metrics[1]["mlflow_run_id"]
    assert {m["zenml_run_name"] for m in metrics} == {"concurrent-0", "concurrent-1"}

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.run_id for r in runs} == {m["mlflow_run_id"] for m in metrics}
    for r in runs:
        assert r.info.status == "FINISHED"
        assert "test/recall_at_5" in r.data.metrics and r.data.tags.get("zenml_run_id")
        assert client.list_artifacts(r.info.run_id, "model")

    from test_security import _bad_files

    stores = [p for p in (tmp_path / "zen" / "local_stores").glob("*") if p.is_dir() and p.name != "default_zen_store"]
    assert stores and not [b for s in stores for b in _bad_files(s)]
