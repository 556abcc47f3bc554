"""SID index (tokens, SIDs, persistence) and the tensor prefix trie used by constrained beam search."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidrec.index.sid_index import LEVEL_LETTERS, PrefixTrie, SIDIndex


def random_unique_codes(rng: np.random.Generator, level_sizes: list[int], n: int) -> np.ndarray:
    total = int(np.prod(level_sizes))
    flat = rng.choice(total, size=min(n, total), replace=False)
    return np.stack(np.unravel_index(flat, level_sizes), 1).astype(np.int64)


def make_index(level_sizes=(4, 5, 3), n=30, seed=0, prefix="") -> SIDIndex:
    rng = np.random.default_rng(seed)
    codes = random_unique_codes(rng, list(level_sizes), n)
    return SIDIndex([f"e{i}" for i in range(len(codes))], codes, list(level_sizes), prefix)


# --------------------------------------------------------------------------- SIDIndex


def test_tokens_and_offsets():
    ix = make_index((4, 5, 3))
    toks = ix.tokens()
    assert len(toks) == 12 == len(set(toks))
    assert toks[:2] == ["<a_0>", "<a_1>"]
    assert ix.token_offset(0) == 0 and ix.token_offset(1) == 4 and ix.token_offset(2) == 9
    assert ix.token_offset(3) == 12
    for lvl, size in enumerate(ix.level_sizes):
        for c in range(size):
            assert toks[ix.token_offset(lvl) + c] == ix.token(lvl, c)
    assert ix.token(1, 3) == "<b_3>"
    users = make_index((4, 13), n=10, prefix="u_")
    assert users.token(1, 12) == "<u_b_12>"
    assert users.tokens()[0] == "<u_a_0>"
    with pytest.raises(IndexError):
        ix.token(0, 4)
    with pytest.raises(IndexError):
        ix.token(3, 0)


def test_sid_parse_round_trip():
    ix = make_index((4, 5, 3), n=40)
    assert ix.num_levels == 3 and len(ix) == 40
    for row in range(len(ix)):
        sid = ix.sid(row)
        expected = "".join(f"<{LEVEL_LETTERS[l]}_{c}>" for l, c in enumerate(ix.codes[row]))
        assert sid == expected
        assert ix.parse(sid) == tuple(ix.codes[row].tolist())
        assert ix.entity_for_codes(ix.parse(sid)) == ix.entity_ids[row]
        assert ix.sid_of(ix.entity_ids[row]) == sid
        assert ix.row_of(ix.entity_ids[row]) == row
    # whitespace between tokens (as a tokenizer may decode them) is fine
    assert ix.parse(" " + ix.sid(0).replace("><", "> <") + "\n") == tuple(ix.codes[0].tolist())


def test_parse_rejects_bad_sids():
    ix = make_index((4, 5, 3), n=10)
    a, b, c = ix.codes[0].tolist()
    assert ix.parse(f"<a_{a}><b_{b}><c_{c}>") == (a, b, c)
    assert ix.parse(f"<a_{a}><b_{b}>") is None  # too short
    assert ix.parse(f"<a_{a}><b_{b}><c_{c}><d_0>") is None  # too long
    assert ix.parse(f"<b_{b}><a_{a}><c_{c}>") is None  # wrong level order
    assert ix.parse(f"<a_{a}><b_{b}><c_{c}> the movie") is None  # stray text
    assert ix.parse(f"<u_a_{a}><u_b_{b}><u_c_{c}>") is None  # other token family
    assert ix.parse("<a_99><b_0><c_0>") is None  # out of range
    assert ix.parse("") is None and ix.parse(None) is None
    known = {tuple(r) for r in ix.codes.tolist()}
    missing = next(t for t in itertools.product(range(4), range(5), range(3)) if t not in known)
    assert ix.parse("".join(ix.token(l, x) for l, x in enumerate(missing))) is None  # well-formed, unknown
    assert ix.entity_for_codes(missing) is None


def test_row_of_unknown_entity():
    ix = make_index(n=5)
    with pytest.raises(KeyError, match="unknown item id 'nope'"):
        ix.row_of("nope")
    users = make_index(n=5, prefix="u_")
    with pytest.raises(KeyError, match="unknown user id"):
        users.sid_of("nope")


def test_duplicate_codes_rejected_naming_entities():
    codes = np.array([[0, 1], [1, 1], [0, 1], [2, 0], [1, 1]])
    with pytest.raises(ValueError) as err:
        SIDIndex(["m1", "m2", "m3", "m4", "m5"], codes, [3, 2])
    msg = str(err.value)
    assert "m1, m3" in msg and "m2, m5" in msg and "m4" not in msg
    assert "<a_0><b_1>" in msg


def test_other_invalid_indices():
    with pytest.raises(ValueError, match="duplicate entity ids: x"):
        SIDIndex(["x", "x"], np.array([[0], [1]]), [2])
    with pytest.raises(ValueError, match=r"level 1 codes must lie in \[0, 2\)"):
        SIDIndex(["x", "y"], np.array([[0, 0], [1, 2]]), [2, 2])
    with pytest.raises(ValueError, match="level_sizes"):
        SIDIndex(["x"], np.array([[0, 0]]), [2])
    with pytest.raises(ValueError, match="entity ids"):
        SIDIndex(["x", "y"], np.array([[0]]), [2])


def test_to_frame():
    ix = make_index((4, 5, 3), n=7)
    df = ix.to_frame()
    assert list(df.columns) == ["entity_id", "sid", "c0", "c1", "c2"]
    assert df["entity_id"].tolist() == ix.entity_ids
    assert df["sid"].tolist() == [ix.sid(i) for i in range(7)]
    np.testing.assert_array_equal(df[["c0", "c1", "c2"]].to_numpy(), ix.codes)


def test_save_load_round_trip(tmp_path):
    ix = make_index((4, 5, 3), n=25, prefix="u_")
    target = tmp_path / "users_index"
    ix.save(target)
    assert sorted(p.name for p in target.iterdir()) == ["index.json", "index.parquet"]
    back = SIDIndex.load(target)
    assert back.entity_ids == ix.entity_ids
    assert back.level_sizes == ix.level_sizes and back.prefix == "u_"
    np.testing.assert_array_equal(back.codes, ix.codes)
    assert back.codes.dtype == np.int64
    assert back.sid(3) == ix.sid(3)
    assert pd.read_parquet(target / "index.parquet")["sid"].tolist() == ix.sids()
    # overwriting replaces the directory and leaves no temp dirs behind
    other = make_index((2, 2), n=3)
    other.save(target)
    assert SIDIndex.load(target).level_sizes == [2, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["users_index"]
    with pytest.raises(FileNotFoundError):
        SIDIndex.load(tmp_path / "missing")


# --------------------------------------------------------------------------- PrefixTrie


def test_trie_tables_small():
    codes = np.array([[0, 1], [0, 2], [1, 0]])
    trie = SIDIndex(["x", "y", "z"], codes, [2, 3]).build_trie()
    assert trie.num_nodes == [1, 2]
    assert trie.next_node[0].tolist() == [[0, 1]]
    assert trie.next_node[1].tolist() == [[-1, 0, 1], [2, -1, -1]]
    assert all(t.dtype == torch.long for t in trie.next_node)
    nodes = torch.tensor([0, -1])
    assert trie.allowed(0, nodes).tolist() == [[True, True], [False, False]]
    out = trie.advance(1, torch.tensor([0, 0, 1, -1, 0]), torch.tensor([2, 0, 0, 0, 7]))
    assert out.tolist() == [1, -1, 2, -1, -1]
    assert trie.to("cpu") is trie
    assert trie.nbytes() == 8 * (2 + 6)


def test_trie_allowed_matches_brute_force():
    ix = make_index((3, 4, 2, 3), n=40, seed=3)
    trie = ix.build_trie()
    rows = {tuple(r) for r in ix.codes.tolist()}
    # enumerate every reachable prefix and compare the mask with the brute-force set of continuations
    frontier = {(): 0}
    for lvl, size in enumerate(ix.level_sizes):
        prefixes = list(frontier)
        nodes = torch.tensor([frontier[p] for p in prefixes])
        mask = trie.allowed(lvl, nodes)
        assert mask.shape == (len(prefixes), size)
        nxt = {}
        for i, p in enumerate(prefixes):
            expect = {r[lvl] for r in rows if r[:lvl] == p}
            assert set(torch.nonzero(mask[i]).flatten().tolist()) == expect
            for c in sorted(expect):
                child = int(trie.advance(lvl, nodes[i : i + 1], torch.tensor([c]))[0])
                nxt[p + (c,)] = child
        frontier = nxt
    # at the last level the trie hands back entity rows
    for p, row in frontier.items():
        assert tuple(ix.codes[row].tolist()) == p


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    level_sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    n=st.integers(1, 60),
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 8),
)
def test_trie_walk_with_any_logits_reaches_valid_entity(level_sizes, n, seed, batch):
    rng = np.random.default_rng(seed)
    codes = random_unique_codes(rng, level_sizes, n)
    ix = SIDIndex([str(i) for i in range(len(codes))], codes, level_sizes)
    trie = ix.build_trie()
    gen = torch.Generator().manual_seed(seed)
    nodes = trie.root(batch)
    chosen = []
    for lvl, size in enumerate(level_sizes):
        logits = torch.randn(batch, size, generator=gen) * 10
        logits[:, torch.randint(size, (1,), generator=gen)] = float("inf") if seed % 3 == 0 else 1e9  # adversarial
        mask = trie.allowed(lvl, nodes)
        assert mask.any(1).all()  # a live node always has a continuation
        pick = logits.masked_fill(~mask, float("-inf")).argmax(1)
        nodes = trie.advance(lvl, nodes, pick)
        assert (nodes >= 0).all()
        chosen.append(pick)
    rows = nodes.numpy()
    seq = torch.stack(chosen, 1).numpy()
    np.testing.assert_array_equal(ix.codes[rows], seq)


def _constrained_beam_search(trie: PrefixTrie, logp: list[np.ndarray], beams: int):
    """Reference batched beam search: logp[t] holds log-probs indexed by the full prefix (codes[:t+1])."""
    nodes = trie.root(1)
    scores = torch.zeros(1, dtype=torch.float64)
    seqs = torch.zeros(1, 0, dtype=torch.long)
    for t, size in enumerate(trie.level_sizes):
        table = torch.from_numpy(logp[t])
        step = table[tuple(seqs.T)] if t else table.expand(1, size)  # [B, size]
        mask = trie.allowed(t, nodes)
        cand = (scores[:, None] + step).masked_fill(~mask, float("-inf")).flatten()
        k = min(beams, int(mask.sum()))
        top = torch.topk(cand, k)
        b, c = top.indices // size, top.indices % size
        nodes = trie.advance(t, nodes[b], c)
        scores = top.values
        seqs = torch.cat([seqs[b], c[:, None]], 1)
    return nodes, scores, seqs


@pytest.mark.parametrize("seed", range(5))
def test_beam_search_matches_exhaustive(seed):
    level_sizes = [3, 4, 3]
    rng = np.random.default_rng(seed)
    ix = SIDIndex([f"i{i}" for i in range(15)], random_unique_codes(rng, level_sizes, 15), level_sizes)
    trie = ix.build_trie()
    logp = []
    for t in range(3):
        raw = torch.from_numpy(rng.normal(size=level_sizes[: t + 1]) * 3)
        logp.append(torch.log_softmax(raw, -1).numpy())  # unconstrained "LM" distribution per prefix

    def score(codes):
        return sum(logp[t][tuple(codes[: t + 1])] for t in range(3))

    exhaustive = sorted(((score(r), tuple(r)) for r in ix.codes.tolist()), reverse=True)
    # a beam as wide as the catalog is exact: every valid item, in score order
    nodes, scores, seqs = _constrained_beam_search(trie, logp, beams=len(ix))
    assert [tuple(s) for s in seqs.tolist()] == [e[1] for e in exhaustive]
    np.testing.assert_allclose(scores.numpy(), [e[0] for e in exhaustive])
    assert [ix.entity_ids[r] for r in nodes.tolist()] == [ix.entity_for_codes(e[1]) for e in exhaustive]
    # narrower beams only ever return valid items
    for beams in (1, 3, 5):
        nodes, scores, seqs = _constrained_beam_search(trie, logp, beams)
        assert (nodes >= 0).all()
        for r, s in zip(nodes.tolist(), seqs.tolist()):
            assert tuple(ix.codes[r].tolist()) == tuple(s)
        assert scores[0] <= exhaustive[0][0] + 1e-9
    # a beam as wide as the largest trie level keeps every prefix, so its best sequence is exact
    nodes, _, seqs = _constrained_beam_search(trie, logp, beams=max(trie.num_nodes))
    assert tuple(seqs[0].tolist()) == exhaustive[0][1]


def test_trie_memory_is_small_for_sparse_levels():
    ix = make_index((16, 16, 16, 8), n=2000, seed=1)
    trie = ix.build_trie()
    assert trie.num_nodes[0] == 1
    assert trie.num_nodes[1] == len(np.unique(ix.codes[:, 0]))
    assert trie.num_nodes[3] == len(np.unique(ix.codes[:, :3], axis=0))
    assert trie.nbytes() <= 8 * len(ix) * sum(ix.level_sizes)
    # batched: all rows at once
    nodes = trie.root(len(ix))
    for lvl in range(4):
        nodes = trie.advance(lvl, nodes, torch.from_numpy(ix.codes[:, lvl]))
    assert nodes.tolist() == list(range(len(ix)))
