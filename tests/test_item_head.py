"""The item-level head (sidrec.model.item_head) on real MovieLens-100k windows and a tiny Llama: which
positions it is trained on, that it learns, that decoding re-ranks by it, and that it survives save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sidrec.config import LoraConfig, RunConfig, TasksConfig, TrainConfig
from sidrec.data.tasks import build_instructions, train_windows
from sidrec.model.item_head import fuse_beams, item_head_loss, item_targets

H = 6

from test_tasks_text import index, ml  # noqa: E402,F401  (pytest fixtures: a real 120-user slice and its index)


@pytest.fixture(scope="module")
def rows(ml, index):
    cfg = TasksConfig(seqrec_mode="window", text_to_sid=0.2, sid_to_text=0.1, titles_to_sid=0.0)
    return build_instructions(ml, index, cfg, None, H, seed=0)


def _model(index, item_head=True, seed=0):
    from sidrec.model.sid_model import Encoder, SIDRecModel, SIDVocab, add_lora, load_backbone

    lm, tok = load_backbone("tiny")
    for p in lm.parameters():
        p.requires_grad_(False)
    lm = add_lora(lm, LoraConfig(r=4, alpha=8, dropout=0.0))
    vocab = SIDVocab.from_index(index, lm.get_input_embeddings().weight.shape[0])
    model = SIDRecModel(lm, vocab, seed=seed)
    if item_head:
        model.attach_item_head(index.codes, index.level_sizes, fusion=1.0, loss_weight=1.0)
    return model, Encoder(tok, vocab), tok


def test_item_rows_of_codes_and_unknown_tuples(index):
    model, _, _ = _model(index)
    head = model.item_head
    codes = torch.as_tensor(index.codes)
    assert torch.equal(head.rows_of(codes), torch.arange(len(index.entity_ids)))
    taken = {tuple(c) for c in index.codes.tolist()}
    free = next(c for c in np.ndindex(*index.level_sizes) if c not in taken)
    bad = torch.tensor([list(free), [index.level_sizes[0], 0, 0][: index.num_levels]])
    assert head.rows_of(bad).tolist() == [-1, -1]
    # an item vector is the sum of its codes' rows plus its own row (zero at the start)
    assert not head.item_rows.detach().any()
    with torch.no_grad():
        head.item_rows[5].fill_(0.25)
    v = head.item_vectors()
    c0 = index.codes[5]
    manual = sum(head.rows[int(head.offsets[l]) + int(c0[l])] for l in range(index.num_levels)) + 0.25
    assert torch.allclose(v[5], manual)


def test_item_head_trains_on_the_position_before_each_target_item_only(ml, index, rows):
    """Window rows: one item-head target per item 2..n, at the position that predicts its first SID token;
    the window's first item (context) and the auxiliary text targets are never item-head targets."""
    from sidrec.training.loop import collate, encode_rows

    model, enc_, _ = _model(index)
    tr = rows[(rows["split"] == "train") & (rows["task"] == "seqrec")].head(12).reset_index(drop=True)
    enc = encode_rows(enc_, tr)
    ids, mask, tgt = collate(enc, np.arange(len(tr)), enc_.pad_id)
    pos, item_rows = item_targets(ids, tgt[:, 1:], model.vocab.base_vocab, model.item_head)
    wins = train_windows(ml, H).head(12)
    row_of = {e: i for i, e in enumerate(index.entity_ids)}
    L = index.num_levels
    for j, items in enumerate(wins["items"]):
        mine = pos[:, 0] == j
        assert item_rows[mine].tolist() == [row_of[x] for x in items[1:]]  # items 2..n, in order
        start = enc.target_start[j]
        expect = [start - 1 + k * L for k in range(len(items) - 1)]  # predicts each target item's first token
        assert pos[mine, 1].tolist() == expect
    # SID -> text rows have no SID target: no item-head position
    text = rows[(rows["split"] == "train") & (rows["task"] == "sid_to_text")].head(4).reset_index(drop=True)
    enc_t = encode_rows(enc_, text)
    ids_t, _, tgt_t = collate(enc_t, np.arange(len(text)), enc_.pad_id)
    assert item_targets(ids_t, tgt_t[:, 1:], model.vocab.base_vocab, model.item_head)[1].numel() == 0


