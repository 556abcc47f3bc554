"""Operations steps (retraining, registry, promotion) and the glue that reads a finished training
run's artifacts back from ZenML. The logic lives in ``sidrec.ops.registry`` / ``sidrec.ops.drift``."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Optional

from zenml import get_step_context, step
from zenml.config.cache_policy import CachePolicy
from zenml.types import HTMLString

import sidrec.artifacts
import sidrec.index.quantize
import sidrec.model.sid_model
import sidrec.ops.drift
import sidrec.ops.registry
import sidrec.runtime
import sidrec.stages
import sidrec.training.loop
from materializers import IndexBundleMaterializer, TrainedRecommenderMaterializer
from sidrec.artifacts import IndexBundle, InstructionSet, TrainedRecommender
from sidrec.config import RunConfig
from sidrec.data.dataset import Dataset
from sidrec.data.validation import QualityReport


from steps.training import _cfg, _meta  # noqa: E402  (one definition of the config/metadata helpers)


# ------------------------------------------------------------------ glue: a finished training run
def training_run_artifacts(run_name_or_id: Optional[str] = None, pipeline_name: str = "training_pipeline") -> dict:
    """dataset, quality report, SID index, recommender and MLflow run id of a finished ZenML run
    (default: the newest completed run of ``pipeline_name``)."""
    from zenml.client import Client

    from sidrec.errors import SidrecError

    client = Client()
    if run_name_or_id:
        run = client.get_pipeline_run(run_name_or_id)
    else:
        runs = client.list_pipeline_runs(sort_by="desc:created", size=50)
        runs = [r for r in runs.items if r.pipeline and r.pipeline.name == pipeline_name and str(r.status).endswith("completed")]
        if not runs:
            raise SidrecError(f"no completed {pipeline_name} run in the ZenML store: run `run.py train --config ...` first")
        run = runs[0]
    steps = run.steps

    def out(name: str, *producers: str):
        """The artifact ``name`` from the first of ``producers`` present in this run: static training
        (sid_quantization, finetune), dynamic training (dynamic_finetune) and retraining (extend_index,
        warm_finetune) produce the same artifacts from different steps."""
        step = next((p for p in producers if p in steps), None)
        if step is None:
            raise SidrecError(f"ZenML run {run.name}: no step among {', '.join(producers)} produced '{name}'; "
                              "pass a training or retraining run")
        return steps[step].outputs[name][0].load()

    metrics = out("metrics", "log_to_mlflow")
    return {"dataset": out("dataset", "ingest"), "quality": out("quality_report", "validate_data"),
            "bundle": out("sid_index", "sid_quantization", "dynamic_finetune", "extend_index"),
            "recommender": out("recommender", "finetune", "dynamic_finetune", "warm_finetune"),
            "mlflow_run_id": metrics["mlflow_run_id"], "zenml_run_id": str(run.id)}


def _set_zenml_stage(zenml_run_id: str, stage: str) -> str:
    """Move the ZenML model version of a run to ``stage`` (the version holding it before drops back to
    ``archived``, ZenML's ``force``). Returns ``<model>:<version> -> <stage>``."""
    from zenml.client import Client
    from zenml.enums import ModelStages

    mv = Client().get_pipeline_run(zenml_run_id).model_version
    if mv is None:
        return "the run has no ZenML model version"
    mv.set_stage(ModelStages(stage), force=True)
    return f"{mv.model.name}:{mv.name} -> {stage}"


def zenml_production_stage(zenml_run_id: str) -> str:
    """The champion's training/retraining run: its ZenML model version to stage ``production``."""
    return _set_zenml_stage(zenml_run_id, "production")


def zenml_staging_stage(zenml_run_id: str) -> str:
    """A run whose model was just registered as the MLflow ``challenger``: its ZenML model version to ``staging``."""
    return _set_zenml_stage(zenml_run_id, "staging")


def register_training_run(cfg: RunConfig, run_name_or_id: Optional[str] = None, pipeline_name: str = "training_pipeline") -> str:
    a = training_run_artifacts(run_name_or_id, pipeline_name)
    version = sidrec.ops.registry.register_model(cfg, run_id=a["mlflow_run_id"], recommender_dir=Path(a["recommender"].path),
                                             bundle=a["bundle"], dataset=a["dataset"], quality_passed=bool(a["quality"].success))
    zenml_staging_stage(a["zenml_run_id"])  # the ZenML model version follows the MLflow alias
    return version


# ------------------------------------------------------------------ retraining steps
def _deps(*modules) -> CachePolicy:
    return CachePolicy(source_dependencies=[sidrec.stages, sidrec.runtime, sidrec.artifacts, *modules])


@step(enable_cache=False)
def drift_report(dataset: Dataset, quality_passed: bool, config: dict) -> tuple[
        Annotated[HTMLString, "drift_report"], Annotated[dict, "drift_summary"]]:
    """Newest data vs the champion's training data (its stored profile); also logged to MLflow."""
    cfg = _cfg(config)
    champion = sidrec.ops.drift.champion_profile(cfg)
    summary = sidrec.ops.drift.compare(champion, sidrec.ops.registry.data_profile(dataset))
    html = sidrec.ops.drift.report_html(summary)
    sidrec.ops.drift.log_report(cfg, html, summary)
    _meta(drift={k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
    return HTMLString(html), summary


@step(output_materializers=IndexBundleMaterializer, enable_cache=False)
def extend_index(features: sidrec.artifacts.EntityFeatures, config: dict) -> Annotated[IndexBundle, "sid_index"]:
    """Keep the champion's SIDs, give new items SIDs with its saved quantizer (no re-fit); fresh index
    when there is no champion or ``retrain.reuse_index`` is off."""
    cfg = _cfg(config)
    bundle, info = sidrec.ops.drift.index_for_retrain(cfg, features)
    _meta(index_source=info)
    return bundle


@step(output_materializers=TrainedRecommenderMaterializer, enable_cache=False)
def warm_finetune(dataset: Dataset, features: sidrec.artifacts.EntityFeatures, instructions: InstructionSet,
                  sid_index: IndexBundle, config: dict) -> Annotated[TrainedRecommender, "recommender"]:
    cfg = _cfg(config)
    from sidrec.ops.tracking import live_training

    out = Path(tempfile.mkdtemp(prefix="sidrec-model-")) / "recommender"
    with live_training() as log:  # with the stack's experiment tracker: live loss curve and system metrics in MLflow
        rec = sidrec.ops.drift.warm_finetune(instructions, sid_index, cfg, out, log=log, ds=dataset, features=features)
    _meta(train=rec.meta["train"], warm_start=rec.meta.get("warm_start", {}))
    return rec


@step(enable_cache=False)
def register_challenger(dataset: Dataset, quality: QualityReport, sid_index: IndexBundle, recommender: TrainedRecommender,
                        metrics: dict, config: dict) -> Annotated[str, "challenger_version"]:
    cfg = _cfg(config)
    v = sidrec.ops.registry.register_model(cfg, run_id=metrics["mlflow_run_id"], recommender_dir=Path(recommender.path),
                                       bundle=sid_index, dataset=dataset, quality_passed=bool(quality.success),
                                       extra_tags={"warm_start": recommender.meta.get("warm_start", {}).get("from_version", "")})
    _meta(registered={"model": sidrec.ops.registry.model_name(cfg), "version": v})
    try:
        zenml_staging_stage(str(get_step_context().pipeline_run.id))  # ZenML's stage follows the challenger alias
    except RuntimeError:  # called through .entrypoint, outside a pipeline run
        pass
    return v


@step(enable_cache=False)
def promotion_gate(challenger_version: str, config: dict) -> Annotated[dict, "decision"]:
    cfg = _cfg(config)
    rec = sidrec.ops.registry.promote(cfg, version=challenger_version, stage_hook=zenml_production_stage)
    _meta(decision={"promoted": rec["promoted"], "reason": rec["reason"][:500], "challenger": challenger_version})
    return {k: v for k, v in rec.items() if k in ("promoted", "reason", "challenger", "champion", "new_champion", "decision_log")}
