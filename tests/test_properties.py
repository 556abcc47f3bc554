"""Property tests (hypothesis) that complement tests/test_index.py (which already checks that a
trie walk under arbitrary logits always ends on a catalog entity):

- collision resolution: any raw code matrix -> unique rows, raw codes kept as the prefix, the extra
  level only when needed and within its declared size;
- quantize (rq_kmeans) on arbitrary embeddings -- duplicates, constant columns, fewer points than
  codes, 'auto' codebooks -- always yields unique SIDs inside the level sizes;
- the trie built from that index accepts exactly the catalog: enumerating every allowed path gives
  back the set of SIDs (no invalid SID can be emitted, no item is unreachable);
- the promotion gate `sidrec.ops.registry.decide` is safe (invalid SIDs / failed validation never
  promote), exact (vs a champion: promote iff every gate metric is within tolerance) and monotone.
"""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sidrec.config import IndexConfig
from sidrec.index.sid_index import SIDIndex
from sidrec.index.quantize import count_duplicates, quantize, resolve_collisions

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------
# collision resolution
# ----------------------------------------------------------------------------------------------
@FAST
@given(n=st.integers(1, 80), m=st.integers(1, 4), k=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_resolve_collisions_always_unique(n, m, k, seed):
    raw = np.random.default_rng(seed).integers(0, k, size=(n, m))
    codes, extra = resolve_collisions(raw)
    assert count_duplicates(codes) == 0
    np.testing.assert_array_equal(codes[:, :m], raw)
    has_dups = len({tuple(r) for r in raw.tolist()}) < n
    assert (len(extra) == 1) == has_dups and codes.shape[1] == m + len(extra)
    if extra:
        assert 0 <= codes[:, m].min() and codes[:, m].max() < extra[0]
        # the extra code numbers items inside each group of identical raw codes 0, 1, 2, ...
        for row in {tuple(r) for r in raw.tolist()}:
            grp = codes[(raw == row).all(1), m]
            assert sorted(grp.tolist()) == list(range(len(grp)))


# ----------------------------------------------------------------------------------------------
# quantize + trie on arbitrary catalogs
# ----------------------------------------------------------------------------------------------
@st.composite
def catalogs(draw):
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, 6))
    pool = draw(st.integers(1, n))  # distinct points: duplicates when pool < n
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(pool, d)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if draw(st.booleans()):
        base[:, 0] = 5.0  # a constant column
    x = base[rng.integers(0, pool, size=n)].astype("float32")
    return x


@FAST
@given(x=catalogs(), levels=st.integers(1, 3), size=st.one_of(st.integers(2, 9), st.just("auto")), seed=st.integers(0, 1000))
def test_quantize_sids_unique_and_trie_accepts_exactly_the_catalog(x, levels, size, seed):
    cfg = IndexConfig(levels=levels, codebook_size=size, kmeans_iters=5)
    res = quantize(x, cfg, seed, progress=False)
    codes, sizes = res.codes, res.level_sizes
    assert codes.shape == (len(x), len(sizes)) and res.collisions == 0
    assert len({tuple(r) for r in codes.tolist()}) == len(x)
    assert (codes >= 0).all() and (codes < np.asarray(sizes)[None, :]).all()

    ix = SIDIndex([f"i{i}" for i in range(len(x))], codes, sizes)
    assert len(set(ix.sids())) == len(x)
    trie = ix.build_trie()
    # enumerate every path the constraint allows
    paths = [()]
    nodes = trie.root(1)
    for lvl in range(len(sizes)):
        mask = trie.allowed(lvl, nodes)  # [P, size]
        assert mask.any(1).all()  # no dead end
        p_idx, c_idx = mask.nonzero(as_tuple=True)
        nodes = trie.advance(lvl, nodes[p_idx], c_idx)
        paths = [paths[p] + (c,) for p, c in zip(p_idx.tolist(), c_idx.tolist())]
    assert sorted(paths) == sorted(tuple(r) for r in codes.tolist())
    np.testing.assert_array_equal(codes[nodes.numpy()], np.array(paths))


# ----------------------------------------------------------------------------------------------
# the promotion gate
# ----------------------------------------------------------------------------------------------
from sidrec import registry  # noqa: E402

METRICS = ["test/recall_at_10", "test/ndcg_at_10"]
score = st.floats(0, 1, allow_nan=False)


def _pcfg(**kw):
    from sidrec.config import PromotionConfig

    return PromotionConfig(metrics=METRICS, **kw)


@st.composite
def metric_dicts(draw):
    return {m: draw(score) for m in METRICS}


@FAST
@given(ch=metric_dicts(), champ=st.one_of(st.none(), metric_dicts()), pop=metric_dicts(),
       inv=st.floats(0, 1, allow_nan=False), valid=st.sampled_from([True, False, None]),
       tol=st.floats(0, 0.2, allow_nan=False), max_inv=st.floats(0, 0.5, allow_nan=False))
def test_gate_never_promotes_invalid_sids_or_unvalidated_data(ch, champ, pop, inv, valid, tol, max_inv):
    cfg = _pcfg(tolerance=tol, max_invalid_rate=max_inv)
    d = registry.decide({**ch, "test/invalid_rate": inv, "data_validation_passed": valid}, champ, pop, cfg)
    if inv > max_inv or valid is not True:
        assert not d.promote and d.reason.startswith("rejected")
    assert isinstance(d.reason, str) and d.reason and "\n" not in d.reason


@FAST
@given(ch=metric_dicts(), champ=metric_dicts(), tol=st.floats(0, 0.2, allow_nan=False))
def test_gate_vs_champion_is_exactly_not_worse_within_tolerance(ch, champ, tol):
    cfg = _pcfg(tolerance=tol)
    d = registry.decide({**ch, "test/invalid_rate": 0.0, "data_validation_passed": True}, champ, {}, cfg)
    assert d.kind == "vs_champion"
    assert d.promote == all(ch[m] >= champ[m] - tol for m in METRICS)
    # the champion itself re-submitted is never worse than itself
    assert registry.decide({**champ, "test/invalid_rate": 0.0, "data_validation_passed": True}, champ, {}, cfg).promote


@FAST
@given(ch=metric_dicts(), champ=st.one_of(st.none(), metric_dicts()), pop=metric_dicts(),
       which=st.sampled_from(METRICS), bump=st.floats(0, 1, allow_nan=False))
def test_gate_is_monotone_in_the_challenger_metrics(ch, champ, pop, which, bump):
    cfg = _pcfg()
    base = {"test/invalid_rate": 0.0, "data_validation_passed": True}
    before = registry.decide({**ch, **base}, champ, pop, cfg)
    assume(before.promote)
    better = {**ch, which: min(1.0, ch[which] + bump)}
    assert registry.decide({**better, **base}, champ, pop, cfg).promote


@FAST
@given(ch=metric_dicts(), pop=metric_dicts())
def test_first_model_must_beat_popularity(ch, pop):
    cfg = _pcfg()
    d = registry.decide({**ch, "test/invalid_rate": 0.0, "data_validation_passed": True}, None, pop, cfg)
    assert d.kind == "first"
    assert d.promote == (all(ch[m] >= pop[m] for m in METRICS) and any(ch[m] > pop[m] for m in METRICS))
    d2 = registry.decide({**ch, "test/invalid_rate": 0.0, "data_validation_passed": True}, None, pop, _pcfg(beat_popularity=False))
    assert d2.promote
