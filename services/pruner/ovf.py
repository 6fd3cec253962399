"""Subset selection for Expand-and-Prune: OVF (Optimal Variance Filtering) and the random ablation.

Pure numpy (the proto module is imported only for its enum numbers; no grpc). Errors are plain
``ValueError``s whose message starts with the field (``keep: ...``); callers that face the wire
validate first or translate them.

Why OVF is exact in O(G log G): for a fixed size k, the variance of a subset is maximised by a
set whose *complement* is contiguous in sorted order (moving any kept value outwards, past a
dropped one, never lowers the spread). So an optimal subset is the i lowest plus the k - i
highest scores for some i in 0..k; prefix sums of x and x² price every i in O(1).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

from epgrpo.protos.v1 import pruner_pb2

# select(scores, k, rng) -> ascending indices of the kept scores
SelectFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

# Candidates whose variance is within this relative distance of the best count as ties; without
# it, float rounding in the prefix sums would decide between subsets of equal variance.
_TIE_RTOL = 1e-12


def _check_keep(n: int, k) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"keep: expected an integer, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"keep: expected 1 <= keep <= {n} (the group size), got {k}")
    return k


def _as_scores(scores) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"scores: expected a 1-D array, got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError(f"scores: expected finite values, got {int((~np.isfinite(x)).sum())} NaN/Inf")
    return x


def subset_variance(scores, indices) -> float:
    """Population variance of ``scores[indices]``."""
    return float(np.var(np.asarray(scores, dtype=np.float64)[np.asarray(indices, dtype=np.int64)]))


def ovf_select(scores, k: int) -> np.ndarray:
    """Ascending indices of a size-k subset of ``scores`` with maximum population variance.

    Ties (equal variance, e.g. duplicate scores) go to the candidate keeping the most high
    scores; among equal values the sort is stable, so the result depends only on the input.
    """
    x = _as_scores(scores)
    n = x.size
    k = _check_keep(n, k)
    if k == n:
        return np.arange(n, dtype=np.int64)
    order = np.argsort(x, kind="stable")
    # Centring does not change variances but keeps sum(x²) - sum(x)²/k from cancelling.
    s = x[order] - x.mean()
    c1 = np.concatenate(([0.0], np.cumsum(s)))
    c2 = np.concatenate(([0.0], np.cumsum(s * s)))
    i = np.arange(k + 1)  # number of lowest scores kept; the k - i others are the highest
    total = c1[i] + (c1[n] - c1[n - k + i])
    total_sq = c2[i] + (c2[n] - c2[n - k + i])
    variance = total_sq / k - (total / k) ** 2
    best = variance.max()
    lows = int(np.flatnonzero(variance >= best - _TIE_RTOL * max(abs(best), 1e-300))[0])
    kept = np.concatenate((order[:lows], order[n - (k - lows):]))
    return np.sort(kept).astype(np.int64)


def random_select(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Ascending indices of a uniformly random k-subset of range(n) (the ablation baseline)."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n: expected a non-negative integer, got {n!r}")
    k = _check_keep(int(n), k)
    return np.sort(rng.choice(int(n), size=k, replace=False)).astype(np.int64)


def _select_ovf(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    return ovf_select(scores, k)


def _select_random(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    _as_scores(scores)  # same input contract as OVF, so switching strategies changes nothing else
    return random_select(len(scores), k, rng)


# proto Strategy value -> selection function (UNSPECIFIED means OVF, as the proto says)
STRATEGIES: dict[int, SelectFn] = {
    pruner_pb2.STRATEGY_UNSPECIFIED: _select_ovf,
    pruner_pb2.STRATEGY_OVF: _select_ovf,
    pruner_pb2.STRATEGY_RANDOM: _select_random,
}


def strategy_function(strategy: int) -> SelectFn:
    """The selection function for a proto ``Strategy`` value (ValueError naming ``strategy``)."""
    try:
        return STRATEGIES[int(strategy)]
    except (KeyError, TypeError, ValueError):
        known = ", ".join(f"{pruner_pb2.Strategy.Name(v)}={v}" for v in sorted(STRATEGIES))
        raise ValueError(f"strategy: expected one of {known}, got {strategy!r}") from None


def selection_rng(seed: int, group_id: str, step: int) -> np.random.Generator:
    """A generator that depends only on (seed, group_id, step): reruns prune identically."""
    group_key = int.from_bytes(hashlib.sha256(group_id.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([int(seed) & (2**64 - 1), group_key, int(step) & (2**32 - 1)]))
