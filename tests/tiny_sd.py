"""Tiny random Stable Diffusion 1.x pipelines for tests: real diffusers/transformers classes, built offline.

One CLIP text encoder (hidden 32, 2 layers) with the character-level tokenizer of tests/tiny_sd3.py,
a 2-level ``UNet2DConditionModel`` (cross-attention down block, plain down block, and their mirrors),
a 2-block ``AutoencoderKL`` (latents at half resolution, SD 1.x scaling factor and no shift) and a
``DDIMScheduler`` configured like SD 1.4's. No safety checker. Saved with ``save_pretrained`` so tests
load them through the same ``from_pretrained(..., local_files_only=True)`` path as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_sd3 import tiny_clip_text, tiny_vae

IMAGE_SIZE = 32  # pixels; latents are 16x16 with 4 channels


def build_tiny_sd(directory: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Saves a random tiny StableDiffusionPipeline to ``directory`` and returns it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, text_config = tiny_clip_text(directory, hidden_act="quick_gelu")
    # `attention_head_dim` is the number of heads in UNet2DConditionModel (a legacy name): 2 heads
    # over 16 channels and 4 over 32 give 8 channels per head throughout.
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8,
    )
    vae = tiny_vae(IMAGE_SIZE, scaling_factor=0.18215)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return directory
