"""Paired difference of two recommenders on the same test users: Recall@10 and NDCG@10, user by user, with standard
errors. Reads the per-user predictions (``predictions.parquet``) that ``bench/seq_training.py --keep`` and
``bench/decode_speed.py --predictions`` write.

    .venv/bin/python bench/paired.py NEW.parquet BASE.parquet
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("new", help="predictions of the variant")
    ap.add_argument("base", help="predictions of the model it is compared with")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
    import pandas as pd

    a, b = pd.read_parquet(args.new), pd.read_parquet(args.base)
    ua, ub = (set(p.loc[p["split"] == "test", "user_id"]) for p in (a, b))
    if ua != ub:
        print(f"paired.py: the two files score different test users ({len(ua)} vs {len(ub)}); compare runs on the "
              "same users", file=sys.stderr)
        return 2
    print(json.dumps({"users": len(ua), **common.paired_at_10(a, b)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
