"""Throughput of the sidrec training loop vs a bare forward+backward loop on the same batches.

Usage:
    .venv/bin/python bench/train_throughput.py --out bench/results/train_throughput.json
        [--steps 6] [--batch 16] [--repeats 3] [--threads 1]

Model: SmolLM2-135M-Instruct + LoRA (quickstart: r=8, alpha=32, dropout 0.05) + SID embeddings,
SID index over MovieLens-100k (``common.ml100k_index``), instruction rows from the quickstart
task mix, bfloat16 autocast.

- ``sidrec_loop``: ``sidrec.training.loop.train`` as the pipeline calls it (encoding of the rows,
  length-bucketed batches, collation, target-span loss, AdamW over LoRA + SID embeddings, LR
  schedule, grad clipping, loss bookkeeping), ``--steps`` steps;
- ``bare_fwd_bwd``: the same batches (same bucketing seed), collated beforehand; per batch only
  forward + ``target_loss`` + backward (no optimizer, no clipping, no bookkeeping).

overhead ratio = time(sidrec_loop) / time(bare_fwd_bwd), median of per-repeat paired ratios
(interleaved repeats); the ratio of the best times is the headline. Padding share is measured on the bucketed batches and compared with the
same batch size without bucketing (random batches, computed from the lengths only).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from sidrec.training.loop import collate, bucketed_batches, encode_rows, target_loss, train  # noqa: E402


def padding_share(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    return 1.0 - real / max(padded, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/train_throughput.json")
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine 2 threads stall under contention)")
    args = ap.parse_args(argv)

    from sidrec.data.tasks import build_instructions

    threads = common.set_threads(args.threads)
    env = common.env_info()
    t_start = time.perf_counter()
    dtype = torch.bfloat16
    ds, cfg = common.ml100k()
    index, build = common.ml100k_index(ds)
    model, tok, enc = common.sid_model(index, args.backbone, lora=cfg.model.lora)
    tcfg = cfg.train.model_copy(update={"steps": args.steps, "batch_size": args.batch, "log_every": max(args.steps, 1)})
    rows = build_instructions(ds, index, cfg.tasks, max(args.steps * args.batch, 256), cfg.data.max_history, cfg.seed)
    train_rows = rows[rows["split"] == "train"].reset_index(drop=True)

    # the same batches the loop will draw (train() buckets with the same seed)
    encd = encode_rows(enc, train_rows)
    lengths = encd.lengths()
    batches = bucketed_batches(lengths, args.batch, args.steps, cfg.seed)
    collated = [collate(encd, idx, enc.pad_id) for idx in batches]
    n_tokens = int(sum(int(m.sum()) for _, m, _ in collated))
    n_padded = int(sum(m.numel() for _, m, _ in collated))
    params = [p for p in model.parameters() if p.requires_grad]
    results = []

    def sidrec_loop():
        results.append(train(model, enc, train_rows, tcfg, cfg.seed, dtype, log=None, progress=False))

    def bare():
        model.train()
        for ids, mask, tgt in collated:
            with torch.autocast("cpu", dtype=dtype):
                h, _ = model.hidden(ids, attention_mask=mask)
                loss, _ = target_loss(model, h, ids, tgt)
            loss.backward()
            for p in params:
                p.grad = None
        model.eval()

    # warm-up: one sidrec step (first optimizer/autograd call costs seconds once) and one bare batch
    t0 = time.perf_counter()
    train(model, enc, train_rows, tcfg.model_copy(update={"steps": 1}), cfg.seed, dtype, log=None, progress=False)
    first_call_s = time.perf_counter() - t0
    ids, mask, tgt = collated[0]
    with torch.autocast("cpu", dtype=dtype):
        h, _ = model.hidden(ids, attention_mask=mask)
        target_loss(model, h, ids, tgt)[0].backward()
    for p in params:
        p.grad = None

    load_before = common.load_note()
    print(f"{args.steps} steps x {args.batch}: {n_tokens} tokens ({n_padded} padded); threads {threads}", flush=True)
    times = common.interleaved({"sidrec_loop": sidrec_loop, "bare_fwd_bwd": bare}, args.repeats)
    res = results[-1]
    same_batches = res.tokens == n_tokens and res.padded_tokens == n_padded

    # padding: bucketed vs plain random batches over a full quickstart-length schedule
    full_steps = cfg.train.steps
    big = build_instructions(ds, index, cfg.tasks, full_steps * args.batch, cfg.data.max_history, cfg.seed)
    big_len = encode_rows(enc, big[big["split"] == "train"].reset_index(drop=True)).lengths()
    bucketed = bucketed_batches(big_len, args.batch, full_steps, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    perm = np.concatenate([rng.permutation(len(big_len)) for _ in range(2)])
    random_b = [perm[i * args.batch : (i + 1) * args.batch] for i in range(full_steps)]

    med = {k: common.median(v) for k, v in times.items()}
    samples = args.steps * args.batch
    result = {
        "benchmark": "train_throughput",
        "command": "python bench/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "samples_per_s": {k: round(samples / min(v), 3) for k, v in times.items()},
        "tokens_per_s": {k: round(n_tokens / min(v), 1) for k, v in times.items()},
        "samples_per_s_median": {k: round(samples / v, 3) for k, v in med.items()},
        "overhead_ratio_sidrec_over_bare": round(min(times["sidrec_loop"]) / min(times["bare_fwd_bwd"]), 4),
        "overhead_ratio_paired_median": round(common.paired_ratio(times["sidrec_loop"], times["bare_fwd_bwd"]), 4),
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "padding_share": {
            "measured_this_run": round(res.padding_share, 4),
            f"bucketed_{full_steps}_steps": round(padding_share(big_len, bucketed), 4),
            f"random_batches_{full_steps}_steps": round(padding_share(big_len, random_b), 4),
        },
        "first_call_one_step_s": round(first_call_s, 3),
        "tokens": n_tokens, "padded_tokens": n_padded, "same_batches_as_bare": bool(same_batches),
        "setup": {"backbone": args.backbone, "lora": cfg.model.lora.model_dump(), "dtype": "bfloat16",
                  "steps": args.steps, "batch": args.batch, "threads": threads, "repeats": args.repeats,
                  "warmup": "one sidrec_loop call of 1 step + one bare batch (not timed)", "level_sizes": index.level_sizes, "index_build": build,
                  "timing": ("interleaved repeats, order rotated; throughput and ratio from the best (min) time of each "
                             "variant; the median of per-repeat paired ratios is also given")},
        "load_before": load_before, "env": env, "load_at_end": common.load_note(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    common.write_json(args.out, result)
    print("samples/s:", result["samples_per_s"], "overhead:", result["overhead_ratio_sidrec_over_bare"],
          "padding:", result["padding_share"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