def test_item_input_reads_each_items_row_at_the_last_token_of_its_sid(ml, index, rows):
    """``item_input``: every item of a window (the context item too) adds its own row to the input embedding at its
    SID's last token, and nothing else changes; with the rows at zero (step 0) the input is exactly as without it."""
    from sidrec.training.loop import collate, encode_rows

    model, enc_, _ = _model(index)
    tr = rows[(rows["split"] == "train") & (rows["task"] == "seqrec")].head(8).reset_index(drop=True)
    enc = encode_rows(enc_, tr)
    ids, _, _ = collate(enc, np.arange(len(tr)), enc_.pad_id)
    with torch.no_grad():
        plain = model.embed(ids)
        model.item_head.item_input = True
        assert torch.equal(model.embed(ids), plain)  # zero rows: the model starts where it would without them
        model.item_head.item_rows.normal_(generator=torch.Generator().manual_seed(1))
        diff = model.embed(ids) - plain
    row_of = {e: i for i, e in enumerate(index.entity_ids)}
    L = index.num_levels
    for j, items in enumerate(train_windows(ml, H).head(8)["items"]):
        start = enc.target_start[j]
        where = [start - 1 + k * L for k in range(len(items))]  # the last SID token of each item, context included
        assert diff[j].abs().sum(-1).nonzero().flatten().tolist() == where
        expect = model.item_head.item_rows[[row_of[x] for x in items]]
        assert torch.allclose(diff[j, where], expect, atol=1e-6)
    # a decoding step that feeds one token has no SID to complete
    assert model.item_head.input_rows(ids[:, :1], model.vocab.base_vocab) is None


def test_item_head_learns_and_gets_its_own_gradient(index, rows):
    from sidrec.model.sid_model import calibrate_sid_logits
    from sidrec.training.loop import collate, encode_rows, train, trainable_parameters

    model, enc_, _ = _model(index)
    tr = rows[(rows["split"] == "train") & (rows["task"] == "seqrec")].head(16).reset_index(drop=True)
    calibrate_sid_logits(model, enc_, list(tr["prompt"] + tr["target"]))  # as fine-tuning does before step 0
    assert float(model.item_head.scale) != 1.0
    enc = encode_rows(enc_, tr)
    batch = np.arange(16)
    ids, mask, tgt = collate(enc, batch, enc_.pad_id)

    def item_loss():
        with torch.no_grad():
            h, _ = model.hidden(ids, attention_mask=mask)
            return float(item_head_loss(model, h, ids, tgt))

    names = [n for n, _ in trainable_parameters(model)]
    assert names[:3] == ["sid_embeddings", "item_head.rows", "item_head.item_rows"]
    before = item_loss()
    rows_before = model.item_head.rows.detach().clone()
    cfg = TrainConfig(steps=30, batch_size=16, warmup_steps=0, checkpoint_every=None, lr=1e-2, embedding_lr=3e-2)
    train(model, enc_, tr, cfg, 0, torch.float32, progress=False)
    assert not torch.equal(rows_before, model.item_head.rows.detach())
    assert model.item_head.item_rows.detach().any()  # the items' own rows learn too
    assert item_loss() < before - 0.1  # it learns the training items, not just noise


