"""Decoding speed of one trained recommender: seconds per 1,000 users and the metrics, on a seeded sample of its test
users, through the library's own evaluation (``evaluate_llm``: trie-constrained beams, the item head's candidates, an
own-index ensemble's fusion).

It reads a folder that ``bench/seq_training.py --keep DIR`` wrote (``model/``, ``index/``, ``instructions/``). With
``--member K`` it decodes member K of an ensemble alone, on its own index and prompts. ``--sidrec DIR`` puts another
checkout's ``sidrec`` first on the path, so a change to decoding is timed on the same model, users and machine as
the code before it (the list must come out the same, up to bfloat16 noise: the metrics say so). Each call appends one
entry, under ``--label``, to ``bench/results/<out>.json``.

    .venv/bin/python bench/decode_speed.py --kept KEPT --config configs/scientific-item-head.yaml --users 1000 \\
        --label new --out scientific/decode_speed
    .venv/bin/python bench/decode_speed.py ... --sidrec /tmp/old-checkout --label old
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kept", required=True, help="a folder bench/seq_training.py --keep wrote (model/, index/, instructions/)")
    ap.add_argument("--config", required=True, help="the run's YAML (beams, batch size, dtype, backbone)")
    ap.add_argument("--member", type=int, default=None, help="decode member K of an ensemble alone")
    ap.add_argument("--users", type=int, default=1000, help="seeded sample of test users (0: all)")
    ap.add_argument("--sidrec", default=None, help="import sidrec from this checkout instead (to time older code)")
    ap.add_argument("--label", required=True)
    ap.add_argument("--predictions", default=None, metavar="PARQUET",
                    help="also write the per-user ranks here (for bench/paired.py)")
    ap.add_argument("--out", required=True, help="bench/results/<out>.json (entries are appended)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # this checkout on the path; third-party warnings quiet

    if args.sidrec:  # the other checkout's sidrec instead of the one common imported
        for name in [m for m in sys.modules if m == "sidrec" or m.startswith("sidrec.")]:
            del sys.modules[name]
        sys.path.insert(0, str(Path(args.sidrec).resolve()))
    import sidrec
    from sidrec.artifacts import IndexBundle, InstructionSet, load_model, member_parts
    from sidrec.config import load_config
    from sidrec.evaluation.evaluate import evaluate_llm
    from sidrec.model.sid_model import Encoder
    from sidrec.runtime import compute_dtype

    cfg = load_config(args.config)
    kept = Path(args.kept)
    model_dir, index_dir, instr_dir = kept / "model", kept / "index", kept / "instructions"
    if args.member is not None:
        model_dir = model_dir / "members" / str(args.member)
        if (model_dir / "index").is_dir():  # a member on its own index reads its own prompts
            index_dir, instr_dir = model_dir / "index", model_dir / "instructions"
    model, tok, _ = load_model(model_dir, cfg.model.backbone)
    index = IndexBundle.load(index_dir).items
    rows = InstructionSet.load(instr_dir).part("test")
    n = None if args.users == 0 else args.users
    ecfg = cfg.eval.model_copy(update={"test_max_users": n, "valid_max_users": None})
    fused = type(model).__name__ == "IndexEnsemble"
    parts = [{"test": p["test"]} for p in member_parts(model_dir, ("test",))] if fused else None
    env = common.env_info()
    t0 = time.perf_counter()
    metrics, preds = evaluate_llm(model, Encoder(tok, model.vocab), index, {"test": rows}, ecfg, cfg.seed,
                              compute_dtype(cfg), progress=False, member_parts=parts)
    seconds = time.perf_counter() - t0
    users = int(metrics["test/users"])
    entry = {"label": args.label, "sidrec": str(Path(sidrec.__file__).resolve().parent), "kept": str(kept),
             "member": args.member, "fused": fused, "users": users, "seconds": round(seconds, 1),
             "seconds_per_1000_users": round(1000 * seconds / max(users, 1), 1), "env": env,
             "metrics": {k: round(float(v), 5) for k, v in metrics.items()}}
    if args.predictions:
        Path(args.predictions).parent.mkdir(parents=True, exist_ok=True)
        preds.to_parquet(args.predictions, index=False)
    out = common.RESULTS / f"{args.out}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text()) if out.is_file() else []
    out.write_text(json.dumps(runs + [entry], indent=1))
    print(f"{args.label}: {users} users in {seconds:.0f}s ({entry['seconds_per_1000_users']}s / 1,000), "
          f"R@10 {metrics['test/recall_at_10']:.4f} N@10 {metrics['test/ndcg_at_10']:.4f} -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
