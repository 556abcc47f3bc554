"""Collaborative signal in the SID index (``index.embedding: hybrid``): co-occurrence vectors from the
training split only, their weight in the quantizer, the end-to-end index, and placing a later run's
new items in a hybrid champion's index."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sidrec.index.collab import align, cooccurrence_matrix, cooccurrence_vectors, hybrid_inputs
from sidrec.config import parse_config

from test_tasks_text import ml  # noqa: F401  (the real MovieLens-100k slice, 120 users)

HYBRID = {"index": {"embedding": "hybrid", "codebook_size": 8, "levels": 2, "kmeans_iters": 10,
                    "hybrid": {"dim": 16, "window": 3}}}


def _text(n: int, d: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_vectors_come_from_the_training_split_only(ml):
    from sidrec import stages

    cfg = parse_config(HYBRID)
    vec = stages.collab_features(ml, cfg)
    assert vec.shape == (len(ml.items), 16) and np.abs(vec).sum() > 0
    # rewrite every user's valid and test items (the last two): the vectors must not move
    rng = np.random.default_rng(0)
    pool = ml.items["item_id"].tolist()
    seqs = ml.sequences.copy()
    seqs["item_ids"] = [list(s[:-2]) + list(rng.choice(pool, 2)) for s in seqs["item_ids"]]
    moved = dataclasses.replace(ml, sequences=seqs)
    assert np.array_equal(stages.collab_features(moved, cfg), vec)
    # ... while a change inside the training split does move them
    seqs2 = ml.sequences.copy()
    seqs2["item_ids"] = [list(rng.permutation(s[:-2])) + list(s[-2:]) for s in seqs2["item_ids"]]
    assert not np.allclose(stages.collab_features(dataclasses.replace(ml, sequences=seqs2), cfg), vec)


def test_items_taken_together_get_close_vectors():
    ids = [f"i{k}" for k in range(20)]
    rng = np.random.default_rng(0)
    # two audiences: users of group A take only items 0..9, users of group B only 10..19
    seqs = [list(rng.choice(ids[:10], 8)) for _ in range(60)] + [list(rng.choice(ids[10:], 8)) for _ in range(60)]
    v = cooccurrence_vectors(seqs + [["i0", "unknown", "i1"]], ids + ["cold"], dim=4, window=2)
    assert not v[-1].any()  # an item nobody took: zero vector
    u = v[:20] / np.linalg.norm(v[:20], axis=1, keepdims=True)
    sim = u @ u.T
    same = sim[:10, :10][~np.eye(10, dtype=bool)].mean() + sim[10:, 10:][~np.eye(10, dtype=bool)].mean()
    assert same / 2 > sim[:10, 10:].mean() + 0.5
    counts = cooccurrence_matrix([["a", "b", "c", "a"]], ["a", "b", "c"], window=1)
    assert counts.toarray().tolist() == [[0, 1, 1], [1, 0, 1], [1, 1, 0]]  # symmetric, distance 1 only


@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
def test_the_collaborative_part_gets_its_share_of_the_quantizer_input(share):
    from sidrec.index.quantize import fit_rq_kmeans

    text, collab = _text(200, 30), _text(200, 6, seed=1) * 40.0  # raw scales must not matter
    x, w = hybrid_inputs(text, collab, share)
    state = fit_rq_kmeans(x, 1, 4, seed=0, iters=2, column_weights=w)
    z = state.latent(x).numpy()  # what the quantizer sees
    var = z.var(0)
    assert var[30:].sum() / var.sum() == pytest.approx(share, rel=1e-3)


def test_a_heavy_collaborative_share_makes_the_first_level_follow_the_audiences():
    from sidrec.index.quantize import quantize

    n = 160
    rng = np.random.default_rng(0)
    audience = np.repeat([0, 1], n // 2)
    collab = (audience[:, None] * 2.0 - 1.0) * np.ones((n, 4)) + 0.1 * rng.normal(size=(n, 4))
    text = rng.normal(size=(n, 40))  # text says nothing about the audiences
    cfg = parse_config({"index": {"codebook_size": 2, "levels": 2, "kmeans_iters": 20}}).index
    for share, agree in ((0.8, True), (None, False)):
        if share is None:
            res = quantize(text.astype(np.float32), cfg, 0)
        else:
            x, w = hybrid_inputs(text, collab, share)
            res = quantize(x, cfg, 0, column_weights=w)
        first = res.codes[:, 0]
        purity = max((first == audience).mean(), (first != audience).mean())
        assert bool(purity == 1.0) is agree


def test_align_undoes_a_rotation_of_the_basis():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 8)).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    ids = [f"i{k}" for k in range(50)]
    later_ids = ids[10:] + ["new"]  # a later run: some items gone, one new, another basis
    later = np.vstack([ref[10:], rng.normal(size=(1, 8))]) @ q
    out = align(ids, ref, later_ids, later)
    assert np.allclose(out[:-1], ref[10:], atol=1e-4)
    with pytest.raises(ValueError, match="in common"):
        align(ids, ref, ["x", "y"], later[:2])


def test_hybrid_index_end_to_end_and_its_artifact(ml, tmp_path):
    from sidrec import stages
    from sidrec.artifacts import EntityFeatures, IndexBundle
    from sidrec.errors import ConfigError

    cfg = parse_config(HYBRID)
    n = len(ml.items)
    feats = EntityFeatures(item_ids=ml.items["item_id"].tolist(), item_texts=[""] * n, item_embeddings=_text(n),
                           item_collab=stages.collab_features(ml, cfg))
    bundle = stages.build_index(feats, cfg)
    assert bundle.report["index/input_dim"] == 24 + 16 and bundle.state.input_dim == 40
    assert 0.5 < bundle.report["index/collab_coverage"] <= 1.0
    bundle.save(tmp_path / "idx")
    back = IndexBundle.load(tmp_path / "idx")
    assert np.array_equal(back.collab, feats.item_collab) and np.array_equal(back.items.codes, bundle.items.codes)
    feats.save(tmp_path / "feat")
    assert np.array_equal(EntityFeatures.load(tmp_path / "feat").item_collab, feats.item_collab)
    # text features computed without the collaborative view: a clear error, not a text-only index
    with pytest.raises(ConfigError, match="re-run the text-features step"):
        stages.build_index(EntityFeatures(item_ids=feats.item_ids, item_texts=feats.item_texts,
                                          item_embeddings=feats.item_embeddings), cfg)
    # a text index has no collaborative part
    assert stages.build_index(feats, parse_config({"index": {**HYBRID["index"], "embedding": "text"}})).collab is None


def test_index_seed_keeps_the_sids_when_the_run_seed_changes(ml):
    """index.seed fixes the hybrid index (collaborative vectors and quantizer) across run seeds; unset, the index
    follows the run's seed as before."""
    from sidrec import stages
    from sidrec.artifacts import EntityFeatures

    n = len(ml.items)

    def codes(**over):
        cfg = parse_config({**HYBRID, **over, "index": {**HYBRID["index"], **over.get("index", {})}})
        feats = EntityFeatures(item_ids=ml.items["item_id"].tolist(), item_texts=[""] * n, item_embeddings=_text(n),
                               item_collab=stages.collab_features(ml, cfg))
        return stages.build_index(feats, cfg).items.codes

    pinned = [codes(seed=s, index={"seed": 7}) for s in (1, 2)]
    assert np.array_equal(pinned[0], pinned[1])
    assert np.array_equal(codes(seed=7), pinned[0])  # index.seed 7 is the index a run with seed 7 builds
    assert not np.array_equal(codes(seed=1), codes(seed=2))  # unset: another run seed, another index


