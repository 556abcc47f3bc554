"""The training pipeline's steps. Each parses only the config sections it uses (so its cache key
changes only when they change) and declares the `sidrec` modules whose source it depends on."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Tuple

from zenml import get_step_context, log_metadata, step
from zenml.config.cache_policy import CachePolicy

import sidrec.artifacts
import sidrec.data.dataset
import sidrec.data.profile
import sidrec.data.tasks
import sidrec.data.text
import sidrec.data.validation
import sidrec.evaluation.baselines
import sidrec.evaluation.evaluate
import sidrec.evaluation.metrics
import sidrec.index.collab
import sidrec.index.collisions
import sidrec.index.dynamic
import sidrec.index.keywords
import sidrec.index.kmeans
import sidrec.index.quantize
import sidrec.index.sid_index
import sidrec.model.decode
import sidrec.model.sid_init
import sidrec.model.sid_model
import sidrec.runtime
import sidrec.stages
import sidrec.training.loop
from materializers import (
    DatasetMaterializer,
    EntityFeaturesMaterializer,
    EvalReportMaterializer,
    IndexBundleMaterializer,
    InstructionSetMaterializer,
    QualityReportMaterializer,
    TrainedRecommenderMaterializer,
)
from sidrec.artifacts import EntityFeatures, EvalReport, IndexBundle, InstructionSet, TrainedRecommender
from sidrec.config import RunConfig
from sidrec.data.dataset import Dataset
from sidrec.data.validation import QualityReport


def _meta(**metadata) -> None:
    """Attach metadata to the running step (a no-op when a step is called via ``.entrypoint``)."""
    try:
        get_step_context()
    except RuntimeError:
        return
    log_metadata(metadata=metadata)


def _cfg(config: dict) -> RunConfig:
    return RunConfig.model_validate(config)


def _deps(*modules) -> CachePolicy:
    return CachePolicy(source_dependencies=[sidrec.stages, sidrec.runtime, sidrec.artifacts, *modules])


@step(output_materializers=DatasetMaterializer, enable_cache=False)
def ingest(config: dict) -> Annotated[Dataset, "dataset"]:
    """Never cached: every run -- also every run of a built pipeline on a ZenML ``Schedule`` -- reads the
    data as it is *now*. The steps below stay cached while the data is unchanged: their cache keys
    take the dataset's content hash (``DatasetMaterializer.compute_content_hash``, the fingerprint)."""
    cfg = _cfg(config)
    ds = sidrec.stages.ingest(cfg)
    _meta(**{"dataset": ds.stats(), "source_digest": sidrec.data.dataset.source_digest(cfg.data), "fingerprint": ds.fingerprint()})
    return ds


@step(output_materializers=QualityReportMaterializer, cache_policy=_deps(sidrec.data.validation, sidrec.data.profile))
def validate_data(dataset: Dataset, config: dict) -> Annotated[QualityReport, "quality_report"]:
    report = sidrec.stages.validate(dataset, _cfg(config))  # GE file Data Context in the state folder
    _meta(**{"data_quality": {"success": bool(report.success), "summary": report.summary()}})
    return report


@step(cache_policy=_deps(sidrec.data.validation))
def quality_gate(report: QualityReport) -> Annotated[bool, "quality_passed"]:
    """Stops the run before any training when a critical expectation failed."""
    from sidrec.data.validation import raise_on_failure

    raise_on_failure(report)
    return True


@step(output_materializers=EntityFeaturesMaterializer, cache_policy=_deps(sidrec.data.text, sidrec.model.sid_model, sidrec.index.collab))
def text_features(dataset: Dataset, quality_passed: bool, config: dict) -> Annotated[EntityFeatures, "features"]:
    return sidrec.stages.featurize(dataset, _cfg(config))


@step(output_materializers=IndexBundleMaterializer, cache_policy=_deps(sidrec.index.quantize, sidrec.index.kmeans, sidrec.index.collisions, sidrec.index.sid_index, sidrec.index.collab))
def sid_quantization(features: EntityFeatures, config: dict) -> Annotated[IndexBundle, "sid_index"]:
    bundle = sidrec.stages.build_index(features, _cfg(config))
    _meta(**{"index": {k.replace("/", "_"): v for k, v in bundle.report.items()}})
    return bundle


