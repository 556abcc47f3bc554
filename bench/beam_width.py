"""Beam width at decoding: does a wider trie-constrained beam find more of the right items?

Re-decodes a trained recommender (a model folder saved by ``run.py train``: adapter + SID rows +
vocab + meta, e.g. an MLflow run's ``artifacts/model``) on the test users of the run's own config,
once per beam width, on the same users. The SID index and the prompts are rebuilt from the config
as the pipeline builds them, with the run's own item SIDs (``item_sids.csv`` beside the model folder,
or ``--sids``): a rebuild need not give the same codes.

    .venv/bin/python bench/beam_width.py --config configs/scientific-hybrid.yaml \\
        --model .sidrec/mlartifacts/<exp>/<run>/artifacts/model --beams 20 50 --out beam_width_scientific

``--exclude-history both --baselines``: the same, with and without the items each user already has
(``eval.exclude_history``), SASRec and popularity trained in this run and scored both ways too.

Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", required=True, help="a saved recommender folder (artifacts/model of a run)")
    ap.add_argument("--sids", default=None, help="the run's item_sids.csv (default: ../index/item_sids.csv beside --model)")
    ap.add_argument("--beams", nargs="+", type=int, default=[20, 50])
    ap.add_argument("--test-users", type=int, default=None, help="a seeded sample of test users (default: all)")
    ap.add_argument("--exclude-history", choices=["off", "on", "both"], default="off",
                    help="eval.exclude_history for the LLM (and the baselines with --baselines): off, on, or both")
    ap.add_argument("--baselines", action="store_true", help="also SASRec and popularity, trained in this run, per mode")
    ap.add_argument("--out", default="beam_width")
    args = ap.parse_args(argv)

    from sidrec import stages
    from sidrec.config import load_config
    from sidrec.evaluation.evaluate import evaluate_llm
    from sidrec.model.sid_model import Encoder, load_recommender

    cfg = load_config(args.config)
    stages.set_threads(cfg)
    t0 = time.perf_counter()
    ds = stages.ingest(cfg)
    features = stages.featurize(ds, cfg)
    bundle = stages.build_index(features, cfg)
    sids = Path(args.sids) if args.sids else Path(args.model).parent / "index" / "item_sids.csv"
    if sids.exists():  # the run's own SIDs (a rebuild need not give the same codes: see BENCHMARKS.md)
        from sidrec.index.sid_index import SIDIndex

        saved = pd.read_csv(sids, dtype={"entity_id": str})
        levels = [c for c in saved.columns if c.startswith("c") and c[1:].isdigit()]
        items = SIDIndex(saved["entity_id"].tolist(), saved[levels].to_numpy(), bundle.items.level_sizes)
        same = sum(bundle.items.sid_of(e) == items.sid_of(e) for e in items.entity_ids)
        print(f"using the run's SIDs from {sids} ({same} of {len(items.entity_ids)} equal to a rebuild)", flush=True)
        bundle = dataclasses.replace(bundle, items=items)
    instr = stages.instruct(ds, bundle, cfg)
    prep_s = time.perf_counter() - t0

    model, tok, meta = load_recommender(Path(args.model), cfg.model.backbone)
    encoder = Encoder(tok, model.vocab)
    parts = {"test": instr.part("test")}
    result = {"env": common.env_info(), "config": args.config, "model": args.model, "prep_seconds": round(prep_s, 1),
              "train": meta.get("train", {}), "widths": {}, "baselines": {}}
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.exclude_history]
    for exclude in modes:
        tag = "exclude_history" if exclude else "all_items"
        for beams in args.beams:
            ecfg = cfg.eval.model_copy(update={"beams": beams, "test_max_users": args.test_users, "exclude_history": exclude})
            t1 = time.perf_counter()
            metrics, _ = evaluate_llm(model, encoder, bundle.items, parts, ecfg, cfg.seed, stages.compute_dtype(cfg),
                                      stages.progress_enabled())
            key = str(beams) if not exclude else f"{beams}/{tag}"
            result["widths"][key] = {"seconds": round(time.perf_counter() - t1, 1), "exclude_history": exclude, "metrics": metrics}
            print(f"beams {beams} {tag}: test users {metrics['test/users']} R@10 {metrics['test/recall_at_10']:.4f} "
                  f"N@10 {metrics['test/ndcg_at_10']:.4f} R@20 {metrics['test/recall_at_20']:.4f} "
                  f"({time.perf_counter() - t1:.0f}s)", flush=True)
            common.write_json(common.RESULTS / f"{args.out}.json", result)
        if args.baselines:  # the same users (test_max_users), the same protocol
            bcfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"test_max_users": args.test_users,
                                                                             "exclude_history": exclude})})
            base = stages.baselines(ds, bcfg)
            result["baselines"][tag] = base
            print(f"baselines {tag}: " + " ".join(f"{k.split('/')[1]} R@10 {base[k]:.4f}" for k in base
                                                  if k.endswith("test/recall_at_10")), flush=True)
            common.write_json(common.RESULTS / f"{args.out}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
