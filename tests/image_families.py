"""The 2026 image families' tiny pipelines and how the tests call them and their stock pipelines
(shared by tests/test_image_families.py and tests/test_image_families_e2e.py; the session fixture
``family_dirs`` in conftest.py builds each pipeline once)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from epgrpo.trainer.policy.base import create_policy

PROMPTS = ["a red cat", "a blue dog"]  # different lengths: variable-length text is padded and masked
SEEDS = [11, 12]
STEPS, SIDE = 4, 32


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    pipeline: str  # the diffusers pipeline class
    transformer: str  # its transformer class
    builder: Callable[[Path], Path]
    options: dict  # the adapter's options for the tiny pipeline
    guidance: float  # sampling.guidance_scale with guidance on
    stock_kwargs: Callable[[float], dict]  # the stock call's guidance arguments for a guidance scale
    latent_shape: tuple[int, int, int]
    lora_modules: tuple[str, ...]  # adapted modules the reference trainers adapt too
    stock_noise: Callable  # (pipe, our unpacked noise) -> the stock call's `latents`
    stock_latents: Callable  # (pipe, our final latents) -> what the stock call returns with output_type="latent"


def _qwen_image_builder(directory: Path) -> Path:
    from tiny_qwen_image import build_tiny_qwen_image

    return build_tiny_qwen_image(directory)


def _flux2_klein_builder(directory: Path) -> Path:
    from tiny_flux2_klein import build_tiny_flux2_klein

    return build_tiny_flux2_klein(directory)


def _z_image_builder(directory: Path) -> Path:
    from tiny_z_image import build_tiny_z_image

    return build_tiny_z_image(directory)


def _qwen_pack(pipe, x: torch.Tensor) -> torch.Tensor:
    """QwenImagePipeline's token packing, transcribed: [B, C, h, w] -> [B, h/2 w/2, 4C], (c, dy, dx) per token."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h // 2 * w // 2, 4 * c)


def _flux2_denormalised(pipe, x: torch.Tensor) -> torch.Tensor:
    """Flux2KleinPipeline's latent output, transcribed: batch-norm statistics undone, 2x2 patches unfolded."""
    bn = pipe.vae.bn
    x = x * torch.sqrt(bn.running_var + pipe.vae.config.batch_norm_eps).view(1, -1, 1, 1) + bn.running_mean.view(1, -1, 1, 1)
    b, c, h, w = x.shape
    return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


FAMILIES = {
    "qwen_image": Family(
        "qwen_image", "QwenImagePipeline", "QwenImageTransformer2DModel", _qwen_image_builder,
        {"max_sequence_length": 512, "negative_prompt": "low quality"}, 3.0,
        lambda g: {"true_cfg_scale": g, "negative_prompt": "low quality", "max_sequence_length": 512} if g > 1 else
        {"true_cfg_scale": 1.0, "max_sequence_length": 512},
        (4, 16, 16),
        ("transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.attn.add_k_proj",
         "transformer_blocks.0.img_mlp.net.2", "transformer_blocks.1.txt_mlp.net.0.proj"),
        _qwen_pack, _qwen_pack),
    "flux2_klein": Family(
        "flux2_klein", "Flux2KleinPipeline", "Flux2Transformer2DModel", _flux2_klein_builder,
        {"max_sequence_length": 64}, 3.0,
        lambda g: {"guidance_scale": g, "max_sequence_length": 64},
        (16, 8, 8),
        ("transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.add_v_proj",
         "single_transformer_blocks.0.attn.to_qkv_mlp_proj"),
        lambda pipe, x: x, _flux2_denormalised),
    "z_image": Family(
        "z_image", "ZImagePipeline", "ZImageTransformer2DModel", _z_image_builder,
        {"max_sequence_length": 64, "negative_prompt": "blurry"}, 3.0,
        # the pipeline's guidance_scale is ours - 1 (0 = off)
        lambda g: {"guidance_scale": g - 1.0, "negative_prompt": ["blurry"] * len(PROMPTS), "max_sequence_length": 64},
        (4, 16, 16),
        ("layers.0.attention.to_out.0", "layers.1.feed_forward.w2", "noise_refiner.0.attention.to_k",
         "context_refiner.0.feed_forward.w3"),
        lambda pipe, x: x, lambda pipe, x: x),
}
NAMES = list(FAMILIES)


def make_policy(family: Family, path, **options):
    options = {"guidance_scale": 1.0, "resolution": SIDE, **family.options, **options}
    return create_policy(family.name, path=str(path), device="cpu", **options)


def load_stock(family: Family, path):
    import diffusers

    pipe = getattr(diffusers, family.pipeline).from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seed_noise(latent_shape) -> torch.Tensor:
    """The rollout's per-trajectory noise (unpacked), one generator per seed."""
    return torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in SEEDS])


def stock_sample(family: Family, pipe, policy, output_type: str, guidance: float):
    # a copy: ZImagePipeline writes the templated prompts into the list it is given
    return pipe(prompt=list(PROMPTS), num_inference_steps=STEPS, height=SIDE, width=SIDE, output_type=output_type,
                latents=family.stock_noise(pipe, seed_noise(policy.latent_shape)), **family.stock_kwargs(guidance)).images


def to_uint8(images01: np.ndarray) -> np.ndarray:
    return (images01 * 255).round().astype(np.uint8)


def cli_args(family: Family, path, out, *extra):
    model = [f"model.{k}={v}" for k, v in family.options.items()]
    return [f"model.name={family.name}", f"model.path={path}", "model.lora_rank=4", f"model.resolution={SIDE}",
            *model, "model.device=cpu", "sampling.num_steps=4", f"sampling.guidance_scale={family.guidance}",
            "reward.rewards=jpeg_compressibility:1", "reward.judge=", f"out_dir={out}", "progress=false", *extra]
