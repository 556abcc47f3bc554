"""SID model wrapper, batched constrained beam search, and the training loss on a tiny random Llama."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from sidrec.config import LoraConfig, TrainConfig
from sidrec.model.decode import beam_search_batch, recommend
from sidrec.index.sid_index import SIDIndex
from sidrec.model.sid_model import Encoder, SIDRecModel, SIDVocab, add_lora, load_backbone
from sidrec.training.loop import encode_rows, target_loss, train


@pytest.fixture(scope="module")
def tiny():
    lm, tok = load_backbone("tiny")
    return lm, tok


def _index(n_items=30, sizes=(4, 4, 3), seed=0):
    rng = np.random.default_rng(seed)
    allc = np.array(list(itertools.product(*[range(s) for s in sizes])))
    pick = rng.choice(len(allc), size=n_items, replace=False)
    return SIDIndex(entity_ids=[f"i{k}" for k in range(n_items)], codes=allc[pick], level_sizes=list(sizes))


def _model(tiny, index, seed=0, lora=False):
    lm, tok = tiny
    if lora:
        for p in lm.parameters():
            p.requires_grad_(False)
        lm = add_lora(lm, LoraConfig(r=4, alpha=8))
    vocab = SIDVocab.from_index(index, lm.get_input_embeddings().weight.shape[0])
    model = SIDRecModel(lm, vocab, seed=seed).eval()
    return model, Encoder(tok, vocab)


def _sequence_logprob(model, prompt: list[int], codes, vocab) -> float:
    """Teacher-forced log-prob of a full SID (level-wise softmax), the quantity beam search maximises."""
    ids = prompt + [vocab.base_vocab + vocab.level_offsets[l] + int(c) for l, c in enumerate(codes)]
    x = torch.tensor([ids])
    with torch.no_grad():
        h, _ = model.hidden(x)
    total = 0.0
    for l, c in enumerate(codes):
        logits = model.sid_logits(h[0, len(prompt) - 1 + l], l)
        total += torch.log_softmax(logits.float(), -1)[int(c)].item()
    return total


def test_encoder_keeps_sid_tokens_atomic(tiny):
    index = _index()
    model, enc = _model(tiny, index)
    sid = index.sid(3)
    ids = enc.encode(f"History: {sid}{index.sid(5)} Next:")
    sid_ids = [i for i in ids if i >= model.vocab.base_vocab]
    assert len(sid_ids) == 2 * index.num_levels
    assert enc.decode(ids).replace(" ", "") == f"History:{sid}{index.sid(5)}Next:"


def test_constrained_search_finds_exact_best_sequences(tiny):
    """With beams >= catalog size the search is exhaustive: its ranking must equal brute force."""
    index = _index(n_items=12, sizes=(3, 3, 2))
    model, enc = _model(tiny, index, seed=1)
    prompt = enc.encode("History: " + index.sid(0) + index.sid(1) + " Next:")
    codes, scores = beam_search_batch(model, [prompt], index.num_levels, beams=12, trie=index.build_trie(),
                                      pad_id=enc.pad_id, dtype=torch.float32)
    brute = sorted(((_sequence_logprob(model, prompt, c, model.vocab), tuple(c)) for c in index.codes.tolist()), reverse=True)
    got = [tuple(c) for c in codes[0].tolist()]
    assert got[0] == brute[0][1]
    assert set(got) == {c for _, c in brute}
    np.testing.assert_allclose(scores[0].numpy(), [s for s, _ in brute], atol=1e-4)


def test_batched_left_padded_equals_one_by_one(tiny):
    index = _index()
    model, enc = _model(tiny, index, seed=2)
    trie = index.build_trie()
    prompts = [enc.encode("History: " + "".join(index.sid(i) for i in range(k)) + " Next:") for k in (1, 4, 2)]
    codes_b, scores_b = beam_search_batch(model, prompts, index.num_levels, 5, trie, enc.pad_id, torch.float32)
    for j, p in enumerate(prompts):
        codes_1, scores_1 = beam_search_batch(model, [p], index.num_levels, 5, trie, enc.pad_id, torch.float32)
        assert codes_b[j].tolist() == codes_1[0].tolist()
        np.testing.assert_allclose(scores_b[j].numpy(), scores_1[0].numpy(), atol=1e-4)


def test_constrained_never_invalid_unconstrained_can_be(tiny):
    # a sparse catalog: 10 of 4*4*3=48 possible SIDs exist
    index = _index(n_items=10, sizes=(4, 4, 3), seed=3)
    model, enc = _model(tiny, index, seed=3)
    prompts = [enc.encode(f"History: {index.sid(i % 10)} Next:") for i in range(8)]
    rows, _, emitted = recommend(model, prompts, index, beams=10, batch_size=3, trie=index.build_trie(),
                                 pad_id=enc.pad_id, dtype=torch.float32, progress=False)
    assert emitted.all() and (rows >= 0).all()
    assert all(len(set(r)) == 10 for r in rows.tolist())  # every beam a distinct existing item
    rows_u, _, emitted_u = recommend(model, prompts, index, beams=10, batch_size=3, trie=None,
                                     pad_id=enc.pad_id, dtype=torch.float32, progress=False)
    assert emitted_u.all()
    assert (rows_u < 0).any(), "unconstrained search over a sparse catalog should emit some non-existent SIDs"


def test_target_loss_covers_target_span_only(tiny):
    index = _index()
    model, enc = _model(tiny, index)
    rows = pd.DataFrame({"prompt": ["History: " + index.sid(1) + " Next:", "Item " + index.sid(2) + " title:"],
                         "target": [index.sid(4), " Toy Story"], "target_kind": ["sid", "text"]})
    e = encode_rows(enc, rows)
    ids = torch.full((2, max(e.lengths())), enc.pad_id)
    tgt = torch.zeros_like(ids, dtype=torch.bool)
    for j, s in enumerate(e.input_ids):
        ids[j, : len(s)] = torch.tensor(s)
        tgt[j, e.target_start[j] : len(s)] = True
    h, _ = model.hidden(ids, attention_mask=(tgt | (ids != enc.pad_id)).long())
    loss, n = target_loss(model, h, ids, tgt)
    n_text = len(enc.encode(" Toy Story")) + 1  # + EOS
    assert n == index.num_levels + n_text
    assert torch.isfinite(loss) and loss.item() > 0
    # label smoothing (train.label_smoothing) moves only the SID tokens' share: by hand, per SID token,
    # (1 - e) * CE(target) + e * mean over the level's codes of -log p(code)
    eps = 0.2
    smooth, _ = target_loss(model, h, ids, tgt, label_smoothing=eps)
    pred, labels = tgt[:, 1:], ids[:, 1:]
    hs, lab = h[:, :-1][pred], labels[pred]
    extra = 0.0
    for level in range(index.num_levels):
        sl = model.vocab.level_slice(level)
        rel = lab - model.vocab.base_vocab
        sel = (lab >= model.vocab.base_vocab) & (rel >= sl.start) & (rel < sl.stop)
        logp = torch.log_softmax(model.sid_logits(hs[sel], level).float(), -1)
        ce = -logp.gather(1, (rel[sel] - sl.start)[:, None]).sum()
        extra += (eps * (-logp.mean(1).sum() - ce)).item()
    assert smooth.item() == pytest.approx(loss.item() + extra / n, rel=1e-5)


def test_lora_training_reduces_loss_and_only_touches_adapter(tiny):
    index = _index()
    model, enc = _model(tiny, index, lora=True)
    base_before = {n: p.detach().clone() for n, p in model.lm.named_parameters() if "lora_" not in n}
    rows = pd.DataFrame({"prompt": [f"History: {index.sid(i)} Next:" for i in range(8)],
                         "target": [index.sid(i + 1) for i in range(8)], "target_kind": "sid"})
    res = train(model, enc, rows, TrainConfig(steps=40, batch_size=8, lr=5e-3, embedding_lr=2e-2, warmup_steps=2,
                                              log_every=5), seed=0, dtype=torch.float32, progress=False)
    assert np.mean(res.losses[-5:]) < 0.5 * np.mean(res.losses[:5])
    for n, p in model.lm.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), f"frozen weight {n} changed"
    assert 0.0 <= res.padding_share < 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_forcing_many_sids_as_one_tree_equals_one_pass_per_sid(tiny, dtype):
    """``sid_log_prob`` scores K SIDs after each prompt in one pass (the K SIDs' tokens share the prompt's cache under
    a tree mask): on left-padded prompts of different lengths it equals a plain pass over prompt + SID per item, and
    the prompts' state is left as it was (it is reused for the next batch of items)."""
    from sidrec.model.decode import prefill, sid_log_prob

    index = _index()
    model, enc = _model(tiny, index, seed=3)
    prompts = [enc.encode("History: " + index.sid(1) + index.sid(4) + " Next:"), enc.encode("Next:"),
               enc.encode("A longer history: " + "".join(index.sid(i) for i in (2, 3, 5, 8)) + " Next:")]
    rng = np.random.default_rng(0)
    rows = np.stack([rng.choice(len(index.entity_ids), 6, replace=False) for _ in prompts])
    codes = torch.as_tensor(np.asarray(index.codes))[torch.as_tensor(rows)]  # [3, 6, L]
    state = prefill(model, prompts, enc.pad_id, dtype)
    before = state.cache.get_seq_length()
    got = sid_log_prob(model, state, codes)
    again = sid_log_prob(model, state, codes[:, 2:4])
    assert state.cache.get_seq_length() == before
    want = torch.tensor([[_sequence_logprob(model, p, codes[u, k].tolist(), model.vocab) for k in range(codes.shape[1])]
                         for u, p in enumerate(prompts)])
    tol = 1e-4 if dtype == torch.float32 else 0.15
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=tol)
    np.testing.assert_allclose(again.numpy(), got[:, 2:4].numpy(), atol=1e-5)
