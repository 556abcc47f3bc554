"""Evaluation: constrained-decoding metrics of the LLM recommender and the baselines.

Everything is leave-one-out, full catalog: the LLM ranks items by beam score over the whole SID
trie; SASRec scores every item; popularity ranks by training counts. History items are excluded for
no method, or (``eval.exclude_history``) for every method.
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from sidrec.evaluation.metrics import coverage, drop_seen, invalid_rate, ranking_metrics


def _sample(rows: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    """A seeded sample of users (the same users for the LLM and the baselines: both frames list the
    split's users in the same order)."""
    if n is None or n >= len(rows):
        return rows
    return rows.sample(n=n, random_state=seed).sort_index()


def seen_rows(rows: pd.DataFrame, index) -> list[set[int]]:
    """Per row, the index rows of the items the user saw before the target (``eval.exclude_history``)."""
    if "seen" not in rows.columns:
        raise ValueError("eval.exclude_history needs the valid/test rows' 'seen' items (instruction rows made by "
                         "this version; re-run the instruction_dataset step)")
    return [set() if s is None else {index.row_of(str(i)) for i in s if str(i) in index} for s in rows["seen"]]


def evaluate_llm(model, encoder, index, parts: dict[str, pd.DataFrame], cfg, seed: int,
                 dtype: torch.dtype = torch.bfloat16, progress: bool = True,
                 member_parts: list[dict[str, pd.DataFrame]] | None = None) -> tuple[dict, pd.DataFrame]:
    """Constrained beam search for every row of each part (``valid``/``test``) -> metrics, predictions.

    ``model`` an ``IndexEnsemble`` (members on their own SID indexes): ``member_parts[k]`` are member k's rows of the
    same users (its prompts), and the members' lists are fused at the item level (``sidrec.model.fusion``)."""
    from sidrec.model.decode import recommend
    from sidrec.model.fusion import IndexEnsemble, recommend_fused

    fused = isinstance(model, IndexEnsemble)
    if fused and (member_parts is None or len(member_parts) != len(model)):
        raise ValueError("an IndexEnsemble is evaluated on its members' own rows: pass member_parts, one per member")
    trie = None if fused else index.build_trie()
    metrics: dict[str, float] = {}
    preds = []
    limits = {"valid": cfg.valid_max_users, "test": cfg.test_max_users}
    for part, rows in parts.items():
        rows = _sample(rows, limits.get(part), seed)
        t0 = time.perf_counter()
        if fused:
            own = [_sample(mp[part], limits.get(part), seed) for mp in member_parts]
            for k, r in enumerate(own):
                if r["user_id"].tolist() != rows["user_id"].tolist() or r["target_item"].tolist() != rows["target_item"].tolist():
                    raise ValueError(f"member {k}'s {part} rows are not the run's users and targets in the run's order")
            prompts = [[enc.encode(p) for p in r["prompt"]] for enc, r in zip(model.encoders, own)]
            ranked, scores, emitted = recommend_fused(model, prompts, cfg.beams, cfg.batch_size, dtype, progress,
                                                      desc=f"decode {part}")
        else:
            prompts = [encoder.encode(p) for p in rows["prompt"]]
            ranked, scores, emitted = recommend(model, prompts, index, cfg.beams, cfg.batch_size, trie,
                                                encoder.pad_id, dtype, progress, desc=f"decode {part}")
        seconds = time.perf_counter() - t0
        invalid = invalid_rate((ranked >= 0)[emitted][None, :]) if emitted.any() else 0.0  # of what was decoded
        if getattr(cfg, "exclude_history", False):
            ranked, scores = drop_seen(ranked, seen_rows(rows, index), scores)
        targets = np.array([index.row_of(t) for t in rows["target_item"]])
        m = ranking_metrics(ranked, targets, cfg.ks)
        metrics.update({f"{part}/{k}": v for k, v in m.items()})
        metrics[f"{part}/invalid_rate"] = invalid
        metrics[f"{part}/coverage_at_10"] = coverage(ranked, len(index.entity_ids), min(10, ranked.shape[1]))
        metrics[f"{part}/users"] = len(rows)
        metrics[f"{part}/decode_seconds"] = round(seconds, 2)
        ids = np.array(index.entity_ids, dtype=object)
        top = [[ids[r] for r in row[:10] if r >= 0] for row in ranked]
        hit = [(row.tolist().index(t) + 1) if t in row else 0 for row, t in zip(ranked, targets)]
        preds.append(pd.DataFrame({
            "split": part, "user_id": rows["user_id"].to_numpy(), "target_item": rows["target_item"].to_numpy(),
            "top10": top, "top10_scores": [s[:10].round(4).tolist() for s in scores], "hit_rank": hit,
        }))
    return metrics, pd.concat(preds, ignore_index=True)


def valid_selector(encoder, index, valid_rows: pd.DataFrame, n_users: int, beams: int, batch_size: int, seed: int,
                   dtype: torch.dtype = torch.bfloat16, exclude_history: bool = False):
    """Model selection score: Recall@10 of constrained beam search on a seeded, fixed sample of
    ``n_users`` *valid* rows. Refuses rows of any other split, so test users never pick a checkpoint."""
    from sidrec.model.decode import recommend

    if len(valid_rows) == 0:
        raise ValueError("model selection needs valid rows (the instruction set has none)")
    if "split" in valid_rows.columns and (valid_rows["split"] != "valid").any():
        raise ValueError("model selection may only see valid users; got rows of split(s) "
                         f"{sorted(set(valid_rows['split']) - {'valid'})}")
    rows = _sample(valid_rows, n_users, seed)
    prompts = [encoder.encode(p) for p in rows["prompt"]]
    targets = np.array([index.row_of(t) for t in rows["target_item"]])
    trie = index.build_trie()

    seen = seen_rows(rows, index) if exclude_history else None

    def score(model) -> float:
        ranked, _, _ = recommend(model, prompts, index, beams, batch_size, trie, encoder.pad_id, dtype, progress=False)
        if seen is not None:
            ranked = drop_seen(ranked, seen)
        return float(ranking_metrics(ranked, targets, [10])["recall_at_10"])

    score.user_ids = rows["user_id"].tolist()
    return score


def indexed_split(ds, part: str, max_len: int | None) -> tuple[list[list[int]], np.ndarray]:
    """``(histories, targets)`` of ``ds``'s ``part`` split (``ds.split(part, max_len)``) as item indices in
    ``ds.item_index()`` order: what SASRec's early stopping and scoring read."""
    index = ds.item_index()
    rows = ds.split(part, max_len)
    return [[index[i] for i in h] for h in rows["history"]], np.array([index[t] for t in rows["target"]])


def same_run_sasrec(ds, cfg, seed: int, max_history: int, progress: bool = True, store=None):
    """``(model, info)``: SASRec (``cfg``: ``baselines.sasrec``) trained on ``ds``'s training split, early-stopped
    on valid NDCG@10 over every valid user; items in ``ds.item_index()`` order. The run's baseline and the
    hybrid index's ``source: sasrec`` vectors are this one model (same data, settings and seed): with a
    ``store`` (:class:`sidrec.evaluation.sasrec_store.SasrecStore`) it is trained once and reused
    (``info["reused"]``)."""
    from sidrec.evaluation.baselines import train_sasrec
    from sidrec.evaluation.sasrec_store import sasrec_key

    index = ds.item_index()
    train = [[index[i] for i in seq] for seq in ds.train_sequences().values()]
    # early stopping looks at every valid user; the reported valid metrics use the sampled ones
    stop_on = indexed_split(ds, "valid", max(max_history, cfg.max_len))
    key = sasrec_key(train, len(index), stop_on, cfg.model_dump(mode="json"), seed) if store is not None else None
    if key is not None and (hit := store.get(key)) is not None:
        return hit
    model, info = train_sasrec(train, len(index), cfg, seed, valid=stop_on, progress=progress, max_minutes=cfg.max_minutes)
    if key is not None:
        store.put(key, model, info)
    return model, info


def evaluate_baselines(ds, cfg, ks, seed: int, max_history: int, progress: bool = True,
                       max_users: dict[str, int | None] | None = None, exclude_history: bool = False,
                       store=None) -> dict[str, float]:
    """Popularity and SASRec on the same leave-one-out split, full ranking over the catalog
    (``exclude_history``: without the items each user saw before the target, as for the LLM; ``store``: see
    :func:`same_run_sasrec`)."""
    from sidrec.evaluation.baselines import popularity_ranked, sasrec_topk

    index = ds.item_index()
    train = [[index[i] for i in seq] for seq in ds.train_sequences().values()]
    n_items = len(index)
    kmax = max(ks)
    out: dict[str, float] = {}
    limits = max_users or {}
    # every item before the target: SASRec reads only the last max_len of it (baselines._pad_histories)
    parts = {p: _sample(ds.split(p, None), limits.get(p), seed) for p in ("valid", "test")}
    targets = {p: np.array([index[t] for t in parts[p]["target"]]) for p in parts}
    hists = {p: [[index[i] for i in h] for h in parts[p]["history"]] for p in parts}
    seen = {p: [set(h) for h in hists[p]] for p in parts} if exclude_history else None
    if cfg.popularity:
        for p in parts:
            ranked = popularity_ranked(train, n_items, len(targets[p]), kmax, exclude=seen[p] if seen else None)
            out.update({f"baseline/popularity/{p}/{k}": v for k, v in ranking_metrics(ranked, targets[p], ks).items()})
    if cfg.sasrec.enabled:
        model, info = same_run_sasrec(ds, cfg.sasrec, seed, max_history, progress, store)
        for p in parts:
            ranked = sasrec_topk(model, hists[p], kmax, exclude=seen[p] if seen else None)
            out.update({f"baseline/sasrec/{p}/{k}": v for k, v in ranking_metrics(ranked, targets[p], ks).items()})
        out["baseline/sasrec/best_epoch"] = info.get("best_epoch", -1)
        out["baseline/sasrec/train_seconds"] = info.get("train_seconds", float("nan"))
        out["baseline/sasrec/epochs_run"] = info.get("epochs_run", -1)
        out["baseline/sasrec/reused"] = float(bool(info.get("reused")))  # 1: the same model, trained earlier
        # converged: stopped by its patience on valid NDCG@10; a time cap or max_epochs reached first is not
        out["baseline/sasrec/converged"] = float(info.get("stopped") == "early_stopping")
    return out


def lift_table(metrics: dict[str, float], split: str = "test", ks=(5, 10, 20)) -> pd.DataFrame:
    """LLM vs baselines, with the LLM's relative lift over each (negative = the LLM loses)."""
    rows = []
    for name in ("recall", "ndcg"):
        for k in ks:
            key = f"{name}_at_{k}"
            llm = metrics.get(f"{split}/{key}")
            if llm is None:
                continue
            row = {"metric": f"{split}/{key}", "llm": llm}
            for b in ("popularity", "sasrec"):
                v = metrics.get(f"baseline/{b}/{split}/{key}")
                if v is not None:
                    row[b] = v
                    row[f"lift_vs_{b}"] = (llm - v) / v if v else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)
