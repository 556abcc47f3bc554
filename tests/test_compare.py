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
    from sidrec.ops.compare import compare

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


def test_compare_plots_runs_over_time_with_the_champion_history(store):
    """Every run by date per index mode, and the registry's promotions/rollbacks (its decision log,
    written by the registry's own logger) marked on the plot and listed in the report."""
    from sidrec import registry
    from sidrec.ops.compare import compare, decision_events
    from sidrec.config import parse_config

    uri, tmp = store
    cfg = parse_config({"tracking": {"tracking_uri": uri}, "registry": {"model_name": "sidrec-toy"}})
    registry._append_log(cfg, {"action": "promote", "model": "sidrec-toy", "challenger": "1", "champion": None, "promoted": True})
    registry._append_log(cfg, {"action": "promote", "model": "sidrec-toy", "challenger": "2", "champion": "1", "promoted": False})
    registry._append_log(cfg, {"action": "promote", "model": "sidrec-toy", "challenger": "3", "champion": "1", "promoted": True})
    registry._append_log(cfg, {"action": "rollback", "model": "sidrec-toy", "from": "3", "to": "1", "promoted": False})
    events = decision_events([registry.decision_log_path(cfg)])
    assert list(events["event"]) == ["promoted", "promoted", "rollback"] and list(events["version"]) == ["1", "3", "1"]
    paths = compare("sidrec-toy", tmp / "out3", uri)  # finds the decision log next to the sqlite store
    md = paths["md"].read_text()
    assert "sidrec-toy promoted v3" in md and "sidrec-toy rollback v1" in md and "promoted v2" not in md
    assert paths["over_time"].stat().st_size > 5000 and "comparison_over_time.png" in paths["html"].read_text()
