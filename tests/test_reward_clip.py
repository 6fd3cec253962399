"""CLIPScore, PickScore and the aesthetic predictor on a tiny random CLIP saved to disk and loaded
back with local_files_only, checked against transformers' own CLIPModel forward (an independent
code path: full forward, logits_per_image) and a float64 recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from epgrpo.services.common.errors import InvalidArgument
from epgrpo.services.reward.backends.base import create_backend
from epgrpo.services.reward.backends.tiny_clip import save_tiny_clip
from epgrpo.services.reward.config import build_backend, parse_spec

PROMPTS = ["a red cat", "hello world", "a photo of 7 dogs", "x"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), aesthetic_head=True)


@pytest.fixture(scope="module")
def reference(clip_dir):
    """transformers' standard path: CLIPProcessor + CLIPModel.forward, float64 numpy outputs."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)

    def forward(images: np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
        inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**inputs)
        return {"logits": out.logits_per_image.double().numpy(), "image": out.image_embeds.double().numpy(),
                "text": out.text_embeds.double().numpy(), "scale": float(model.logit_scale.detach().exp())}

    return forward


def images_at(size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """Smooth random images (noise would exaggerate resampling differences)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(0, 3, 1, 2), size=(size, size), mode="bilinear")
    return up.permute(0, 2, 3, 1).round().clamp(0, 255).numpy().astype(np.uint8)


def test_pickscore_equals_logit_scale_times_cosine(clip_dir, reference):
    images = images_at(32)  # the model's size: preprocessing is exactly the processor's
    ref = reference(images, PROMPTS)
    scores = create_backend("pickscore", path=str(clip_dir)).score(images, PROMPTS)
    np.testing.assert_allclose(scores, np.diag(ref["logits"]), rtol=1e-5, atol=1e-5)
    cosine = (ref["image"] * ref["text"]).sum(1) / np.linalg.norm(ref["image"], axis=1) / np.linalg.norm(ref["text"], axis=1)
    np.testing.assert_allclose(scores, ref["scale"] * cosine, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(scores, 5))) == len(PROMPTS)  # distinct pairs give distinct scores


def test_clipscore_is_clipped_weighted_cosine(clip_dir, reference):
    images = images_at(32, seed=1)
    prompts = ["a red cat", "zebra", "a photo of 7 dogs", "x"]  # "zebra" has a negative cosine here
    ref = reference(images, prompts)
    cosine = np.diag(ref["logits"]) / ref["scale"]
    for weight in (2.5, 1.0):
        scores = create_backend("clipscore", path=str(clip_dir), weight=weight).score(images, prompts)
        np.testing.assert_allclose(scores, weight * np.maximum(cosine, 0), rtol=1e-5, atol=1e-6)
    assert (cosine < 0).any() and (cosine > 0).any(), "the fixture should exercise the clipping at 0"


def test_aesthetic_is_the_linear_head_on_the_unit_image_embedding(clip_dir, reference):
    images = images_at(32, seed=2)
    ref = reference(images, PROMPTS)
    x = ref["image"] / np.linalg.norm(ref["image"], axis=1, keepdims=True)
    head = load_file(str(clip_dir / "aesthetic_head.safetensors"))
    for i in (0, 2, 4, 6, 7):  # LAION's Linear indices; no activations between them
        x = x @ head[f"layers.{i}.weight"].double().numpy().T + head[f"layers.{i}.bias"].double().numpy()
    scores = create_backend("aesthetic", path=str(clip_dir)).score(images, [""] * len(images))
    np.testing.assert_allclose(scores, x[:, 0], rtol=1e-5, atol=1e-6)


def test_preprocessing_of_other_sizes_follows_the_processor(clip_dir, reference):
    from transformers import CLIPImageProcessor

    backend = create_backend("pickscore", path=str(clip_dir))
    processor = CLIPImageProcessor.from_pretrained(clip_dir, local_files_only=True)
    for shape in [(3, 48, 80, 3), (3, 100, 45, 3), (2, 20, 20, 3)]:  # wide, tall, upscaled
        images = images_at(max(shape[1:3]), shape[0])[:, : shape[1], : shape[2]]
        ours = backend.encoder.pixel_values(images).numpy()
        theirs = processor(images=list(images), return_tensors="pt")["pixel_values"].numpy()
        assert ours.shape == theirs.shape == (shape[0], 3, 32, 32)
        assert np.abs(ours - theirs).mean() < 0.02, shape  # torch vs PIL bicubic: rounding-level differences
    images = images_at(64)
    np.testing.assert_allclose(backend.score(images, PROMPTS), np.diag(reference(images, PROMPTS)["logits"]), atol=0.05)


def test_gray_long_prompts_chunks_and_string_options(clip_dir):
    images = images_at(32, n=5)
    long_prompt = "a very long prompt " * 40  # > 32 tokens: truncated, not an error
    prompts = [*PROMPTS, long_prompt]
    default = create_backend("pickscore", path=str(clip_dir)).score(images, prompts)
    # Options as --rewards gives them: strings, converted to the constructor's types.
    (entry,) = parse_spec(f"pickscore:path={clip_dir};batch_size=2;dtype=float32")
    chunked = build_backend(entry, "cpu")
    assert chunked.encoder.batch_size == 2
    np.testing.assert_allclose(chunked.score(images, prompts), default, rtol=1e-5, atol=1e-5)
    gray = images.mean(axis=3, keepdims=True).astype(np.uint8)
    rgb_of_gray = np.repeat(gray, 3, axis=3)
    np.testing.assert_allclose(chunked.score(gray, prompts), chunked.score(rgb_of_gray, prompts), atol=1e-6)


def test_bfloat16_runs_close_to_float32(clip_dir):
    images = images_at(32)
    fp32 = create_backend("clipscore", path=str(clip_dir), dtype="float32")
    bf16 = create_backend("clipscore", path=str(clip_dir), dtype="bf16")
    assert next(bf16.encoder.model.parameters()).dtype == torch.bfloat16
    np.testing.assert_allclose(bf16.score(images, PROMPTS), fp32.score(images, PROMPTS), atol=0.05)


def test_bad_configuration_fails_at_load_naming_the_option(clip_dir, tmp_path):
    with pytest.raises(InvalidArgument, match="'pickscore': option 'path' is required"):
        create_backend("pickscore")
    with pytest.raises(InvalidArgument, match=r"path=.*expected a directory with config.json"):
        create_backend("clipscore", path=str(tmp_path))
    with pytest.raises(InvalidArgument, match="dtype: expected auto or one of"):
        create_backend("clipscore", path=str(clip_dir), dtype="int8")
    with pytest.raises(InvalidArgument, match="head=.*no such file"):
        create_backend("aesthetic", path=str(clip_dir), head=str(tmp_path / "missing.safetensors"))
    wrong = {"layers.0.weight": torch.zeros(4, 99), "layers.1.weight": torch.zeros(1, 4)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(InvalidArgument, match=r"layers.0.weight has shape \[4, 99\], expected \[\*, 16\]"):
        create_backend("aesthetic", path=str(clip_dir), head=str(tmp_path / "wrong.safetensors"))
    with pytest.raises(InvalidArgument, match="option batch_size: expected int, got 'many'"):
        build_backend(parse_spec(f"pickscore:path={clip_dir};batch_size=many")[0], "cpu")
    with pytest.raises(InvalidArgument, match="bad options"):
        build_backend(parse_spec(f"pickscore:path={clip_dir};colour=red")[0], "cpu")
