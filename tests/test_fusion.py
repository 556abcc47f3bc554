"""Members on their own SID indexes fused at the item level (``train.member_index: own``, sidrec.model.fusion): the
fused list is the union of the members' pools ranked by the sum of every member's exact score of each item on its
own SIDs (checked against an exhaustive scoring of the whole catalog); one member is its own decoding; members that
index other catalogs are refused; the stage trains member k on its own index, saves it with its index and prompts,
loads, evaluates and serves the ensemble."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sidrec.config import parse_config
from sidrec.errors import ConfigError, ModelError

from test_item_head import _model  # noqa: E402  (a tiny Llama with LoRA, SID rows and an item head)
from test_tasks_text import index, ml  # noqa: E402,F401  (pytest fixtures: a real 120-user slice and its index)


def _other(index, seed=1):
    """The same catalog on another SID index: every item's code tuple moved to another item."""
    from sidrec.index.sid_index import SIDIndex

    perm = np.random.default_rng(seed).permutation(len(index.entity_ids))
    return SIDIndex(entity_ids=list(index.entity_ids), codes=np.asarray(index.codes)[perm], level_sizes=list(index.level_sizes))


def _member(index, seed, candidates):
    m, enc, tok = _model(index, seed=seed)
    with torch.no_grad():  # an item head that disagrees with the SID head
        m.item_head.item_rows.add_(0.5 * torch.randn(m.item_head.item_rows.shape, generator=torch.Generator().manual_seed(seed)))
    m.item_head.candidates = candidates
    return m.eval(), enc, tok


def _exact(model, enc, index, history: list[int]) -> torch.Tensor:
    """[n] every catalog item's score by one member, each from one full pass over prompt + the item's SID: the sum
    over levels of log-softmax(SID logits) + fusion x log-softmax(item logits) after the prompt."""
    prompt = enc.encode("Items:" + "".join(index.sid(i) for i in history))
    n, L = len(index.entity_ids), index.num_levels
    codes = torch.as_tensor(np.asarray(index.codes))
    toks = torch.stack([model.vocab.code_ids(level, codes[:, level]) for level in range(L)], 1)  # [n, L]
    ids = torch.cat([torch.tensor([prompt]).expand(n, -1), toks[:, :-1]], 1)
    with torch.no_grad():
        h, _ = model.hidden(ids)
        out = torch.zeros(n)
        for level in range(L):
            lp = torch.log_softmax(model.sid_logits(h[:, len(prompt) - 1 + level], level).float(), -1)
            out += lp.gather(1, codes[:, level : level + 1]).squeeze(1)
        item = torch.log_softmax(model.item_head.logits(h[:1, len(prompt) - 1]).float(), -1)[0]
    return out + float(model.item_head.fusion) * item


def test_the_fused_list_ranks_the_pools_union_by_the_members_summed_exact_scores(index):
    """Two members on two indexes of one catalog, 4 beams + 3 head candidates each: the fused top 5 is exactly the
    union of the two pools ranked by the sum of each member's exact score of each item, with those scores; items
    outside a member's pool are scored by it (rescoring), and the fused list is neither member's own."""
    from sidrec.model.decode import beam_search_batch
    from sidrec.model.fusion import IndexEnsemble, recommend_fused

    other = _other(index)
    (a, enc_a, tok), (b, enc_b, _) = _member(index, 5, 3), _member(other, 6, 3)
    ens = IndexEnsemble([a, b], [index, other], tok)
    histories = [[1], [2, 3, 4], [7, 9]]
    prompts = [[enc.encode("Items:" + "".join(ix.sid(i) for i in h)) for h in histories]
               for enc, ix in ((enc_a, index), (enc_b, other))]
    rows, scores, emitted = recommend_fused(ens, prompts, 5, batch_size=2, dtype=torch.float32, progress=False)
    assert emitted.all()
    rescored = differs_a = differs_b = False
    for u, h in enumerate(histories):
        exact = _exact(a, enc_a, index, h) + _exact(b, enc_b, other, h)
        pools = []
        for m, ix, p in ((a, index, prompts[0][u]), (b, other, prompts[1][u])):
            codes, _ = beam_search_batch(m, [p], ix.num_levels, 4, ix.build_trie(), 0, torch.float32, pool=True)
            assert codes.shape[1] == 4 + 3  # the beams and the head's candidates
            lookup = {tuple(c): r for r, c in enumerate(np.asarray(ix.codes).tolist())}
            pools.append({lookup[tuple(c)] for c in codes[0].tolist()})
        union = sorted(pools[0] | pools[1])
        rescored |= pools[0] != pools[1]
        want = sorted(union, key=lambda r: -float(exact[r]))[:5]
        assert rows[u].tolist() == want
        np.testing.assert_allclose(scores[u], exact[want].numpy(), atol=1e-4)
        own_a = beam_search_batch(a, [prompts[0][u]], index.num_levels, 5, index.build_trie(), 0, torch.float32)[0][0]
        differs_a |= a.item_head.rows_of(own_a).tolist() != rows[u].tolist()
        own_b = beam_search_batch(b, [prompts[1][u]], other.num_levels, 5, other.build_trie(), 0, torch.float32)[0][0]
        differs_b |= b.item_head.rows_of(own_b).tolist() != rows[u].tolist()
    assert rescored and differs_a and differs_b


