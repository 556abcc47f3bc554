"""Dynamic (ED2-style) index: gradient into the codebooks, refresh consistency, frozen index unique."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from sidrec.artifacts import EntityFeatures
from sidrec.config import parse_config
from sidrec.data import load_dataset
from sidrec.dynamic import IndexGenerator, assign, train_dynamic
from sidrec.model import add_lora, load_backbone
from sidrec.train import collate, encode_rows, target_loss


def _cfg(ml100k_dir, **over):
    d = {"seed": 0, "data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 40, "kcore": 3},
         "index": {"mode": "dynamic", "entities": "items+users", "levels": 2, "codebook_size": 8, "kmeans_iters": 5,
                   "dynamic": {"refresh_every": 3, "entity_batch": 8, "text_tokens": 12}},
         "tasks": {"seqrec": 1.0, "text_to_sid": 0.3, "sid_to_text": 0.2, "titles_to_sid": 0.0, "user_pred": 0.5,
                   "user_to_text": 0.2, "text_to_user": 0.2, "prompt_history": 4},
         "model": {"backbone": "tiny", "dtype": "float32"},
         "train": {"steps": 7, "batch_size": 4, "warmup_steps": 1, "log_every": 1}}
    d.update(over)
    return parse_config(d)


@pytest.fixture(scope="module")
def setup(ml100k_dir):
    cfg = _cfg(ml100k_dir)
    ds = load_dataset(cfg.data)
    lm, tok = load_backbone("tiny")
    for p in lm.parameters():
        p.requires_grad_(False)
    lm = add_lora(lm, cfg.model.lora)
    rng = np.random.default_rng(0)
    users = list(ds.train_sequences().keys())
    feats = EntityFeatures(item_ids=ds.items["item_id"].tolist(), item_texts=[""] * len(ds.items),
                           item_embeddings=rng.normal(size=(len(ds.items), 64)).astype("float32"),
                           user_ids=users, user_texts=[""] * len(users),
                           user_embeddings=rng.normal(size=(len(users), 64)).astype("float32"))
    return cfg, ds, lm, tok, feats


def test_recommendation_loss_gradient_reaches_codebooks(setup):
    from sidrec.dynamic import DynamicSIDRecModel, vocab_for
    from sidrec.model import Encoder

    cfg, ds, lm, tok, feats = setup
    gen = IndexGenerator(64, 64, 16, 2, 8, 64, emb_std=0.02, seed=0)
    gen.init_from(torch.as_tensor(feats.item_embeddings), 5, 0)
    index, _ = assign(gen, torch.as_tensor(feats.item_embeddings), feats.item_ids, "")
    model = DynamicSIDRecModel(lm, vocab_for(index, lm.get_input_embeddings().weight.shape[0]), [gen])
    enc = Encoder(tok, model.vocab)
    import pandas as pd

    rows = pd.DataFrame({"prompt": [f"History: {index.sid(i)} Next:" for i in range(4)],
                         "target": [index.sid(i + 1) for i in range(4)], "target_kind": "sid"})
    e = encode_rows(enc, rows)
    ids, mask, tgt = collate(e, np.arange(4), enc.pad_id)
    h, _ = model.hidden(ids, attention_mask=mask)
    loss, _ = target_loss(model, h, ids, tgt)  # the recommendation loss only: no quantizer loss here
    loss.backward()
    for lv, cb in enumerate(gen.codebooks):
        assert cb.grad is not None and cb.grad.abs().sum() > 0, f"no recommendation gradient in codebook {lv}"


def test_train_dynamic_refreshes_consistently_and_freezes_unique(setup):
    cfg, ds, lm, tok, feats = setup
    logged = []
    res = train_dynamic(ds, feats, cfg, lm, tok, log=lambda s, m: logged.append((s, m)), progress=False)
    # refreshed at step 3; frozen at round(0.75 * 7) = 5, no refresh after that (step 6 trains on the final index)
    assert [(e["step"], e["frozen"]) for e in res.log] == [(3, 0), (5, 1)]
    assert res.summary["dynamic/frozen_at_step"] == 5
    for e in res.log:
        assert 0.0 <= e["churn/items"] <= 1.0 and "churn/users" in e
    # final indices unique (items and users)
    for idx in (res.items, res.users):
        assert len({tuple(c) for c in idx.codes.tolist()}) == len(idx.codes)
    # the final training rows (re-rendered after the last refresh) and eval rows use the final index
    rows = res.rows
    for r in rows[rows.task.isin(["seqrec", "text_to_sid"])].itertuples():
        if r.task == "seqrec" and r.split == "train":  # a window: the SIDs of items 2..n, the last one the target item's
            assert r.target.endswith(res.items.sid_of(r.target_item))
            toks, L = re.findall(r"<[a-z]_\d+>", r.target), res.items.num_levels
            assert len(toks) % L == 0
            assert all(res.items.parse("".join(toks[i:i + L])) is not None for i in range(0, len(toks), L))
        else:
            assert r.target == res.items.sid_of(r.target_item)
    for r in rows[rows.split == "test"].itertuples():
        assert r.prompt.startswith(res.users.sid_of(r.user_id))
    # the frozen model's token table matches the final generator table shape and is saveable
    assert res.model.sid_embeddings.shape[0] == len(res.model.vocab)
    assert any("dynamic/churn/items" in m for _, m in logged)
    assert np.isfinite(res.summary["train/final_loss"])


def test_assign_rebalances_a_collapsed_index_instead_of_failing():
    """All entities on one code (a collapsed codebook) must still give a unique index within the cap."""
    gen = IndexGenerator(8, 8, 4, 2, 4, 3, emb_std=0.02, seed=0)
    gen.init_from(torch.randn(40, 8), 3, 0)
    same = torch.zeros(12, 8) + torch.randn(1, 8)  # 12 identical entities, cap 3, 4 codes at the last level
    index, rate = assign(gen, same, [f"e{i}" for i in range(12)], "")
    assert rate == pytest.approx(11 / 12)
    assert len({tuple(c) for c in index.codes.tolist()}) == 12
    assert index.codes[:, -1].max() < 3 and len(set(index.codes[:, 1].tolist())) == 4
    with pytest.raises(ValueError, match="extra_level_cap"):
        assign(gen, torch.zeros(13, 8) + torch.randn(1, 8), [f"e{i}" for i in range(13)], "")


def test_freeze_after_one_refreshes_after_the_last_step(setup, ml100k_dir):
    cfg, ds, lm, tok, feats = setup
    cfg = _cfg(ml100k_dir, index={**cfg.index.model_dump(), "dynamic": {**cfg.index.dynamic.model_dump(), "freeze_after": 1.0}})
    res = train_dynamic(ds, feats, cfg, lm, tok, progress=False)
    assert [(e["step"], e["frozen"]) for e in res.log] == [(3, 0), (6, 0), (7, 1)]


def test_dead_code_restart_splits_a_crowded_code():
    from sidrec.dynamic import restart_dead_codes

    torch.manual_seed(0)
    gen = IndexGenerator(8, 8, 4, 2, 8, 64, emb_std=0.02, seed=0)
    gen.init_from(torch.randn(64, 8), 5, 0)
    with torch.no_grad():  # collapse: every level-0 codeword far away except code 0
        gen.codebooks[0][1:] = 100.0
    x = torch.randn(64, 8)
    before, rate_before = assign(gen, x, [f"e{i}" for i in range(64)], "")
    assert set(before.codes[:, 0].tolist()) == {0}
    moved = restart_dead_codes(gen, x, seed=0)
    assert moved >= 7  # all 7 dead level-0 codes (+ any dead level-1 codes) were restarted
    after, rate_after = assign(gen, x, [f"e{i}" for i in range(64)], "")
    assert len(set(after.codes[:, 0].tolist())) == 8 and rate_after < rate_before
    assert restart_dead_codes(IndexGenerator(8, 8, 4, 2, 8, 64, 0.02, 0, kind="lsh"), x, 0) == 0