def test_fusion_reranks_the_constrained_beams(index):
    from sidrec.model.decode import beam_search_batch

    model, enc, _ = _model(index, seed=3)
    model.eval()
    trie = index.build_trie()
    prompts = [enc.encode("Items:" + "".join(index.sid(i) for i in range(k))) for k in (2, 5)]
    model.item_head.fusion.fill_(0.0)
    codes0, scores0 = beam_search_batch(model, prompts, index.num_levels, 8, trie, enc.pad_id, torch.float32)
    model.item_head.fusion.fill_(1.0)
    codes1, scores1 = beam_search_batch(model, prompts, index.num_levels, 8, trie, enc.pad_id, torch.float32)
    for b, p in enumerate(prompts):
        assert sorted(map(tuple, codes0[b].tolist())) == sorted(map(tuple, codes1[b].tolist()))  # same candidates
        with torch.no_grad():
            h, _ = model.hidden(torch.tensor([p]))
            logp = torch.log_softmax(model.item_head.logits(h[0, -1]).float(), -1)
        rows0 = model.item_head.rows_of(codes0[b])
        expect = scores0[b] + logp[rows0]
        order = expect.argsort(descending=True, stable=True)
        assert codes1[b].tolist() == codes0[b][order].tolist()  # re-ranked by beam score + log p_item
        np.testing.assert_allclose(scores1[b].numpy(), expect[order].numpy(), atol=1e-4)
    # a dead beam stays dead and last
    c, s = fuse_beams(model.item_head, torch.zeros(1, model.hidden_size), codes0[:1], torch.tensor([[0.0] * 7 + [-float("inf")]]))
    assert torch.isinf(s[0, -1]) and torch.isfinite(s[0, :-1]).all()


def _exhaustive(model, prompt, index, fusion):
    """Every catalog item's SID log-probability (one forward pass of prompt + SID each) + fusion x log p_item."""
    n, L = len(index.entity_ids), index.num_levels
    with torch.no_grad():
        h, _ = model.hidden(torch.tensor([prompt]))
        item_lp = torch.log_softmax(model.item_head.logits(h[0, -1]).float(), -1)
        out = torch.zeros(n)
        for i in range(n):
            codes = index.codes[i]
            toks = [int(model.vocab.code_ids(level, torch.tensor(int(codes[level])))) for level in range(L)]
            h, _ = model.hidden(torch.tensor([prompt + toks[:-1]]))
            for level in range(L):
                lp = torch.log_softmax(model.sid_logits(h[0, len(prompt) - 1 + level], level).float(), -1)
                out[i] += lp[int(codes[level])]
    return out + fusion * item_lp


@pytest.mark.parametrize("item_input", [False, True])
def test_item_head_candidates_join_the_beams_with_their_exact_sid_scores(index, item_input):
    """With the head's own top items added (``candidates``), a 3-beam search returns exactly the top 3 of an
    exhaustive ranking of the whole catalog by SID log-prob + log p_item once every item is a candidate, and
    each returned score is that sum (the teacher-forced SID score equals what a search would have summed).
    With ``item_input`` the prompt's items read their rows, in the cached search as in one full pass."""
    from sidrec.model.decode import beam_search_batch

    model, enc, _ = _model(index, seed=5)
    model.item_head.item_input = item_input
    with torch.no_grad():  # a head that disagrees with the SID head, so the union matters
        model.item_head.item_rows.add_(0.5 * torch.randn(model.item_head.item_rows.shape, generator=torch.Generator().manual_seed(0)))
    model.eval()
    trie = index.build_trie()
    n = len(index.entity_ids)
    prompts = [enc.encode("Items:" + "".join(index.sid(i) for i in range(k))) for k in (1, 4)]
    model.item_head.candidates = 0
    c0, s0 = beam_search_batch(model, prompts, index.num_levels, 3, trie, enc.pad_id, torch.float32)
    model.item_head.candidates = n  # every item not among the beams joins them
    c1, s1 = beam_search_batch(model, prompts, index.num_levels, 3, trie, enc.pad_id, torch.float32)
    differs = False
    for b, p in enumerate(prompts):
        full = _exhaustive(model, p, index, 1.0)
        top = full.topk(3)
        rows1 = model.item_head.rows_of(c1[b])
        assert rows1.tolist() == top.indices.tolist()
        np.testing.assert_allclose(s1[b].numpy(), top.values.numpy(), atol=1e-4)
        differs |= model.item_head.rows_of(c0[b]).tolist() != rows1.tolist()
    assert differs  # the beams alone missed some of the best fused items
    # a few candidates: the result is the fused top 3 of the beams and the head's top 5 non-beam items
    model.item_head.candidates = 5
    c2, s2 = beam_search_batch(model, prompts[:1], index.num_levels, 3, trie, enc.pad_id, torch.float32)
    assert len(set(map(tuple, c2[0].tolist()))) == 3 and torch.isfinite(s2).all()
    assert (s2[0] >= s0[0] - 1e-5).all()  # never worse than the beams alone, rank by rank


