"""Does one seed give one model in this process and the next? A fingerprint of every stage of a short run.

Runs ingest -> text features -> index -> instructions -> ``--steps`` fine-tuning steps of a config and prints a
short hash of each stage's output (item embeddings, collaborative vectors, SID codes, instruction rows, the saved
adapter and SID rows) and the loss curve, as one JSON line. Run it twice (in two processes) and compare the lines:
the first stage whose hash differs is where the runs part. ``--set train.deterministic=false`` shows what
``train.deterministic`` prevents (BENCHMARKS.md, session 36: on two CPU threads the adapters differed by step 10).

    SIDREC_PROGRESS=0 .venv/bin/python bench/same_seed.py --steps 40 > a.json
    SIDREC_PROGRESS=0 .venv/bin/python bench/same_seed.py --steps 40 > b.json && diff a.json b.json

Quickstart on 2 cores: ~1.5 minutes for 40 steps. Run it alone on the machine (a shared CPU changes the timings,
and with ``train.deterministic`` off, also the result).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import common


def _hash(b: bytes) -> str:
    return hashlib.sha1(b).hexdigest()[:12]


def fingerprint(config: str, sets: list[str], steps: int) -> dict:
    from sidrec import stages
    from sidrec.config import parse_config

    cfg = parse_config(common.config_with_overrides(config, [f"train.steps={steps}", *sets]), config)
    stages.set_threads(cfg)
    ds = stages.ingest(cfg)
    feats = stages.featurize(ds, cfg)
    bundle = stages.build_index(feats, cfg)
    instr = stages.instruct(ds, bundle, cfg)
    out = {"embeddings": _hash(np.ascontiguousarray(feats.item_embeddings).tobytes()),
           "collab": _hash(np.ascontiguousarray(feats.item_collab).tobytes()) if feats.item_collab is not None else None,
           "codes": _hash(np.ascontiguousarray(bundle.items.codes).tobytes()),
           "instructions": _hash(instr.rows.drop(columns=["seen"], errors="ignore").to_json().encode())}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        rec = stages.finetune(instr, bundle, cfg, Path(tmp) / "rec", ds=ds, features=feats)
        out["fine_tune_seconds"] = round(time.perf_counter() - t0, 1)
        out["loss_curve"] = rec.meta["loss_curve"]
        for f in sorted(Path(rec.path).rglob("*.safetensors")):
            out[str(f.relative_to(rec.path))] = _hash(f.read_bytes())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(common.QUICKSTART))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, dotted keys (e.g. train.threads=1)")
    args = ap.parse_args(argv)
    fp = fingerprint(args.config, args.set, args.steps)
    seconds = fp.pop("fine_tune_seconds")  # timings and the machine's load differ between runs: on stderr
    print(json.dumps({"env": common.env_info(), "fine_tune_seconds": seconds}, default=str), file=sys.stderr)
    print(json.dumps({"overrides": args.set, **fp}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
