"""MLflow logging under concurrent runs: a dataset insert that loses a race is retried."""
from __future__ import annotations

import pytest


def test_logging_a_dataset_retries_a_concurrent_runs_insert(monkeypatch):
    """Two runs of one experiment logging identical rows at once can collide on MLflow's dataset key: the
    loser's log_input is retried (it then only links the dataset); anything else still fails."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from sidrec.ops import tracking

    calls = []

    def flaky(dataset, context=None):
        calls.append(context)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")

    monkeypatch.setattr(mlflow, "log_input", flaky)
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    tracking.log_input_retrying(object(), "training")
    assert calls == ["training", "training"]

    def always(dataset, context=None):
        raise MlflowException("still failing")

    monkeypatch.setattr(mlflow, "log_input", always)
    with pytest.raises(MlflowException, match="still failing"):
        tracking.log_input_retrying(object(), "evaluation", attempts=3)

    def other(dataset, context=None):
        raise ValueError("not a store error")

    monkeypatch.setattr(mlflow, "log_input", other)
    with pytest.raises(ValueError):
        tracking.log_input_retrying(object(), "evaluation")
