"""MLflow logging: one experiment per dataset, one run per pipeline run.

Logging happens in one place, after evaluation, from the artifacts themselves, so a re-run whose
steps all come from ZenML's cache still produces a complete MLflow run.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from sidrec.config import REPO_ROOT, RunConfig
from sidrec.runtime import state_home



def tracking_uri(cfg: Optional[RunConfig] = None) -> str:
    if cfg is not None and cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(state_home() / 'mlflow.db').resolve()}"


def experiment_name(cfg: RunConfig) -> str:
    return cfg.tracking.experiment or f"sidrec-{cfg.data.dataset_name}"


def setup_mlflow(cfg: RunConfig):
    """Point MLflow at the configured store and return the experiment id (created with a fixed artifact root)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = experiment_name(cfg)
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = local_artifact_location(uri, name)
        try:
            return mlflow.create_experiment(name, artifact_location=location)
        except Exception:  # created concurrently by another run
            exp = mlflow.get_experiment_by_name(name)
    return exp.experiment_id


def local_artifact_location(uri: str, experiment: str) -> Optional[str]:
    """The artifact root for a new experiment: a folder in the state directory for a store this process
    writes itself (sqlite, file, or a database URI such as postgresql://), so runs never write into the
    working directory; ``None`` for a tracking server (http(s), databricks), whose own artifact store
    (``--artifacts-destination`` / ``--default-artifact-root``) must be used -- a local path there would
    make every pod write to its own disk."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in ("http", "https") or uri.split(":")[0] in ("databricks", "databricks-uc", "uc"):
        return None  # a tracking server (or Databricks) owns its artifact store
    root = state_home() / "mlartifacts" / experiment
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve().as_uri()


def tracker_run(cfg: RunConfig):
    """The MLflow run an orchestrator's experiment tracker started for this step (ZenML's MLflow tracker
    starts one per pipeline run, before the step), or ``None`` when there is none. It must be in the
    config's store and experiment: logging elsewhere would split one pipeline run across two places."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return None
    active_uri, exp = mlflow.get_tracking_uri(), mlflow.get_experiment(run.info.experiment_id)
    if active_uri != tracking_uri(cfg) or exp.name != experiment_name(cfg):
        from sidrec.errors import ConfigError

        raise ConfigError(f"the experiment tracker's MLflow run is in {active_uri} / experiment {exp.name!r}, but "
                          f"tracking.tracking_uri / tracking.experiment say {tracking_uri(cfg)} / {experiment_name(cfg)!r}: "
                          "make them the same (or run without the tracker)")
    return run


def live_log():
    """A ``log(step, metrics)`` callback for the training loop that writes to the active MLflow run (the
    experiment tracker's, during a tracked step) as training goes, or ``None`` without an active run."""
    import mlflow

    if mlflow.active_run() is None:
        return None

    def log(step: int, metrics: dict) -> None:
        try:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=int(step))
        except Exception as exc:  # a tracking server hiccup must not kill a training run
            import logging

            logging.getLogger(__name__).warning("live MLflow logging failed at step %d: %s", step, exc)

    return log


@contextlib.contextmanager
def system_metrics(interval_s: float = 10.0):
    """CPU, memory, disk and network of this machine, logged every ``interval_s`` seconds to the active
    MLflow run (``system/*`` metrics, MLflow's own monitor; it needs psutil) while the block runs."""
    import mlflow

    run = mlflow.active_run()
    monitor = None
    if run is not None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run.info.run_id, sampling_interval=interval_s, samples_before_logging=1)
            monitor.start()
        except Exception as exc:  # psutil missing or the monitor refused: train anyway
            import logging

            logging.getLogger(__name__).warning("system metrics are not logged: %s", exc)
            monitor = None
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()
            try:  # one closing sample, so a fine-tuning shorter than one interval is recorded too
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            except Exception:
                pass


@contextlib.contextmanager
def live_training():
    """What a tracked fine-tuning step records while it trains: system metrics, and the ``log`` callback
    (:func:`live_log`, ``None`` without an active run) it passes to the training loop."""
    with system_metrics():
        yield live_log()


