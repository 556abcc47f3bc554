"""Quantizers (RQ-KMeans, RQ-VAE), collision resolution and incremental assignment."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sidrec.config import IndexConfig, RQVAEConfig
from sidrec.index.quantize import (
    QuantizerState,
    assign_new,
    auto_codebook_size,
    code_stats,
    fit_rq_kmeans,
    fit_rq_vae,
    plot_code_usage,
    quantize,
    raw_collision_rate,
    resolve_collisions,
)

SMALL_VAE = RQVAEConfig(latent_dim=16, hidden_dims=[64], epochs=40, batch_size=128, lr=3e-3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add sync overhead (and are very slow on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _unique_rows(codes: np.ndarray) -> bool:
    return np.unique(codes, axis=0).shape[0] == codes.shape[0]


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(8, 16)) * 10.0
    labels = np.repeat(np.arange(8), 50)
    x = (centers[labels] + rng.normal(size=(400, 16))).astype(np.float32)
    return x, labels


def _purity(codes0: np.ndarray, labels: np.ndarray) -> float:
    return sum(np.bincount(labels[codes0 == c]).max() for c in np.unique(codes0)) / len(labels)


@pytest.fixture(scope="module")
def kmeans_result(blobs):
    x, _ = blobs
    return quantize(x, IndexConfig(quantizer="rq_kmeans", levels=3, codebook_size=8, kmeans_iters=30), seed=1)


@pytest.fixture(scope="module")
def vae_result(blobs):
    x, _ = blobs
    cfg = IndexConfig(quantizer="rq_vae", levels=2, codebook_size=8, rqvae=SMALL_VAE)
    return quantize(x, cfg, seed=1, progress=False)


@pytest.mark.parametrize(
    "n,levels,expected",
    [(1682, 3, 64), (1, 3, 4), (1, 1, 4), (64, 3, 16), (65, 3, 32), (100, 2, 64), (4096, 3, 64), (4097, 3, 128),
     (32768, 3, 128), (32769, 3, 256), (10**6, 3, 256), (10**9, 2, 256), (20, 1, 128), (50, 1, 256)],
)
def test_auto_codebook_size(n, levels, expected):
    assert auto_codebook_size(n, levels) == expected


def test_rq_kmeans_separates_blobs(kmeans_result, blobs):
    _, labels = blobs
    r = kmeans_result
    assert r.codes.dtype == np.int64
    assert _purity(r.codes[:, 0], labels) == 1.0
    assert len(np.unique(r.codes[:, 0])) == 8  # one code per blob
    assert r.stats["utilization_level_0"] == 1.0
    assert r.stats["perplexity_level_0"] == pytest.approx(8.0)
    assert r.stats["utilization_level_1"] >= 0.75
    assert _unique_rows(r.codes)
    assert r.collisions == 0
    assert r.level_sizes[:3] == [8, 8, 8]
    assert r.codes.shape[1] == len(r.level_sizes)
    for lvl, size in enumerate(r.level_sizes):
        assert r.codes[:, lvl].min() >= 0 and r.codes[:, lvl].max() < size
    # the standardised data is mostly between-blob variance, which level 0 already explains
    assert r.recon_error < 0.05
    assert r.raw_collision_rate == pytest.approx(raw_collision_rate(r.state.assign(blobs[0])))


def test_rq_vae_separates_blobs(vae_result, blobs):
    _, labels = blobs
    r = vae_result
    assert r.state.kind == "rq_vae"
    assert _purity(r.codes[:, 0], labels) >= 0.95
    assert r.stats["utilization_level_0"] >= 0.75
    assert _unique_rows(r.codes)
    assert r.collisions == 0
    assert np.isfinite(r.recon_error) and r.recon_error < 1.0


def test_determinism(blobs, kmeans_result, vae_result):
    x, _ = blobs
    again = quantize(x, IndexConfig(quantizer="rq_kmeans", levels=3, codebook_size=8, kmeans_iters=30), seed=1)
    np.testing.assert_array_equal(again.codes, kmeans_result.codes)
    cfg = IndexConfig(quantizer="rq_vae", levels=2, codebook_size=8, rqvae=SMALL_VAE)
    again = quantize(x, cfg, seed=1, progress=False)
    np.testing.assert_array_equal(again.codes, vae_result.codes)
    for a, b in zip(again.state.codebooks, vae_result.state.codebooks):
        np.testing.assert_array_equal(a, b)


def test_seed_changes_kmeans_init(blobs):
    x, _ = blobs
    a = fit_rq_kmeans(x, 2, 8, seed=0, iters=30).assign(x)
    b = fit_rq_kmeans(x, 2, 8, seed=5, iters=30).assign(x)
    # blob partition is the same, only the code labels may be permuted
    assert _purity(b[:, 0], a[:, 0]) == 1.0


def test_raw_collision_rate_hand_made():
    raw = np.array([[0, 0], [0, 0], [1, 0], [0, 0], [1, 1]])
    assert raw_collision_rate(raw) == pytest.approx(1 - 3 / 5)
    assert raw_collision_rate(np.array([[0], [1], [2]])) == 0.0


def test_prefix_cells_split_raw_collisions_between_the_earlier_levels_and_the_last():
    from sidrec.index.collisions import prefix_cells

    # cell (0, 0): 3 items, one repeat; cell (1, 0): 3 items, two repeats; cell (2, 5): 1 item
    raw = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0], [1, 0, 0], [1, 0, 0], [2, 5, 0]])
    roomy = prefix_cells(raw, last_size=3)
    assert roomy == {"overfull": 0.0, "in_room": pytest.approx(3 / 7), "prefix_cells": pytest.approx(3 / 7), "largest_cell": 3.0}
    assert roomy["in_room"] == pytest.approx(raw_collision_rate(raw))  # no cell overfull: every repeat is the last level's
    tight = prefix_cells(raw, last_size=2)  # both 3-item cells now hold more items than the last level has codes
    assert tight["overfull"] == pytest.approx(6 / 7) and tight["in_room"] == 0.0


def test_quantize_with_duplicate_points_and_fewer_points_than_codes():
    # 5 distinct, far-apart points repeated [3, 1, 1, 1, 2] times; 8 codes > 5 distinct points
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(5, 4)) * 10
    x = np.repeat(pts, [3, 1, 1, 1, 2], axis=0).astype(np.float32)
    r = quantize(x, IndexConfig(levels=1, codebook_size=8, kmeans_iters=10), seed=0)
    assert r.raw_collision_rate == pytest.approx(1 - 5 / 8)
    assert r.level_sizes == [8, 3]
    assert r.state.codebook_sizes == [8]  # all N slots allocated
    assert len(np.unique(r.codes[:, 0])) == 5
    np.testing.assert_array_equal(r.codes[:, 1], [0, 1, 2, 0, 0, 0, 0, 1])
    assert r.collisions == 0
    assert r.stats["max_group_size"] == 3
    assert r.recon_error == pytest.approx(0.0, abs=1e-8)


def test_resolve_collisions():
    raw = np.array([[1, 2], [0, 0], [1, 2], [3, 3], [1, 2], [0, 0]])
    codes, extra = resolve_collisions(raw)
    assert extra == [3]
    np.testing.assert_array_equal(codes[:, :2], raw)
    np.testing.assert_array_equal(codes[:, 2], [0, 0, 1, 0, 2, 1])
    assert _unique_rows(codes)

    unique = np.array([[0, 1], [1, 0]])
    codes, extra = resolve_collisions(unique)
    assert extra == [] and codes.shape == (2, 2)
    np.testing.assert_array_equal(codes, unique)


def test_resolve_collisions_all_collide():
    raw = np.zeros((37, 3), dtype=np.int64)
    codes, extra = resolve_collisions(raw)
    assert extra == [37]
    np.testing.assert_array_equal(codes[:, 3], np.arange(37))
    assert _unique_rows(codes)


def test_code_stats_hand_made():
    codes = np.array([[0, 0], [0, 1], [1, 0], [2, 0]])
    s = code_stats(codes, [4, 2])
    assert s["utilization_level_0"] == 0.75
    assert s["perplexity_level_0"] == pytest.approx(np.exp(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))))
    assert s["utilization_level_1"] == 1.0
    assert s["max_group_size"] == 1
    assert code_stats(codes, [4, 2], raw_levels=1)["max_group_size"] == 2


def test_assign_new_with_extra_level(blobs, kmeans_result):
    x, _ = blobs
    r = kmeans_result
    assert r.codes.shape[1] == 4  # blob data collides at 3 levels -> extra level
    # duplicates of existing items (guaranteed raw collisions) + fresh points near the blobs
    rng = np.random.default_rng(7)
    x_new = np.concatenate([x[:5], x[:5], x[100:110] + 0.01 * rng.normal(size=(10, 16))]).astype(np.float32)
    new, sizes = assign_new(r.state, r.codes, r.level_sizes, x_new)
    assert new.shape == (20, 4)
    np.testing.assert_array_equal(new[:, :3], r.state.assign(x_new))
    both = np.concatenate([r.codes, new])
    assert _unique_rows(both)
    assert sizes[:3] == r.level_sizes[:3]
    assert sizes[3] >= r.level_sizes[3]
    assert sizes[3] == both[:, 3].max() + 1 or sizes[3] == r.level_sizes[3]
    for lvl, size in enumerate(sizes):
        assert both[:, lvl].max() < size
    # the extra index continues after the existing members of the group
    grp = (r.codes[:, :3] == new[0, :3]).all(1)
    assert new[0, 3] == r.codes[grp, 3].max() + 1


def test_assign_new_without_extra_level():
    rng = np.random.default_rng(1)
    centers = (rng.normal(size=(8, 6)) * 10).astype(np.float32)
    # 16 slots but only 8 distinct points: slots 8..15 are free
    state = fit_rq_kmeans(centers, levels=1, codebook_size=16, seed=0, iters=10)
    existing, extra = resolve_collisions(state.assign(centers))
    assert extra == [] and existing.shape == (8, 1)
    x_new = (centers[[2, 2, 5]] + 0.01).astype(np.float32)
    new, sizes = assign_new(state, existing, [16], x_new)
    assert sizes == [16]
    assert _unique_rows(np.concatenate([existing, new]))

    full = fit_rq_kmeans(centers, levels=1, codebook_size=8, seed=0, iters=10)
    existing = full.assign(centers)
    assert _unique_rows(existing)
    with pytest.raises(ValueError, match="taken"):
        assign_new(full, existing, [8], centers[:1])


@pytest.mark.parametrize("which", ["kmeans", "vae"])
def test_state_save_load_round_trip(tmp_path, blobs, kmeans_result, vae_result, which):
    x, _ = blobs
    state = kmeans_result.state if which == "kmeans" else vae_result.state
    state.save(tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["quantizer.json", "quantizer.safetensors"]
    loaded = QuantizerState.load(tmp_path / "q")
    assert loaded.kind == state.kind
    np.testing.assert_array_equal(loaded.assign(x), state.assign(x))
    assert loaded.reconstruction_error(x) == pytest.approx(state.reconstruction_error(x))


def test_load_missing_state(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved quantizer"):
        QuantizerState.load(tmp_path)


def test_random_high_dim_vectors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 576)).astype(np.float32)
    r = quantize(x, IndexConfig(levels=3, codebook_size="auto", kmeans_iters=10, balance="none"), seed=0)
    assert r.level_sizes[:3] == [64, 64, 64]  # auto: 2,000 items, 3 levels
    assert _unique_rows(r.codes) and r.collisions == 0
    assert r.stats["utilization_level_0"] >= 0.9
    assert 0.0 < r.recon_error < 1.0  # standardised input has unit variance per dimension
    assert 0.0 <= r.raw_collision_rate < 1.0
    # the default balances the last level: fewer raw collisions, bought with reconstruction error (items moved off
    # their nearest last code; ~1.7x here and on real catalogs, BENCHMARKS.md "Raw collisions vs catalog size")
    b = quantize(x, IndexConfig(levels=3, kmeans_iters=10), seed=0)
    assert b.level_sizes == r.level_sizes and _unique_rows(b.codes) and b.collisions == 0
    assert b.raw_collision_rate < 0.5 * r.raw_collision_rate and b.recon_error > r.recon_error

    cfg = RQVAEConfig(latent_dim=16, hidden_dims=[64], epochs=2, batch_size=512)
    state = fit_rq_vae(x, 3, 32, seed=0, cfg=cfg, progress=False)
    raw = state.assign(x)
    assert raw.shape == (2000, 3) and raw.max() < 32
    codes, _ = resolve_collisions(raw)
    assert _unique_rows(codes)


def test_input_validation():
    with pytest.raises(ValueError, match="2-D"):
        quantize(np.zeros(5), IndexConfig(), seed=0)
    bad = np.ones((4, 3), dtype=np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quantize(bad, IndexConfig(), seed=0)


def test_plot_code_usage(tmp_path, kmeans_result):
    out = tmp_path / "plots" / "usage.png"
    plot_code_usage(kmeans_result.codes, kmeans_result.level_sizes, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kmeans_fits_on_a_sample_of_a_large_input():
    """Above k * max_points_per_centroid rows the centroids come from a sample; they still find the clusters."""
    from sidrec.index.quantize import nearest, kmeans

    rng = np.random.default_rng(3)
    centers = rng.normal(scale=10.0, size=(8, 16)).astype(np.float32)
    x = torch.from_numpy(centers[rng.integers(0, 8, 5000)] + rng.normal(scale=0.1, size=(5000, 16)).astype(np.float32))
    c = kmeans(x, 8, 20, torch.Generator().manual_seed(0), max_points_per_centroid=8)  # fits on 64 of 5000 rows
    # every true center has a centroid next to it, so the full assignment recovers the clusters
    d = ((torch.from_numpy(centers)[:, None, :] - c[None]) ** 2).sum(-1)
    assert float(d.min(1).values.max()) < 1.0
    assert len(set(nearest(x, c).tolist())) == 8
    # the sample differs from the full input, so the two fits differ (the sampling is really used)
    full = kmeans(x, 8, 20, torch.Generator().manual_seed(0), max_points_per_centroid=None)
    assert not torch.equal(c, full)


@pytest.mark.parametrize("block", [64, 65536])
def test_assign_in_place_matches_reference_residual_assignment(blobs, kmeans_result, vae_result, monkeypatch, block):
    """assign() works block by block on one residual buffer updated in place; it must equal the plain
    residual loop over the whole input (400 rows: 7 blocks of 64, or one block)."""
    import sidrec.index.quantize as q

    monkeypatch.setattr(q, "_ASSIGN_BLOCK", block)
    x, _ = blobs
    for res in (kmeans_result, vae_result):
        state = res.state
        ref, _ = state.residual_assign(state.latent(x))
        assert np.array_equal(state.assign(x), ref.numpy())


def test_rq_kmeans_on_a_large_catalog_fits_on_a_sample(monkeypatch):
    """Above codebook_size * MAX_POINTS_PER_CENTROID rows the levels are fitted on a sample (here 128 of
    3,000 rows); standardisation still uses every row and the codes still separate the clusters."""
    import sidrec.index.quantize as q

    monkeypatch.setattr(q, "MAX_POINTS_PER_CENTROID", 16)
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(8, 16)) * 10.0
    labels = rng.integers(0, 8, 3000)
    x = (centers[labels] + rng.normal(size=(3000, 16))).astype(np.float32)
    st = q.fit_rq_kmeans(x, 2, 8, seed=0, iters=20)
    np.testing.assert_allclose(st.mean, x.astype(np.float64).mean(0), atol=1e-4)
    np.testing.assert_allclose(st.scale, x.astype(np.float64).std(0), rtol=1e-4)
    assert _purity(st.assign(x)[:, 0], labels) > 0.99
    monkeypatch.setattr(q, "MAX_POINTS_PER_CENTROID", 256)  # all rows: a different fit
    assert not np.array_equal(q.fit_rq_kmeans(x, 2, 8, seed=0, iters=20).codebooks[1], st.codebooks[1])


def test_balanced_last_level_spreads_a_real_catalog_and_new_items_follow_the_same_rule(tmp_path, ml100k_dir):
    """index.balance: last on real vectors (PPMI-SVD of a MovieLens-100k slice): the last level's codes even
    out, fewer items share a full SID, and the saved state assigns the fitted rows exactly as fitted."""
    from sidrec.config import parse_config
    from sidrec.index.collab import cooccurrence_vectors
    from sidrec.index.collisions import raw_collision_rate
    from sidrec.index.quantize import QuantizerState, fit_rq_kmeans, quantize

    from sidrec.config import DataConfig
    from sidrec.data.dataset import load_dataset

    ml = load_dataset(DataConfig(format="recbole", path=str(ml100k_dir), max_users=300, kcore=5))
    x = cooccurrence_vectors(ml.train_sequences().values(), ml.items["item_id"].tolist(), dim=16, window=3)
    x = x[np.abs(x).sum(1) > 0]
    n, k = x.shape[0], 16
    plain = fit_rq_kmeans(x, 3, k, seed=0, iters=20)
    bal = fit_rq_kmeans(x, 3, k, seed=0, iters=20, balance="last")
    assert not plain.prices and bal.prices[0].tolist() == bal.prices[1].tolist() == [0.0] * k  # only the last level is priced
    assert all(np.array_equal(a, b) for a, b in zip(plain.codebooks, bal.codebooks))  # same codebooks, other argmin
    raw_p, raw_b = plain.assign(x), bal.assign(x)
    assert np.array_equal(raw_p[:, :2], raw_b[:, :2])  # the first levels are untouched
    share = n / k
    assert np.bincount(raw_b[:, 2], minlength=k).max() < 1.5 * share < np.bincount(raw_p[:, 2], minlength=k).max()
    assert raw_collision_rate(raw_b) < raw_collision_rate(raw_p)
    bal.save(tmp_path / "q")
    back = QuantizerState.load(tmp_path / "q")
    assert np.array_equal(back.assign(x), raw_b) and np.array_equal(back.prices[2], bal.prices[2])
    cfg = parse_config({"index": {"codebook_size": k, "levels": 3, "kmeans_iters": 20, "balance": "last",
                                  "collisions": "nearest_free"}}).index
    res = quantize(x, cfg, seed=0, progress=False)
    assert res.collisions == 0 and res.raw_collision_rate == raw_collision_rate(raw_b)


def test_an_index_config_that_says_nothing_gives_a_real_catalog_unique_m_token_sids(ml100k_dir, tmp_path):
    """Issue 14: with the defaults (codebook_size auto, collisions unset -> nearest_free) every item of a real catalog
    gets its own M-level SID, however many raw collisions the quantizer leaves: no extra level. An explicit N, which
    may be too small to hold the catalog in M levels, and LSH keep the extra level unless collisions is set."""
    from sidrec.config import DataConfig, parse_config
    from sidrec.data.dataset import load_dataset
    from sidrec.index.collab import cooccurrence_vectors
    from sidrec.index.quantize import auto_codebook_size, quantize

    ml = load_dataset(DataConfig(format="recbole", path=str(ml100k_dir), max_users=300, kcore=5))
    x = cooccurrence_vectors(ml.train_sequences().values(), ml.items["item_id"].tolist(), dim=16, window=3)
    cfg = parse_config({}).index
    assert (cfg.codebook_size, cfg.collisions, cfg.balance) == ("auto", "nearest_free", "last")
    res = quantize(x, cfg.model_copy(update={"kmeans_iters": 10}), seed=0, progress=False)
    n = auto_codebook_size(x.shape[0], cfg.levels)
    assert res.level_sizes == [n] * cfg.levels and res.codes.shape == (x.shape[0], cfg.levels)
    assert res.collisions == 0 and _unique_rows(res.codes) and res.raw_collision_rate > 0
    assert parse_config({"index": {"codebook_size": 8}}).index.collisions == "extra_level"
    assert parse_config({"index": {"quantizer": "lsh"}}).index.collisions == "extra_level"
    assert parse_config({"index": {"codebook_size": 8, "collisions": "nearest_free"}}).index.collisions == "nearest_free"
    assert parse_config({"index": {"collisions": "extra_level"}}).index.collisions == "extra_level"
    assert parse_config({"index": {"levels": 2}}).index.collisions == "extra_level"  # 2 levels: too little room
    from sidrec.errors import ConfigError

    with pytest.raises(ConfigError, match=r"index\.levels"):  # a bad levels value is still reported by its field
        parse_config({"index": {"levels": "three"}})
    four = parse_config({"index": {"levels": 4}}).index
    assert (four.codebook_size, four.collisions) == ("auto", "nearest_free")
    # a base file's explicit N counts: the merged mapping decides
    from sidrec.config import load_config

    (tmp_path / "base.yaml").write_text("index: {codebook_size: 16}\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nindex: {levels: 3}\n")
    merged = load_config(tmp_path / "run.yaml").index
    assert (merged.collisions, merged.balance) == ("extra_level", "none")


@pytest.mark.parametrize("index,balance", [
    ({}, "last"),  # sidrec sizes the codebook of an RQ-KMeans index: balanced
    ({"mode": "dynamic"}, "last"),  # the dynamic index starts from the balanced static one
    ({"codebook_size": 64}, "none"),  # an explicit N keeps the index a recorded run was measured on
    ({"quantizer": "rq_vae"}, "none"),  # balancing is RQ-KMeans' (refused elsewhere)
    ({"quantizer": "lsh", "collisions": "extra_level"}, "none"),
    ({"balance": "none"}, "none"),  # said is kept
    ({"codebook_size": 64, "balance": "last"}, "last"),
])
def test_balance_default_follows_who_sizes_the_codebook(index, balance):
    from sidrec.config import parse_config

    assert parse_config({"index": index}).index.balance == balance


def test_the_default_index_balances_the_last_level_of_a_real_catalog(ml100k_dir):
    """The defaults on all of MovieLens-100k: 64 codes per level (auto) and the last level balanced leave under half the
    raw collisions of the same codebooks unbalanced, and every item keeps its own 3-token SID."""
    from sidrec.config import DataConfig, parse_config
    from sidrec.data.dataset import load_dataset
    from sidrec.index.collab import cooccurrence_vectors

    ml = load_dataset(DataConfig(format="recbole", path=str(ml100k_dir)))
    x = cooccurrence_vectors(ml.train_sequences().values(), ml.items["item_id"].tolist(), dim=32, window=3)
    cfg = parse_config({"index": {"kmeans_iters": 20}}).index
    res = quantize(x, cfg, seed=0, progress=False)
    plain = quantize(x, cfg.model_copy(update={"balance": "none"}), seed=0, progress=False)
    assert res.level_sizes == [64] * 3 and res.collisions == 0 and _unique_rows(res.codes)
    assert res.raw_collision_rate < 0.5 * plain.raw_collision_rate, (res.raw_collision_rate, plain.raw_collision_rate)
    # what balancing removes are the last level's collisions; the first two levels are the same codebooks, same cells
    assert res.stats["raw_in_room"] < 0.5 * plain.stats["raw_in_room"]
    assert res.stats["raw_overfull"] == plain.stats["raw_overfull"] and res.stats["raw_prefix_cells"] == plain.stats["raw_prefix_cells"]
    assert res.stats["raw_in_room"] <= res.raw_collision_rate <= res.stats["raw_in_room"] + res.stats["raw_overfull"]


@pytest.mark.parametrize("index", [{"quantizer": "rq_vae"}, {"quantizer": "lsh", "collisions": "extra_level"}])
def test_balance_is_refused_where_it_does_not_apply(index):
    from sidrec.config import parse_config

    with pytest.raises(Exception, match="balance"):
        parse_config({"index": {"balance": "last", **index}})
