"""RewardScorer: weighted sums against a float64 recomputation, and precise validation errors."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epgrpo.services.common.errors import InvalidArgument, ResourceExhausted, ServiceError, status_for
from epgrpo.services.reward.backends.base import RewardBackend, create_backend
from epgrpo.services.reward.scorer import RewardBackendError, RewardScorer


class MeanBrightness(RewardBackend):
    name = "brightness"
    description = "mean pixel value / 255"
    inputs = "image only"
    range = "[0, 1]"

    def _score(self, images, prompts, metadata):
        return images.reshape(len(images), -1).mean(1) / 255.0


class PromptLength(RewardBackend):
    name = "prompt_length"
    description = "characters in the prompt"
    inputs = "prompt"
    range = "[0, inf)"

    def _score(self, images, prompts, metadata):
        return np.array([len(p) for p in prompts], dtype=np.float32)


class Broken(RewardBackend):
    """Returns whatever it was told to, to check the scorer's guard on backend output."""

    name = "broken"

    def __init__(self, output):
        super().__init__()
        self.output = output

    def _score(self, images, prompts, metadata):
        return self.output(len(images))


@pytest.fixture(scope="module")
def scorer():
    backends = {"brightness": MeanBrightness(), "prompt_length": PromptLength(),
                "jpeg_compressibility": create_backend("jpeg_compressibility")}
    return RewardScorer(backends, max_batch=16)


def batch(n=3, h=8, w=8, c=1, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)
    return images, [f"prompt {'x' * i}" for i in range(n)], []


