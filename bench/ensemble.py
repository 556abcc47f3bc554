"""Seed ensemble benchmark: do two fine-tuned recommenders, fused into one list, beat each alone?

Input: models kept by ``bench/seq_training.py --keep DIR`` (each ``DIR/<variant-seed>`` holds ``model``,
``index`` and ``instructions``; seeds may have different SID indexes, so models meet at the *item* level).
For every test user each model decodes as the library does (the constrained beams plus the item head's own top
``item_head_candidates`` items, ranked by ``SID log-prob + fusion x item log-prob``); that is each model's own list,
checked against its saved evaluation. Then every item in the union of the models' candidate pools gets a score from
*every* model on its own SIDs: an item in the model's own pool keeps the fused score its decoding gave it; any other
is scored as decoding scores a head candidate (the SID head by teacher forcing from the prompt's KV cache, plus the
fused item log-probability). The library does the same for ``train.member_index: own`` (``sidrec.model.fusion``, whose
pool and rescoring this bench calls). For every subset of two or more models, over the union of that subset's pools:

- ``sum``: the sum of the models' fused scores (a product of the models' probabilities), and, user by user against
  the subset's best single model, the mean difference in hit@10 and NDCG@10 with its standard error (``paired``);
- ``rrf``: reciprocal-rank fusion of the models' own top-K lists (``1 / (60 + rank)``), nothing rescored;

and each model re-ranked over the union of all pools on its own score (``union/<model>``): what the others'
candidates add alone. With ``--seed-ensemble`` (models that share one index, e.g. kept from runs with the same
``index.seed``) the models are also decoded as one ``SeedEnsemble``, as ``train.members`` trains and serves them: one
constrained search over their averaged log-probabilities, evaluated by ``stages.evaluate``.

    .venv/bin/python bench/ensemble.py --config configs/scientific-item-head.yaml \\
        --models KEEP/item-head-input-seed46 KEEP/item-head-input-seed47 KEEP/item-head-input-seed48 \\
        --out scientific/ensemble-seeds46-48

Run it alone on the machine. JSON under ``bench/results``.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _decode(path: Path, cfg, users: list[str], bs: int = 16):
    """One model's own list and pool for ``users`` (test split order): rows [U, W], fused scores [U, W] over the
    beams + head candidates (``sidrec.model.fusion.member_pool``), its own top-K rows [U, K]; plus what ``_rescore``
    needs to score other rows."""
    import numpy as np

    from sidrec.artifacts import IndexBundle, InstructionSet
    from sidrec.model.decode import prefill
    from sidrec.model.fusion import member_pool
    from sidrec.model.sid_model import Encoder, load_recommender
    from sidrec.runtime import compute_dtype

    model, tok, _ = load_recommender(path / "model", cfg.model.backbone)
    model.eval()
    bundle = IndexBundle.load(path / "index")
    rows = InstructionSet.load(path / "instructions").part("test").set_index("user_id").loc[users]
    enc = Encoder(tok, model.vocab)
    dtype = compute_dtype(cfg)
    trie = bundle.items.build_trie()
    beams = cfg.eval.beams
    prompts = [enc.encode(p) for p in rows["prompt"]]
    U, W = len(prompts), beams + int(model.item_head.candidates)
    pool = np.full((U, W), -1, dtype=np.int64)
    fused = np.full((U, W), -np.inf, dtype=np.float32)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    for s0 in range(0, U, bs):
        idx = order[s0:s0 + bs]
        state = prefill(model, [prompts[i] for i in idx], enc.pad_id, dtype)
        r, s = member_pool(model, state, bundle.items, trie, beams)
        pool[idx, : r.shape[1]], fused[idx, : s.shape[1]] = r, s
    top = np.take_along_axis(pool, np.argsort(-fused, axis=1, kind="stable")[:, :beams], 1)
    ctx = dict(model=model, bundle=bundle, prompts=prompts, enc=enc, dtype=dtype)
    return pool, fused, top, ctx, rows


def _rescore(ctx, rows_wanted, bs: int = 8):
    """[U, K] fused scores of the catalog rows ``rows_wanted`` [U, K] (-1 = padding) by one model, on its own SIDs
    (``sidrec.model.fusion.member_scores``)."""
    import numpy as np

    from sidrec.model.decode import prefill
    from sidrec.model.fusion import member_scores

    U, K = rows_wanted.shape
    out = np.full((U, K), -np.inf, dtype=np.float32)
    for s0 in range(0, U, bs):
        idx = np.arange(s0, min(U, s0 + bs))
        state = prefill(ctx["model"], [ctx["prompts"][i] for i in idx], ctx["enc"].pad_id, ctx["dtype"])
        out[idx] = member_scores(ctx["model"], state, ctx["bundle"].items, rows_wanted[idx])
    return out


def _seed_ensemble(cfg, paths: list[Path], valid_users: int, test_users=None):
    """The models as one ``SeedEnsemble`` (what ``train.members`` trains and decodes; they must share one index),
    evaluated by ``stages.evaluate`` on the whole test split (or a seeded sample of ``test_users``; valid on
    ``valid_users``): (metrics, predictions, seconds)."""
    import json
    import shutil
    import tempfile

    from sidrec import stages
    from sidrec.artifacts import IndexBundle, InstructionSet, TrainedRecommender
    from sidrec.model.sid_model import save_ensemble

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "ensemble"
        metas = []
        for k, p in enumerate(paths):
            shutil.copytree(p / "model", d / "members" / str(k))
            metas.append(json.loads((p / "model" / "meta.json").read_text()))
        meta = {**metas[0], "members": [{"model": str(p), "train": m["train"]} for p, m in zip(paths, metas)]}
        save_ensemble(d, meta)
        ecfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"valid_max_users": valid_users,
                                                                             "test_max_users": test_users})})
        t0 = time.perf_counter()
        report = stages.evaluate(TrainedRecommender(path=d, meta=meta), InstructionSet.load(paths[0] / "instructions"),
                                 IndexBundle.load(paths[0] / "index"), ecfg)
        return report.metrics, report.predictions, time.perf_counter() - t0


def _paired(top, single, targets, single_name: str) -> dict:
    """Ensemble minus one model, user by user, at 10: mean difference of hit and NDCG and the standard error of each."""
    import numpy as np

    from sidrec.evaluation.metrics import target_ranks

    out = {}
    for name, ranked in (("ensemble", top), ("single", single)):
        r = target_ranks(ranked, targets)
        inside = (r >= 0) & (r < 10)
        out[name] = (inside.astype(float), np.where(inside, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0))
    res = {"against": single_name}
    for i, metric in enumerate(("recall_at_10", "ndcg_at_10")):
        d = out["ensemble"][i] - out["single"][i]
        res[metric] = {"diff": round(float(d.mean()), 5), "se": round(float(d.std(ddof=1) / np.sqrt(len(d))), 5),
                       "ratio": round(float(out["ensemble"][i].mean() / max(out["single"][i].mean(), 1e-12)), 4)}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--models", nargs="+", required=True, help="directories kept by bench/seq_training.py --keep")
    ap.add_argument("--max-users", type=int, default=None, help="the first N test users only (a sample, for a smoke run)")
    ap.add_argument("--seed-ensemble", action="store_true",
                    help="the models share one index: also decode them as one SeedEnsemble (train.members) on every test user")
    ap.add_argument("--valid-users", type=int, default=200, help="valid users the seed ensemble's evaluation also decodes")
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

    # the union of the candidate pools, padded with -1; which model's own pool holds each union row
    U, n = len(users), len(paths)
    union = [np.unique(np.concatenate([d[0][u] for d in decoded])) for u in range(U)]
    union = [x[x >= 0] for x in union]
    width = max(len(x) for x in union)
    rows_u = np.full((U, width), -1, dtype=np.int64)
    for u, x in enumerate(union):
        rows_u[u, : len(x)] = x
    result["union_width_mean"] = round(float(np.mean([len(x) for x in union])), 1)
    in_pool = np.zeros((n, U, width), dtype=bool)
    scores = np.full((n, U, width), -np.inf, dtype=np.float32)
    for m, d in enumerate(decoded):
        t0 = time.perf_counter()
        pool, fused = d[0], d[1]
        # a model's own pool keeps the scores its decoding gave them; only the others' extra items are scored here
        extra = []
        for u in range(U):
            own = dict(zip(pool[u].tolist(), fused[u].tolist()))
            own.pop(-1, None)
            for j, r in enumerate(rows_u[u, : len(union[u])].tolist()):
                if r in own:
                    in_pool[m, u, j] = True
                    scores[m, u, j] = own[r]
            extra.append([j for j in range(len(union[u])) if not in_pool[m, u, j]])
        ew = max(1, max(len(e) for e in extra))
        rows_e = np.full((U, ew), -1, dtype=np.int64)
        for u, e in enumerate(extra):
            rows_e[u, : len(e)] = rows_u[u, e]
        s_e = _rescore(d[3], rows_e)
        for u, e in enumerate(extra):
            scores[m, u, e] = s_e[u, : len(e)]
        result.setdefault("rescore_seconds", []).append(round(time.perf_counter() - t0, 1))
        result.setdefault("extra_width_mean", []).append(round(float(np.mean([len(e) for e in extra])), 1))
        top = np.take_along_axis(rows_u, np.argsort(-scores[m], axis=1, kind="stable")[:, :K], 1)
        report(f"union/{paths[m].name}", top, targets)
        del d[3]["model"]  # one model at a time from here on

    def ranked(score):
        return np.take_along_axis(rows_u, np.argsort(-score, axis=1, kind="stable")[:, :K], 1)

    singles = [d[2] for d in decoded]
    rrf_of = []
    for d in decoded:  # each model's own top-K as 1 / (60 + rank) over the union
        x = np.zeros((U, width), dtype=np.float64)
        for u in range(U):
            pos = {int(r): i for i, r in enumerate(d[2][u])}
            x[u] = [1.0 / (60 + pos[int(r)]) if int(r) in pos else 0.0 for r in rows_u[u]]
        rrf_of.append(x)
    for size in range(2, n + 1):
        for sub in itertools.combinations(range(n), size):
            tag = "+".join(paths[m].name.rsplit("seed", 1)[-1] for m in sub)
            cand = in_pool[list(sub)].any(0)  # the union of this subset's pools only
            total = np.where(cand, scores[list(sub)].sum(0), -np.inf)
            report(f"ensemble/sum/{tag}", ranked(total), targets)
            # paired against the subset's best single model, user by user: mean difference and its standard error
            b = max(sub, key=lambda m: result["metrics"][f"own/{paths[m].name}"]["recall_at_10"])
            result.setdefault("paired", {})[f"sum/{tag}"] = _paired(ranked(total), singles[b], targets, paths[b].name)
            rrf = np.where(cand, sum(rrf_of[m] for m in sub), -np.inf)
            report(f"ensemble/rrf/{tag}", ranked(rrf), targets)
    if args.seed_ensemble:
        for m in decoded:
            m[3].clear()  # the item-level part's models are done
        metrics, preds, secs = _seed_ensemble(cfg, paths, args.valid_users, args.max_users)
        result["seed_ensemble"] = {"metrics": {k: v for k, v in metrics.items() if k.startswith(("test/", "valid/"))},
                                   "seconds": round(secs, 1)}
        print(f"seed ensemble (one search): test R@10 {metrics['test/recall_at_10']:.4f} "
              f"N@10 {metrics['test/ndcg_at_10']:.4f} ({secs:.0f}s)", flush=True)
        test = preds[preds["split"] == "test"].set_index("user_id").reindex(users)
        if test["hit_rank"].notna().all():  # the same users (all of them): paired against the best single model
            ranks = test["hit_rank"].to_numpy().astype(np.int64)
            top = np.full((U, K), -1, dtype=np.int64)
            hit = (ranks >= 1) & (ranks <= K)
            top[hit, ranks[hit] - 1] = targets[hit]  # only the target's position matters for the metrics
            b = max(range(n), key=lambda m: result["metrics"][f"own/{paths[m].name}"]["recall_at_10"])
            result["seed_ensemble"]["paired"] = _paired(top, singles[b], targets, paths[b].name)
    common.write_json(common.RESULTS / f"{args.out}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
