"""Side-by-side comparison of training runs in MLflow (static vs dynamic index, ablations, baselines)."""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Optional

import pandas as pd

METRICS = ["test/recall_at_5", "test/recall_at_10", "test/ndcg_at_5", "test/ndcg_at_10", "test/invalid_rate",
           "test/coverage_at_10", "index/collision_rate_raw", "train/seconds"]
BASELINES = [f"baseline/{b}/test/{m}_at_{k}" for b in ("sasrec", "popularity") for m in ("recall", "ndcg") for k in (5, 10)]


def collect(experiments: Optional[list[str]] = None) -> pd.DataFrame:
    """One row per finished training run: config name, index mode, quantizer, entities, metrics."""
    import mlflow

    if experiments:
        names = experiments
    else:
        names = [e.name for e in mlflow.search_experiments() if e.name.startswith("sidrec-")]
    frames = []
    for name in names:
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            from sidrec.errors import ConfigError

            raise ConfigError(f"--experiment: no MLflow experiment named {name!r} (see `mlflow experiments search`)")
        df = mlflow.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'")
        if df.empty:
            continue
        df = df[df.get("tags.kind", pd.Series(index=df.index, dtype=object)).fillna("") != "comparison"]
        df["experiment"] = name
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    keep = {"run_id": "run_id", "experiment": "experiment", "start_time": "start_time",
            "tags.config_name": "config", "tags.index_mode": "index_mode", "tags.quantizer": "quantizer",
            "tags.index_entities": "entities", "tags.backbone": "backbone"}
    out = pd.DataFrame({v: df[k] if k in df else None for k, v in keep.items()})
    for m in METRICS + BASELINES:
        out[m] = df.get(f"metrics.{m}")
    return out.sort_values(["experiment", "config", "start_time"]).reset_index(drop=True)


def latest_per_config(runs: pd.DataFrame) -> pd.DataFrame:
    return runs.groupby(["experiment", "config"], sort=True).tail(1).reset_index(drop=True)