@step(output_materializers=InstructionSetMaterializer, cache_policy=_deps(sidrec.data.tasks, sidrec.data.text))
def instruction_dataset(dataset: Dataset, sid_index: IndexBundle, config: dict) -> Annotated[InstructionSet, "instructions"]:
    return sidrec.stages.instruct(dataset, sid_index, _cfg(config))


@step(output_materializers=TrainedRecommenderMaterializer,
      cache_policy=_deps(sidrec.training.loop, sidrec.model.sid_model, sidrec.index.keywords, sidrec.model.sid_init, sidrec.evaluation.evaluate, sidrec.model.decode))
def finetune(dataset: Dataset, features: EntityFeatures, instructions: InstructionSet, sid_index: IndexBundle,
             config: dict) -> Annotated[TrainedRecommender, "recommender"]:
    from sidrec.ops.tracking import live_training

    out = Path(tempfile.mkdtemp(prefix="sidrec-model-")) / "recommender"
    with live_training() as log:  # with the stack's experiment tracker: live loss curve and system metrics in MLflow
        rec = sidrec.stages.finetune(instructions, sid_index, _cfg(config), out, ds=dataset, log=log, features=features)
    _meta(**{"train": rec.meta["train"]})
    return rec


@step(output_materializers={"recommender": TrainedRecommenderMaterializer, "sid_index": IndexBundleMaterializer,
                            "instructions": InstructionSetMaterializer},
      cache_policy=_deps(sidrec.index.dynamic, sidrec.training.loop, sidrec.model.sid_model, sidrec.data.tasks, sidrec.index.quantize, sidrec.index.kmeans,
                         sidrec.index.collisions, sidrec.index.collab,
                         sidrec.index.keywords, sidrec.model.sid_init, sidrec.evaluation.evaluate, sidrec.model.decode))
def dynamic_finetune(dataset: Dataset, features: EntityFeatures, config: dict) -> Tuple[
        Annotated[TrainedRecommender, "recommender"], Annotated[IndexBundle, "sid_index"],
        Annotated[InstructionSet, "instructions"]]:
    """Dynamic index: starts as the static index, learned in alternating phases with LoRA; emits the final
    (frozen) index with the adapter and the instruction set rendered on it."""
    from sidrec.ops.tracking import live_training

    out = Path(tempfile.mkdtemp(prefix="sidrec-model-")) / "recommender"
    with live_training() as log:
        rec, bundle, instr = sidrec.stages.dynamic_finetune(dataset, features, _cfg(config), out, log=log)
    _meta(**{"train": rec.meta["train"], "index": {k.replace("/", "_"): v for k, v in bundle.report.items()}})
    return rec, bundle, instr


@step(output_materializers=EvalReportMaterializer,
      cache_policy=_deps(sidrec.evaluation.evaluate, sidrec.model.decode, sidrec.evaluation.metrics, sidrec.model.sid_model))
def evaluate(recommender: TrainedRecommender, instructions: InstructionSet, sid_index: IndexBundle,
             config: dict) -> Annotated[EvalReport, "eval_report"]:
    return sidrec.stages.evaluate(recommender, instructions, sid_index, _cfg(config))


@step(cache_policy=_deps(sidrec.evaluation.evaluate, sidrec.evaluation.baselines, sidrec.evaluation.metrics))
def baselines(dataset: Dataset, config: dict) -> Annotated[dict, "baseline_metrics"]:
    return sidrec.stages.baselines(dataset, _cfg(config))


@step(enable_cache=False)
def log_to_mlflow(dataset: Dataset, quality: QualityReport, sid_index: IndexBundle, instructions: InstructionSet,
                  recommender: TrainedRecommender, eval_report: EvalReport, baseline_metrics: dict,
                  config: dict) -> Annotated[dict, "metrics"]:
    """One MLflow run per pipeline run (never cached, so cached re-runs are still fully logged)."""
    from sidrec.ops.tracking import log_training_run

    ctx = get_step_context()
    run_id, metrics = log_training_run(
        _cfg(config), dataset=dataset, quality=quality, bundle=sid_index, instructions=instructions,
        recommender=recommender, report=eval_report, baseline_metrics=baseline_metrics,
        zenml_run_id=str(ctx.pipeline_run.id), zenml_run_name=ctx.pipeline_run.name,
    )
    _meta(**{"mlflow_run_id": run_id})
    metrics["mlflow_run_id"] = run_id
    return metrics