def test_retrain_places_new_items_in_the_hybrid_champions_basis(ml, tmp_path, monkeypatch):
    import sidrec.ops.drift as drift
    from sidrec import stages
    from sidrec.artifacts import EntityFeatures
    from sidrec.index.quantize import assign_new

    cfg = parse_config({**HYBRID, "retrain": {"reuse_index": True}})
    ids = ml.items["item_id"].tolist()
    text, collab = _text(len(ids)), stages.collab_features(ml, cfg)
    keep = len(ids) - 5  # the champion never saw the last 5 items
    champ = stages.build_index(EntityFeatures(item_ids=ids[:keep], item_texts=[""] * keep, item_embeddings=text[:keep],
                                              item_collab=collab[:keep]), cfg)
    champ.save(tmp_path / "model" / "index")
    monkeypatch.setattr(drift, "download_champion", lambda c: tmp_path / "model")
    # this run's SVD came out in another basis: the same vectors, rotated
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(16, 16)))
    later = EntityFeatures(item_ids=ids, item_texts=[""] * len(ids), item_embeddings=text,
                           item_collab=(collab.astype(np.float64) @ q).astype(np.float32))
    bundle, info = drift.index_for_retrain(cfg, later)
    assert info["source"] == "champion" and info["new_items"] == 5
    for e in ids[:keep]:
        assert bundle.items.sid_of(e) == champ.items.sid_of(e)
    # the new items got the codes the champion's quantizer gives their un-rotated hybrid vectors
    x_new, _ = hybrid_inputs(text[keep:], collab[keep:], cfg.index.hybrid.collab_share)
    want, _ = assign_new(champ.state, champ.items.codes, list(champ.items.level_sizes), x_new)
    got = np.array([bundle.items.codes[bundle.items.row_of(e)] for e in ids[keep:]])
    assert np.array_equal(got, want)
    assert bundle.collab.shape == (len(ids), 16) and np.allclose(bundle.collab[keep:], collab[keep:], atol=1e-4)
    # a champion without collaborative vectors cannot place them: a fresh index, with the reason
    text_champ = stages.build_index(EntityFeatures(item_ids=ids[:keep], item_texts=[""] * keep, item_embeddings=text[:keep]),
                                    parse_config({**HYBRID, "index": {**HYBRID["index"], "embedding": "text"}}))
    text_champ.save(tmp_path / "model2" / "index")
    monkeypatch.setattr(drift, "download_champion", lambda c: tmp_path / "model2")
    fresh, info = drift.index_for_retrain(cfg, later)
    assert info["source"] == "fresh" and "no collaborative vectors" in info["reason"]
    assert len(fresh.items) == len(ids) and fresh.collab is not None


