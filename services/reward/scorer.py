"""Weighted combination of reward backends over one batch. Pure: no grpc, usable in-process.

Validates the whole request before any backend runs, so a bad request costs nothing and the
error names the offending field ('rewards[1].name: ...', 'prompts: ...').
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from typing import Mapping, Sequence

import numpy as np

from epgrpo.services.common.errors import InvalidArgument, ResourceExhausted, ServiceError, show
from epgrpo.services.reward.backends.base import RewardBackend, check_batch, check_modality
from epgrpo.services.reward.backends.video import WRAPPERS, make_wrapper, parse_wrapper


MAX_CACHED_WRAPPERS = 256


class RewardBackendError(ServiceError):
    """A backend returned something unusable (wrong shape, NaN/Inf): a server-side bug, INTERNAL."""


class RewardScorer:
    def __init__(self, backends: Mapping[str, RewardBackend], max_batch: int = 1024):
        if not backends:
            raise ValueError("RewardScorer needs at least one backend")
        if max_batch < 1:
            raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
        self.backends = dict(backends)
        self.max_batch = max_batch
        # models are never called from two threads at once; backends marked ``concurrent`` may be
        self._locks = {name: threading.Lock() for name, b in self.backends.items() if not b.concurrent}
        # video wrappers of served image rewards ('frames(pickscore, k=4)'), built on first request
        self.wrappers: dict[str, RewardBackend] = {}
        self._wrappers_lock = threading.RLock()  # a wrapper looks its inner reward up

    def describe(self) -> list[dict[str, str]]:
        """name / description / inputs / range / modality of every served reward, by name."""
        return [{**self.backends[name].info(), "name": name} for name in sorted(self.backends)]

    def describe_wrappers(self) -> list[dict[str, str]]:
        """The video wrappers any served image reward can be asked for in (none without image rewards)."""
        if all(b.modality == "video" for b in self.backends.values()):
            return []
        common = {"modality": "video", "inputs": "videos [N, T, H, W, C]; what the wrapped reward needs",
                  "range": "the wrapped reward's", "group_aware": False}
        wrappers = [
            {"name": "frames(<image reward>[, k=N|all][, at=uniform|start|end])", **common,
             "description": "an image reward served here, averaged over k frames of each video (default k=4, "
                            "evenly spaced: at=uniform; start: the first k; end: the last k); group-aware when the "
                            "image reward is (frame j compared across the group's videos)"},
            {"name": "first_frame(<image reward>)", **common,
             "description": "an image reward served here, scoring the first frame of each video"},
        ]
        assert {w["name"].partition("(")[0] for w in wrappers} == set(WRAPPERS)
        return wrappers

    def backend(self, name: str, field: str = "rewards") -> RewardBackend:
        """The served reward ``name``, or the video wrapper it names around a served image reward;
        InvalidArgument naming ``field`` otherwise."""
        if name in self.backends:
            return self.backends[name]
        try:
            parsed = parse_wrapper(name)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{field}: {exc}") from None
        if parsed is None:
            raise InvalidArgument(f"{field}: unknown reward {show(name)}; this instance serves: "
                                  f"{', '.join(sorted(self.backends))}, and video wrappers of its image rewards "
                                  f"({', '.join(f'{w}(...)' for w in sorted(WRAPPERS))})")
        with self._wrappers_lock:
            if name in self.wrappers:
                return self.wrappers[name]
            try:
                wrapper = make_wrapper(name, lambda inner: self.backend(inner, field))
            except InvalidArgument as exc:
                raise InvalidArgument(f"{field}: {exc}" if not str(exc).startswith(field) else str(exc)) from None
            if len(self.wrappers) < MAX_CACHED_WRAPPERS:  # clients may spell options many ways: bounded
                self.wrappers[name] = wrapper
            return wrapper

    def _lock(self, backend: RewardBackend, name: str):
        inner = getattr(backend, "inner_name", None)  # a wrapper calls its image reward: take that one's lock
        return self._locks.get(inner if inner is not None else name) or contextlib.nullcontext()

    def validate(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, str]],
        specs: Sequence[tuple[str, float]],
    ) -> list[dict[str, str]]:
        """Raises InvalidArgument / ResourceExhausted naming the field; returns per-image metadata."""
        metadata = check_batch(images, prompts, metadata)
        if len(images) > self.max_batch:
            raise ResourceExhausted(
                f"images.shape: batch of {len(images)} images exceeds this instance's limit of {self.max_batch}; "
                "split the request"
            )
        if not specs:
            raise InvalidArgument("rewards: expected at least one reward spec (name and weight)")
        seen: dict[str, int] = {}
        for i, (name, weight) in enumerate(specs):
            backend = self.backend(name, f"rewards[{i}].name")
            check_modality(name, backend.modality, images, f"rewards[{i}].name")
            if name in seen:
                raise InvalidArgument(f"rewards[{i}].name: duplicate reward {show(name)} "
                                      f"(already at rewards[{seen[name]}])")
            seen[name] = i
            # Negative weights are refused: every reward is "higher is better", and a sign flip hidden
            # in a weight is how a combined reward silently optimises the wrong way.
            if not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight < 0:
                raise InvalidArgument(f"rewards[{i}].weight: expected a finite number >= 0, got {weight}")
        return metadata

    def score(
        self,
        images: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[dict[str, str]],
        specs: Sequence[tuple[str, float]],
    ) -> tuple[np.ndarray, list[tuple[str, float, np.ndarray]]]:
        """(combined float64 [N] = sum of weight * raw, [(name, weight, raw float32 [N]), ...])."""
        metadata = self.validate(images, prompts, metadata, specs)
        raws = [self.run_backend(name, images, prompts, metadata) for name, _ in specs]
        return self.combine(specs, raws)

    def run_backend(
        self, name: str, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict[str, str]]
    ) -> np.ndarray:
        """One backend's raw float32 [N] scores of a validated batch, checked for shape and finiteness.
        (The dynamic batcher calls this on merged batches.)"""
        n = len(images)
        backend = self.backend(name)
        with self._lock(backend, name):
            raw = np.asarray(backend.score(images, list(prompts), metadata), dtype=np.float32)
        if raw.shape != (n,):
            raise RewardBackendError(f"reward {name!r} returned shape {list(raw.shape)}, expected [{n}]")
        if not np.isfinite(raw).all():
            bad = int((~np.isfinite(raw)).sum())
            raise RewardBackendError(f"reward {name!r} returned {bad} non-finite scores (NaN/Inf)")
        return raw

    @staticmethod
    def combine(
        specs: Sequence[tuple[str, float]], raws: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[tuple[str, float, np.ndarray]]]:
        """The weighted sum of every spec's raw scores, and the per-reward list, in spec order."""
        combined = np.zeros(len(raws[0]), dtype=np.float64)
        per_reward: list[tuple[str, float, np.ndarray]] = []
        for (name, weight), raw in zip(specs, raws):
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
                combined += float(weight) * raw.astype(np.float64)
            per_reward.append((name, float(weight), raw))
        # Scores travel as float32: a sum past its range would arrive as Inf.
        if not (np.abs(combined) <= np.finfo(np.float32).max).all():
            raise InvalidArgument("rewards: the weighted sum exceeds the float32 range; use smaller weights")
        return combined, per_reward