def _bar_chart(table: pd.DataFrame, path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    metrics = ["test/recall_at_5", "test/recall_at_10", "test/ndcg_at_5", "test/ndcg_at_10"]
    labels = [f"{r.experiment.removeprefix('sidrec-')}:{r.config} ({r.index_mode})" for r in table.itertuples()]
    systems = [(lab, [table.loc[i, m] for m in metrics]) for i, lab in enumerate(labels)]
    # baselines once per experiment (same split for every run of a dataset)
    for exp, g in table.groupby("experiment"):
        last = g.iloc[-1]
        for b in ("sasrec", "popularity"):
            vals = [last.get(f"baseline/{b}/{m}") for m in metrics]
            systems.append((f"{exp.removeprefix('sidrec-')}:{b} (baseline)", vals))
    fig = Figure(figsize=(max(8, 1.2 * len(metrics) * max(1, len(systems)) / 3), 4.5))
    ax = fig.add_subplot(111)
    x = np.arange(len(metrics))
    w = 0.85 / max(1, len(systems))
    for i, (label, vals) in enumerate(systems):
        ax.bar(x + i * w, [np.nan if v is None else float(v) for v in vals], w, label=label)
    ax.set_xticks(x + 0.85 / 2 - w / 2, metrics)
    ax.set_title("Recall/NDCG@K per run (index mode / ablation) and baselines")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def decision_events(decision_logs: list[Path]) -> pd.DataFrame:
    """Champion changes from registry decision logs (JSON lines, ``sidrec.ops.registry``): one row per
    promotion that moved the alias and per rollback, with its time, model and version."""
    import json

    rows = []
    for path in decision_logs:
        if not Path(path).is_file():
            continue
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("action") == "promote" and r.get("promoted"):
                rows.append({"time": r.get("time"), "model": r.get("model"), "event": "promoted", "version": r.get("challenger")})
            elif r.get("action") == "rollback" and r.get("to"):
                rows.append({"time": r.get("time"), "model": r.get("model"), "event": "rollback", "version": r.get("to")})
    df = pd.DataFrame(rows, columns=["time", "model", "event", "version"])
    df["time"] = pd.to_datetime(df["time"], utc=True, errors="coerce", format="%Y-%m-%dT%H:%M:%S%z")
    return df.dropna(subset=["time"]).sort_values("time").reset_index(drop=True)


def _over_time_chart(runs: pd.DataFrame, events: pd.DataFrame, path: Path) -> None:
    """Test Recall@10 / NDCG@10 of every run by date, one line per (dataset, index mode), SASRec of each
    run dashed, champion promotions (green) and rollbacks (red) as vertical lines."""
    from matplotlib.figure import Figure

    metrics = ["test/recall_at_10", "test/ndcg_at_10"]
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    t = pd.to_datetime(runs["start_time"], utc=True)
    for ax, m in zip(axes, metrics):
        for (exp, mode), g in runs.assign(_t=t).groupby(["experiment", "index_mode"], dropna=False):
            g = g.sort_values("_t")
            label = f"{str(exp).removeprefix('sidrec-')} {mode or '?'}"
            ax.plot(g["_t"], g[m], marker="o", label=label)
            base = g.get(f"baseline/sasrec/{m}")
            if base is not None and base.notna().any():
                ax.plot(g["_t"], base, ls="--", lw=1, label=f"{label}: SASRec")
        for e in events.itertuples():
            ax.axvline(e.time, color="tab:green" if e.event == "promoted" else "tab:red", lw=1, alpha=0.7)
            ax.annotate(f"{'v' if e.event == 'promoted' else 'back to v'}{e.version}", (e.time, ax.get_ylim()[1]),
                        fontsize=7, rotation=90, va="top", ha="right")
        ax.set(title=f"{m} over time (green: promoted, red: rollback)", xlabel="run start", ylabel=m)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(runs: pd.DataFrame, out_dir: Path, events: Optional[pd.DataFrame] = None) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    table = latest_per_config(runs)
    cols = ["experiment", "config", "index_mode", "entities", "quantizer"] + METRICS + BASELINES
    shown = table[[c for c in cols if c in table]].copy()
    md = ["# sidrec run comparison", "", f"{len(runs)} finished runs; the latest run of each config is shown.", ""]
    md.append("| " + " | ".join(shown.columns) + " |")
    md.append("|" + "---|" * len(shown.columns))
    for r in shown.itertuples(index=False):
        md.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |")
    events = events if events is not None else decision_events([])
    paths = {"md": out_dir / "comparison.md", "html": out_dir / "comparison.html", "png": out_dir / "comparison.png",
             "over_time": out_dir / "comparison_over_time.png"}
    if len(events):
        md += ["", "Champion history: " + "; ".join(f"{e.time:%Y-%m-%d %H:%M} {e.model} {e.event} v{e.version}"
                                                    for e in events.itertuples())]
    paths["md"].write_text("\n".join(md) + "\n")
    paths["html"].write_text("<html><head><meta charset='utf-8'><title>sidrec comparison</title></head><body>"
                             "<h2>sidrec run comparison</h2>" + shown.to_html(index=False, float_format="%.4f", na_rep="-")
                             + "<p><img src='comparison.png'></p><p><img src='comparison_over_time.png'></p></body></html>")
    _bar_chart(table, paths["png"])
    _over_time_chart(runs, events, paths["over_time"])
    return paths


def _default_decision_logs(tracking_uri: str, runs: pd.DataFrame) -> list[Path]:
    """The registry's decision logs of the compared datasets: ``decisions/<model>.jsonl`` next to a sqlite
    store (else in the state folder), the model named like the experiment (``sidrec-<dataset>``)."""
    from sidrec.runtime import state_home

    root = Path(tracking_uri[len("sqlite:///"):]).resolve().parent if tracking_uri.startswith("sqlite:///") else state_home()
    return [root / "decisions" / f"{name}.jsonl" for name in sorted(set(runs["experiment"]))]


def compare(experiment: Optional[str], out_dir: Path, tracking_uri: str,
            decision_logs: Optional[list[Path]] = None) -> dict[str, Path]:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    runs = collect([experiment] if experiment else None)
    if runs.empty:
        from sidrec.errors import SidrecError

        raise SidrecError("no finished sidrec training runs in MLflow yet; run `run.py train --config ...` first")
    paths = write_report(runs, out_dir, decision_events(decision_logs or _default_decision_logs(tracking_uri, runs)))
    name = experiment or "sidrec-comparisons"
    exp = mlflow.get_experiment_by_name(name) or mlflow.get_experiment(mlflow.create_experiment(name))
    with mlflow.start_run(experiment_id=exp.experiment_id, run_name="comparison", tags={"kind": "comparison"}):
        for p in paths.values():
            mlflow.log_artifact(str(p), "comparison")
        mlflow.log_metric("compared_runs", len(runs))
    print(html.unescape(paths["md"].read_text()))
    return paths
