"""A tiny random Qwen-Image pipeline for tests: real diffusers/transformers classes, built offline.

A 2-layer ``Qwen2_5_VLForConditionalGeneration`` (text width 32, a 1-block vision tower the text
path never uses) with the byte-level tokenizer of tests/tiny_qwen_text.py, a 2-block
``QwenImageTransformer2DModel``, an ``AutoencoderKLQwenImage`` with one spatial downsampling and
non-trivial per-channel ``latents_mean``/``latents_std`` (so the normalisation is exercised), and
the ``FlowMatchEulerDiscreteScheduler`` configured like Qwen-Image's (dynamic shifting, exponential).
Saved with ``save_pretrained``; tests load it through ``from_pretrained(..., local_files_only=True)``.

32x32 images give 16x16 latents with 4 channels, packed by QwenImagePipeline into 64 tokens of 16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_qwen_text import qwen_tokenizer

IMAGE_SIZE = 32


def build_tiny_qwen_image(directory: Path, seed: int = 0) -> Path:
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer(directory / "_tokenizer_src")
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            "bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 32,
              "fullatt_block_indexes": [0]}
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=(torch.randn(4, generator=generator) * 0.5).tolist(),
        latents_std=(torch.rand(4, generator=generator) + 0.5).tolist())
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.save_pretrained(directory)
    return directory