def test_combined_is_the_weighted_sum_of_raw_scores(scorer):
    images, prompts, metadata = batch(5, c=3)
    combined, per_reward = scorer.score(images, prompts, metadata, [("brightness", 2.0), ("prompt_length", 0.5)])
    assert [(name, weight) for name, weight, _ in per_reward] == [("brightness", 2.0), ("prompt_length", 0.5)]
    brightness = images.reshape(5, -1).mean(1) / 255.0
    lengths = np.array([len(p) for p in prompts], dtype=np.float64)
    np.testing.assert_allclose(per_reward[0][2], brightness, rtol=1e-6)
    np.testing.assert_allclose(per_reward[1][2], lengths)
    np.testing.assert_allclose(combined, 2.0 * per_reward[0][2].astype(np.float64) + 0.5 * lengths, rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 16),
    channels=st.sampled_from([1, 3]),
    names=st.lists(st.sampled_from(["brightness", "prompt_length", "jpeg_compressibility"]), min_size=1, max_size=3, unique=True),
    weights=st.lists(st.floats(0, 1e3, allow_nan=False, allow_infinity=False), min_size=3, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_combined_equals_float64_weighted_sum(scorer, n, channels, names, weights, seed):
    images, prompts, _ = batch(n, 8, 9, channels, seed)
    specs = list(zip(names, weights))
    combined, per_reward = scorer.score(images, prompts, [], specs)
    assert combined.shape == (n,)
    expected = np.zeros(n, dtype=np.float64)
    for (name, weight), (got_name, got_weight, raw) in zip(specs, per_reward):
        assert (got_name, got_weight) == (name, weight) and raw.dtype == np.float32 and raw.shape == (n,)
        np.testing.assert_array_equal(raw, scorer.backends[name].score(images, prompts, []))
        expected += weight * raw.astype(np.float64)
    np.testing.assert_allclose(combined, expected, rtol=1e-12, atol=1e-12)


def test_metadata_reaches_backends_one_dict_per_image():
    seen = []

    class Recorder(RewardBackend):
        def _score(self, images, prompts, metadata):
            seen.append(metadata)
            return np.zeros(len(images))

    scorer = RewardScorer({"recorder": Recorder()})
    images, prompts, _ = batch(2)
    scorer.score(images, prompts, [], [("recorder", 1.0)])
    scorer.score(images, prompts, [{"digit": "3"}, {}], [("recorder", 1.0)])
    assert seen == [[{}, {}], [{"digit": "3"}, {}]]


def _bad(images=None, prompts=None, metadata=None, specs=None):
    good_images, good_prompts, _ = batch(12)
    return (
        good_images if images is None else images,
        good_prompts if prompts is None else prompts,
        [] if metadata is None else metadata,
        [("brightness", 1.0)] if specs is None else specs,
    )


@pytest.mark.parametrize(
    "request_args, error, message",
    [
        (_bad(images=np.zeros((2, 8, 8, 1), np.float32)), InvalidArgument, "images.dtype: expected uint8, got float32"),
        (_bad(images=np.zeros((2, 8, 8), np.uint8)), InvalidArgument, "images.shape: expected [N, H, W, C]"),
        (_bad(images=np.zeros((2, 8, 8, 4), np.uint8)), InvalidArgument, "images.shape: expected [N, H, W, C] with C in {1, 3}"),
        (_bad(images=np.zeros((0, 8, 8, 1), np.uint8), prompts=[]), InvalidArgument, "images.shape: expected N, H, W >= 1"),
        (_bad(images=np.zeros((1, 0, 8, 1), np.uint8), prompts=["p"]), InvalidArgument, "images.shape: expected N, H, W >= 1"),
        (_bad(images=np.zeros((17, 8, 8, 1), np.uint8), prompts=["p"] * 17), ResourceExhausted, "images.shape: batch of 17"),
        (_bad(prompts=["a", "b", "c"]), InvalidArgument, "prompts: expected 12 prompts (one per image), got 3"),
        (_bad(metadata=[{}] * 5), InvalidArgument, "metadata: expected 0 or 12 entries"),
        (_bad(specs=[]), InvalidArgument, "rewards: expected at least one reward"),
        (_bad(specs=[("brightness", 1.0), ("clip", 1.0)]), InvalidArgument,
         "rewards[1].name: unknown reward 'clip'; this instance serves: brightness, jpeg_compressibility, prompt_length"),
        (_bad(specs=[("brightness", 1.0), ("prompt_length", 1.0), ("brightness", 2.0)]), InvalidArgument,
         "rewards[2].name: duplicate reward 'brightness' (already at rewards[0])"),
        (_bad(specs=[("brightness", float("nan"))]), InvalidArgument, "rewards[0].weight: expected a finite number >= 0, got nan"),
        (_bad(specs=[("prompt_length", 1.0), ("brightness", float("-inf"))]), InvalidArgument, "rewards[1].weight: expected a finite number >= 0, got -inf"),
        (_bad(specs=[("brightness", -0.5)]), InvalidArgument, "rewards[0].weight: expected a finite number >= 0, got -0.5"),
        (_bad(specs=[("prompt_length", 1e308), ("brightness", 1.0)]), InvalidArgument, "rewards: the weighted sum exceeds"),
    ],
)
def test_validation_errors_name_the_field(scorer, request_args, error, message):
    with pytest.raises(error, match="^" + re.escape(message)):
        scorer.score(*request_args)


@pytest.mark.parametrize(
    "output, message",
    [
        (lambda n: np.full(n, np.nan), "reward 'broken' returned 3 non-finite scores"),
        (lambda n: np.array([0.0, np.inf, 1.0])[:n], "reward 'broken' returned 1 non-finite scores"),
        (lambda n: np.zeros(n + 1), "reward 'broken' returned shape [4], expected [3]"),
    ],
)
def test_broken_backend_output_is_an_internal_error_naming_the_reward(output, message):
    scorer = RewardScorer({"broken": Broken(output)})
    images, prompts, _ = batch(3)
    with pytest.raises(RewardBackendError, match=re.escape(message)) as caught:
        scorer.score(images, prompts, [], [("broken", 1.0)])
    assert isinstance(caught.value, ServiceError)
    assert status_for(caught.value)[0] == grpc.StatusCode.INTERNAL


def test_zero_weight_rewards_are_still_reported(scorer):
    # A weight of 0 is how a caller logs a reward (e.g. a held-out judge) without training on it.
    images, prompts, _ = batch(4)
    combined, per_reward = scorer.score(images, prompts, [], [("brightness", 1.0), ("jpeg_compressibility", 0.0)])
    np.testing.assert_allclose(combined, per_reward[0][2].astype(np.float64), rtol=1e-12)
    assert per_reward[1][1] == 0.0 and (per_reward[1][2] < 0).all()


def test_describe_lists_every_served_reward(scorer):
    described = scorer.describe()
    assert [d["name"] for d in described] == ["brightness", "jpeg_compressibility", "prompt_length"]
    assert all(d["description"] and d["inputs"] and d["range"] for d in described)


def test_scorer_needs_backends_and_a_positive_max_batch():
    with pytest.raises(ValueError):
        RewardScorer({})
    with pytest.raises(ValueError, match="max_batch"):
        RewardScorer({"brightness": MeanBrightness()}, max_batch=0)
