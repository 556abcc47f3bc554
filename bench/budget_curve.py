"""Quality vs fine-tuning budget of the static LLM recommender on Amazon Scientific, against SASRec.

Usage:
    .venv/bin/python bench/budget_curve.py [--runs bench/results/scientific/static-*.json]
        [--out bench/results/budget_curve.json] [--png bench/results/budget_curve.png]

Input: the flat metrics files written by ``run.py train --metrics-out`` for runs that differ only in
``train.steps`` (configs/scientific.yaml, scientific-long.yaml, scientific-2000.yaml; copies are kept
in ``bench/results/scientific/``). Each has the LLM's test metrics and, from the same run and the same
sampled test users, SASRec's and popularity's.

Output: per metric (Recall@10, NDCG@10 and @5), the measured points, a least-squares fit of the metric
as linear in log(steps) and the step count where that line reaches SASRec's value (an extrapolation,
labelled as such; ``null`` when the fitted slope is not positive), a check of the method (with three or
more budgets: what the fit through the smaller runs predicted for the largest one, and what it got),
plus a plot of the points, the fitted lines and SASRec's level (mean over the runs; per run in the JSON).
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METRICS = ("recall_at_5", "recall_at_10", "ndcg_at_5", "ndcg_at_10")


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for p in paths:
        m = json.loads(Path(p).read_text(encoding="utf-8"))
        missing = [k for k in ("train/steps", "train/seconds", *(f"test/{x}" for x in METRICS)) if k not in m]
        if missing:
            raise SystemExit(f"{p}: not a run.py metrics file (missing {', '.join(missing)})")
        runs.append({"file": str(p), **m})
    if len({r["train/steps"] for r in runs}) < 2:
        raise SystemExit("need runs with at least two different train/steps values")
    return sorted(runs, key=lambda r: r["train/steps"])


def fit(runs: list[dict], metric: str) -> dict:
    steps = np.array([r["train/steps"] for r in runs], dtype=float)
    y = np.array([r[f"test/{metric}"] for r in runs], dtype=float)
    slope, intercept = np.polyfit(np.log(steps), y, 1)
    pred = slope * np.log(steps) + intercept
    sasrec = float(np.mean([r[f"baseline/sasrec/test/{metric}"] for r in runs if f"baseline/sasrec/test/{metric}" in r]))
    cross = float(np.exp((sasrec - intercept) / slope)) if slope > 0 else None
    check = None
    if len(set(steps[:-1])) >= 2:  # does a fit through the smaller runs predict the largest one?
        s0, i0 = np.polyfit(np.log(steps[:-1]), y[:-1], 1)
        check = {"steps": int(steps[-1]), "predicted_from_smaller_runs": round(float(s0 * np.log(steps[-1]) + i0), 4),
                 "measured": round(float(y[-1]), 4)}
    return {"steps": steps.astype(int).tolist(), "llm": y.round(4).tolist(), "sasrec": round(sasrec, 4),
            "sasrec_per_run": [round(float(r.get(f"baseline/sasrec/test/{metric}", np.nan)), 4) for r in runs],
            "largest_run_vs_earlier_fit": check,
            "popularity": round(float(np.mean([r.get(f"baseline/popularity/test/{metric}", np.nan) for r in runs])), 4),
            "fit": {"slope_per_log_step": round(float(slope), 5), "intercept": round(float(intercept), 5),
                    "max_abs_residual": round(float(np.abs(pred - y).max()), 4)},
            "steps_to_reach_sasrec_extrapolated": None if cross is None else int(round(cross, -1)),
            "share_of_sasrec_at_largest_budget": round(float(y[-1] / sasrec), 3) if sasrec else None}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("recall_at_10", "ndcg_at_10")):
        r = result["metrics"][metric]
        s = np.array(r["steps"], dtype=float)
        ax.plot(s, r["llm"], "o", color="C0", label="LLM (static SIDs), measured")
        top = max(s.max() * 3, r["steps_to_reach_sasrec_extrapolated"] or 0) * 1.1
        xs = np.geomspace(s.min(), top, 50)
        ax.plot(xs, r["fit"]["slope_per_log_step"] * np.log(xs) + r["fit"]["intercept"], "--", color="C0",
                alpha=0.6, label="linear in log(steps), extrapolated")
        ax.axhline(r["sasrec"], color="C3", label="SASRec (same runs)")
        ax.axhline(r["popularity"], color="grey", ls=":", label="popularity")
        ax.set_xscale("log")
        ticks = [t for t in (250, 500, 1000, 2000, 4000, 8000, 16000) if t <= top]
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("fine-tuning steps (batch 16)")
        ax.set_title(metric.replace("_at_", "@").replace("recall", "Recall").replace("ndcg", "NDCG"))
        ax.legend(fontsize=7)
    fig.suptitle("Amazon Scientific, 1,000 test users: LLM quality vs budget (SmolLM2-135M + LoRA, 2-core CPU)", fontsize=9)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="*", default=None, help="run.py metrics files (default: bench/results/scientific/static-*.json)")
    ap.add_argument("--out", default=str(common.RESULTS / "budget_curve.json"))
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    paths = args.runs or sorted(glob.glob(str(common.RESULTS / "scientific" / "static-*.json")))
    if not paths:
        raise SystemExit("no metrics files given and none under bench/results/scientific/")
    runs = load_runs(paths)
    result = {
        "benchmark": "budget_curve",
        "command": "python bench/budget_curve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": [{"file": r["file"], "steps": r["train/steps"], "train_seconds": r["train/seconds"],
                  "tokens_per_s": r.get("train/tokens_per_s"), "test_users": r.get("test/users")} for r in runs],
        "metrics": {m: fit(runs, m) for m in METRICS},
        "note": "steps_to_reach_sasrec_extrapolated is an extrapolation of a fit through the measured points, not a measurement",
    }
    out = common.write_json(args.out, result)
    plot(result, Path(args.png) if args.png else out.with_suffix(".png"))
    for m, r in result["metrics"].items():
        print(f"{m}: LLM {r['llm']} at {r['steps']} steps, SASRec {r['sasrec']}; reaches SASRec at "
              f"~{r['steps_to_reach_sasrec_extrapolated']} steps (extrapolated)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
