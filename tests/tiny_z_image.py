"""A tiny random Z-Image pipeline for tests: real diffusers/transformers classes, built offline.

A 2-layer ``Qwen3ForCausalLM`` (width 32; the pipeline takes its second-to-last hidden state) with
the byte-level tokenizer and Qwen3 chat template of tests/tiny_qwen_text.py, a
``ZImageTransformer2DModel`` with 2 main layers and one noise/context refiner layer each, the
2-block ``AutoencoderKL`` of tests/tiny_sd3.py with Z-Image's scaling and shift factors, and the
scheduler configured like Z-Image's (static shift 3). Saved with ``save_pretrained``.

32x32 images give 16x16 latents with 4 channels; the transformer patchifies them 2x2 itself.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_qwen_text import QWEN3_CHAT_TEMPLATE, qwen_tokenizer, tiny_qwen3
from tiny_sd3 import tiny_vae

IMAGE_SIZE = 32
TEXT_TOKENS = 64


def build_tiny_z_image(directory: Path, seed: int = 0) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer(directory / "_tokenizer_src", QWEN3_CHAT_TEMPLATE)
    text_encoder = tiny_qwen3(len(tokenizer), hidden_size=32, layers=2)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[4, 6, 6], axes_lens=[256, 32, 32])
    vae = tiny_vae(IMAGE_SIZE, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                   scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    pipe.save_pretrained(directory)
    return directory
