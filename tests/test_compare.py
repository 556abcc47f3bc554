"""`run.py compare`: reads MLflow runs and writes md/html/png, logged as a comparison run."""
from __future__ import annotations

import mlflow
import pytest


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("sidrec-toy", artifact_location=(tmp_path / "art").as_uri())
    for name, mode, r10 in (("static-a", "static", 0.05), ("dyn-b", "dynamic", 0.07), ("static-a", "static", 0.06)):
        with mlflow.start_run(experiment_id=exp, tags={"config_name": name, "index_mode": mode, "quantizer": "rq_kmeans",
                                                       "index_entities": "items"}):
            mlflow.log_metrics({"test/recall_at_10": r10, "test/ndcg_at_10": r10 / 2, "test/recall_at_5": r10 / 2,
                                "test/ndcg_at_5": r10 / 3, "baseline/sasrec/test/recall_at_10": 0.1,
                                "baseline/popularity/test/recall_at_10": 0.03})
    return uri, tmp_path


def test_compare_writes_report_and_logs_it(store):
    from sidrec.compare import compare

    uri, tmp = store
    paths = compare("sidrec-toy", tmp / "out", uri)
    md = paths["md"].read_text()
    assert "| sidrec-toy | dyn-b | dynamic |" in md and "0.0700" in md
    assert "0.0600" in md and "0.0500" not in md  # the latest run of each config
    assert paths["png"].stat().st_size > 1000 and "<table" in paths["html"].read_text()
    runs = mlflow.search_runs(experiment_names=["sidrec-toy"], filter_string="tags.kind = 'comparison'")
    assert len(runs) == 1
    # a second comparison ignores the comparison run itself
    paths = compare("sidrec-toy", tmp / "out2", uri)
    assert "3 finished runs" in paths["md"].read_text()
