"""A seed ensemble (``train.members``, sidrec.model.ensemble): members on one index decoded as one, checked against an
exhaustive ranking of the whole catalog by the members' averaged log-probabilities; a one-member ensemble is the
member; members that do not share an index are refused; the stage trains member k with seed + k (member 0 is the
single run), saves and loads the ensemble, and evaluates it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sidrec.config import parse_config
from sidrec.errors import ModelError

from test_item_head import _model  # noqa: E402  (a tiny Llama with LoRA, SID rows and an item head)
from test_tasks_text import index, ml  # noqa: E402,F401  (pytest fixtures: a real 120-user slice and its index)


def _members(index, seeds=(5, 6)):
    out = []
    for s in seeds:
        m, enc, tok = _model(index, seed=s)
        with torch.no_grad():  # item heads that disagree with each other and with the SID heads
            m.item_head.item_rows.add_(0.5 * torch.randn(m.item_head.item_rows.shape, generator=torch.Generator().manual_seed(s)))
        m.eval()
        out.append(m)
    return out, enc, tok


def _exhaustive(members, prompt, index, fusion):
    """Every catalog item: sum over levels of log-softmax(mean over members of log p_level) + fusion x
    log-softmax(mean over members of log p_item), each member run on prompt + the item's SID in one full pass."""
    n, L = len(index.entity_ids), index.num_levels
    with torch.no_grad():
        item_lp = torch.stack([torch.log_softmax(m.item_head.logits(m.hidden(torch.tensor([prompt]))[0][0, -1]).float(), -1)
                               for m in members]).mean(0)
        out = torch.zeros(n)
        for i in range(n):
            codes = index.codes[i]
            toks = [int(members[0].vocab.code_ids(level, torch.tensor(int(codes[level])))) for level in range(L)]
            hs = [m.hidden(torch.tensor([prompt + toks[:-1]]))[0] for m in members]
            for level in range(L):
                lp = torch.stack([torch.log_softmax(m.sid_logits(h[0, len(prompt) - 1 + level], level).float(), -1)
                                  for m, h in zip(members, hs)]).mean(0)
                out[i] += torch.log_softmax(lp, -1)[int(codes[level])]
    return out + fusion * torch.log_softmax(item_lp, -1)


def test_the_ensemble_search_ranks_by_the_members_averaged_log_probabilities(index):
    """With every item a head candidate, a 3-beam search of two members returns exactly the top 3 of the exhaustive
    ranking by the members' mean log-probabilities (level by level, and the item head's), with those scores; the
    ensemble's list differs from each member's own (the fusion is not one member in disguise)."""
    from sidrec.model.decode import beam_search_batch
    from sidrec.model.ensemble import SeedEnsemble

    members, enc, _ = _members(index)
    ens = SeedEnsemble(members).eval()
    trie = index.build_trie()
    n = len(index.entity_ids)
    prompts = [enc.encode("Items:" + "".join(index.sid(i) for i in range(k))) for k in (1, 4)]
    for m in members:
        m.item_head.candidates = n
    ens.item_head.candidates = n
    codes, scores = beam_search_batch(ens, prompts, index.num_levels, 3, trie, enc.pad_id, torch.float32)
    own = [beam_search_batch(m, prompts, index.num_levels, 3, trie, enc.pad_id, torch.float32)[0] for m in members]
    differs = [False, False]
    for b, p in enumerate(prompts):
        top = _exhaustive(members, p, index, float(ens.item_head.fusion)).topk(3)
        rows = ens.item_head.rows_of(codes[b])
        assert rows.tolist() == top.indices.tolist()
        np.testing.assert_allclose(scores[b].numpy(), top.values.numpy(), atol=1e-4)
        for k in range(2):
            differs[k] |= members[k].item_head.rows_of(own[k][b]).tolist() != rows.tolist()
    assert all(differs)


def test_a_one_member_ensemble_is_the_member(index):
    from sidrec.model.decode import beam_search_batch
    from sidrec.model.ensemble import SeedEnsemble

    (m,), enc, _ = _members(index, seeds=(3,))
    m.item_head.candidates = 4
    ens = SeedEnsemble([m]).eval()
    trie = index.build_trie()
    p = [enc.encode("Items:" + index.sid(1) + index.sid(2)), enc.encode("Items:" + index.sid(7))]
    a = beam_search_batch(m, p, index.num_levels, 5, trie, enc.pad_id, torch.float32)
    b = beam_search_batch(ens, p, index.num_levels, 5, trie, enc.pad_id, torch.float32)
    assert a[0].tolist() == b[0].tolist()
    np.testing.assert_allclose(a[1].numpy(), b[1].numpy(), atol=1e-5)


