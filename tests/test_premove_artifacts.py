"""What sidrec saved before the house move (commit 3e06108: flat modules -> subpackages) still loads.

``tests/fixtures/premove/`` was written by the pre-move source tree (``make_premove_fixture.py`` there says
how): ZenML artifacts as the materializers wrote them, with the ``data_type`` / ``materializer`` import
paths ZenML recorded (``sidrec.data.Dataset``, ``sidrec.validation.QualityReport``, ...), and a registered
pyfunc whose ``serving.py`` imports the pre-move ``sidrec.serving``. Today's code must resolve those paths,
load the artifacts to the same content, and serve the model with the same recommendations.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "premove"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


def _load_artifact(name: str, tmp_path: Path):
    """Load a fixture artifact the way ZenML does: import the recorded data type and materializer by
    their stored source paths, then ``materializer(uri).load(data_type)`` (on a copy: loading must not
    need to write into the artifact store, and the fixture stays untouched)."""
    from zenml.utils import source_utils

    sources = json.loads((FIXTURE / "artifacts" / "sources.json").read_text())[name]
    data_type = source_utils.load(sources["data_type"])
    materializer = source_utils.load(sources["materializer"])
    uri = tmp_path / name
    shutil.copytree(FIXTURE / "artifacts" / name, uri)
    return data_type, materializer(str(uri)).load(data_type)


def test_premove_dataset_artifact_loads_with_the_same_content(tmp_path):
    from sidrec.data.dataset import Dataset

    data_type, ds = _load_artifact("dataset", tmp_path)
    assert data_type is Dataset and isinstance(ds, Dataset)
    assert len(ds.items) == EXPECTED["n_items"]
    assert ds.fingerprint() == EXPECTED["fingerprint"]  # same content, same canonical hash


def test_premove_quality_report_and_index_artifacts_load(tmp_path):
    from sidrec.artifacts import IndexBundle
    from sidrec.data.validation import QualityReport

    data_type, report = _load_artifact("quality_report", tmp_path)
    assert data_type is QualityReport and isinstance(report, QualityReport)
    assert report.success is EXPECTED["quality_success"]
    data_type, bundle = _load_artifact("index", tmp_path)
    assert data_type is IndexBundle
    assert {i: bundle.items.sid_of(i) for i in EXPECTED["item_sids"]} == EXPECTED["item_sids"]
    _, feats = _load_artifact("features", tmp_path)
    assert feats.item_embeddings.shape[0] == EXPECTED["n_items"]


def test_premove_registered_model_serves_the_same_recommendations(tmp_path):
    import mlflow

    model = tmp_path / "model"
    shutil.copytree(FIXTURE / "model", model)
    assert "from sidrec.serving import" in (model / "serving.py").read_text()  # the pre-move import path
    # (MLflow warns that the pre-move pyfunc's predict has no type hints: that is how it was saved)
    pf = mlflow.pyfunc.load_model(str(model))
    recs = pf.predict(pd.DataFrame({"history": [",".join(EXPECTED["history"])]}), params={"k": 5})
    assert recs["item_id"].astype(str).tolist() == EXPECTED["recommended"]


@pytest.mark.parametrize("old", ["sidrec.serving", "sidrec.validation", "sidrec.train", "sidrec.registry"])
def test_premove_module_paths_are_the_new_modules(old):
    import importlib

    from sidrec import MOVED

    assert importlib.import_module(old) is importlib.import_module(f"sidrec.{MOVED[old.split('.', 1)[1]]}")