def test_config_refuses_hybrid_where_it_cannot_work():
    from sidrec.errors import ConfigError

    # the dynamic index starts from the static (hybrid) index, so the two go together; other quantizers do not
    assert parse_config({"index": {"embedding": "hybrid", "mode": "dynamic"}}).index.embedding == "hybrid"
    with pytest.raises(ConfigError, match="starts from the static RQ-KMeans"):
        parse_config({"index": {"mode": "dynamic", "quantizer": "rq_vae"}})
    with pytest.raises(ConfigError, match="collab_share"):
        parse_config({"index": {"embedding": "hybrid", "hybrid": {"collab_share": 0.0}}})


def test_sasrec_vectors_are_the_run_baselines_item_table_and_never_see_test_items(ml):
    from sidrec import stages
    from sidrec.artifacts import EntityFeatures
    from sidrec.evaluation.evaluate import same_run_sasrec

    sasrec = {"hidden": 16, "layers": 1, "heads": 1, "max_len": 20, "max_epochs": 3, "patience": 2}
    cfg = parse_config({**HYBRID, "index": {**HYBRID["index"], "hybrid": {"source": "sasrec"}},
                        "baselines": {"sasrec": sasrec}})
    vec = stages.collab_features(ml, cfg)
    assert vec.shape == (len(ml.items), 16) and vec.dtype == np.float32
    model, info = same_run_sasrec(ml, cfg.baselines.sasrec, cfg.seed, cfg.data.max_history, progress=False)
    assert np.array_equal(vec, model.item_weights().detach().numpy())  # one model: the baseline's
    assert stages.baselines(ml, cfg)["baseline/sasrec/reused"] == 1.0  # and the baselines step does not retrain it
    assert info["epochs_run"] >= 1
    # rewrite every user's test item (the last): nothing in the vectors may move
    rng = np.random.default_rng(1)
    pool = ml.items["item_id"].tolist()
    seqs = ml.sequences.copy()
    seqs["item_ids"] = [list(s[:-1]) + [rng.choice(pool)] for s in seqs["item_ids"]]
    assert np.array_equal(stages.collab_features(dataclasses.replace(ml, sequences=seqs), cfg), vec)
    # and the hybrid index builds on them
    n = len(ml.items)
    feats = EntityFeatures(item_ids=pool, item_texts=[""] * n, item_embeddings=_text(n), item_collab=vec)
    assert stages.build_index(feats, cfg).state.input_dim == 24 + 16