def test_one_member_is_its_own_decoding(index):
    from sidrec.model.decode import beam_search_batch
    from sidrec.model.fusion import IndexEnsemble, recommend_fused

    m, enc, tok = _member(index, 3, 4)
    prompts = [enc.encode("Items:" + index.sid(1) + index.sid(2)), enc.encode("Items:" + index.sid(7))]
    rows, scores, _ = recommend_fused(IndexEnsemble([m], [index], tok), [prompts], 6, dtype=torch.float32, progress=False)
    codes, sc = beam_search_batch(m, prompts, index.num_levels, 6, index.build_trie(), enc.pad_id, torch.float32)
    assert rows.tolist() == m.item_head.rows_of(codes).tolist()
    np.testing.assert_allclose(scores, sc.numpy(), atol=1e-5)


def test_members_that_index_other_catalogs_are_refused(index):
    from sidrec.index.sid_index import SIDIndex
    from sidrec.model.fusion import IndexEnsemble

    m, _, tok = _member(index, 3, 0)
    fewer = SIDIndex(entity_ids=list(index.entity_ids)[:-1], codes=np.asarray(index.codes)[:-1],
                     level_sizes=list(index.level_sizes))
    with pytest.raises(ModelError, match="member 1's SID index lists another catalog"):
        IndexEnsemble([m, m], [index, fewer], tok)
    with pytest.raises(ConfigError, match="member_index .own. needs train.members >= 2"):
        parse_config({"train": {"member_index": "own"}})


@pytest.mark.slow
def test_own_index_members_trained_saved_loaded_evaluated_and_served(ml100k_dir, tmp_path):
    """train.members 2 with member_index own: member 0 is the single run on the run's index, member 1 trains on its
    own index (index seed + 1: other SIDs) and is saved with it and its valid/test prompts; the folder loads as an
    IndexEnsemble, evaluates on the run's users and serves a request; the plain loader refuses it with a pointer."""
    from safetensors.torch import load_file

    from sidrec import stages
    from sidrec.artifacts import IndexBundle, load_model
    from sidrec.model.fusion import IndexEnsemble
    from sidrec.model.sid_model import load_recommender
    from sidrec.ops.serving import Recommender

    def cfg(members=1, own=False):
        return parse_config({
            "seed": 0,
            "data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 30, "kcore": 3},
            "index": {"codebook_size": 8, "levels": 2, "kmeans_iters": 10},
            "model": {"backbone": "tiny", "dtype": "float32", "item_head": 1.0, "item_head_candidates": 3},
            "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": None, "members": members,
                      "member_index": "own" if own else "shared", "threads": 1},
            "eval": {"beams": 10, "batch_size": 16, "ks": [1, 5, 10]},
        })

    c2 = cfg(members=2, own=True)
    ds = stages.ingest(c2)
    features = stages.featurize(ds, c2)
    bundle = stages.build_index(features, c2)
    instr = stages.instruct(ds, bundle, c2)
    with pytest.raises(ModelError, match="needs the dataset and the text features"):
        stages.finetune(instr, bundle, c2, tmp_path / "nope", ds=ds)
    rec = stages.finetune(instr, bundle, c2, tmp_path / "ens", ds=ds, features=features)
    assert rec.meta["member_index"] == "own" and [m["index_seed"] for m in rec.meta["members"]] == [0, 1]
    idx0 = IndexBundle.load(tmp_path / "ens" / "members" / "0" / "index").items
    idx1 = IndexBundle.load(tmp_path / "ens" / "members" / "1" / "index").items
    assert np.array_equal(idx0.codes, bundle.items.codes) and not np.array_equal(idx1.codes, idx0.codes)
    assert idx1.entity_ids == idx0.entity_ids

    single = stages.finetune(instr, bundle, cfg(), tmp_path / "single", ds=ds)  # member 0 is the single run, bit for bit
    w = lambda d: load_file(str(d / "sid_embeddings.safetensors"))["sid_embeddings"]  # noqa: E731
    assert torch.equal(w(tmp_path / "ens" / "members" / "0"), w(single.path))

    model, _, meta = load_model(tmp_path / "ens", "tiny")
    assert isinstance(model, IndexEnsemble) and len(model) == 2 and meta["train"]["train/members"] == 2
    with pytest.raises(ModelError, match="sidrec.artifacts.load_model"):
        load_recommender(tmp_path / "ens", "tiny")
    report = stages.evaluate(rec, instr, bundle, c2)
    assert report.metrics["test/users"] == len(instr.part("test")) and report.metrics["test/invalid_rate"] == 0.0
    assert 0.0 <= report.metrics["test/recall_at_10"] <= 1.0

    items = tmp_path / "items.csv"
    ds.items[["item_id", "title"]].to_csv(items, index=False)
    served = Recommender(tmp_path / "ens", tmp_path / "ens" / "members" / "0" / "index", items,
                         {"backbone": "tiny", "beams": 10, "dtype": "float32", "prompt_history": 20})
    out = served.recommend([[str(i) for i in ds.items["item_id"].iloc[:3]]], k=5)[0]
    assert served.fused and len(out) == 5 and out["item_id"].is_unique and set(out["item_id"]) <= set(idx0.entity_ids)
    # the promotion gate scores a registered ensemble as evaluate does (the same users, each member's own prompts)
    from sidrec.ops.registry import _test_users, score_recommender

    gate = score_recommender(served, _test_users(ds, c2), c2)
    assert gate["test/scored_share"] == 1.0 and 0.0 <= gate["test/recall_at_10"] <= 1.0
