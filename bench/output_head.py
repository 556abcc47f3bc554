"""SID-only output head vs full-vocabulary logits, in training and in decoding.

Usage:
    .venv/bin/python bench/output_head.py --out bench/results/output_head.json [--png FILE]
        [--train-batches 2] [--batch 16] [--decode-users 8] [--beams 20] [--repeats 5] [--threads 1]

Same model in every variant: SmolLM2-135M-Instruct + LoRA (quickstart settings), SID embeddings
initialised as in ``SIDRecModel``, SID index over MovieLens-100k (see ``common.ml100k_index``),
bfloat16 autocast, instruction batches from ``sidrec.data.tasks`` (quickstart task mix), length-bucketed.

Training (forward + backward, loss over the target span; no optimizer step):
- ``sid_head``: ``sidrec.training.loop.target_loss``: SID targets against their level's rows only (text
  targets of SID->title rows against the vocabulary, as in the pipeline);
- ``full_vocab_target_span``: every target position against the full 49k vocabulary + all SID
  rows (the "append SID tokens to the vocabulary" design, loss still on the target span);
- ``full_vocab_all_positions``: full logits at every position, loss masked to the target span
  (what a stock causal-LM loss with ``labels=-100`` outside the target computes).

Decoding (constrained beam search, ``sidrec.model.decode.beam_search_batch``):
- ``sid_head``: logits over the current level's SID rows;
- ``full_vocab``: full vocabulary + all SID rows computed at every step, then the level's
  columns taken (same result, cost of the appended-vocabulary head).

Throughput: non-padding tokens per second (training) and decoded users per second (decoding),
from the best of ``--repeats`` interleaved repeats. Because the whole-step differences are small
next to the noise of a shared machine, the script also times what the variants differ in alone:
head + loss fwd+bwd on the batches' real hidden states (training) and the head matmul for one
decoding step (decoding); ``estimated_speedup_*`` combines these with the backbone time.
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

from sidrec.model.decode import beam_search_batch  # noqa: E402
from sidrec.training.loop import collate, bucketed_batches, encode_rows, target_loss  # noqa: E402


def full_logits(model, h: torch.Tensor) -> torch.Tensor:
    """``[..., base_vocab + n_sid]``: text head and SID rows concatenated (appended-vocabulary head)."""
    text = model.text_logits(h)
    sid = h @ model.sid_embeddings.to(h.dtype).T
    return torch.cat([text, sid.to(text.dtype)], -1)


def full_vocab_loss(model, h, ids, tgt, all_positions: bool):
    pred_mask = tgt[:, 1:]
    labels = ids[:, 1:]
    if all_positions:
        logits = full_logits(model, h[:, :-1]).float()  # [B, T-1, V]
        lab = labels.masked_fill(~pred_mask, -100)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100)
    logits = full_logits(model, h[:, :-1][pred_mask]).float()
    return torch.nn.functional.cross_entropy(logits, labels[pred_mask])


class FullVocabHead:
    """Wraps a SIDRecModel so that ``sid_logits`` computes the full logits then slices the level."""

    def __init__(self, model):
        self._m = model
        self.vocab = model.vocab

    def __getattr__(self, name):
        return getattr(self._m, name)

    def sid_logits(self, h, level):
        full = full_logits(self._m, h)
        sl = self.vocab.level_slice(level)
        base = self.vocab.base_vocab
        return full[..., base + sl.start : base + sl.stop]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    tr = result["training"]["tokens_per_s"]
    names = list(tr)
    axes[0].bar(range(len(names)), [tr[n] for n in names], color=["tab:green", "tab:orange", "tab:red"][: len(names)])
    axes[0].set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    axes[0].set_ylabel("tokens / s (fwd+bwd)")
    axes[0].set_title("training")
    de = result["decoding"]["users_per_s"]
    dn = list(de)
    axes[1].bar(range(len(dn)), [de[n] for n in dn], color=["tab:green", "tab:orange"])
    axes[1].set_xticks(range(len(dn)), [n.replace("_", "\n") for n in dn], fontsize=8)
    axes[1].set_ylabel(f"users / s (beam {result['setup']['beams']})")
    axes[1].set_title("constrained decoding")
    fig.suptitle(f"SID-only head vs full 49k-vocab logits (SmolLM2-135M, {result['setup']['threads']} threads, shared CPU)", fontsize=9)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/output_head.json")
    ap.add_argument("--png", default=None, help="bar chart (default: --out with .png)")
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--batch", type=int, default=16, help="training batch size")
    ap.add_argument("--train-batches", type=int, default=2, help="training batches per repeat")
    ap.add_argument("--decode-users", type=int, default=8)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine 2 threads stall under contention)")
    args = ap.parse_args(argv)

    from sidrec.config import LoraConfig
    from sidrec.data.tasks import build_instructions

    threads = common.set_threads(args.threads)
    env = common.env_info()
    t_start = time.perf_counter()
    dtype = torch.bfloat16
    ds, cfg = common.ml100k()
    index, build = common.ml100k_index(ds)
    model, tok, enc = common.sid_model(index, args.backbone, lora=cfg.model.lora)
    rows = build_instructions(ds, index, cfg.tasks, 512, cfg.data.max_history, cfg.seed)
    train_rows = rows[rows["split"] == "train"].reset_index(drop=True)
    encd = encode_rows(enc, train_rows)
    # representative batches: from a 64-batch bucketed schedule, the ones at evenly spaced
    # quantiles of the mean row length (the first few batches of one schedule can all be short)
    lengths = encd.lengths()
    pool = bucketed_batches(lengths, args.batch, 64, cfg.seed)
    pool = sorted(pool, key=lambda b: float(lengths[b].mean()))
    picks = [int(round((i + 0.5) / args.train_batches * len(pool) - 0.5)) for i in range(args.train_batches)]
    batches = [pool[i] for i in picks]
    collated = [collate(encd, idx, enc.pad_id) for idx in batches]
    n_tokens = int(sum(int(m.sum()) for _, m, _ in collated))
    n_target = int(sum(int(t[:, 1:].sum()) for _, _, t in collated))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def run_train(kind: str):
        def fn():
            for ids, mask, tgt in collated:
                with torch.autocast("cpu", dtype=dtype):
                    h, _ = model.hidden(ids, attention_mask=mask)
                    if kind == "sid_head":
                        loss, _ = target_loss(model, h, ids, tgt)
                    else:
                        loss = full_vocab_loss(model, h, ids, tgt, all_positions=kind == "full_vocab_all_positions")
                loss.backward()
                for p in params:
                    p.grad = None
        return fn

    kinds = ["sid_head", "full_vocab_target_span", "full_vocab_all_positions"]
    load_train = common.load_note()
    print(f"training: {len(collated)} batches x {args.batch}, {n_tokens} tokens ({n_target} target); threads {threads}", flush=True)
    run_train("sid_head")()  # warm-up
    tt = common.interleaved({k: run_train(k) for k in kinds}, args.repeats)
    # head + loss alone (fwd+bwd) on the batches' real hidden states: short, repeatable timings
    # that isolate what the variants differ in (the backbone work is identical)
    hs = []
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        for ids, mask, tgt in collated:
            hs.append(model.hidden(ids, attention_mask=mask)[0].detach())

    def head_only(kind: str):
        def fn():
            for (ids, mask, tgt), h0 in zip(collated, hs):
                h = h0.clone().requires_grad_(True)
                with torch.autocast("cpu", dtype=dtype):
                    if kind == "sid_head":
                        loss, _ = target_loss(model, h, ids, tgt)
                    else:
                        loss = full_vocab_loss(model, h, ids, tgt, all_positions=kind == "full_vocab_all_positions")
                loss.backward()
                for p in params:
                    p.grad = None
        return fn

    ht = common.interleaved({k: head_only(k) for k in kinds}, max(args.repeats, 5))
    head_s = {k: min(v) for k, v in ht.items()}
    backbone_s = max(min(tt["sid_head"]) - head_s["sid_head"], 1e-9)  # fwd+bwd of the backbone alone
    model.eval()

    # decoding
    prompts = common.seqrec_prompts(ds, index, enc, args.decode_users)
    trie = index.build_trie()
    full = FullVocabHead(model)
    L = index.num_levels
    dec = {
        "sid_head": lambda: beam_search_batch(model, prompts, L, args.beams, trie, enc.pad_id, dtype),
        "full_vocab": lambda: beam_search_batch(full, prompts, L, args.beams, trie, enc.pad_id, dtype),
    }
    load_dec = common.load_note()
    beam_search_batch(model, prompts[:2], L, 5, trie, enc.pad_id, dtype)  # warm-up
    dt, last = common.interleaved(dec, args.repeats, return_last=True)
    same = bool(torch.equal(last["sid_head"][0], last["full_vocab"][0]))
    # head-only micro-timing (no backbone): [decode rows, H] @ W.T
    h = torch.randn(len(prompts) * args.beams, model.hidden_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        head = common.interleaved({"sid_head": lambda: model.sid_logits(h, 1), "full_vocab": lambda: full.sid_logits(h, 1)}, 5)

    result = {
        "benchmark": "output_head",
        "command": "python bench/output_head.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "training": {
            "tokens_per_s": {k: round(n_tokens / min(v), 1) for k, v in tt.items()},
            "samples_per_s": {k: round(len(collated) * args.batch / min(v), 2) for k, v in tt.items()},
            "tokens_per_s_median": {k: round(n_tokens / common.median(v), 1) for k, v in tt.items()},
            "seconds": {k: [round(x, 3) for x in v] for k, v in tt.items()},
            "speedup_sid_head_over": {k: round(min(tt[k]) / min(tt["sid_head"]), 3) for k in kinds[1:]},
            "speedup_sid_head_over_paired_median": {k: round(common.paired_ratio(tt[k], tt["sid_head"]), 3) for k in kinds[1:]},
            "head_and_loss_only_s_per_repeat": {k: round(v, 4) for k, v in head_s.items()},
            "backbone_fwd_bwd_s_per_repeat": round(backbone_s, 4),
            "estimated_speedup_sid_head_over": {k: round((backbone_s + head_s[k]) / (backbone_s + head_s["sid_head"]), 3) for k in kinds[1:]},
            "tokens": n_tokens, "target_tokens": n_target, "load": load_train,
        },
        "decoding": {
            "users_per_s": {k: round(len(prompts) / min(v), 3) for k, v in dt.items()},
            "users_per_s_median": {k: round(len(prompts) / common.median(v), 3) for k, v in dt.items()},
            "seconds": {k: [round(x, 3) for x in v] for k, v in dt.items()},
            "speedup_sid_head_over_full_vocab": round(min(dt["full_vocab"]) / min(dt["sid_head"]), 3),
            "speedup_sid_head_over_full_vocab_paired_median": round(common.paired_ratio(dt["full_vocab"], dt["sid_head"]), 3),
            "same_result": same, "load": load_dec,
            "head_only_ms_per_step": {k: round(1000 * common.median(v), 3) for k, v in head.items()},
        },
        "setup": {
            "backbone": args.backbone, "lora": cfg.model.lora.model_dump(), "dtype": "bfloat16",
            "vocab": model.vocab.base_vocab, "sid_rows": len(model.vocab), "level_sizes": index.level_sizes,
            "train_batch": args.batch, "train_batches_per_repeat": args.train_batches,
            "decode_users": len(prompts), "beams": args.beams, "threads": threads, "repeats": args.repeats,
            "timing": ("interleaved repeats, order rotated; throughput and speedups from the best (min) time of each "
                       "variant (robust to the shared machine's additive noise); *_median / *_paired_median also given"),
            "index_build": build,
        },
        "env": env, "load_at_end": common.load_note(), "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = common.write_json(args.out, result)
    plot(result, Path(args.png) if args.png else out.with_suffix(".png"))
    print("train tokens/s:", result["training"]["tokens_per_s"], "decode users/s:", result["decoding"]["users_per_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
