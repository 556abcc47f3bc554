"""How many candidates should the item head re-rank? Re-decodes one saved recommender with an item head.

The fused list of ``model.item_head`` re-ranks what the constrained beams found, so its Recall@K can never
exceed the beams' own. ``model.item_head_candidates`` lets the head's top items join the beams (each scored by
the SID head by teacher forcing). This script decodes the same model, on the same valid and test users, for a
grid of ``beams x candidates x fusion``, so the levers are compared on one model with nothing else changing.

    .venv/bin/python bench/seq_training.py ... --keep DIR      # a saved model + its index + instructions
    .venv/bin/python bench/item_candidates.py --config configs/scientific-hybrid.yaml --kept DIR/item-head \\
        --grid 20:0:1 20:20:1 20:20:0.5 --out scientific/item-candidates

Each grid point is ``beams:candidates:fusion``. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--kept", required=True, help="a folder written by seq_training.py --keep: model/, index/, instructions/")
    ap.add_argument("--grid", nargs="+", default=["20:0:1", "20:20:1"], metavar="BEAMS:CANDIDATES:FUSION")
    ap.add_argument("--valid-users", type=int, default=1000, help="valid users (seeded sample) for choosing a grid point")
    ap.add_argument("--test-users", type=int, default=None, help="a seeded sample of test users (default: all)")
    ap.add_argument("--out", default="item_candidates")
    args = ap.parse_args(argv)

    from sidrec import stages
    from sidrec.artifacts import IndexBundle, InstructionSet
    from sidrec.config import load_config
    from sidrec.evaluation.evaluate import evaluate_llm
    from sidrec.model.sid_model import Encoder, load_recommender

    cfg = load_config(args.config)
    stages.set_threads(cfg)
    kept = Path(args.kept)
    bundle = IndexBundle.load(kept / "index")
    instr = InstructionSet.load(kept / "instructions")
    model, tok, meta = load_recommender(kept / "model", cfg.model.backbone)
    if model.item_head is None:
        raise SystemExit(f"{kept / 'model'}: no item head (train with model.item_head > 0)")
    encoder = Encoder(tok, model.vocab)
    parts = {"valid": instr.part("valid"), "test": instr.part("test")}
    result = {"env": common.env_info(), "config": args.config, "kept": str(kept), "train": meta.get("train", {}), "grid": {}}
    for point in args.grid:
        beams, cands, fusion = point.split(":")
        model.item_head.candidates = int(cands)
        model.item_head.fusion.fill_(float(fusion))
        ecfg = cfg.eval.model_copy(update={"beams": int(beams), "valid_max_users": args.valid_users,
                                           "test_max_users": args.test_users})
        t0 = time.perf_counter()
        metrics, _ = evaluate_llm(model, encoder, bundle.items, parts, ecfg, cfg.seed, stages.compute_dtype(cfg), False)
        result["grid"][point] = {"seconds": round(time.perf_counter() - t0, 1), "metrics": metrics}
        print(f"{point}: valid R@10 {metrics['valid/recall_at_10']:.4f} | test R@10 {metrics['test/recall_at_10']:.4f} "
              f"N@10 {metrics['test/ndcg_at_10']:.4f} R@20 {metrics['test/recall_at_20']:.4f} "
              f"({metrics['test/decode_seconds']:.0f}s test decode)", flush=True)
        common.write_json(common.RESULTS / f"{args.out}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
