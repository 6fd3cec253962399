"""OVF (maximum-variance k-subset) against brute force, and the random ablation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epgrpo.protos.v1 import pruner_pb2
from epgrpo.services.pruner.ovf import (STRATEGIES, ovf_select, random_select, selection_rng, strategy_function,
                                        subset_variance)


def brute_force_max_variance(scores: np.ndarray, k: int) -> float:
    return max(float(np.var(scores[list(c)])) for c in itertools.combinations(range(len(scores)), k))


def assert_optimal(scores: np.ndarray, k: int) -> np.ndarray:
    kept = ovf_select(scores, k)
    assert kept.dtype == np.int64
    assert len(kept) == k and len(set(kept.tolist())) == k
    assert np.all(np.diff(kept) > 0), "indices must be ascending"
    # Optimal subsets may tie, so compare the variance, not the indices.
    best = brute_force_max_variance(scores, k)
    scale = float(np.ptp(scores)) ** 2  # tolerance relative to the spread, not the offset
    assert subset_variance(scores, kept) >= best - 1e-9 * scale
    return kept


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_for_every_k(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 11))
    draw = seed % 4
    if draw == 0:
        scores = rng.normal(size=n)
    elif draw == 1:  # heavy duplicates: ties between optimal subsets
        scores = rng.integers(0, 3, size=n).astype(float)
    elif draw == 2:  # clustered around the mean with a few outliers (the paper's reward clustering)
        scores = 0.5 + 0.01 * rng.normal(size=n)
        scores[rng.integers(0, n, size=2)] = rng.uniform(0, 1, size=2)
    else:  # a large offset: cancellation in sum(x²) - sum(x)² would show here
        scores = 1e8 + rng.uniform(size=n)
    for k in range(1, n + 1):
        assert_optimal(scores, k)


def test_known_answer_keeps_the_extremes():
    scores = np.array([0.50, 0.51, 0.49, 0.10, 0.95, 0.52, 0.90, 0.05])
    assert ovf_select(scores, 4).tolist() == [3, 4, 6, 7]


def test_all_equal_scores_are_deterministic():
    scores = np.full(7, 0.3)
    first = ovf_select(scores, 3)
    assert first.tolist() == ovf_select(scores.copy(), 3).tolist()
    assert subset_variance(scores, first) == 0.0


def test_k_equals_n_returns_everything():
    scores = np.array([3.0, 1.0, 2.0])
    assert ovf_select(scores, 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("k", [0, -1, 4, 2.0, True, None])
def test_bad_keep_names_keep(k):
    with pytest.raises(ValueError, match=r"^keep: "):
        ovf_select([1.0, 2.0, 3.0], k)


def test_bad_scores_are_rejected():
    with pytest.raises(ValueError, match=r"^scores: .*finite"):
        ovf_select([1.0, float("nan"), 3.0], 2)
    with pytest.raises(ValueError, match=r"^scores: .*1-D"):
        ovf_select(np.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match=r"^keep: "):
        ovf_select([], 1)


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), min_size=1, max_size=9),
    data=st.data(),
)
def test_property_optimal_and_well_formed(scores, data):
    scores = np.array(scores)
    k = data.draw(st.integers(1, len(scores)))
    assert_optimal(scores, k)


@settings(max_examples=100, deadline=None)
@given(scores=st.lists(st.integers(-3, 3), min_size=2, max_size=40), data=st.data())
def test_property_shift_and_permutation_keep_the_variance(scores, data):
    # Larger groups than brute force allows: the optimum must not depend on order or offset.
    scores = np.array(scores, dtype=float)
    k = data.draw(st.integers(1, len(scores)))
    perm = np.random.default_rng(len(scores)).permutation(len(scores))
    base = subset_variance(scores, ovf_select(scores, k))
    assert subset_variance(scores[perm], ovf_select(scores[perm], k)) == pytest.approx(base, abs=1e-9)
    assert subset_variance(scores + 100.0, ovf_select(scores + 100.0, k)) == pytest.approx(base, abs=1e-9)


def test_ovf_beats_random_on_clustered_rewards():
    rng = np.random.default_rng(0)
    scores = np.concatenate([0.5 + 0.02 * rng.normal(size=44), [0.0, 0.1, 0.9, 1.0]])
    ovf_var = subset_variance(scores, ovf_select(scores, 12))
    random_var = np.mean([subset_variance(scores, random_select(48, 12, rng)) for _ in range(50)])
    assert ovf_var > 3 * random_var


@pytest.mark.parametrize("n,k", [(1, 1), (10, 3), (48, 24), (48, 48)])
def test_random_select_gives_distinct_sorted_indices(n, k):
    kept = random_select(n, k, np.random.default_rng(1))
    assert len(kept) == k and len(set(kept.tolist())) == k
    assert np.all(np.diff(kept) > 0) and kept.min() >= 0 and kept.max() < n


def test_random_select_is_uniform_enough():
    counts = np.zeros(10)
    rng = np.random.default_rng(2)
    for _ in range(2000):
        counts[random_select(10, 3, rng)] += 1
    assert np.allclose(counts / 2000, 0.3, atol=0.05)


def test_random_select_bad_keep():
    with pytest.raises(ValueError, match=r"^keep: "):
        random_select(5, 6, np.random.default_rng(0))


def test_strategy_registry_follows_the_proto():
    scores = np.array([0.5, 0.1, 0.9, 0.52, 0.48])
    rng = np.random.default_rng(0)
    assert set(STRATEGIES) == set(pruner_pb2.Strategy.values())
    for unspecified_or_ovf in (pruner_pb2.STRATEGY_UNSPECIFIED, pruner_pb2.STRATEGY_OVF):
        assert strategy_function(unspecified_or_ovf)(scores, 2, rng).tolist() == [1, 2]
    assert len(strategy_function(pruner_pb2.STRATEGY_RANDOM)(scores, 2, rng)) == 2
    with pytest.raises(ValueError, match=r"^strategy: "):
        strategy_function(7)


def test_selection_rng_depends_only_on_seed_group_and_step():
    def draw(*key):
        return selection_rng(*key).integers(0, 2**62, size=4).tolist()

    assert draw(1, "g0", 5) == draw(1, "g0", 5)
    assert len({tuple(draw(*key)) for key in [(1, "g0", 5), (2, "g0", 5), (1, "g1", 5), (1, "g0", 7)]}) == 4
