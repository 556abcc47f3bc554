"""Seed ensemble benchmark: do two fine-tuned recommenders, fused into one list, beat each alone?

Input: models kept by ``bench/seq_training.py --keep DIR`` (each ``DIR/<variant-seed>`` holds ``model``,
``index`` and ``instructions``; seeds may have different SID indexes, so models meet at the *item* level).
For every test user each model decodes as the library does (the constrained beams plus the item head's own top
``item_head_candidates`` items, ranked by ``SID log-prob + fusion x item log-prob``); that is each model's own list,
checked against its saved evaluation. Then every item in the union of the models' candidate pools is scored by
*every* model on its own SIDs (the SID head by teacher forcing from the prompt's KV cache, as decoding scores a head
candidate, plus the fused item log-probability), and three ensembles are ranked:

- ``sum``: the sum of the models' fused scores over the union (a product of the models' probabilities);
- ``rrf``: reciprocal-rank fusion of the models' own top-K lists (``1 / (60 + rank)``), nothing rescored;
- each model re-ranked over the union on its own score (``union/<model>``): what the other's candidates add alone.

    .venv/bin/python bench/ensemble.py --config configs/scientific-item-head.yaml \\
        --models KEEP/item-head-input-seed44 KEEP/item-head-input-seed45 --out scientific/ensemble-seeds44-45

Run it alone on the machine. JSON under ``bench/results``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _decode(path: Path, cfg, users: list[str], bs: int = 16):
    """One model's own list and pool for ``users`` (test split order): rows [U, W], fused scores [U, W] over the
    beams + head candidates, its own top-K rows [U, K]; plus what ``_rescore`` needs to score other rows."""
    import numpy as np
    import torch

    from sidrec.artifacts import IndexBundle, InstructionSet
    from sidrec.model.decode import NEG_INF, _left_pad, beam_search_batch, sid_log_prob
    from sidrec.model.item_head import head_candidates, item_log_prob
    from sidrec.model.sid_model import Encoder, load_recommender
    from sidrec.runtime import compute_dtype

    model, tok, _ = load_recommender(path / "model", cfg.model.backbone)
    model.eval()
    head = model.item_head
    bundle = IndexBundle.load(path / "index")
    instr = InstructionSet.load(path / "instructions")
    rows = instr.part("test").set_index("user_id").loc[users]
    enc = Encoder(tok, model.vocab)
    dtype = compute_dtype(cfg)
    trie = bundle.items.build_trie()
    beams, c = cfg.eval.beams, int(head.candidates)
    w = float(head.fusion)
    prompts = [enc.encode(p) for p in rows["prompt"]]
    U, W = len(prompts), beams + c
    pool = np.full((U, W), -1, dtype=np.int64)
    fused = np.full((U, W), -np.inf, dtype=np.float32)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    with torch.no_grad():
        for s0 in range(0, U, bs):
            idx = order[s0:s0 + bs]
            batch = [prompts[i] for i in idx]
            head.candidates = 0  # plain beams (fusion 0); the candidates and the fusion are added below
            head.fusion.fill_(0.0)
            codes, sc = beam_search_batch(model, batch, bundle.items.num_levels, beams, trie, enc.pad_id, dtype)
            head.candidates = c
            head.fusion.fill_(w)
            ids, mask = _left_pad(batch, enc.pad_id)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                h, cache = model.hidden(ids, attention_mask=mask, position_ids=pos, use_cache=True)
                lp = item_log_prob(head, h[:, -1])
                more, real = head_candidates(head, lp, codes, c)
                more_sc = sid_log_prob(model, cache, mask, pos[:, -1] + 1, h[:, -1], more).masked_fill(~real, NEG_INF)
            r = head.rows_of(torch.cat([codes, more], 1))
            s = torch.cat([sc, more_sc.float()], 1) + w * lp.float().gather(1, r.clamp(min=0))
            pool[idx] = r.numpy()
            fused[idx] = torch.where(r >= 0, s, torch.full_like(s, -np.inf)).numpy()
    top = np.take_along_axis(pool, np.argsort(-fused, axis=1, kind="stable")[:, :beams], 1)
    ctx = dict(model=model, head=head, bundle=bundle, prompts=prompts, enc=enc, dtype=dtype, w=w)
    return pool, fused, top, ctx, rows


def _rescore(ctx, rows_wanted, bs: int = 8):
    """[U, K] fused scores of the catalog rows ``rows_wanted`` [U, K] (-1 = padding) by one model, on its own SIDs."""
    import numpy as np
    import torch

    from sidrec.model.decode import _left_pad, sid_log_prob
    from sidrec.model.item_head import item_log_prob

    model, head, prompts, enc, dtype, w = (ctx[k] for k in ("model", "head", "prompts", "enc", "dtype", "w"))
    U, K = rows_wanted.shape
    out = np.full((U, K), -np.inf, dtype=np.float32)
    with torch.no_grad():
        for s0 in range(0, U, bs):
            idx = np.arange(s0, min(U, s0 + bs))
            batch = [prompts[i] for i in idx]
            r = torch.from_numpy(rows_wanted[idx])
            codes = head.codes[r.clamp(min=0)]
            ids, mask = _left_pad(batch, enc.pad_id)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                h, cache = model.hidden(ids, attention_mask=mask, position_ids=pos, use_cache=True)
                lp = item_log_prob(head, h[:, -1])
                sc = sid_log_prob(model, cache, mask, pos[:, -1] + 1, h[:, -1], codes)
            s = sc.float() + w * lp.float().gather(1, r.clamp(min=0))
            out[idx] = torch.where(r >= 0, s, torch.full_like(s, -np.inf)).numpy()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--models", nargs="+", required=True, help="directories kept by bench/seq_training.py --keep")
    ap.add_argument("--max-users", type=int, default=None, help="the first N test users only (a sample, for a smoke run)")
    ap.add_argument("--out", default="ensemble")
    args = ap.parse_args(argv)

    import numpy as np

    from sidrec import stages
    from sidrec.artifacts import InstructionSet
    from sidrec.config import load_config
    from sidrec.evaluation.metrics import ranking_metrics

    cfg = load_config(args.config)
    stages.set_threads(cfg)
    paths = [Path(p) for p in args.models]
    users = sorted(set.intersection(*(set(InstructionSet.load(p / "instructions").part("test")["user_id"]) for p in paths)))
    if args.max_users:
        users = users[: args.max_users]
    result = {"env": common.env_info(), "config": args.config, "models": [str(p) for p in paths], "users": len(users),
              "metrics": {}}
    ks, K = cfg.eval.ks, cfg.eval.beams

    def report(name, top, targets):
        m = ranking_metrics(top, targets, ks)
        result["metrics"][name] = {k: round(float(v), 5) for k, v in m.items()}
        print(f"{name}: R@10 {m['recall_at_10']:.4f} N@10 {m['ndcg_at_10']:.4f}", flush=True)

    decoded, targets = [], None
    for p in paths:
        t0 = time.perf_counter()
        pool, fused, top, ctx, rows = _decode(p, cfg, users)
        t = np.array([ctx["bundle"].items.row_of(x) for x in rows["target_item"]])
        if targets is None:
            targets = t
        # the models must share the catalog's rows (same items, same order) to meet at the item level
        assert (t == targets).all(), f"{p}: the test targets' catalog rows differ from the first model's"
        decoded.append((pool, fused, top, ctx))
        result.setdefault("decode_seconds", []).append(round(time.perf_counter() - t0, 1))
        report(f"own/{p.name}", top, targets)

    # the union of the candidate pools, padded with -1
    U = len(users)
    union = [np.unique(np.concatenate([d[0][u] for d in decoded])) for u in range(U)]
    union = [x[x >= 0] for x in union]
    width = max(len(x) for x in union)
    rows_u = np.full((U, width), -1, dtype=np.int64)
    for u, x in enumerate(union):
        rows_u[u, : len(x)] = x
    result["union_width_mean"] = round(float(np.mean([len(x) for x in union])), 1)
    scores = []
    for p, d in zip(paths, decoded):
        t0 = time.perf_counter()
        s = _rescore(d[3], rows_u)
        scores.append(s)
        result.setdefault("rescore_seconds", []).append(round(time.perf_counter() - t0, 1))
        top = np.take_along_axis(rows_u, np.argsort(-s, axis=1, kind="stable")[:, :K], 1)
        report(f"union/{p.name}", top, targets)
        del d[3]["model"]  # one model at a time from here on
    total = np.sum(scores, axis=0)
    report("ensemble/sum", np.take_along_axis(rows_u, np.argsort(-total, axis=1, kind="stable")[:, :K], 1), targets)
    rrf = np.zeros((U, width), dtype=np.float64)
    for d in decoded:
        for u in range(U):
            pos = {int(r): i for i, r in enumerate(d[2][u])}
            rrf[u] += [1.0 / (60 + pos[int(r)]) if int(r) in pos else 0.0 for r in rows_u[u]]
    rrf[rows_u < 0] = -np.inf
    report("ensemble/rrf", np.take_along_axis(rows_u, np.argsort(-rrf, axis=1, kind="stable")[:, :K], 1), targets)
    common.write_json(common.RESULTS / f"{args.out}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
