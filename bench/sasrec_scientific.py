"""SASRec and most-popular on Amazon Scientific (UniSRec split) vs the RecBole reference.

Usage:
    python bench/sasrec_scientific.py --data ../shared/data/amazon-scientific --out sasrec_sci.json

Reads <name>.test.inter (user_id, item_id_list, item_id); each row's full
sequence is history + target. Leave-one-out: train = seq[:-2], valid target =
seq[-2] (history seq[:-2]), test target = seq[-1] (history seq[:-1]). Full
ranking over all items, history items not excluded (as RecBole does).
Reference (SOURCE.md, RecBole 1.2.1): SASRec Recall@10 .0980, NDCG@10 .0561;
most-popular Recall@10 .0309, NDCG@10 .0172.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidrec.evaluation.baselines import popularity_ranked, sasrec_topk, train_sasrec  # noqa: E402
from sidrec.config import SASRecConfig  # noqa: E402
from sidrec.evaluation.metrics import ranking_metrics  # noqa: E402

REFERENCE = {
    "sasrec": {"recall_at_5": 0.0732, "recall_at_10": 0.0980, "ndcg_at_5": 0.0481, "ndcg_at_10": 0.0561},
    "popularity": {"recall_at_10": 0.0309, "ndcg_at_10": 0.0172},
}


def load_sequences(folder: Path, name: str | None = None) -> tuple[list[list[int]], int]:
    """Full per-user sequences (history + test target) and the number of items."""
    if name is None:
        hits = sorted(folder.glob("*.test.inter"))
        if not hits:
            sys.exit(f"error: no *.test.inter in {folder}")
        name = hits[0].name[: -len(".test.inter")]
    path = folder / f"{name}.test.inter"
    raw: list[list[str]] = []
    with path.open(encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        cols = [h.split(":")[0] for h in header]
        ih, it = cols.index("item_id_list"), cols.index("item_id")
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                continue
            raw.append(parts[ih].split() + [parts[it]])
    # item tokens -> contiguous indices; the UniSRec files already use 0..n-1 integer ids
    tokens = {t for s in raw for t in s}
    i2i = folder / f"{name}.item2index"
    if all(t.isdigit() for t in tokens):
        ids = sorted(int(t) for t in tokens)
        n_items = max(ids[-1] + 1, sum(1 for _ in i2i.open()) if i2i.is_file() else 0)
        seqs = [[int(t) for t in s] for s in raw]
    else:
        vocab = {t: i for i, t in enumerate(sorted(tokens))}
        n_items = len(vocab)
        seqs = [[vocab[t] for t in s] for s in raw]
    return seqs, n_items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/amazon-scientific")
    ap.add_argument("--name", default=None, help="file prefix (default: the *.test.inter found)")
    ap.add_argument("--out", default="sasrec_scientific.json")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=256,
                    help="users per batch (each contributes every position); RecBole's 2048 counts prefix rows")
    ap.add_argument("--max-epochs", type=int, default=200)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = Path(args.data)
    seqs, n_items = load_sequences(folder, args.name)
    seqs = [s for s in seqs if len(s) >= 3]
    train = [s[:-2] for s in seqs]
    valid = (train, np.array([s[-2] for s in seqs]))
    test_hist = [s[:-1] for s in seqs]
    test_tgt = np.array([s[-1] for s in seqs])
    print(f"{len(seqs)} users, {n_items} items, {sum(map(len, seqs))} interactions")

    cfg = SASRecConfig(hidden=64, layers=2, heads=2, dropout=0.5, max_len=50, lr=1e-3,
                       batch_size=args.batch_size, max_epochs=args.max_epochs, patience=args.patience)
    t0 = time.perf_counter()
    model, info = train_sasrec(train, n_items, cfg, seed=args.seed, valid=valid,
                               progress=not args.no_progress, max_minutes=args.max_minutes)
    ks = (5, 10, 20)
    sas = ranking_metrics(sasrec_topk(model, test_hist, max(ks)), test_tgt, ks)
    pop = ranking_metrics(popularity_ranked(train, n_items, len(seqs), max(ks)), test_tgt, ks)
    result = {
        "dataset": str(folder),
        "users": len(seqs),
        "items": n_items,
        "threads": torch.get_num_threads(),
        "sasrec_config": cfg.model_dump(),
        "seed": args.seed,
        "sasrec_info": info,
        "wall_seconds": time.perf_counter() - t0,
        "sasrec": sas,
        "popularity": pop,
        "reference": REFERENCE,
    }
    Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"SASRec: best epoch {info['best_epoch']} / {info['epochs_run']} run, {info['train_seconds']:.0f} s")
    for name, m in (("sasrec", sas), ("popularity", pop)):
        ref = REFERENCE[name]
        cells = []
        for key in ("recall_at_5", "recall_at_10", "ndcg_at_5", "ndcg_at_10"):
            r = f" (ref {ref[key]:.4f})" if key in ref else ""
            cells.append(f"{key} {m[key]:.4f}{r}")
        print(f"{name:10s} " + ", ".join(cells))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
