"""Sequence training benchmark: quality per CPU-minute of the LLM recommender's training variants.

One process, one dataset, one split, one SID index (built from the base config's text features),
SASRec and popularity trained once in the same run; then for every variant (a set of config
overrides on top of the base config) the library's own stages run unchanged: instruction set ->
fine-tuning -> trie-constrained evaluation on the same valid/test users. Recorded per variant:
fine-tuning wall time, tokens and epochs seen, first-step loss, the loss curve, the model-selection
curve, and test Recall/NDCG@K next to the baselines. JSON + PNG under ``bench/results``.

    .venv/bin/python bench/seq_training.py --config configs/quickstart.yaml --variants prefix window \\
        --out seq_training_ml100k

Variants are named in ``VARIANTS`` below (``--list`` prints them). Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# overrides on top of the base config, by name
# the balanced dual index that moves (fast tokenizer): the index part of the dual variants below (_merge copies it)
_DUAL_BALANCED_FAST_TOK = {"mode": "dynamic", "entities": "items+users", "balance": "last", "dynamic": {"tokenizer_lr": 3.0e-3}}

VARIANTS: dict[str, dict] = {
    # the pre-issue format: one random prefix, one target, full backbone, random SID rows, extra level
    "prefix": {"tasks": {"seqrec_mode": "prefix"}, "model": {"sid_init": "random", "layers": None, "calibrate_sid_logits": False},
               "index": {"collisions": "extra_level"}, "train": {"epochs": None, "eval_every": None}},
    "prefix-text-init": {"tasks": {"seqrec_mode": "prefix"}, "model": {"sid_init": "text", "layers": None},
                         "index": {"collisions": "extra_level"}, "train": {"epochs": None, "eval_every": None}},
    "window-random-init": {"tasks": {"seqrec_mode": "window"}, "model": {"sid_init": "random"}},
    "window-uncalibrated": {"tasks": {"seqrec_mode": "window"}, "model": {"calibrate_sid_logits": False}},
    "window-random-uncalibrated": {"tasks": {"seqrec_mode": "window"}, "model": {"sid_init": "random", "calibrate_sid_logits": False}},
    "window": {"tasks": {"seqrec_mode": "window"}},
    "window-warmup": {"tasks": {"seqrec_mode": "window"}, "train": {"sid_warmup_steps": 50}},
    "window-extra-level": {"tasks": {"seqrec_mode": "window"}, "index": {"collisions": "extra_level"}},
    "window-nearest-free": {"tasks": {"seqrec_mode": "window"}, "index": {"collisions": "nearest_free"}},
    "window-full-backbone": {"tasks": {"seqrec_mode": "window"}, "model": {"layers": None}},
    "window-hi-lr": {"tasks": {"seqrec_mode": "window"}, "train": {"lr": 3.0e-3, "embedding_lr": 2.0e-2}},
    "window-6-layers": {"tasks": {"seqrec_mode": "window"}, "model": {"layers": 6}},
    "window-hybrid": {"tasks": {"seqrec_mode": "window"}, "index": {"embedding": "hybrid"}},  # the default share (0.8)
    # hybrid_ml100k.json's "window-hybrid" ran when the default share was 0.5: this variant
    "window-hybrid-0.5": {"tasks": {"seqrec_mode": "window"}, "index": {"embedding": "hybrid", "hybrid": {"collab_share": 0.5}}},
    "window-hybrid-0.8": {"tasks": {"seqrec_mode": "window"}, "index": {"embedding": "hybrid", "hybrid": {"collab_share": 0.8}}},
    "window-hybrid-0.95": {"tasks": {"seqrec_mode": "window"}, "index": {"embedding": "hybrid", "hybrid": {"collab_share": 0.95}}},
    "window-hybrid-0.2": {"tasks": {"seqrec_mode": "window"}, "index": {"embedding": "hybrid", "hybrid": {"collab_share": 0.2}}},
    # issue 11, against the memorised next-item distribution (Scientific: valid flat from epoch 3, R@1 above SASRec, R@5 below)
    "window-ls0.1": {"tasks": {"seqrec_mode": "window"}, "train": {"label_smoothing": 0.1}},
    "window-ls0.1-dropout0.2": {"tasks": {"seqrec_mode": "window"}, "train": {"label_smoothing": 0.1},
                                "model": {"lora": {"dropout": 0.2}}},
    "window-20-layers": {"tasks": {"seqrec_mode": "window"}, "model": {"layers": 20}},
    # more capacity per token at the same cost: LoRA rank 32 (alpha 64 keeps alpha/sqrt(r) near rank 8's 32/sqrt(8))
    "window-lora32": {"tasks": {"seqrec_mode": "window"}, "model": {"lora": {"r": 32, "alpha": 64}}},
    # issue 11 item 6, the other collaborative source: the same-run SASRec's item table instead of co-occurrence PPMI-SVD
    "window-hybrid-sasrec": {"tasks": {"seqrec_mode": "window"}, "index": {"embedding": "hybrid", "hybrid": {"source": "sasrec"}}},
    "window-20-layers-sasrec": {"tasks": {"seqrec_mode": "window"}, "model": {"layers": 20},
                                "index": {"embedding": "hybrid", "hybrid": {"source": "sasrec"}}},
    "window-no-aux": {"tasks": {"seqrec_mode": "window", "text_to_sid": 0.0, "sid_to_text": 0.0, "titles_to_sid": 0.0}},
    # issue 13: the base config as it is (static), and the dynamic index (sidrec.index.dynamic) on top of it
    "static": {},
    "static-balanced": {"index": {"balance": "last"}},  # issue 14 item 4: the last level balanced (index.balance)
    "static-balanced-20-layers": {"index": {"balance": "last"}, "model": {"layers": 20}},
    "dynamic-items": {"index": {"mode": "dynamic"}},
    "dynamic-dual": {"index": {"mode": "dynamic", "entities": "items+users"}, "tasks": {"user_pred": 0.1, "text_to_user": 0.05}},
    # ED2's user tasks at a third of their weight (issue 13: with them the dual index is 0.72x static, without 1.04x)
    "dynamic-dual-light-user": {"index": {"mode": "dynamic", "entities": "items+users"}, "tasks": {"user_pred": 0.03, "text_to_user": 0.015}},
    "dynamic-dual-light-user-20-layers": {"index": {"mode": "dynamic", "entities": "items+users"}, "model": {"layers": 20},
                                          "tasks": {"user_pred": 0.03, "text_to_user": 0.015}},
    "static-dual-light-user": {"index": {"entities": "items+users"}, "tasks": {"user_pred": 0.03, "text_to_user": 0.015}},
    "static-dual": {"index": {"entities": "items+users"}, "tasks": {"user_pred": 0.1, "text_to_user": 0.05}},
    "static-dual-no-prompt-sid": {"index": {"entities": "items+users"},
                                  "tasks": {"user_pred": 0.1, "text_to_user": 0.05, "user_sid_in_prompt": False}},
    "dynamic-items-fast-tok": {"index": {"mode": "dynamic", "dynamic": {"tokenizer_lr": 3.0e-3}}},
    # issue 13's collision target: the dynamic index from the balanced static one, prices refitted at each refresh
    "dynamic-items-fast-tok-balanced": {"index": {"mode": "dynamic", "balance": "last", "dynamic": {"tokenizer_lr": 3.0e-3}}},
    "dynamic-items-fast-tok-balanced-20-layers": {"index": {"mode": "dynamic", "balance": "last", "dynamic": {"tokenizer_lr": 3.0e-3}},
                                                  "model": {"layers": 20}},
    "dynamic-dual-fast-tok": {"index": {"mode": "dynamic", "entities": "items+users", "dynamic": {"tokenizer_lr": 3.0e-3}},
                              "tasks": {"user_pred": 0.1, "text_to_user": 0.05}},
    # issue 13's dual target: the balanced item index that moves (fast tokenizer) with users' SIDs and the light user tasks
    "dynamic-dual-fast-tok-balanced-light-user": {"index": _DUAL_BALANCED_FAST_TOK,
                                                  "tasks": {"user_pred": 0.03, "text_to_user": 0.015}},
    # the same dual index without the user tasks: users' SIDs only at the head of the prompts
    "dynamic-dual-fast-tok-balanced-no-user-tasks": {"index": _DUAL_BALANCED_FAST_TOK},
    # the dual index with the users' SIDs only in the light user tasks, not at the head of the prompts (Scientific: the
    # prompt's user SID, not the user tasks, is what cost the dual index)
    "dynamic-dual-fast-tok-balanced-light-user-no-prompt-sid": {
        "index": _DUAL_BALANCED_FAST_TOK, "tasks": {"user_pred": 0.03, "text_to_user": 0.015, "user_sid_in_prompt": False}},
    # issue 11: LoRA dropout 0.2 instead of 0.05 (does it help a model that overfitted at 12 epochs? at 4: no change)
    "static-lora-dropout0.2": {"model": {"lora": {"dropout": 0.2}}},
    # issue 11: the item-level head (sidrec.model.item_head) trained beside the SID head, fused into the beam ranking
    "item-head": {"model": {"item_head": 1.0}},
    "item-head-0.3": {"model": {"item_head": 0.3}},
    "item-head-20-layers": {"model": {"item_head": 1.0, "layers": 20}},
    "item-head-3": {"model": {"item_head": 3.0}},
    # the balanced dynamic item index with the item head (re-pointed at every refresh)
    "dynamic-items-fast-tok-balanced-item-head": {"index": {"mode": "dynamic", "balance": "last", "dynamic": {"tokenizer_lr": 3.0e-3}},
                                                  "model": {"item_head": 1.0}},
    "dynamic-items-fast-tok-balanced-item-head-input": {
        "index": {"mode": "dynamic", "balance": "last", "dynamic": {"tokenizer_lr": 3.0e-3}},
        "model": {"item_head": 1.0, "item_head_input": True}},
    # ... with the codebooks at a tenth of the tokenizer's rate (index.dynamic.codeword_lr; issue 13's collision target:
    # codewords moving at 3e-3 re-sort the items inside a prefix cell, raw collisions .08 -> .12, session 33)
    "dynamic-items-fast-tok-balanced-item-head-input-slow-books": {
        "index": {"mode": "dynamic", "balance": "last", "dynamic": {"tokenizer_lr": 3.0e-3, "codeword_lr": 3.0e-4}},
        "model": {"item_head": 1.0, "item_head_input": True}},
    # issue 13, the dual index's ~20% loss on the shipped recipe taken apart (session 34): the users' SIDs and light user
    # tasks on the static index (is it the user side or the moving index?), and the dual index with slow codewords
    "static-dual-light-user-no-prompt-sid": {
        "index": {"entities": "items+users"}, "tasks": {"user_pred": 0.03, "text_to_user": 0.015, "user_sid_in_prompt": False}},
    # ... the users' token families alone: users' SIDs in the vocabulary and index, in no prompt and no task
    "static-dual-families-only": {"index": {"entities": "items+users"}, "tasks": {"user_sid_in_prompt": False}},
    "dynamic-dual-fast-tok-balanced-light-user-no-prompt-sid-slow-books": {
        "index": {**_DUAL_BALANCED_FAST_TOK, "dynamic": {"tokenizer_lr": 3.0e-3, "codeword_lr": 3.0e-4}},
        "tasks": {"user_pred": 0.03, "text_to_user": 0.015, "user_sid_in_prompt": False}},
    # ... with the moved items' head vectors kept at every refresh (index.dynamic.keep_item_vectors)
    "dynamic-items-fast-tok-balanced-item-head-input-keep": {
        "index": {"mode": "dynamic", "balance": "last", "dynamic": {"tokenizer_lr": 3.0e-3, "keep_item_vectors": True}},
        "model": {"item_head": 1.0, "item_head_input": True}},
    "item-head-8ep": {"model": {"item_head": 1.0}, "train": {"epochs": 8}},
    # the item's own head row also read at its SID's last token in the input (model.item_head_input)
    "item-head-input": {"model": {"item_head": 1.0, "item_head_input": True}},
    # issue 14 item 4: twice the codes per level that `auto` gives MovieLens-100k (32), the last level balanced: raw
    # collisions .43 -> .07 on the quickstart's index inputs (session 30)
    "static-codebook64-balanced": {"index": {"codebook_size": 64, "balance": "last"}},
    # issue 14 item 4 on Scientific (4,385 items; the then `auto` gave 64, now pinned in configs/scientific*.yaml):
    # the recorded index (64 codes, nearest_free, plain) against twice the codes with the last level balanced; both
    # set nearest_free because configs/scientific.yaml pins extra_level (session 31; BENCHMARKS "Scale")
    "static-nearest-free": {"index": {"collisions": "nearest_free"}},
    "static-codebook128-balanced": {"index": {"codebook_size": 128, "balance": "last", "collisions": "nearest_free"}},
    # ... with the moving average of the weights scored and kept (train.ema)
    "item-head-input-ema": {"model": {"item_head": 1.0, "item_head_input": True}, "train": {"ema": 0.995}},
    # issue 11: two members, each on its own index (seed, seed + 1), fused at the item level (sidrec.model.fusion);
    # every member is also evaluated alone on the same users (``members`` in the result)
    # the item head also learns the same-run SASRec's next-item distribution (model.item_head_distill; sidrec.model.distill)
    "item-head-input-distill": {"model": {"item_head": 1.0, "item_head_input": True, "item_head_distill": 1.0}},
    "item-head-input-distill-t2": {"model": {"item_head": 1.0, "item_head_input": True, "item_head_distill": 1.0,
                                             "item_head_distill_temperature": 2.0}},
    "item-head-input-own2": {"model": {"item_head": 1.0, "item_head_input": True}, "train": {"members": 2, "member_index": "own"}},
    "item-head-hi-lr": {"model": {"item_head": 1.0}, "train": {"lr": 4.0e-3, "embedding_lr": 2.0e-2}},
}

# Every dual variant above ran with the users' quantizer on their text embedding alone and random user SID rows
# (index.hybrid.users and model.sid_init_users, new in session 35, both default to true): pinned so that they go on
# measuring what their recorded results measured.
for _v in VARIANTS.values():
    if _v.get("index", {}).get("entities") == "items+users":
        _v["index"] = {**_v["index"], "hybrid": {**_v["index"].get("hybrid", {}), "users": False}}
        _v["model"] = {**_v.get("model", {}), "sid_init_users": False}

# issue 13 (session 35): users' SIDs from their text plus the mean collaborative vector of their training items
# (index.hybrid.users), in the items' space and scale; the item head on in both (the shipped recipe's)
_LIGHT_USER = {"user_pred": 0.03, "text_to_user": 0.015}
_DUAL_DYN = {"mode": "dynamic", "entities": "items+users", "dynamic": {"tokenizer_lr": 3.0e-3}}
VARIANTS.update({
    # ... with random user SID rows (model.sid_init_users false), as every dual run before
    "static-dual-collab-users": {"index": {"entities": "items+users"}, "model": {"sid_init_users": False}, "tasks": _LIGHT_USER},
    "dynamic-dual-collab-users": {"index": _DUAL_DYN, "model": {"item_head": 1.0, "sid_init_users": False}, "tasks": _LIGHT_USER},
    # ... and the users' SID rows from their texts as the items' are (model.sid_init_users, the default)
    "static-dual-collab-users-text-rows": {"index": {"entities": "items+users"}, "tasks": _LIGHT_USER},
    "dynamic-dual-collab-users-text-rows": {"index": _DUAL_DYN, "model": {"item_head": 1.0}, "tasks": _LIGHT_USER},
    "dynamic-dual-collab-users-text-rows-no-user-tasks": {"index": _DUAL_DYN, "model": {"item_head": 1.0}},
    # session 36: only the first of the user's SID tokens in the prompt (tasks.user_prompt_levels 1): a group of ~20
    # similar users shares it, so the prompt cannot name the one user whose training windows it memorises
    "dynamic-dual-collab-users-text-rows-user-head": {"index": _DUAL_DYN, "model": {"item_head": 1.0},
                                                      "tasks": {**_LIGHT_USER, "user_prompt_levels": 1}},
    "dynamic-dual-collab-users-text-rows-no-user-tasks-user-head": {"index": _DUAL_DYN, "model": {"item_head": 1.0},
                                                                    "tasks": {"user_prompt_levels": 1}},
})

# Every variant above that sets tokenizer_lr without codeword_lr ran with the codebooks at tokenizer_lr (the default
# until session 34, now tokenizer_lr / 10): pinned so that they go on measuring what their recorded results measured.
for _v in VARIANTS.values():
    _dyn = _v.get("index", {}).get("dynamic")
    if _dyn and "tokenizer_lr" in _dyn and "codeword_lr" not in _dyn:
        _v["index"] = {**_v["index"], "dynamic": {**_dyn, "codeword_lr": _dyn["tokenizer_lr"]}}


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


FUSION_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def _members_alone(rec, instr, bundle, cfg) -> list[dict]:
    """Each member of an ensemble evaluated alone, on the run's users (its own index and prompts with
    ``train.member_index: own``): the metrics ``stages.evaluate`` reports for it."""
    from sidrec import stages
    from sidrec.artifacts import IndexBundle, InstructionSet, TrainedRecommender

    out = []
    for k in range(cfg.train.members):
        d = Path(rec.path) / "members" / str(k)
        m_instr, m_bundle = instr, bundle
        if (d / "index").is_dir():
            m_instr, m_bundle = InstructionSet.load(d / "instructions"), IndexBundle.load(d / "index")
        mcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"members": 1, "member_index": "shared"})})
        report = stages.evaluate(TrainedRecommender.load(d), m_instr, m_bundle, mcfg)
        out.append({k2: v for k2, v in report.metrics.items() if k2.startswith(("test/", "valid/"))})
        out[-1]["_predictions"] = report.predictions
    return out


def fusion_sweep(rec, instr, bundle, cfg, weights=FUSION_WEIGHTS) -> dict:
    """The item head's share of the ranking, measured on one model: one constrained decode of the valid
    sample and of the test users with the beams as searched (fusion 0), the item head's log-probability of
    every beam from the prompt's last state, then Recall/NDCG@K of ``beam + w * item`` for each ``w`` and of
    the item head alone over the whole catalog (no beam search). Valid picks a ``w``; test reports all."""
    import numpy as np
    import torch

    from sidrec.evaluation.evaluate import _sample
    from sidrec.evaluation.metrics import ranking_metrics
    from sidrec.model.decode import _left_pad, recommend
    from sidrec.model.sid_model import Encoder, load_recommender
    from sidrec.runtime import compute_dtype

    model, tok, _ = load_recommender(Path(rec.path), cfg.model.backbone)
    head = model.item_head
    head.fusion.fill_(0.0)
    enc = Encoder(tok, model.vocab)
    dtype = compute_dtype(cfg)
    trie = bundle.items.build_trie()
    out: dict = {}
    for part, limit in (("valid", cfg.eval.valid_max_users), ("test", cfg.eval.test_max_users)):
        rows = _sample(instr.part(part), limit, cfg.seed)
        prompts = [enc.encode(p) for p in rows["prompt"]]
        targets = np.array([bundle.items.row_of(t) for t in rows["target_item"]])
        ranked, scores, _ = recommend(model, prompts, bundle.items, cfg.eval.beams, cfg.eval.batch_size, trie,
                                      enc.pad_id, dtype, progress=False)
        item_lp = np.full(ranked.shape, -np.inf, dtype=np.float32)
        alone = np.zeros((len(prompts), cfg.eval.beams), dtype=np.int64)
        with torch.no_grad():
            for s0 in range(0, len(prompts), cfg.eval.batch_size):
                ids, mask = _left_pad(prompts[s0:s0 + cfg.eval.batch_size], enc.pad_id)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    h, _ = model.hidden(ids, attention_mask=mask, position_ids=pos)
                lp = torch.log_softmax(head.logits(h[:, -1]).float(), -1).numpy()
                r = ranked[s0:s0 + len(lp)]
                item_lp[s0:s0 + len(lp)] = np.where(r >= 0, np.take_along_axis(lp, np.maximum(r, 0), 1), -np.inf)
                alone[s0:s0 + len(lp)] = np.argsort(-lp, axis=1)[:, : cfg.eval.beams]
        for w in weights:
            fused = np.where(np.isfinite(scores), scores + w * item_lp, -np.inf)
            order = np.argsort(-fused, axis=1, kind="stable")
            m = ranking_metrics(np.take_along_axis(ranked, order, 1), targets, cfg.eval.ks)
            out[f"{part}/fusion_{w}"] = {k: round(float(v), 5) for k, v in m.items()}
        m = ranking_metrics(alone, targets, cfg.eval.ks)
        out[f"{part}/item_head_alone"] = {k: round(float(v), 5) for k, v in m.items()}
    best = max(weights, key=lambda w: out[f"valid/fusion_{w}"]["recall_at_10"])
    out["best_valid_weight"] = best
    return out


CANDIDATES = (0, 10, 20, 30, 50)
RERANK_WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0)


def rerank_sweep(rec, instr, bundle, cfg, valid_users: int = 2000, candidates=CANDIDATES, weights=RERANK_WEIGHTS) -> dict:
    """How many of the item head's own items should join the beams, and at what fusion weight, measured on one
    model: each user's prompt is decoded once (the constrained beams as searched, fusion 0), the head's top
    ``max(candidates)`` items that the beams missed are scored by the SID head by teacher forcing (as decoding scores
    them), and the list ``beams + the head's first C`` re-ranked by ``beam + w * log p_item`` is scored for every
    ``(C, w)``. ``valid_users`` valid users pick the pair (Recall@10); test reports every pair. The grid is the
    library's own decoding (``item_head_candidates``, ``item_head_fusion``) replayed offline."""
    import numpy as np
    import torch

    from sidrec.evaluation.evaluate import _sample
    from sidrec.evaluation.metrics import ranking_metrics
    from sidrec.model.decode import NEG_INF, beam_search_batch, prefill, sid_log_prob
    from sidrec.model.item_head import head_candidates, item_log_prob
    from sidrec.model.sid_model import Encoder, load_recommender
    from sidrec.runtime import compute_dtype

    model, tok, _ = load_recommender(Path(rec.path), cfg.model.backbone)
    model.eval()
    head = model.item_head
    head.fusion.fill_(0.0)
    head.candidates = 0  # plain beams from the search; the candidates are added below, up to the largest C
    enc = Encoder(tok, model.vocab)
    dtype = compute_dtype(cfg)
    trie = bundle.items.build_trie()
    beams, c_max, bs = cfg.eval.beams, max(candidates), 16
    out: dict = {}
    for part, limit in (("valid", valid_users), ("test", cfg.eval.test_max_users)):
        t0 = time.perf_counter()
        rows = _sample(instr.part(part), limit, cfg.seed)
        prompts = [enc.encode(p) for p in rows["prompt"]]
        targets = np.array([bundle.items.row_of(t) for t in rows["target_item"]])
        U, W = len(prompts), beams + c_max
        pool = np.full((U, W), -1, dtype=np.int64)
        sid = np.full((U, W), -np.inf, dtype=np.float32)
        item = np.full((U, W), -np.inf, dtype=np.float32)
        alone = np.zeros((U, beams), dtype=np.int64)
        order = np.argsort([len(p) for p in prompts], kind="stable")
        with torch.no_grad():
            for s0 in range(0, U, bs):
                idx = order[s0:s0 + bs]
                batch = [prompts[i] for i in idx]
                state = prefill(model, batch, enc.pad_id, dtype)
                codes, sc = beam_search_batch(model, None, bundle.items.num_levels, beams, trie, state=state)
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    lp = item_log_prob(head, state.h)
                    more, real = head_candidates(head, lp, codes, c_max)
                    more_sc = sid_log_prob(model, state, more).masked_fill(~real, NEG_INF)
                all_codes = torch.cat([codes, more], 1)
                r = head.rows_of(all_codes)
                s = torch.cat([sc, more_sc.float()], 1)
                pool[idx] = r.numpy()
                sid[idx] = torch.where(r >= 0, s, torch.full_like(s, -np.inf)).numpy()
                item[idx] = torch.where(r >= 0, lp.float().gather(1, r.clamp(min=0)), torch.full_like(s, -np.inf)).numpy()
                alone[idx] = lp.float().topk(beams, dim=-1).indices.numpy()
        for c in candidates:
            width = beams + c
            for w in weights:
                fused = sid[:, :width] + w * item[:, :width]
                fused = np.where(np.isfinite(fused), fused, -np.inf)
                o = np.argsort(-fused, axis=1, kind="stable")[:, :beams]
                m = ranking_metrics(np.take_along_axis(pool[:, :width], o, 1), targets, cfg.eval.ks)
                out[f"{part}/c{c}/fusion_{w}"] = {k: round(float(v), 5) for k, v in m.items()}
        m = ranking_metrics(alone, targets, cfg.eval.ks)
        out[f"{part}/item_head_alone"] = {k: round(float(v), 5) for k, v in m.items()}
        out[f"{part}/users"] = U
        out[f"{part}/seconds"] = round(time.perf_counter() - t0, 1)
        print(f"rerank sweep {part}: {U} users, {out[f'{part}/seconds']:.0f}s", flush=True)
    grid = [(c, w) for c in candidates for w in weights]
    best = max(grid, key=lambda cw: (out[f"valid/c{cw[0]}/fusion_{cw[1]}"]["recall_at_10"],
                                     out[f"valid/c{cw[0]}/fusion_{cw[1]}"]["ndcg_at_10"]))
    out["best_valid"] = {"candidates": best[0], "fusion": best[1], "test": out[f"test/c{best[0]}/fusion_{best[1]}"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(common.QUICKSTART))
    ap.add_argument("--variants", nargs="+", default=["prefix", "window"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra overrides for every variant, dotted keys, YAML values (e.g. train.epochs=2)")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="repeat every variant with these seeds")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--unfused", action="store_true",
                    help="variants with an item head: also score the same model with other fusion weights and the item head alone "
                         "(fusion_sweep)")
    ap.add_argument("--rerank", type=int, default=None, metavar="VALID_USERS",
                    help="variants with an item head: also replay the decoding's candidates x fusion grid on the same model "
                         "(rerank_sweep), the pair picked on this many valid users")
    ap.add_argument("--out", default="seq_training")
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="copy every variant's fine-tuned model to DIR/<variant> (for decoding experiments on a saved model)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        print(json.dumps(VARIANTS, indent=1))
        return 0

    from sidrec import stages
    from sidrec.config import parse_config

    base = common.config_with_overrides(args.config, args.set)
    cfg = parse_config(base, args.config)
    stages.set_threads(cfg)
    t0 = time.perf_counter()
    ds = stages.ingest(cfg)
    features = stages.featurize(ds, cfg)
    prep_s = time.perf_counter() - t0
    print(f"prep (ingest + text features): {prep_s:.0f}s", flush=True)

    result = {"env": common.env_info(), "config": args.config, "overrides": args.set, "prep_seconds": round(prep_s, 1),
              "variants": {}}
    if not args.no_baselines:
        t1 = time.perf_counter()
        result["baselines"] = stages.baselines(ds, cfg)
        result["baselines_seconds"] = round(time.perf_counter() - t1, 1)
        print(json.dumps({k: v for k, v in result["baselines"].items() if "test/recall_at_10" in k or "test/ndcg_at_10" in k}), flush=True)

    bundles: dict[str, object] = {}
    users = None  # features with user embeddings (dual index variants), computed once
    for name in args.variants:
        for seed in args.seeds or [cfg.seed]:
            over = _merge(VARIANTS[name], {"seed": seed})
            if over.get("index", {}).get("mode") == "dynamic" and "item_head" not in over.get("model", {}):
                over = _merge(over, {"model": {"item_head": 0.0}})  # the dynamic variants compare SID heads unless they say
            vcfg = parse_config(_merge(base, over), f"variant {name}")
            key = json.dumps([vcfg.index.model_dump(mode="json"), stages.index_seed(vcfg)], sort_keys=True)
            vfeat = features
            if vcfg.index.embedding == "hybrid":  # the training split's co-occurrence vectors, as featurize adds them
                vfeat = dataclasses.replace(features, item_collab=stages.collab_features(ds, vcfg))
            if vcfg.index.entities == "items+users" and vfeat.user_embeddings is None:  # user texts, as featurize does
                if users is None:
                    users = stages.featurize(ds, vcfg)
                vfeat = dataclasses.replace(vfeat, user_ids=users.user_ids, user_texts=users.user_texts,
                                            user_embeddings=users.user_embeddings)
            if vcfg.index.entities == "items+users" and vfeat.item_collab is not None and vcfg.index.hybrid.users:
                vfeat = dataclasses.replace(vfeat, user_collab=stages.user_collab_features(ds, vfeat.user_ids, vfeat.item_collab))
            dynamic = vcfg.index.mode == "dynamic"
            if key not in bundles and not dynamic:
                bundles[key] = stages.build_index(vfeat, vcfg)
            label = name if args.seeds is None else f"{name}/seed{seed}"
            t1 = time.perf_counter()
            if not dynamic:
                bundle = bundles[key]
                instr = stages.instruct(ds, bundle, vcfg)
            with tempfile.TemporaryDirectory() as tmp:
                t2 = time.perf_counter()
                if dynamic:  # index, instructions and fine-tuning are one stage
                    rec, bundle, instr = stages.dynamic_finetune(ds, vfeat, vcfg, Path(tmp) / "rec")
                else:
                    rec = stages.finetune(instr, bundle, vcfg, Path(tmp) / "rec", ds=ds, features=vfeat)
                ft_s = time.perf_counter() - t2
                t3 = time.perf_counter()
                report = stages.evaluate(rec, instr, bundle, vcfg)
                ev_s = time.perf_counter() - t3
                t4 = time.perf_counter()
                members = _members_alone(rec, instr, bundle, vcfg) if vcfg.train.members > 1 else None
                members_s = time.perf_counter() - t4
                if members:  # paired against the better member on test Recall@10
                    best = max(range(len(members)), key=lambda k: members[k]["test/recall_at_10"])
                    for k, mm in enumerate(members):
                        pp = mm.pop("_predictions")
                        if k == best:
                            members_paired = {"against_member": k, **common.paired_at_10(report.predictions, pp)}
                sweep = None
                if args.unfused and vcfg.model.item_head > 0:  # the same model: beams alone, fused, the item head alone
                    sweep = fusion_sweep(rec, instr, bundle, vcfg)
                rerank = None
                if args.rerank and vcfg.model.item_head > 0:
                    rerank = rerank_sweep(rec, instr, bundle, vcfg, valid_users=args.rerank)
                if args.keep:
                    kept = Path(args.keep) / label.replace("/", "-")
                    rec.save(kept / "model")
                    bundle.save(kept / "index")
                    instr.save(kept / "instructions")
                    report.predictions.to_parquet(kept / "predictions.parquet")  # per-user ranks, for paired comparisons
            train = rec.meta["train"]
            entry = {
                "overrides": over, "fine_tune_seconds": round(ft_s, 1), "eval_seconds": round(ev_s, 1),
                "instructions_seconds": round(t2 - t1, 1), "train_rows": int(instr.meta["n_train"]),
                "tokens_per_item": int(bundle.items.num_levels), "index": bundle.report,
                "train": train, "loss_curve": rec.meta["loss_curve"], "select_curve": rec.meta.get("select_curve", []),
                "dynamic_log": rec.meta.get("dynamic_log", []),
                "metrics": {k: v for k, v in report.metrics.items()},
                **({"fusion_sweep": sweep} if sweep is not None else {}),
                **({"members": members, "paired_vs_better_member": members_paired, "members_eval_seconds": round(members_s, 1)}
                   if members is not None else {}),
                **({"rerank_sweep": rerank} if rerank is not None else {}),
            }
            result["variants"][label] = entry
            print(f"{label}: fine-tune {ft_s:.0f}s eval {ev_s:.0f}s tokens {train['train/tokens']} "
                  f"first_loss {train.get('train/first_loss')} test R@10 {report.metrics['test/recall_at_10']:.4f} "
                  f"N@10 {report.metrics['test/ndcg_at_10']:.4f} best_step {train.get('train/best_step')}"
                  + (" | " + " ".join(f"{k.split('/')[1]} {v['recall_at_10']:.4f}/{v['ndcg_at_10']:.4f}"
                                      for k, v in sweep.items() if k.startswith("test/")) if sweep else ""),
                  flush=True)
            for k, mm in enumerate(members or []):
                print(f"{label}: member {k} alone: test R@10 {mm['test/recall_at_10']:.4f} N@10 {mm['test/ndcg_at_10']:.4f}",
                      flush=True)
            if members:
                print(f"{label}: paired vs the better member: {json.dumps(members_paired)}", flush=True)
            if rerank is not None:
                b = rerank["best_valid"]
                print(f"{label}: rerank best on valid C={b['candidates']} w={b['fusion']}: test R@10 "
                      f"{b['test']['recall_at_10']:.4f} N@10 {b['test']['ndcg_at_10']:.4f}", flush=True)
            common.write_json(common.RESULTS / f"{args.out}.json", result)
    plot(result, common.RESULTS / f"{args.out}.png")
    return 0


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.2))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    base = result.get("baselines", {})
    for label, v in result["variants"].items():
        steps, losses = zip(*v["loss_curve"]) if v["loss_curve"] else ((), ())
        ax1.plot(steps, losses, label=label)
        tok = v["train"]["train/tokens"]
        ax2.scatter([tok], [v["metrics"]["test/recall_at_10"]], label=label)
        ax3.scatter([v["fine_tune_seconds"] / 60], [v["metrics"]["test/ndcg_at_10"]], label=label)
    for ax, key in ((ax2, "recall_at_10"), (ax3, "ndcg_at_10")):
        for b, style in (("sasrec", "--"), ("popularity", ":")):
            val = base.get(f"baseline/{b}/test/{key}")
            if val is not None:
                ax.axhline(val, ls=style, c="k", lw=1, label=b)
    ax1.set(title="training loss", xlabel="step", ylabel="loss (SID tokens)")
    ax2.set(title="test Recall@10 vs tokens seen", xlabel="training tokens", ylabel="Recall@10")
    ax3.set(title="test NDCG@10 vs fine-tuning minutes", xlabel="minutes (2 CPU cores)", ylabel="NDCG@10")
    ax1.legend(fontsize=7)
    ax3.legend(fontsize=7)
    common.save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
