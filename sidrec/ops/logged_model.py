"""The recommender as an MLflow 3 LoggedModel: a pyfunc from code (``sidrec/ops/serving.py``) with the
SID index, item titles and the training data's profile as artifacts, a signature with the ``k``
parameter and an input example. Logged into the training run when it is logged
(:func:`sidrec.ops.tracking.log_training_run`), so an unregistered run shows its model on MLflow's
Logged Models page with its test metrics; registration registers that LoggedModel."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd

from sidrec.config import RunConfig

MODEL_ID_TAG = "sidrec.model_id"  # the training run's tag naming its LoggedModel


def data_profile(ds) -> dict:
    """A small summary of a dataset, stored with the model for the drift report."""
    counts = ds.interactions["item_id"].value_counts()
    text_cols = [c for c in ds.items.columns if c != "item_id"]
    has_text = ds.items[text_cols].astype(str).apply(lambda r: any(v.strip() for v in r), axis=1) if text_cols else pd.Series(False, index=ds.items.index)
    return {
        "name": ds.name, "fingerprint": ds.fingerprint(), "stats": ds.stats(),
        "users": sorted(ds.interactions["user_id"].unique().tolist()),
        "items": ds.items["item_id"].tolist(),
        "item_counts": {str(k): int(v) for k, v in counts.items()},
        "text_coverage": float(has_text.mean()) if len(has_text) else 0.0,
        "time_range": [int(ds.interactions["timestamp"].min()), int(ds.interactions["timestamp"].max())] if len(ds.interactions) else [0, 0],
    }


def pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("mlflow", "torch", "transformers", "peft", "safetensors", "pandas", "pyarrow", "numpy", "pyyaml"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def serving_signature(default_k: int = 10):
    """The pyfunc's MLflow signature: input rows ``history`` (comma-separated item ids), an optional
    per-row ``k`` and an optional ``user_id`` (a dual index's user SID heads the prompt); the inference
    parameter ``k`` (default ``default_k``) for the whole request, which ``mlflow models serve`` and
    ``pyfunc.predict(..., params={"k": 5})`` pass only when declared here; one output row per recommended item."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "history"), ColSpec("long", "k", required=False),
                       ColSpec("string", "user_id", required=False)]),
        outputs=Schema([ColSpec("long", "request"), ColSpec("long", "rank"), ColSpec("string", "item_id"),
                        ColSpec("string", "title"), ColSpec("double", "score")]),
        params=ParamSchema([ParamSpec("k", "long", int(default_k))]),
    )


def log_recommender(cfg: RunConfig, recommender_dir, bundle, dataset):
    """Log the pyfunc into the active MLflow run as the LoggedModel ``recommender`` (not ``model``: a run's
    ``runs:/<id>/model`` would then resolve to the LoggedModel instead of the run's ``model/`` folder of
    adapter + SID rows); returns mlflow's ModelInfo (``model_id``, ``model_uri``)."""
    import mlflow

    from sidrec.ops.serving import SERVING_FILE
    from sidrec.stages import prompt_format

    with tempfile.TemporaryDirectory(prefix="sidrec-model-") as tmp:
        tmp = Path(tmp)
        bundle.save(tmp / "index")
        items = dataset.items[["item_id"]].copy()
        items["title"] = dataset.items["title"] if "title" in dataset.items.columns else ""
        items.to_csv(tmp / "items.csv", index=False)
        (tmp / "data_profile.json").write_text(json.dumps(data_profile(dataset)))
        artifacts = {"recommender": str(recommender_dir), "index": str(tmp / "index"), "items": str(tmp / "items.csv"),
                     "data_profile": str(tmp / "data_profile.json")}
        model_config = {"backbone": cfg.model.backbone, "beams": cfg.eval.beams, "prompt_history": cfg.tasks.prompt_history,
                        "prompt_format": prompt_format(cfg).to_json(),
                        "dtype": cfg.model.dtype, "k": 10, "exclude_history": cfg.eval.exclude_history}
        example_history = ",".join(str(i) for i in dataset.items["item_id"].head(3))
        return mlflow.pyfunc.log_model(name="recommender", python_model=str(SERVING_FILE), artifacts=artifacts,
                                       model_config=model_config, pip_requirements=pip_requirements(),
                                       signature=serving_signature(model_config["k"]),
                                       input_example=(pd.DataFrame({"history": [example_history]}), {"k": 5}))
