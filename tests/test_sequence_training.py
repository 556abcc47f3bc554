"""Sequence (window) training on real MovieLens-100k: windows, loss positions, one prompt format,
model selection on valid users only, the SID warm-up, text SID init, fewer tokens per item, and a
backbone cut to its first layers."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sidrec.config import IndexConfig, LoraConfig, TasksConfig, TrainConfig
from sidrec.data.tasks import PromptFormat, build_instructions, train_windows

H = 6  # data.max_history of these tests: windows of 7 items


# the real MovieLens-100k slice (120 users) and its 3-level index, shared with the instruction-row tests
from test_tasks_text import index, ml  # noqa: E402,F401  (pytest fixtures)


@pytest.fixture(scope="module")
def rows(ml, index):
    cfg = TasksConfig(seqrec_mode="window", text_to_sid=0.2, sid_to_text=0.1, titles_to_sid=0.0)
    return build_instructions(ml, index, cfg, None, H, seed=0)


def test_every_training_interaction_but_the_first_is_a_target_exactly_once(ml):
    wins = train_windows(ml, H)
    seqs = dict(zip(ml.sequences["user_id"], ml.sequences["item_ids"]))
    for user, group in wins.groupby("user_id", sort=False):
        train = list(seqs[user][:-2])
        ws = list(group.sort_values("newest", ascending=False)["items"])  # oldest first
        assert all(2 <= len(w) <= H + 1 for w in ws)
        assert ws[0][0] == train[0]
        targets = [x for w in ws for x in w[1:]]  # every item after a window's first is a target
        assert targets == train[1:]  # each training interaction after the first, once, in order
        for older, newer in zip(ws, ws[1:]):
            assert newer[0] == older[-1]  # consecutive windows share exactly the one context item
    assert set(wins["user_id"]) == {u for u, s in seqs.items() if len(s) >= 4}


def test_no_valid_or_test_item_in_any_training_window(ml, rows):
    seqs = dict(zip(ml.sequences["user_id"], ml.sequences["item_ids"]))
    wins = train_windows(ml, H)
    for user, items in zip(wins["user_id"], wins["items"]):
        held_out = set(seqs[user][-2:]) - set(seqs[user][:-2])
        assert not held_out & set(items)
    # the rendered rows too: each user's window targets never contain its held-out SIDs
    tr = rows[(rows["split"] == "train") & (rows["task"] == "seqrec")]
    assert len(tr) == len(wins)


def test_loss_covers_exactly_the_sids_of_items_2_to_n(ml, index, rows):
    from sidrec.model.sid_model import Encoder, SIDVocab
    from sidrec.training.loop import collate, encode_rows
    from transformers import AutoTokenizer

    from sidrec.model.sid_model import SMOLLM2_DIR

    tok = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    vocab = SIDVocab.from_index(index, len(tok))
    enc_ = Encoder(tok, vocab)
    tr = rows[(rows["split"] == "train") & (rows["task"] == "seqrec")].head(12).reset_index(drop=True)
    enc = encode_rows(enc_, tr)
    ids, mask, tgt = collate(enc, np.arange(len(tr)), enc_.pad_id)
    wins = train_windows(ml, H).head(12)
    for j, items in enumerate(wins["items"]):
        supervised = ids[j][tgt[j]].tolist()
        expect = [vocab.id(t) for x in items[1:] for t in _tokens(index.sid_of(x))]
        assert supervised == expect  # SIDs of items 2..n, every level, nothing else
        prompt = ids[j][: enc.target_start[j]].tolist()
        assert prompt == enc_.encode("Items:" + index.sid_of(items[0]))  # prefix + first item: never supervised
        assert not tgt[j][: enc.target_start[j]].any()


def _tokens(sid: str) -> list[str]:
    return ["<" + t for t in sid.split("<") if t]


def test_training_and_evaluation_render_the_same_history(ml, index, rows):
    fmt = PromptFormat.from_config(TasksConfig(seqrec_mode="window"), H)
    wins = train_windows(ml, H)
    newest = wins[wins["newest"] == 0].set_index("user_id")["items"]
    tr = rows[(rows["split"] == "train") & (rows["task"] == "seqrec")]
    train_text = set(tr["prompt"] + tr["target"])
    valid = rows[rows["split"] == "valid"].set_index("user_id")
    checked = 0
    for user, items in newest.items():
        if len(items) < H + 1:
            continue  # a short sequence: the valid history is the whole window, checked below too
        sids = [index.sid_of(x) for x in items]
        # the newest window of a user, as trained on ...
        assert fmt.prefix + "".join(sids) in train_text
        # ... and the valid prompt of the same user: the same rendering of the last H items
        assert valid.loc[user, "prompt"] == fmt.prefix + "".join(sids[1:]) == fmt.render(sids)
        checked += 1
    assert checked > 10
    assert PromptFormat.from_json(fmt.to_json()) == fmt
    assert PromptFormat.from_json(None, 10).mode == "prefix"  # models saved before formats existed


def test_prefix_mode_still_samples_one_target_prompts(ml, index):
    rows = build_instructions(ml, index, TasksConfig(seqrec_mode="prefix", prompt_history=5), 50, H, seed=0)
    tr = rows[rows["split"] == "train"]
    assert len(tr) == 50
    sr = tr[tr["task"] == "seqrec"]
    assert all(len(t.split("><")) == 3 for t in sr["target"])  # one item: 3 SID tokens


def test_epochs_set_the_number_of_steps():
    from sidrec.training.loop import train_steps

    assert train_steps(TrainConfig(steps=7, batch_size=4), 100) == 7
    assert train_steps(TrainConfig(steps=7, batch_size=4, epochs=2), 101) == 51


# ---------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def tiny(index):
    from sidrec.model.sid_model import Encoder, SIDRecModel, SIDVocab, add_lora, load_backbone

    def make():
        lm, tok = load_backbone("tiny")
        for p in lm.parameters():
            p.requires_grad_(False)
        lm = add_lora(lm, LoraConfig(r=4, alpha=8, dropout=0.0))
        vocab = SIDVocab.from_index(index, lm.get_input_embeddings().weight.shape[0])
        return SIDRecModel(lm, vocab, seed=0), Encoder(tok, vocab)

    return make


def test_selection_uses_valid_users_only_and_keeps_the_best_step(rows, index, tiny):
    from sidrec.evaluation.evaluate import valid_selector
    from sidrec.training.loop import trainable_parameters, train

    model, enc = tiny()
    with pytest.raises(ValueError, match="only see valid users"):
        valid_selector(enc, index, rows[rows["split"] != "train"], 20, 10, 8, 0, torch.float32)
    valid = rows[rows["split"] == "valid"].reset_index(drop=True)
    sel = valid_selector(enc, index, valid, 20, 10, 8, 0, torch.float32)
    assert set(sel.user_ids) <= set(valid["user_id"]) and len(sel.user_ids) == 20
    assert 0.0 <= sel(model) <= 1.0  # a real constrained decode of the valid sample

    scores = iter([0.1, 0.7, 0.3])  # the step-4 weights score best
    snapshots = {}

    def scripted(m):
        snapshots[len(snapshots) + 1] = {n: p.detach().clone() for n, p in trainable_parameters(m)}
        return next(scores)

    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=0, eval_every=2, checkpoint_every=None, lr=1e-2, embedding_lr=1e-2)
    res = train(model, enc, rows[rows["split"] == "train"].reset_index(drop=True), cfg, 0, torch.float32, progress=False,
                select=scripted)
    assert [s for s, _ in res.select_curve] == [2, 4, 6]
    assert res.best_step == 4 and res.summary()["train/best_step"] == 4
    for n, p in trainable_parameters(model):
        assert torch.equal(p.detach(), snapshots[2][n])
    assert not torch.equal(snapshots[2]["sid_embeddings"], snapshots[3]["sid_embeddings"])


def test_sid_warmup_trains_only_the_sid_rows(rows, tiny):
    from sidrec.training.loop import trainable_parameters, train

    model, enc = tiny()
    before = {n: p.detach().clone() for n, p in trainable_parameters(model)}
    cfg = TrainConfig(steps=3, batch_size=4, sid_warmup_steps=3, checkpoint_every=None)
    res = train(model, enc, rows[rows["split"] == "train"].reset_index(drop=True), cfg, 0, torch.float32, progress=False)
    after = dict(trainable_parameters(model))
    assert not torch.equal(before["sid_embeddings"], after["sid_embeddings"].detach())
    assert all(torch.equal(before[n], p.detach()) for n, p in after.items() if n != "sid_embeddings")
    assert np.isfinite(res.first_loss) and res.first_loss == res.losses[0]


def test_text_init_gives_distinct_rows_at_the_vocabulary_spread(ml, index, tiny):
    from sidrec.model.sid_init import item_text_vectors, text_init
    from sidrec.data.text import item_texts

    model, enc = tiny()
    base = model.base_embeddings().weight.detach()
    order = ml.item_index()
    texts = item_texts(ml)
    vecs = item_text_vectors([texts[order[e]] for e in index.entity_ids], enc.tok, base, 32)
    table, share = text_init(model.vocab, index, vecs, base, model.sid_embeddings.detach())
    lvl0 = table[model.vocab.level_slice(0)]
    used = np.unique(index.codes[:, 0])
    mu = base.float().mean(0)
    spread = (base.float() - mu).norm(dim=1).mean()
    d = (lvl0[used] - mu).norm(dim=1)
    assert torch.isclose(d.pow(2).mean().sqrt(), spread, rtol=1e-3)  # as far from the mean as real tokens
    assert torch.unique(lvl0[used], dim=0).shape[0] == len(used)
    assert 0 < share <= 1


def test_backbone_cut_to_its_first_layers():
    from sidrec.errors import ModelError
    from sidrec.model.sid_model import inner_model, load_backbone

    lm, tok = load_backbone("tiny", 1)
    assert len(inner_model(lm).layers) == 1 and lm.config.num_hidden_layers == 1
    ids = torch.tensor([tok("hello world", add_special_tokens=False)["input_ids"]])
    assert lm(ids).logits.shape[:2] == ids.shape
    with pytest.raises(ModelError, match="more than"):
        load_backbone("tiny", 5)


# ---------------------------------------------------------------------------------- M tokens per item
def test_nearest_free_collisions_keep_m_levels_and_unique_codes():
    from sidrec.index.quantize import quantize

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, 16))
    x = (centers[rng.integers(0, 12, 600)] + 0.05 * rng.normal(size=(600, 16))).astype(np.float32)  # tight clusters
    extra = quantize(x, IndexConfig(levels=2, codebook_size=32, kmeans_iters=10), 0, progress=False)
    free = quantize(x, IndexConfig(levels=2, codebook_size=32, kmeans_iters=10, collisions="nearest_free"), 0, progress=False)
    assert extra.raw_collision_rate > 0.1 and extra.codes.shape[1] == 3  # the data collides
    assert free.codes.shape[1] == 2 and free.level_sizes == [32, 32]
    assert len(np.unique(free.codes, axis=0)) == len(x)
    raw = free.state.assign(x)
    _, group = np.unique(raw, axis=0, return_inverse=True)
    kept = (free.codes == raw).all(1)
    assert (np.bincount(group.ravel(), weights=kept) == 1).all()  # exactly one item of every raw group keeps its code
    moved = (free.codes != raw).any(1)
    assert (free.codes[moved, 0] == raw[moved, 0]).mean() > 0.75  # moves stay near: mostly under the same first code


def test_nearest_free_refuses_a_catalog_larger_than_the_codes():
    from sidrec.index.quantize import quantize

    x = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="nearest_free"):
        quantize(x, IndexConfig(levels=2, codebook_size=4, kmeans_iters=5, collisions="nearest_free"), 0, progress=False)


def test_model_selection_does_not_change_what_is_trained(rows, index, tiny):
    """Scoring valid users mid-training (a real constrained decode) leaves the trained weights bit-identical."""
    from sidrec.evaluation.evaluate import valid_selector
    from sidrec.training.loop import trainable_parameters, train

    finals = []
    for every in (2, 6):
        model, enc = tiny()
        sel = valid_selector(enc, index, rows[rows["split"] == "valid"].reset_index(drop=True), 10, 10, 8, 0, torch.float32)
        calls = iter(range(100))  # the latest step always scores best: the last step's weights are kept
        cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=0, eval_every=every, checkpoint_every=None)
        train(model, enc, rows[rows["split"] == "train"].reset_index(drop=True), cfg, 0, torch.float32, progress=False,
              select=lambda m: sel(m) * 0 + next(calls))
        finals.append({n: p.detach().clone() for n, p in trainable_parameters(model)})
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])