def test_members_on_different_indexes_are_refused(index):
    from sidrec.index.sid_index import SIDIndex
    from sidrec.model.ensemble import SeedEnsemble

    (a, b), _, _ = _members(index)
    with torch.no_grad():  # the same vocabulary, other catalog SIDs: two items swap codes
        codes = b.item_head.codes.clone()
        codes[[0, 1]] = codes[[1, 0]]
        b.item_head.set_codes(codes)
    with pytest.raises(ModelError, match="member 1's item head has other catalog SIDs"):
        SeedEnsemble([a, b])
    other = SIDIndex(entity_ids=list(index.entity_ids), codes=index.codes, level_sizes=[s + 1 for s in index.level_sizes])
    (c,), _, _ = _members(other, seeds=(7,))
    with pytest.raises(ModelError, match="SID vocabulary differs"):
        SeedEnsemble([a, c])


@pytest.mark.slow
def test_members_trained_saved_loaded_and_evaluated(ml100k_dir, tmp_path):
    """train.members 2: member 0 is exactly the single run with the same seed, member 1 the run with seed + 1; the
    folder loads as a SeedEnsemble and evaluates; a folder whose ensemble meta.json is missing is refused."""
    from safetensors.torch import load_file

    from sidrec import stages
    from sidrec.model.ensemble import SeedEnsemble
    from sidrec.model.sid_model import load_recommender

    def cfg(seed=0, members=1):
        return parse_config({
            "seed": seed,
            "data": {"format": "recbole", "path": str(ml100k_dir), "max_users": 30, "kcore": 3},
            "index": {"codebook_size": 8, "levels": 2, "kmeans_iters": 10},
            "model": {"backbone": "tiny", "dtype": "float32", "item_head": 1.0, "item_head_candidates": 3},
            "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": None, "members": members,
                      "threads": 1},  # one thread: the weights are compared bit for bit
            "eval": {"beams": 10, "batch_size": 16, "ks": [1, 5, 10]},
        })

    c2 = cfg(members=2)
    ds = stages.ingest(c2)
    bundle = stages.build_index(stages.featurize(ds, c2), c2)
    instr = stages.instruct(ds, bundle, c2)
    logged = []
    rec = stages.finetune(instr, bundle, c2, tmp_path / "ens", log=lambda step, m: logged.extend(m))
    assert rec.meta["train"]["train/members"] == 2 and [m["seed"] for m in rec.meta["members"]] == [0, 1]
    assert any(k.startswith("member1/") for k in logged) and not any(k.startswith("member0/") for k in logged)

    def weights(d):
        return load_file(str(d / "sid_embeddings.safetensors"))["sid_embeddings"]

    for k, seed in ((0, 0), (1, 1)):
        single = stages.finetune(instr, bundle, cfg(seed=seed), tmp_path / f"single{seed}")
        assert torch.equal(weights(tmp_path / "ens" / "members" / str(k)), weights(single.path))
    model, _, meta = load_recommender(tmp_path / "ens", "tiny")
    assert isinstance(model, SeedEnsemble) and len(model) == 2 and meta["train"]["train/members"] == 2
    report = stages.evaluate(rec, instr, bundle, c2)
    assert 0.0 <= report.metrics["test/recall_at_10"] <= 1.0 and len(report.predictions) > 0
    # a scheduled retrain (drift.warm_finetune) of an ensemble trains fresh and says so, in the meta it writes once
    import json

    from sidrec.ops.drift import warm_finetune

    re = warm_finetune(instr, bundle, c2, tmp_path / "retrain")
    assert re.meta["warm_start"]["warm"] is False and "members" in re.meta["warm_start"]["reason"]
    assert json.loads((tmp_path / "retrain" / "meta.json").read_text())["warm_start"] == re.meta["warm_start"]
    assert torch.equal(weights(tmp_path / "retrain" / "members" / "1"), weights(tmp_path / "ens" / "members" / "1"))
    (tmp_path / "ens" / "meta.json").unlink()  # an ensemble whose training did not finish
    with pytest.raises(ModelError, match="unfinished seed ensemble"):
        load_recommender(tmp_path / "ens", "tiny")
