"""Reward backends in-process: digit CNN (accuracy, junk rejection, cache), judge, JPEG, registry."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

from epgrpo.services.common.errors import InvalidArgument
from epgrpo.services.reward.backends import digit_data, digits
from epgrpo.services.reward.backends.base import (
    RewardBackend,
    available_backends,
    create_backend,
    register_backend,
)


@pytest.fixture(scope="module")
def digit_reward():
    return create_backend("digit")


@pytest.fixture(scope="module")
def judge():
    return create_backend("digit_judge")


@pytest.fixture(scope="module")
def heldout():
    """Held-out real digits as the reward receives them: uint8 [N, 16, 16, 1], labels, prompts."""
    images, labels = digits.real_digits()
    _, test_idx = digits.digit_split()
    return digit_data.to_uint8(images[test_idx]), labels[test_idx], [f"a handwritten digit {d}" for d in labels[test_idx]]


def prompts_for(digit: int, n: int) -> list[str]:
    return [f"a handwritten digit {digit}"] * n


def junk_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    ys, xs = np.mgrid[:16, :16]
    blob = ((ys - 8) ** 2 + (xs - 7) ** 2 <= 20).astype(np.uint8) * 255
    return {
        "uniform noise": rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8),
        "checkerboard period 2": np.broadcast_to(((ys + xs) % 2 * 255).astype(np.uint8)[None, :, :, None], (4, 16, 16, 1)),
        "checkerboard period 4": np.broadcast_to(((ys // 2 + xs // 2) % 2 * 255).astype(np.uint8)[None, :, :, None], (4, 16, 16, 1)),
        "saturated blob": blob[None, :, :, None],
        "blob with patch checkerboard": (blob * ((ys // 2 + xs // 2) % 2)).astype(np.uint8)[None, :, :, None],
        "white": np.full((1, 16, 16, 1), 255, np.uint8),
        "black": np.zeros((1, 16, 16, 1), np.uint8),
    }


def test_digit_reward_is_high_for_the_true_label_and_low_for_wrong_ones(digit_reward, heldout):
    images, labels, prompts = heldout
    true_scores = digit_reward.score(images, prompts, [])
    assert true_scores.dtype == np.float32 and true_scores.shape == (len(labels),)
    assert true_scores.mean() > 0.8
    wrong = digit_reward.score(images, [f"a handwritten digit {(d + 3) % 10}" for d in labels], [])
    assert wrong.mean() < 0.05
    probabilities = digit_reward.probabilities(images)
    assert (probabilities[:, :10].argmax(1) == labels).mean() > 0.93
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)


def test_digit_reward_rejects_junk_for_every_digit(digit_reward):
    for name, images in junk_batch(np.random.default_rng(7)).items():
        images = np.ascontiguousarray(images)
        best = digit_reward.probabilities(images)[:, :10].max(axis=1)  # the best any prompt could get
        assert best.mean() < 0.15, f"{name}: some digit scores {best.mean():.3f}"
        digit = int(digit_reward.probabilities(images[:1])[0, :10].argmax())
        assert digit_reward.score(images[:1], prompts_for(digit, 1), [])[0] == pytest.approx(best[0], abs=1e-6)


def test_digit_reward_accepts_rgb_and_other_sizes(digit_reward, heldout):
    images, labels, prompts = heldout
    gray = digit_reward.score(images[:50], prompts[:50], [])
    rgb = digit_reward.score(np.repeat(images[:50], 3, axis=3), prompts[:50], [])
    np.testing.assert_allclose(rgb, gray, atol=1e-6)
    # The native 8x8 digits (0..16 -> uint8) are upsampled the way the training data was.
    from sklearn.datasets import load_digits

    data = load_digits()
    _, test_idx = digits.digit_split()
    native = np.round(data.images[test_idx] / 16 * 255).astype(np.uint8)[..., None]
    assert digit_reward.score(native, prompts, []).mean() > 0.8
    big = np.repeat(np.repeat(images, 4, axis=1), 4, axis=2)  # 64x64 nearest-upsampled
    assert digit_reward.score(big, prompts, []).mean() > 0.7


def test_target_digit_from_prompt_words_and_metadata():
    assert digits.parse_target_digits(["a handwritten digit 7", "a handwritten Seven.", "one digit 3"], []).tolist() == [7, 7, 3]
    assert digits.parse_target_digits(["anything", "a digit 2"], [{"digit": "5"}, {}]).tolist() == [5, 2]


@pytest.mark.parametrize(
    "prompts, metadata, field",
    [
        (["a handwritten digit 7", "a cat"], [], "prompts[1]"),
        (["digits 3 and 4"], [], "prompts[0]"),
        (["a handwritten digit 10"], [], "prompts[0]"),
        (["a digit 1", "a digit 2", "x"], [{}, {}, {"digit": "12"}], "metadata[2].digit"),
    ],
)
def test_bad_prompts_name_the_sample(digit_reward, prompts, metadata, field):
    images = np.zeros((len(prompts), 16, 16, 1), np.uint8)
    with pytest.raises(InvalidArgument, match="^" + re.escape(field) + ": expected"):
        digit_reward.score(images, prompts, metadata)


def test_backends_validate_images_in_process(digit_reward):
    with pytest.raises(InvalidArgument, match=r"images\.dtype"):
        digit_reward.score(np.zeros((1, 16, 16, 1), np.float32), ["a digit 1"], [])
    with pytest.raises(InvalidArgument, match=r"images\.shape"):
        digit_reward.score(np.zeros((1, 16, 16, 2), np.uint8), ["a digit 1"], [])


def test_classifier_cache_is_written_then_loaded_without_retraining(tmp_path, monkeypatch, heldout):
    # Stand-in training (random weights, fast): this test is about the cache, not the recipe.
    calls = []

    def fake_train():
        calls.append(1)
        torch.manual_seed(len(calls))
        return digits.DigitCNN().eval(), {"version": digits.CLASSIFIER_VERSION, "heldout_accuracy": "0.5"}

    monkeypatch.setenv("EPGRPO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(digits, "train_classifier", fake_train)
    images, _, prompts = heldout
    first = create_backend("digit")
    path = digits.weights_path(tmp_path / "rewards")
    assert digits.CLASSIFIER_VERSION in path.name
    assert calls == [1] and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left

    def must_not_train():
        raise AssertionError("retrained although the cache exists")

    monkeypatch.setattr(digits, "train_classifier", must_not_train)
    second = create_backend("digit")
    np.testing.assert_array_equal(second.score(images, prompts, []), first.score(images, prompts, []))
    assert second.training_info["heldout_accuracy"] == "0.5"

    # A damaged cache file is rebuilt rather than fatal.
    monkeypatch.setattr(digits, "train_classifier", fake_train)
    path.write_bytes(b"not a safetensors file")
    create_backend("digit")
    assert calls == [1, 1] and path.stat().st_size > 1000


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    # One epoch is enough to expose any unseeded randomness (init, dropout, data order, junk).
    torch.manual_seed(1)
    first, _ = digits.train_classifier(epochs=1)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second, _ = digits.train_classifier(epochs=1)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_cached_classifier_loads_fast_and_records_its_accuracy(digit_reward):
    start = time.perf_counter()
    again = create_backend("digit")
    assert time.perf_counter() - start < 5.0  # training takes 10-20 s
    assert again.training_info["version"] == digits.CLASSIFIER_VERSION
    assert float(again.training_info["heldout_accuracy"]) > 0.95


def test_training_data_junk_families_are_what_they_claim():
    gen = torch.Generator().manual_seed(0)
    board = digit_data.checkerboards(3, 2, gen)
    assert torch.all(board[:, :, :, 1:] != board[:, :, :, :-1])  # period 2: every neighbour differs
    board4 = digit_data.checkerboards(3, 4, gen)
    assert torch.equal(board4[:, :, :, 4:], board4[:, :, :, :-4])
    images, labels = digits.real_digits()
    junk = digit_data.junk_images(100, images[:200], torch.from_numpy(labels[:200]), gen)
    assert junk.shape == (100, 1, 16, 16) and 0 <= junk.min() and junk.max() <= 1
    torch.testing.assert_close(digit_data.quantize(junk), junk)


def test_judge_scores_true_labels_high(judge, heldout):
    images, labels, prompts = heldout
    assert judge.heldout_accuracy > 0.95
    assert judge.score(images, prompts, []).mean() > 0.8
    assert judge.score(images, [f"a handwritten digit {(d + 3) % 10}" for d in labels], []).mean() < 0.1


def _pil_jpeg_kb(image: np.ndarray) -> float:
    buffer = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_rewards_equal_a_direct_pil_computation(channels):
    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, (5, 24, 20, channels), dtype=np.uint8)
    expected = np.array([_pil_jpeg_kb(im) for im in images], dtype=np.float32)
    compress = create_backend("jpeg_compressibility").score(images, [""] * 5, [])
    incompress = create_backend("jpeg_incompressibility").score(images, [""] * 5, [])
    np.testing.assert_array_equal(compress, -expected)
    np.testing.assert_array_equal(incompress, expected)


def test_flat_image_is_more_compressible_than_noise():
    flat = np.full((1, 64, 64, 3), 128, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    reward = create_backend("jpeg_compressibility")
    assert reward.score(flat, [""], [])[0] > reward.score(noise, [""], [])[0]


def test_registry_lists_backends_and_rejects_unknown_names():
    names = available_backends()
    assert {"digit", "digit_judge", "jpeg_compressibility", "jpeg_incompressibility"} <= set(names)
    with pytest.raises(InvalidArgument, match=r"unknown reward 'clip'.*digit, digit_judge, .*jpeg_compressibility"):
        create_backend("clip")
    with pytest.raises(InvalidArgument, match=r"reward 'jpeg_compressibility': bad options"):
        create_backend("jpeg_compressibility", temperature=2)
    for name in names:
        cls = type(create_backend(name)) if name.startswith("jpeg") else None
        assert cls is None or (cls.name == name and cls.description and cls.inputs and cls.range)


def test_register_backend_refuses_a_second_class_under_a_taken_name():
    class Impostor(RewardBackend):
        def _score(self, images, prompts, metadata):
            return np.zeros(len(images))

    with pytest.raises(ValueError, match="already registered"):
        register_backend("jpeg_compressibility")(Impostor)
    with pytest.raises(TypeError):
        register_backend("not_a_backend")(object)
