"""SASRec's epoch on a 50k-user catalog (issue 14 item 3): seconds per epoch and valid NDCG@10 after each
epoch, per batch size, with and without length-bucketed batches. The catalog is bench/scale.py's synthetic
one (47.5k users, 11.4k items after 5-core at 50k); the model, loss (full softmax at every position) and
optimiser are the library's (:mod:`sidrec.evaluation.baselines`), with ``baselines.sasrec``'s defaults.

    .venv/bin/python bench/sasrec_epoch.py --users 50000 --epochs 3 --runs 256 128 64 1024:2e-3 256:bucketed

A run is ``BATCH[:LR][:bucketed]``. Run it alone on the machine. JSON under bench/results.

With ``--converge`` each run (``BATCH[:LR]``) is instead trained as the pipeline trains the same-run SASRec
(:func:`sidrec.evaluation.baselines.train_sasrec`: early stopping on valid NDCG@10 with ``baselines.sasrec``'s
patience, the best epoch kept) and scored on the test split (Recall@10, NDCG@10): the wall time to
convergence and the quality it converges to, per batch size.

    .venv/bin/python bench/sasrec_epoch.py --users 50000 --converge --runs 256 128 --out sasrec_converge
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from scale import synth_catalog  # noqa: E402

from sidrec.evaluation import baselines as B  # noqa: E402
from sidrec.evaluation.evaluate import indexed_split  # noqa: E402


def bucketed_epoch(model, opt, inp, tgt, batch_size, gen) -> float:
    """As :func:`sidrec.evaluation.baselines._train_epoch`, but batches of sequences of similar length
    (sorted by length with a random tie-break, then the batches shuffled): less padding per batch."""
    model.train()
    lens = (inp > 0).sum(1)
    order = torch.argsort(lens.float() + torch.rand(len(lens), generator=gen))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    tot, cnt = 0.0, 0
    for b in torch.randperm(len(batches), generator=gen).tolist():
        loss, n = B.train_step(model, opt, inp[batches[b]], tgt[batches[b]])
        tot += loss * n
        cnt += n
    return tot / max(cnt, 1)


def parse_run(run: str, default_lr: float) -> tuple[int, float, bool]:
    """``BATCH[:LR][:bucketed]`` -> (batch size, learning rate, bucketed)."""
    parts = run.split(":")
    lr = next((float(p) for p in parts[1:] if p != "bucketed"), default_lr)
    return int(parts[0]), lr, "bucketed" in parts


def converge(run: str, train, n_items: int, sc, valid, test) -> dict:
    """Train SASRec as the pipeline does, with run ``BATCH[:LR]``'s batch size and learning rate; score on test."""
    from sidrec.evaluation.metrics import ranking_metrics

    bs, lr, bucketed = parse_run(run, sc.lr)
    if bucketed:
        raise SystemExit(f"--converge trains as the pipeline does (no length-bucketed batches): drop ':bucketed' from {run!r}")
    cfg = sc.model_copy(update={"batch_size": bs, "lr": lr})
    model, info = B.train_sasrec(train, n_items, cfg, seed=0, valid=valid, progress=False)
    m = ranking_metrics(B.sasrec_topk(model, test[0], 10), test[1], ks=(10,))
    return {**info, "seconds_per_epoch": round(info["train_seconds"] / max(info["epochs_run"], 1), 1),
            "test_recall_at_10": round(m["recall_at_10"], 4), "test_ndcg_at_10": round(m["ndcg_at_10"], 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--runs", nargs="+", default=["256", "128", "64", "1024:2e-3", "256:bucketed"])
    ap.add_argument("--converge", action="store_true",
                    help="train each run to early stopping and score it on test, instead of --epochs epochs")
    ap.add_argument("--out", default="sasrec_epoch")
    args = ap.parse_args(argv)

    from sidrec import stages
    from sidrec.config import parse_config

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        wd = Path(tmp)
        inter, items = synth_catalog(args.users, seed=0)
        inter.to_csv(wd / "i.csv", index=False)
        items.to_csv(wd / "t.csv", index=False)
        cfg = parse_config({"data": {"format": "table", "path": str(wd / "i.csv"), "items_path": str(wd / "t.csv"),
                                     "name": f"synthetic-{args.users}", "max_history": 20}})
        ds = stages.ingest(cfg)
    index = ds.item_index()
    train = [[index[i] for i in s] for s in ds.train_sequences().values()]
    sc = cfg.baselines.sasrec
    inp, tgt = B._training_arrays(train, sc.max_len)
    valid = indexed_split(ds, "valid", sc.max_len)
    result = {"env": common.env_info(), "users": len(train), "items": len(index),
              "supervised_positions": int((tgt > 0).sum()), "runs": {}}
    print({k: result[k] for k in ("users", "items", "supervised_positions")}, flush=True)
    if args.converge:
        test = indexed_split(ds, "test", sc.max_len)
        result["test_users"] = len(test[1])
        result["patience"] = sc.patience
        for run in args.runs:
            result["runs"][run] = converge(run, train, len(index), sc, valid, test)
            print(run, result["runs"][run], flush=True)
            common.write_json(common.RESULTS / f"{args.out}.json", result)
        return 0
    for run in args.runs:
        bs, lr, bucketed = parse_run(run, sc.lr)
        epoch_fn = bucketed_epoch if bucketed else B._train_epoch
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        model = B.SASRec.from_config(len(index), sc)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        rows = []
        for epoch in range(1, args.epochs + 1):
            t = time.perf_counter()
            loss = epoch_fn(model, opt, inp, tgt, bs, gen)
            train_s = time.perf_counter() - t
            t = time.perf_counter()
            ndcg = B._valid_ndcg10(model, valid)
            rows.append({"epoch": epoch, "train_seconds": round(train_s, 1), "valid_seconds": round(time.perf_counter() - t, 1),
                         "loss": round(loss, 4), "valid_ndcg_at_10": round(ndcg, 4)})
        result["runs"][run] = rows
        print(run, rows, flush=True)
        common.write_json(common.RESULTS / f"{args.out}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
