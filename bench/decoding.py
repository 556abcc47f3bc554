"""Cost of the trie constraint in batched SID beam search, and the invalid-SID rate without it.

Usage:
    .venv/bin/python bench/decoding.py --out bench/results/decoding.json [--backbone smollm2]
        [--batch 32] [--beams 10 20 50] [--ref-beams 20] [--repeats 3] [--threads 1]

Setup: SmolLM2-135M-Instruct (no adapter; SID embeddings initialised as in ``SIDRecModel``),
a real SID index over the 1682 MovieLens-100k items (MiniLM item-text embeddings -> RQ-KMeans,
M=3, codebook 'auto' = 32, plus the collision level), ``batch`` test-user prompts
(``History: <10 SIDs> Next:``), bfloat16 autocast as in the pipeline.

Variants, all timed in one process with interleaved repeats (order rotated each repeat):
- ``constrained``: ``sidrec.model.decode.beam_search_batch`` with the dense-table ``PrefixTrie``;
- ``unconstrained``: the same function with ``trie=None`` (identical search, no mask);
- ``dict_trie`` (reference): the same batched search and model forwards, but the mask is built
  the usual ``prefix_allowed_tokens_fn`` way: for every hypothesis at every step walk a nested
  Python dict from the root along the hypothesis's prefix and set the allowed codes in a mask.

Reported per beam width: ratio constrained/unconstrained from the best (min) time of each variant
(headline; the noise of a shared machine only adds time), the median of per-repeat paired ratios,
and an estimate from the constraint-only statements timed alone on the real shapes
(``constraint_ops_s_per_search``); speedup of the dense trie over the dict trie (whole search, and
the mask alone); invalid rate (share of emitted beams whose code tuple is not in the catalog).
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

from sidrec.model.decode import NEG_INF, _left_pad, beam_search_batch  # noqa: E402


# --------------------------------------------------------------------------- reference


def build_dict_trie(codes: np.ndarray) -> dict:
    root: dict = {}
    for row in codes.tolist():
        d = root
        for c in row:
            d = d.setdefault(c, {})
    return root


def make_prefix_allowed_fn(dict_trie: dict):
    """``fn(batch_id, prefix) -> list of allowed next codes``: the public HF-style callback."""

    def fn(batch_id: int, prefix: list[int]) -> list[int]:
        d = dict_trie
        for c in prefix:
            d = d.get(c)
            if d is None:
                return []
        return list(d.keys())

    return fn


@torch.no_grad()
def beam_search_dict_reference(model, prompts, num_levels, beams, prefix_allowed_fn, pad_id=0, dtype=torch.bfloat16):
    """``beam_search_batch`` with the mask built by a Python loop over hypotheses (reference)."""
    vocab = model.vocab
    B = len(prompts)
    ids, mask = _left_pad(prompts, pad_id)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        h, cache = model.hidden(ids, attention_mask=mask, position_ids=pos, use_cache=True)
    h = h[:, -1]
    next_pos = pos[:, -1] + 1
    scores = torch.zeros(B, 1)
    codes = torch.zeros(B, 1, 0, dtype=torch.long)
    for level in range(num_levels):
        k_in = scores.shape[1]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = model.sid_logits(h, level)
        logp = torch.log_softmax(logits.float(), dim=-1).view(B, k_in, -1)
        n_codes = logp.shape[-1]
        # --- the reference part: per-hypothesis Python walk of a nested dict
        allowed = torch.zeros(B, k_in, n_codes, dtype=torch.bool)
        prefixes = codes.tolist()
        for b in range(B):
            for k in range(k_in):
                ok = prefix_allowed_fn(b, prefixes[b][k])
                if ok:
                    allowed[b, k, ok] = True
        logp = logp.masked_fill(~allowed, NEG_INF)
        # ---
        cand = (scores.unsqueeze(-1) + logp).view(B, k_in * n_codes)
        k_out = min(beams, k_in * n_codes)
        top, flat = cand.topk(k_out, dim=-1)
        src = torch.div(flat, n_codes, rounding_mode="floor")
        code = flat % n_codes
        codes = torch.cat([codes.gather(1, src.unsqueeze(-1).expand(-1, -1, codes.shape[-1])), code.unsqueeze(-1)], -1)
        scores = top
        if level == num_levels - 1:
            break
        flat_src = (src + torch.arange(B).unsqueeze(1) * k_in).view(-1)
        if k_in == 1:
            cache.batch_repeat_interleave(k_out)
            mask = mask.repeat_interleave(k_out, dim=0)
            next_pos = next_pos.repeat_interleave(k_out, dim=0)
        else:
            cache.reorder_cache(flat_src)
            mask = mask.index_select(0, flat_src)
            next_pos = next_pos.index_select(0, flat_src)
        tok = vocab.code_ids(level, code.view(-1, 1))
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            h, cache = model.hidden(tok, attention_mask=mask, position_ids=next_pos.unsqueeze(1), cache=cache, use_cache=True)
        h = h[:, -1]
        next_pos = next_pos + 1
    return codes, scores


# --------------------------------------------------------------------------- helpers


def invalid_rate(codes: torch.Tensor, scores: torch.Tensor, catalog: set) -> tuple[float, int]:
    c = codes.numpy()
    s = scores.numpy()
    emitted = invalid = 0
    for b in range(c.shape[0]):
        for k in range(c.shape[1]):
            if np.isfinite(s[b, k]):
                emitted += 1
                invalid += tuple(c[b, k].tolist()) not in catalog
    return invalid / max(emitted, 1), emitted


def time_mask_only(trie, dict_fn, B, beams, n_codes, level, codes_prefix, repeats=20):
    """Mask construction alone (no model): dense-table gather vs dict walk, seconds per call."""
    nodes = torch.zeros(B * beams, dtype=torch.long)
    t0 = time.perf_counter()
    for _ in range(repeats):
        trie.allowed(level, nodes)
    dense = (time.perf_counter() - t0) / repeats
    prefixes = codes_prefix.tolist()
    t0 = time.perf_counter()
    for _ in range(repeats):
        allowed = torch.zeros(B, beams, n_codes, dtype=torch.bool)
        for b in range(B):
            for k in range(beams):
                ok = dict_fn(b, prefixes[b][k])
                if ok:
                    allowed[b, k, ok] = True
    ref = (time.perf_counter() - t0) / repeats
    return dense, ref


def constraint_ops_seconds(trie, B: int, beams: int, level_sizes: list[int], repeats: int = 20) -> float:
    """Seconds per search spent in the constraint-only statements of ``beam_search_batch``.

    Replays, for the real shapes (``B`` prompts x ``beams``, every level), exactly the statements
    that the ``trie is not None`` branches of ``sidrec.model.decode.beam_search_batch`` execute (mask
    build + ``masked_fill``, parent gather + ``advance`` + ``where``), timing only those; the
    log-probs are random and the top-k between them is not timed. Median over ``repeats``.
    """
    g = torch.Generator().manual_seed(0)
    per = []
    for _ in range(repeats):
        spent = 0.0
        scores = torch.zeros(B, 1)
        nodes = torch.zeros(B, 1, dtype=torch.long)
        for level, n_codes in enumerate(level_sizes):
            k_in = scores.shape[1]
            logp = torch.log_softmax(torch.randn(B, k_in, n_codes, generator=g), -1)
            t0 = time.perf_counter()
            alive = nodes >= 0
            allowed = trie.allowed(level, nodes.clamp(min=0).view(-1)).view(B, k_in, n_codes)
            logp = logp.masked_fill(~(allowed & alive.unsqueeze(-1)), NEG_INF)
            spent += time.perf_counter() - t0
            cand = (scores.unsqueeze(-1) + logp).view(B, k_in * n_codes)
            k_out = min(beams, k_in * n_codes)
            top, flat = cand.topk(k_out, dim=-1)
            src = torch.div(flat, n_codes, rounding_mode="floor")
            code = flat % n_codes
            t0 = time.perf_counter()
            parent = nodes.gather(1, src)
            child = trie.advance(level, parent.clamp(min=0).view(-1), code.view(-1)).view(B, k_out)
            nodes = torch.where((parent >= 0) & torch.isfinite(top), child, torch.full_like(child, -1))
            spent += time.perf_counter() - t0
            scores = top
        per.append(spent)
    return float(np.median(per))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/decoding.json")
    ap.add_argument("--backbone", default="smollm2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--beams", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--ref-beams", type=int, nargs="*", default=[20], help="beam widths at which the dict-trie reference runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine 2 threads stall under contention)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = ap.parse_args(argv)

    threads = common.set_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    env = common.env_info()
    t_start = time.perf_counter()

    ds, _ = common.ml100k()
    index, build = common.ml100k_index(ds)
    model, tok, enc = common.sid_model(index, args.backbone)
    model.eval()
    prompts = common.seqrec_prompts(ds, index, enc, args.batch)
    trie = index.build_trie()
    dict_fn = make_prefix_allowed_fn(build_dict_trie(index.codes))
    catalog = {tuple(r) for r in index.codes.tolist()}
    L = index.num_levels
    pad = enc.pad_id
    print(f"index: {len(index)} items, level sizes {index.level_sizes}; prompts: {len(prompts)}, "
          f"mean length {np.mean([len(p) for p in prompts]):.1f} tokens; threads {threads}", flush=True)

    # one small warm-up call per variant (first-call overheads), outside the measurements
    beam_search_batch(model, prompts[:4], L, 5, trie, pad, dtype)
    beam_search_batch(model, prompts[:4], L, 5, None, pad, dtype)
    beam_search_dict_reference(model, prompts[:4], L, 5, dict_fn, pad, dtype)

    per_beam = {}
    for beams in args.beams:
        fns = {
            "constrained": lambda: beam_search_batch(model, prompts, L, beams, trie, pad, dtype),
            "unconstrained": lambda: beam_search_batch(model, prompts, L, beams, None, pad, dtype),
        }
        if beams in args.ref_beams:
            fns["dict_trie"] = lambda: beam_search_dict_reference(model, prompts, L, beams, dict_fn, pad, dtype)
        load_before = common.load_note()
        times, last = common.interleaved(fns, args.repeats, return_last=True)
        c_codes, c_scores = last["constrained"]
        u_codes, u_scores = last["unconstrained"]
        c_inv, c_n = invalid_rate(c_codes, c_scores, catalog)
        u_inv, u_n = invalid_rate(u_codes, u_scores, catalog)
        ops_s = constraint_ops_seconds(trie, len(prompts), beams, index.level_sizes)
        t_unc_min = min(times["unconstrained"])
        entry = {
            "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
            "median_s": {k: round(common.median(v), 4) for k, v in times.items()},
            "min_s": {k: round(min(v), 4) for k, v in times.items()},
            "ratio_constrained_over_unconstrained": round(min(times["constrained"]) / t_unc_min, 4),
            "ratio_paired_median": round(common.paired_ratio(times["constrained"], times["unconstrained"]), 4),
            "constraint_ops_s_per_search": ops_s,
            "ratio_estimate_from_ops": round(1.0 + ops_s / t_unc_min, 5),
            "users_per_s_constrained": round(args.batch / common.median(times["constrained"]), 2),
            "invalid_rate_constrained": c_inv,
            "invalid_rate_unconstrained": u_inv,
            "emitted_beams": {"constrained": c_n, "unconstrained": u_n},
            "load_before": load_before, "load_after": common.load_note(),
        }
        if "dict_trie" in times:
            r_codes, r_scores = last["dict_trie"]
            entry["speedup_over_dict_trie"] = round(min(times["dict_trie"]) / min(times["constrained"]), 4)
            entry["speedup_over_dict_trie_paired_median"] = round(common.paired_ratio(times["dict_trie"], times["constrained"]), 4)
            entry["dict_trie_same_result"] = bool(torch.equal(r_codes, c_codes) and torch.allclose(r_scores, c_scores))
            # the mask alone, at the widest level, without the model
            dense_s, ref_s = time_mask_only(trie, dict_fn, args.batch, beams, index.level_sizes[1], 1, c_codes[:, :, :1])
            entry["mask_only_s_per_step_level1"] = {"dense_table": dense_s, "dict_walk": ref_s, "speedup": round(ref_s / dense_s, 1)}
        per_beam[str(beams)] = entry
        print(f"beams {beams}: " + ", ".join(f"{k} {v:.2f}s" for k, v in entry["median_s"].items())
              + f"; ratio {entry['ratio_constrained_over_unconstrained']:.3f} (paired median {entry['ratio_paired_median']:.3f}, from ops {entry['ratio_estimate_from_ops']:.4f})"
              + (f"; speedup over dict {entry['speedup_over_dict_trie']:.2f}x" if "speedup_over_dict_trie" in entry else "")
              + f"; invalid unconstrained {u_inv:.3f}", flush=True)

    result = {
        "benchmark": "decoding",
        "command": "python bench/decoding.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "ratio_constrained_over_unconstrained": {b: e["ratio_constrained_over_unconstrained"] for b, e in per_beam.items()},
        "speedup_over_dict_trie": {b: e["speedup_over_dict_trie"] for b, e in per_beam.items() if "speedup_over_dict_trie" in e},
        "invalid_rate_constrained": max(e["invalid_rate_constrained"] for e in per_beam.values()),
        "invalid_rate_unconstrained": {b: round(e["invalid_rate_unconstrained"], 4) for b, e in per_beam.items()},
        "target_ratio_at_20": 1.10,
        "setup": {
            "backbone": args.backbone, "adapter": "none (untrained SID embeddings, pipeline init)",
            "batch_users": args.batch, "beams": args.beams, "dtype": args.dtype, "levels": L,
            "level_sizes": index.level_sizes, "catalog": len(index), "index_build": build,
            "prompt_tokens_mean": float(np.mean([len(p) for p in prompts])),
            "threads": threads, "repeats": args.repeats, "warmup": "one call per variant on 4 prompts, beam 5",
            "timing": ("interleaved repeats, variant order rotated; headline ratios = ratio of the best (min) "
                       "times, robust to the additive noise of a shared machine; per_beam also has the median "
                       "of per-repeat paired ratios and an estimate from the timed constraint-only statements"),
        },
        "per_beam": per_beam,
        "env": env,
        "load_at_end": common.load_note(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