@contextlib.contextmanager
def _pipeline_run(cfg: RunConfig, active, run_name: str, tags: dict):
    """The MLflow run of one pipeline run: the experiment tracker's ``active`` run, tagged (ZenML ends it),
    or a run of our own in the config's experiment."""
    import mlflow

    if active is not None:
        mlflow.set_tags(tags)
        yield active
        return
    with mlflow.start_run(experiment_id=setup_mlflow(cfg), run_name=run_name, tags=tags) as run:
        yield run


def _logged_steps(run_id: str, key: str) -> set[int]:
    from mlflow.tracking import MlflowClient

    try:
        return {m.step for m in MlflowClient().get_metric_history(run_id, key)}
    except Exception:
        return set()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _plot_loss(curve: list, select_curve: Optional[list] = None, best_step: Optional[int] = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if curve:
        steps, losses = zip(*curve)
        ax.plot(steps, losses, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (target span)")
    ax.set_title("LoRA fine-tuning loss")
    if select_curve:  # model selection: valid Recall@10 on the right axis, the kept step marked
        ax2 = ax.twinx()
        s, v = zip(*select_curve)
        ax2.plot(s, v, "o-", color="tab:orange", label="valid Recall@10 (selection)")
        ax2.set_ylabel("valid Recall@10")
        if best_step:
            ax2.axvline(best_step, color="tab:orange", ls=":", lw=1)
        ax2.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return fig


def plot_refreshes(log: list[dict], path: Path, phases: str = "") -> None:
    """The dynamic index per refresh: churn, raw collision rate (solid), the share of entities in overfull
    prefix cells (dotted) and mean level utilization (dashed) per entity family, with the tokenizer phases
    shaded (``phases``: "kind:start-end ...")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for part in phases.split():
        kind, _, span = part.partition(":")
        if kind == "tok":
            a, _, b = span.partition("-")
            ax.axvspan(int(a), int(b), color="0.9", lw=0)
    steps = [e["step"] for e in log]
    families = sorted({k.split("/")[1] for e in log for k in e if k.startswith("churn/")})
    for fam, color in zip(families, ("tab:blue", "tab:green")):
        ax.plot(steps, [e.get(f"churn/{fam}", float("nan")) for e in log], "o-", color=color, label=f"churn ({fam})")
        ax.plot(steps, [e.get(f"collision_rate_raw/{fam}", float("nan")) for e in log], "s-", color=color, alpha=0.5,
                label=f"raw collisions ({fam})")
        if any(f"raw_overfull/{fam}" in e for e in log):  # the part no last-level code can separate (earlier levels)
            ax.plot(steps, [e.get(f"raw_overfull/{fam}", float("nan")) for e in log], "x:", color=color, alpha=0.5,
                    label=f"in overfull cells ({fam})")
        util = [np.mean([v for k, v in e.items() if k.startswith(f"utilization/{fam}/")] or [np.nan]) for e in log]
        ax.plot(steps, util, "^--", color=color, alpha=0.5, label=f"utilization ({fam})")
    ax.set_xlabel("step (refresh at the end of each shaded tokenizer phase)")
    ax.set_ylabel("share")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("dynamic index refreshes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_comparison(metrics: dict, split: str = "test"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [f"{m}_at_{k}" for m in ("recall", "ndcg") for k in (5, 10, 20)]
    systems = {"LLM (SID)": f"{split}/", "SASRec": f"baseline/sasrec/{split}/", "popularity": f"baseline/popularity/{split}/"}
    fig, ax = plt.subplots(figsize=(8, 3.8))
    x = np.arange(len(names))
    w = 0.8 / len(systems)
    for i, (label, pre) in enumerate(systems.items()):
        vals = [metrics.get(pre + n, np.nan) for n in names]
        ax.bar(x + i * w, vals, w, label=label)
    ax.set_xticks(x + w, names, rotation=20)
    ax.set_title(f"{split}: LLM recommender vs baselines")
    ax.legend()
    fig.tight_layout()
    return fig


def _log_quality_and_index(tmp: Path, quality, bundle, recommender) -> None:
    """Artifacts ``data_quality/`` (our page + the GE Data Docs site) and ``index/`` (SID tables, code
    usage, the dynamic index's refreshes) of the active run."""
    import mlflow

    # data quality: our summary page + the Great Expectations Data Docs site
    from sidrec.ops.reports import quality_html

    (tmp / "data_quality.html").write_text(quality_html(quality))
    mlflow.log_artifact(str(tmp / "data_quality.html"), "data_quality")
    if quality.docs_dir and Path(quality.docs_dir).is_dir():
        mlflow.log_artifacts(quality.docs_dir, "data_quality/data_docs")
    # SID index: item -> SID table, code-usage plot, index report
    bundle.items.to_frame().to_csv(tmp / "item_sids.csv", index=False)
    mlflow.log_artifact(str(tmp / "item_sids.csv"), "index")
    if bundle.users is not None:
        bundle.users.to_frame().to_csv(tmp / "user_sids.csv", index=False)
        mlflow.log_artifact(str(tmp / "user_sids.csv"), "index")
    if bundle.usage_png:
        (tmp / "code_usage.png").write_bytes(bundle.usage_png)
        mlflow.log_artifact(str(tmp / "code_usage.png"), "index")
    if recommender.meta.get("dynamic_log"):  # the dynamic index's refresh curves
        plot_refreshes(recommender.meta["dynamic_log"], tmp / "refreshes.png",
                       str(recommender.meta.get("train", {}).get("dynamic/phases", "")))
        mlflow.log_artifact(str(tmp / "refreshes.png"), "index")


def _log_evaluation(tmp: Path, report, metrics: dict, recommender, instructions) -> None:
    """Artifacts ``evaluation/`` (predictions, metrics, the lift table), ``plots/`` and an
    ``instructions/`` sample of the active run."""
    import mlflow

    # evaluation: predictions, metrics, plots
    report.predictions.to_parquet(tmp / "predictions.parquet", index=False)
    mlflow.log_artifact(str(tmp / "predictions.parquet"), "evaluation")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float))
    mlflow.log_artifact(str(tmp / "metrics.json"), "evaluation")
    import matplotlib.pyplot as plt

    for fig, name in ((_plot_loss(recommender.meta.get("loss_curve", []), recommender.meta.get("select_curve"),
                                  recommender.meta.get("train", {}).get("train/best_step")), "train_loss.png"),
                      (_plot_comparison(metrics), "llm_vs_baselines.png")):
        mlflow.log_figure(fig, f"plots/{name}")
        plt.close(fig)
    from sidrec.evaluation.evaluate import lift_table

    mlflow.log_table(lift_table(metrics), "evaluation/lift_vs_baselines.json")
    instructions.rows.groupby(["split", "task"]).head(20).to_json(tmp / "instructions_sample.jsonl", orient="records", lines=True)
    mlflow.log_artifact(str(tmp / "instructions_sample.jsonl"), "instructions")


def log_input_retrying(dataset, context: str, attempts: int = 4) -> None:
    """``mlflow.log_input`` that survives a concurrent run logging the same dataset: MLflow's SQL store looks a
    dataset up and then inserts it, so two runs of one experiment logging identical rows at the same moment can
    both insert and one fails on the unique key. Once the other's insert has landed, a retry finds the dataset
    and only links it. Other errors, and the last attempt's, propagate."""
    import mlflow
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _log_model_and_data(cfg: RunConfig, dataset, bundle, instructions, recommender, eval_metrics: dict) -> str:
    """The recommender as a LoggedModel of the active run (tag ``sidrec.model_id``), the train / valid /
    test instruction rows as MLflow datasets (``log_input``), and the valid / test metrics linked to the
    model and to their split's dataset. Returns the model id."""
    import mlflow

    from sidrec.ops.logged_model import MODEL_ID_TAG, log_recommender

    info = log_recommender(cfg, recommender.path, bundle, dataset)
    mlflow.set_tag(MODEL_ID_TAG, info.model_id)
    splits = {}
    for split, context in (("train", "training"), ("valid", "validation"), ("test", "evaluation")):
        rows = instructions.part(split)
        if not len(rows):
            continue
        cols = [c for c in ("user_id", "task", "prompt", "target", "target_item") if c in rows.columns]
        splits[split] = mlflow.data.from_pandas(rows[cols], name=f"{dataset.name}-{split}",
                                                targets="target" if "target" in cols else None)
        log_input_retrying(splits[split], context)
    for split in ("valid", "test"):
        part = {k: float(v) for k, v in eval_metrics.items() if k.startswith(f"{split}/") and isinstance(v, (int, float))}
        if part:
            mlflow.log_metrics(part, model_id=info.model_id, dataset=splits.get(split))
    return info.model_id


def log_training_run(cfg: RunConfig, *, dataset, quality, bundle, instructions, recommender, report, baseline_metrics: dict,
                     zenml_run_id: str = "", zenml_run_name: str = "") -> tuple[str, dict]:
    """Create the MLflow run for one pipeline run; returns ``(mlflow_run_id, flat metrics)``."""
    import mlflow

    active = tracker_run(cfg)  # the experiment tracker's run (ZenML), checked before anything re-points MLflow
    metrics: dict[str, float] = {}
    metrics.update(report.metrics)
    metrics.update(baseline_metrics)
    metrics.update(bundle.report)
    train_summary = dict(recommender.meta.get("train", {}))
    metrics.update(train_summary)
    tags = {
        "index_mode": cfg.index.mode,
        "index_entities": cfg.index.entities,
        "quantizer": cfg.index.quantizer,
        "backbone": cfg.model.backbone,
        "dataset": dataset.name,
        "dataset_hash": dataset.fingerprint(),
        "git_commit": git_commit(),
        "zenml_run_id": zenml_run_id,
        "zenml_run_name": zenml_run_name,
        "config_name": cfg.name,
        "data_validation": "passed" if getattr(quality, "success", False) else "failed",  # read by the promotion gate
    }
    if recommender.meta.get("compute_dtype"):  # model.dtype: auto as resolved on the machine that trained it
        tags["compute_dtype"] = recommender.meta["compute_dtype"]
    if "baseline/sasrec/converged" in metrics:
        tags["baseline_sasrec"] = "converged" if metrics["baseline/sasrec/converged"] else "not converged"
    from sidrec.ops.reports import baseline_notes

    if baseline_notes(metrics):
        tags["mlflow.note.content"] = "\n".join(baseline_notes(metrics))  # the run page's description
    with _pipeline_run(cfg, active, zenml_run_name or cfg.name, tags) as run:
        params = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in cfg.flat().items()}
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        # valid/ and test/ metrics are logged with the LoggedModel below (linked to it and to their dataset)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))
                            and not (k.startswith(("valid/", "test/")) and k in report.metrics)})
        # the curves: only the points the tracked fine-tuning step did not log live (a cached finetune, or
        # no tracker) -- so the run page shows each point once
        seen = {key: _logged_steps(run.info.run_id, key) for key in ("train/loss", "valid/select_recall_at_10")}
        for step, loss in recommender.meta.get("loss_curve", []):
            if int(step) not in seen["train/loss"]:
                mlflow.log_metric("train/loss", float(loss), step=int(step))
        for step, score in recommender.meta.get("select_curve", []):  # model selection (valid users)
            if int(step) not in seen["valid/select_recall_at_10"]:
                mlflow.log_metric("valid/select_recall_at_10", float(score), step=int(step))
        for entry in recommender.meta.get("dynamic_log", []):  # per index refresh (dynamic mode)
            mlflow.log_metrics({f"index/{k.replace('/', '_')}": float(v) for k, v in entry.items() if k != "step"},
                               step=int(entry["step"]))
        with tempfile.TemporaryDirectory() as tmp:
            _log_quality_and_index(Path(tmp), quality, bundle, recommender)
            # the model: LoRA adapter + SID embeddings + tokenizer (the folder), and the servable pyfunc as a
            # LoggedModel with the run's evaluation metrics linked to it and to the data they came from
            mlflow.log_artifacts(str(recommender.path), "model")
            _log_model_and_data(cfg, dataset, bundle, instructions, recommender, report.metrics)
            _log_evaluation(Path(tmp), report, metrics, recommender, instructions)
    return run.info.run_id, metrics
