"""Ranking metrics against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sidrec.evaluation.metrics import coverage, invalid_rate, per_user_hits, ranking_metrics, target_ranks

# Three users, top-4 lists (best first), -1 = empty slot.
#   user 0: target 3 at rank 0 -> gain 1/log2(2) = 1
#   user 1: target 7 at rank 3 -> gain 1/log2(5) = 0.43067655807339306
#   user 2: target 6 absent (list has two empty slots) -> gain 0
RANKED = np.array([[3, 1, 2, 0], [0, 5, 4, 7], [9, 8, -1, -1]])
TARGETS = np.array([3, 7, 6])
G1 = 1 / math.log2(5)


def test_hand_computed_example():
    m = ranking_metrics(RANKED, TARGETS, ks=(1, 2, 4))
    assert set(m) == {"recall_at_1", "ndcg_at_1", "recall_at_2", "ndcg_at_2", "recall_at_4", "ndcg_at_4"}
    assert m["recall_at_1"] == pytest.approx(1 / 3)
    assert m["ndcg_at_1"] == pytest.approx(1 / 3)
    assert m["recall_at_2"] == pytest.approx(1 / 3)
    assert m["ndcg_at_2"] == pytest.approx(1 / 3)
    assert m["recall_at_4"] == pytest.approx(2 / 3)
    assert m["ndcg_at_4"] == pytest.approx((1 + G1) / 3)
    assert m["ndcg_at_4"] == pytest.approx(0.47689218602446435)
    assert target_ranks(RANKED, TARGETS).tolist() == [0, 3, -1]
    assert per_user_hits(RANKED, TARGETS, 4).tolist() == [True, True, False]


def test_rank_gain_is_one_over_log2_rank_plus_two():
    ranked = np.arange(10)[None, :]
    for r in range(10):
        m = ranking_metrics(ranked, np.array([r]), ks=(10,))
        assert m["ndcg_at_10"] == pytest.approx(1 / math.log2(r + 2))
        assert m["recall_at_10"] == 1.0


def test_empty_slots_never_hit():
    ranked = np.full((2, 3), -1)
    m = ranking_metrics(ranked, np.array([0, 5]), ks=(1, 3))
    assert m == {"recall_at_1": 0.0, "ndcg_at_1": 0.0, "recall_at_3": 0.0, "ndcg_at_3": 0.0}


def test_k_larger_than_width_raises():
    with pytest.raises(ValueError, match="k=5"):
        ranking_metrics(RANKED, TARGETS, ks=(1, 5))
    with pytest.raises(ValueError):
        coverage(RANKED, n_items=10, k=5)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        ranking_metrics(RANKED, np.array([1, 2]), ks=(1,))


def test_coverage():
    # top-2 across users: {3,1} U {0,5} U {9,8} = 6 distinct of 12 items
    assert coverage(RANKED, n_items=12, k=2) == pytest.approx(6 / 12)
    # top-4: {3,1,2,0,5,4,7,9,8} = 9 distinct; -1 ignored
    assert coverage(RANKED, n_items=12, k=4) == pytest.approx(9 / 12)


def test_invalid_rate():
    mask = np.array([[True, False, True], [False, False, True]])
    assert invalid_rate(mask) == pytest.approx(3 / 6)
    ranked = np.array([[4, 99, 2], [-1, 77, 1]])  # slot (1,0) empty: not emitted
    assert invalid_rate(mask, ranked) == pytest.approx(2 / 5)
    assert invalid_rate(np.zeros((2, 2), bool), np.full((2, 2), -1)) == 0.0
