"""Quality vs training tokens on Amazon Scientific: one-target prefix training vs window training.

Usage (after the runs, from the repository root):
    .venv/bin/python bench/window_vs_prefix.py \\
        --prefix bench/results/scientific/static-*.json --window bench/results/scientific/window-*.json \\
        --out bench/results/window_vs_prefix.json --png bench/results/window_vs_prefix.png

Inputs are the flat metrics files of ``run.py train --metrics-out``. For a window run, the model-selection
curve is the file's ``train/select_curve`` (copied in from the model's ``meta.json``) or, when its MLflow
run is in the local store, read from MLflow; the curve (valid Recall@10 on the fixed valid sample at
every ``train.eval_every`` steps, ``valid/select_recall_at_10``) is read from MLflow and drawn against
the tokens seen at each step (steps x the run's mean tokens per step). Test points are final test
metrics; the selection curve is *valid* users (the ones that picked the checkpoint), drawn dashed.
SASRec / popularity lines are from the same runs.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _load(pattern: str) -> list[dict]:
    return [json.loads(Path(p).read_text()) | {"_file": p} for p in sorted(glob.glob(pattern))]


def _select_curve(run_id: str) -> list[tuple[int, float]]:
    try:
        from mlflow.tracking import MlflowClient

        from sidrec.config import RunConfig
        from sidrec.ops.tracking import tracking_uri

        client = MlflowClient(tracking_uri(RunConfig()))
        return sorted((int(m.step), float(m.value)) for m in client.get_metric_history(run_id, "valid/select_recall_at_10"))
    except Exception as e:  # noqa: BLE001 -- the run may live in another store: no curve, points only
        print(f"no selection curve for {run_id}: {type(e).__name__}")
        return []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", default="bench/results/scientific/static-*.json")
    ap.add_argument("--window", default="bench/results/scientific/window-*.json")
    ap.add_argument("--out", default=str(common.RESULTS / "window_vs_prefix.json"))
    ap.add_argument("--png", default=str(common.RESULTS / "window_vs_prefix.png"))
    args = ap.parse_args(argv)
    runs = {"prefix": _load(args.prefix), "window": _load(args.window)}
    out: dict = {"env": common.env_info(), "runs": {}}
    for kind, rs in runs.items():
        for r in rs:
            tokens_per_step = r["train/tokens"] / max(r["train/steps"], 1)
            curve = [tuple(x) for x in r.get("train/select_curve", [])]  # copied in from the model's meta.json
            if not curve and kind == "window" and r.get("mlflow_run_id"):
                curve = _select_curve(r["mlflow_run_id"])
            out["runs"][Path(r["_file"]).stem] = {
                "kind": kind, "tokens": r["train/tokens"], "steps": r["train/steps"], "fine_tune_seconds": r["train/seconds"],
                "test_users": r.get("test/users"), "best_step": r.get("train/best_step"),
                **{k: r.get(f"test/{k}") for k in ("recall_at_10", "ndcg_at_10")},
                "sasrec": {k: r.get(f"baseline/sasrec/test/{k}") for k in ("recall_at_10", "ndcg_at_10")},
                "popularity": {k: r.get(f"baseline/popularity/test/{k}") for k in ("recall_at_10", "ndcg_at_10")},
                "sasrec_valid_recall_at_10": r.get("baseline/sasrec/valid/recall_at_10"),
                "select_curve_tokens": [[int(s * tokens_per_step), v] for s, v in curve],
            }
    common.write_json(args.out, out)

    from matplotlib.figure import Figure

    # every point is a ratio to SASRec trained in the same run and scored on the same users (the prefix
    # runs tested 1,000 sampled users, the window runs all 8,442: absolute values are not comparable)
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("recall_at_10", "ndcg_at_10")):
        for kind, marker in (("prefix", "s"), ("window", "o")):
            # a selected model is drawn at the tokens seen by its best step (the weights that were tested)
            pts = sorted((v["tokens"] * (v["best_step"] or v["steps"]) / v["steps"], v[metric] / v["sasrec"][metric])
                         for v in out["runs"].values()
                         if v["kind"] == kind and v[metric] is not None and v["sasrec"][metric])
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=f"{kind} training (test)")
        if metric == "recall_at_10":
            for name, v in out["runs"].items():
                if v["select_curve_tokens"] and v["sasrec_valid_recall_at_10"]:
                    xs, ys = zip(*v["select_curve_tokens"])
                    ax.plot(xs, [y / v["sasrec_valid_recall_at_10"] for y in ys], ls="--", lw=1,
                            label=f"{name}: valid (selection users)")
        ax.axhline(1.0, c="k", ls="--", lw=1, label="SASRec (same run, same users)")
        ax.set_xscale("log")
        ax.set(xlabel="training tokens seen", ylabel=f"LLM / SASRec, {metric.replace('_at_', '@')}",
               title=f"Scientific: {metric.replace('_at_', '@')} relative to SASRec")
        ax.legend(fontsize=7)
    common.save_figure(fig, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