@pytest.mark.parametrize("item_input", [False, True])
def test_item_head_saved_and_loaded_with_the_recommender(index, tmp_path, item_input):
    from sidrec.model.decode import beam_search_batch
    from sidrec.model.sid_model import load_recommender, save_recommender

    model, enc, tok = _model(index, seed=4)
    model.item_head.item_input = item_input
    with torch.no_grad():
        model.item_head.rows.add_(0.01 * torch.randn_like(model.item_head.rows))
        model.item_head.item_rows.add_(0.01 * torch.randn_like(model.item_head.item_rows))
        model.item_head.scale.fill_(0.37)
        model.item_head.fusion.fill_(0.5)
    model.item_head.candidates = 7
    model.eval()
    save_recommender(model, tok, tmp_path / "m", {"layers": None})
    loaded, _, _ = load_recommender(tmp_path / "m", "tiny", merge=False)
    head = loaded.item_head
    assert head is not None and head.level_sizes == list(index.level_sizes)
    assert torch.equal(head.rows, model.item_head.rows.detach()) and torch.equal(head.codes, model.item_head.codes)
    assert torch.equal(head.item_rows, model.item_head.item_rows.detach())
    assert float(head.scale) == pytest.approx(0.37) and float(head.fusion) == pytest.approx(0.5)
    assert head.candidates == 7 and head.item_input == item_input
    trie = index.build_trie()
    p = [enc.encode("Items:" + index.sid(1) + index.sid(2))]
    a = beam_search_batch(model, p, index.num_levels, 6, trie, enc.pad_id, torch.float32)
    b = beam_search_batch(loaded, p, index.num_levels, 6, trie, enc.pad_id, torch.float32)
    assert a[0].tolist() == b[0].tolist()
    np.testing.assert_allclose(a[1].numpy(), b[1].numpy(), atol=1e-5)


def test_item_head_follows_new_codes_of_the_same_items(index):
    """A dynamic index's refresh re-points the head (set_codes): each item keeps its own row, sums its new codes'
    rows, and the code -> item lookup follows."""
    model, _, _ = _model(index)
    head = model.item_head
    with torch.no_grad():
        head.item_rows.normal_(generator=torch.Generator().manual_seed(1))
    own = head.item_rows.detach().clone()
    codes = torch.as_tensor(index.codes).clone()
    new = codes.clone()
    new[[0, 1]] = codes[[1, 0]]  # two items swap SIDs
    head.set_codes(new)
    assert head.rows_of(codes[[0, 1]]).tolist() == [1, 0]
    assert torch.equal(head.rows_of(new), torch.arange(len(new)))
    v = head.item_vectors()
    manual = sum(head.rows[int(head.offsets[l]) + int(new[0, l])] for l in range(index.num_levels)) + own[0]
    assert torch.allclose(v[0], manual)
    with pytest.raises(ValueError, match="new codes of shape"):
        head.set_codes(new[:-1])
    assert RunConfig.model_validate({"model": {"item_head": 1.0}}).model.item_head == 1.0