def test_a_user_vector_is_the_mean_of_their_items():
    from sidrec.index.collab import user_vectors

    items = np.arange(12, dtype=np.float32).reshape(4, 3)
    got = user_vectors([["a", "c"], ["b", "b", "d", "gone"], []], ["a", "b", "c", "d"], items)
    assert np.allclose(got, [items[[0, 2]].mean(0), items[[1, 1, 3]].mean(0), np.zeros(3)])


def test_the_users_index_sees_their_training_items_collaborative_vectors(ml, tmp_path):
    """Dual index on a hybrid index: the users' quantizer input is [user text | mean collaborative vector of the user's
    training items], weighted as the items' is, from the training split only; index.hybrid.users: false keeps the
    user text alone."""
    from sidrec import stages
    from sidrec.artifacts import EntityFeatures
    from sidrec.errors import ConfigError

    dual = {"index": {**HYBRID["index"], "entities": "items+users"}}
    cfg = parse_config(dual)
    users = list(ml.train_sequences().keys())
    n, m = len(ml.items), len(users)
    item_collab = stages.collab_features(ml, cfg)
    user_collab = stages.user_collab_features(ml, users, item_collab)
    assert user_collab.shape == (m, 16)
    row = {e: i for i, e in enumerate(ml.items["item_id"])}
    first = ml.train_sequences()[users[0]]
    assert np.allclose(user_collab[0], item_collab[[row[i] for i in first]].mean(0), atol=1e-5)
    # a user's valid and test items (the last two of the sequence) never enter their vector
    seqs = ml.sequences.copy()
    pool = ml.items["item_id"].tolist()
    rng = np.random.default_rng(1)
    seqs["item_ids"] = [list(s[:-2]) + list(rng.choice(pool, 2)) for s in seqs["item_ids"]]
    assert np.array_equal(stages.user_collab_features(dataclasses.replace(ml, sequences=seqs), users, item_collab), user_collab)

    feats = EntityFeatures(item_ids=pool, item_texts=[""] * n, item_embeddings=_text(n), user_ids=users,
                           user_texts=[""] * m, user_embeddings=_text(m, d=24, seed=1) * 50.0, item_collab=item_collab,
                           user_collab=user_collab)
    x, w = stages.user_index_inputs(feats, cfg)
    assert x.shape == (m, 24 + 16) and w is not None
    bundle = stages.build_index(feats, cfg)
    text_only = stages.build_index(feats, parse_config({"index": {**dual["index"], "hybrid": {"dim": 16, "window": 3,
                                                                                               "users": False}}}))
    assert np.array_equal(bundle.items.codes, text_only.items.codes)  # the items' index is untouched

    def spread(codes):  # mean squared distance of a user's collaborative vector to the mean of their first code's users
        z = (user_collab - user_collab.mean(0)) / (user_collab.std(0) + 1e-8)
        return float(np.mean([((z[codes[:, 0] == c] - z[codes[:, 0] == c].mean(0)) ** 2).sum(1).mean()
                              for c in np.unique(codes[:, 0])]))

    # users who take the same items now share first codes; a text-only users' index does not see it
    assert spread(bundle.users.codes) < 0.8 * spread(text_only.users.codes)
    assert stages.user_index_inputs(feats, parse_config({"index": {**dual["index"], "hybrid": {"users": False}}}))[1] is None
    feats.save(tmp_path / "feat")
    assert np.array_equal(EntityFeatures.load(tmp_path / "feat").user_collab, user_collab)
    with pytest.raises(ConfigError, match="index.hybrid.users"):
        stages.user_index_inputs(dataclasses.replace(feats, user_collab=None), cfg)
