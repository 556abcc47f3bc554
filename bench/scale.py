"""Scale: wall time and peak memory of every stage on catalogs of 10k / 50k / 200k users (issue 14).

A synthetic catalog shaped like an Amazon category: ~users/3 items with power-law popularity (Zipf),
items grouped in topics, each user's sequence drawn from 1-3 topics (session-like) with a
log-normal length (mean ~9 interactions), short titles. Written as CSV for the `table` loader, then run
through the library's stages exactly as the pipeline runs them (no ZenML), one stage after the other:

    ingest, validation, text features (backbone), index (and the same index with ``index.balance: last``),
    instructions, fine-tuning (N steps, reported
    per 100 steps), decoding (a user sample, reported per 1,000 users), SASRec (to convergence on valid,
    or stopped by --sasrec-minutes and then reported as not converged)

Peak memory per stage is the peak RSS of this process while the stage runs (a sampler thread reads
/proc/self/status every 20 ms); the baseline before the first stage is recorded too.

    .venv/bin/python bench/scale.py --users 10000 50000 --out scale

Run it alone on the machine. JSON + PNG under bench/results.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WORDS = ("digital portable classic smart compact premium basic advanced mini pro ultra lab steel glass "
         "precision wireless cordless heavy light rapid").split()
NOUNS = ("thermometer scale pipette beaker flask microscope caliper timer meter sensor kit tester probe "
         "filter pump clamp stand tube slide lens").split()


def synth_catalog(n_users: int, seed: int = 0, items_per_user: float = 1 / 3, mean_len: float = 8.8):
    """(interactions, items) frames of a synthetic catalog (see the module doc)."""
    rng = np.random.default_rng(seed)
    n_items = max(50, int(n_users * items_per_user))
    n_topics = max(5, int(np.sqrt(n_items)))
    topic = rng.integers(0, n_topics, n_items)
    pop = 1.0 / np.arange(1, n_items + 1) ** 1.05  # Zipf popularity, item 0 the most popular
    pop = pop[rng.permutation(n_items)]
    by_topic = [np.flatnonzero(topic == t) for t in range(n_topics)]
    weights = [pop[ix] / pop[ix].sum() for ix in by_topic]
    lens = np.clip(np.round(rng.lognormal(np.log(mean_len) - 0.25, 0.7, n_users)).astype(int), 5, 200)
    users, items, stamps = [], [], []
    t0 = 1_600_000_000
    for u in range(n_users):
        topics = rng.choice(n_topics, size=rng.integers(1, 4), replace=False)
        picks = []
        for t in rng.choice(topics, size=lens[u]):
            if len(by_topic[t]):
                picks.append(int(rng.choice(by_topic[t], p=weights[t])))
        ts = t0 + np.cumsum(rng.integers(60, 86_400 * 7, len(picks)))
        users += [f"u{u}"] * len(picks)
        items += [f"i{i}" for i in picks]
        stamps += ts.tolist()
    inter = pd.DataFrame({"user_id": users, "item_id": items, "timestamp": stamps})
    titles = [f"{WORDS[rng.integers(len(WORDS))]} {NOUNS[topic[i] % len(NOUNS)]} {WORDS[topic[i] % len(WORDS)]} "
              f"model {i}" for i in range(n_items)]
    return inter, pd.DataFrame({"item_id": [f"i{i}" for i in range(n_items)], "title": titles})


class PeakRSS:
    """Peak resident memory of this process between start() and stop(), sampled every 20 ms."""

    def __init__(self):
        self.peak, self._run, self._t = 0, False, None

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _loop(self):
        while self._run:
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def start(self):
        self.peak, self._run = self.now(), True
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def stop(self) -> int:
        self._run = False
        self._t.join()
        return max(self.peak, self.now())


def run_size(n_users: int, args, workdir: Path) -> dict:
    from sidrec import stages
    from sidrec.config import parse_config
    from sidrec.data.profile import ProfileHistory

    inter, items = synth_catalog(n_users, seed=args.seed)
    inter.to_csv(workdir / "interactions.csv", index=False)
    items.to_csv(workdir / "items.csv", index=False)
    cfg = parse_config({
        "name": f"scale-{n_users}", "seed": args.seed,
        "data": {"format": "table", "path": str(workdir / "interactions.csv"), "items_path": str(workdir / "items.csv"),
                 "name": f"synthetic-{n_users}", "max_history": 20},
        "features": {"embedder": "backbone", "batch_size": 64, "cache": False},
        "index": {"quantizer": "rq_kmeans", "levels": 3, "codebook_size": "auto", "collisions": "nearest_free"},
        "tasks": {"seqrec_mode": "window", "text_to_sid": 0.1, "sid_to_text": 0.05, "titles_to_sid": 0.0},
        "model": {"backbone": args.backbone, "layers": args.layers, "sid_init": "text", "dtype": "auto"},
        "train": {"steps": args.steps, "batch_size": 16, "checkpoint_every": None},
        "eval": {"beams": 20, "batch_size": 32, "test_max_users": args.decode_users, "valid_max_users": 32},
        "baselines": {"sasrec": {"max_epochs": 200, "patience": 5, "max_minutes": args.sasrec_minutes}},
    }, f"scale {n_users}")
    out = {"users": n_users, "items": int(items.shape[0]), "interactions": int(len(inter)), "stages": {}}
    rss = PeakRSS()
    out["rss_before_gib"] = round(rss.now() / 2**30, 2)

    def stage(name, fn):
        gc.collect()
        rss.start()
        t = time.perf_counter()
        value = fn()
        out["stages"][name] = {"seconds": round(time.perf_counter() - t, 1), "peak_rss_gib": round(rss.stop() / 2**30, 2)}
        print(f"{n_users} users | {name}: {out['stages'][name]}", flush=True)
        return value

    ds = stage("ingest", lambda: stages.ingest(cfg))
    out["dataset"] = ds.stats()
    # the profile history goes to the temp folder, not the user's state folder
    stage("validation", lambda: stages.validate(ds, cfg, workdir / "docs", history=ProfileHistory(workdir / "quality")))
    features = stage("features", lambda: stages.featurize(ds, cfg))
    bundle = stage("index", lambda: stages.build_index(features, cfg))
    out["index"] = {k: v for k, v in bundle.report.items() if not isinstance(v, (list, dict))}
    # the same index with the last level balanced (index.balance: last): raw collisions vs catalog size, both ways
    balanced = stage("index-balanced", lambda: stages.build_index(features, cfg.model_copy(
        update={"index": cfg.index.model_copy(update={"balance": "last"})})))
    out["index_balanced"] = {k: v for k, v in balanced.report.items() if not isinstance(v, (list, dict))}
    del balanced
    instr = stage("instructions", lambda: stages.instruct(ds, bundle, cfg))
    out["train_rows"] = int(instr.meta.get("n_train", 0))
    rec = stage("fine-tuning", lambda: stages.finetune(instr, bundle, cfg, workdir / "rec", ds=ds))
    out["stages"]["fine-tuning"]["per_100_steps_s"] = round(out["stages"]["fine-tuning"]["seconds"] * 100 / args.steps, 1)
    out["train"] = {k: v for k, v in rec.meta.get("train", {}).items() if not isinstance(v, (list, dict))}
    report = stage("decoding", lambda: stages.evaluate(rec, instr, bundle, cfg))
    users = report.metrics.get("test/users", 1) + report.metrics.get("valid/users", 0)
    out["stages"]["decoding"]["per_1000_users_s"] = round(out["stages"]["decoding"]["seconds"] * 1000 / max(users, 1), 1)
    base = stage("sasrec", lambda: stages.baselines(ds, cfg, reuse=False))  # timed: always trained
    out["sasrec"] = {k.split("/")[-1]: v for k, v in base.items() if k.startswith("baseline/sasrec/") and "/valid/" not in k}
    return out


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    sizes = [r["users"] for r in result["sizes"]]
    names = list(result["sizes"][0]["stages"])
    fig = Figure(figsize=(12, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    for name in names:
        ax1.plot(sizes, [r["stages"][name]["seconds"] / 60 for r in result["sizes"]], "o-", label=name)
        ax2.plot(sizes, [r["stages"][name]["peak_rss_gib"] for r in result["sizes"]], "o-", label=name)
    ax1.set(xscale="log", title="wall time per stage", xlabel="users", ylabel="minutes (2 CPU cores)")
    ax2.set(xscale="log", title="peak RSS during each stage", xlabel="users", ylabel="GiB")
    ax1.legend(fontsize=7)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", nargs="+", type=int, default=[10_000, 50_000])
    ap.add_argument("--steps", type=int, default=50, help="fine-tuning steps (time reported per 100)")
    ap.add_argument("--decode-users", type=int, default=300, help="test users decoded (time reported per 1,000)")
    ap.add_argument("--sasrec-minutes", type=float, default=15.0)
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="scale")
    args = ap.parse_args(argv)
    result = {"env": common.env_info(), "args": vars(args), "sizes": []}
    for n in args.users:
        with tempfile.TemporaryDirectory(prefix=f"sidrec-scale-{n}-") as tmp:
            result["sizes"].append(run_size(n, args, Path(tmp)))
        common.write_json(common.RESULTS / f"{args.out}.json", result)
    plot(result, common.RESULTS / f"{args.out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