def test_item_head_keeps_every_vector_across_new_codes_when_asked(index):
    """``set_codes(keep_vectors=True)`` (a dynamic refresh with ``index.dynamic.keep_item_vectors``): a moved item's own
    row absorbs the change of its code rows, so every item's vector, and so the head's scores, stay as they were;
    the items that did not move keep their own rows untouched."""
    model, _, _ = _model(index)
    head = model.item_head
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        head.rows.normal_(generator=g)
        head.item_rows.normal_(generator=g)
    codes = torch.as_tensor(index.codes).clone()
    new = codes.clone()
    new[[0, 1]] = codes[[1, 0]]
    h = torch.randn(3, head.item_rows.shape[1], generator=g)
    before_v, before_logits, own = head.item_vectors().detach().clone(), head.logits(h).detach(), head.item_rows.detach().clone()
    head.set_codes(new, keep_vectors=True)
    assert torch.equal(head.codes, new) and torch.equal(head.rows_of(new), torch.arange(len(new)))
    assert torch.allclose(head.item_vectors(), before_v, atol=1e-5)
    assert torch.allclose(head.logits(h), before_logits, atol=1e-4)
    assert torch.equal(head.item_rows[2:], own[2:])
    assert not torch.allclose(head.item_rows[:2], own[:2])
    kept = head.item_rows.detach().clone()
    head.set_codes(codes)  # without it the moved items' own rows stay, so their vectors change
    assert torch.equal(head.item_rows, kept) and not torch.allclose(head.item_vectors()[:2], before_v[:2])


def test_warm_start_carries_the_item_head_to_the_extended_catalog(tmp_path):
    """A retrain from a champion with an item head: code rows, the items' own rows (by SID) and the scale carry
    over; the new items keep a zero row of their own."""
    from sidrec.config import parse_config
    from sidrec.model.sid_model import save_recommender
    from sidrec.ops.drift import extend_index, warm_start_model
    from sidrec.stages import build_model
    from test_retrain import _bundle

    cfg = parse_config({"model": {"backbone": "tiny", "dtype": "float32", "item_head": 1.0}})
    bundle, x = _bundle()
    champ, tok, _ = build_model(cfg, bundle)
    with torch.no_grad():
        champ.item_head.rows.add_(0.1)
        champ.item_head.item_rows.normal_()
        champ.item_head.scale.fill_(0.42)
    save_recommender(champ, tok, tmp_path / "champ", {"backbone": "tiny", "lora": cfg.model.lora.model_dump()})
    ext, n_new = extend_index(bundle, bundle.items.entity_ids + ["n1", "n2"],
                              np.vstack([x, np.random.default_rng(3).normal(size=(2, x.shape[1])).astype("float32")]))
    fresh, _, _ = build_model(cfg, ext)
    info = warm_start_model(fresh, tmp_path / "champ", cfg)
    assert info["warm"] and info["item_head_warm"], info
    head = fresh.item_head
    assert float(head.scale) == pytest.approx(0.42)
    for e in bundle.items.entity_ids:
        assert torch.equal(head.item_rows[ext.items.row_of(e)], champ.item_head.item_rows[bundle.items.row_of(e)].detach())
    for e in ("n1", "n2"):
        assert not head.item_rows[ext.items.row_of(e)].any()
    n = champ.item_head.rows.shape[0]
    assert torch.equal(head.rows[:n], champ.item_head.rows.detach())


def test_item_head_brought_to_unit_spread_even_with_an_uncalibrated_sid_head(index, rows):
    from sidrec.config import parse_config
    from sidrec.stages import calibrate

    tr = rows[(rows["split"] == "train") & (rows["task"] == "seqrec")].reset_index(drop=True)
    for flag in (True, False):
        model, enc, _ = _model(index)
        cfg = parse_config({"model": {"backbone": "tiny", "item_head": 1.0, "calibrate_sid_logits": flag}})
        calibrate(model, enc, tr, cfg)
        assert float(model.item_head.scale) != 1.0
        assert (model.sid_logit_scale != 1.0).any() == flag  # the SID head's scales only when asked
