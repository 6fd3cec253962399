"""A tiny random FLUX.2 [klein] pipeline for tests: real diffusers/transformers classes, built offline.

A 28-layer ``Qwen3ForCausalLM`` of width 16 (the pipeline stacks hidden states 9, 18 and 27) with the
byte-level tokenizer and Qwen3 chat template of tests/tiny_qwen_text.py, a ``Flux2Transformer2DModel``
with one double-stream and one single-stream block and no guidance embedding (as klein), an
``AutoencoderKLFlux2`` with 4 latent channels, one downsampling and random batch-norm statistics
(so the normalisation is exercised), and the FLUX.2 scheduler (dynamic shifting at
``compute_empirical_mu``). ``is_distilled`` False (the base model: true CFG against "") unless asked.

32x32 images give 16x16x4 VAE latents, patchified to 16x8x8 and packed into 64 tokens of 16.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_qwen_text import QWEN3_CHAT_TEMPLATE, qwen_tokenizer, tiny_qwen3

IMAGE_SIZE = 32
TEXT_TOKENS = 64  # max_sequence_length the tests use (the template alone is ~40 byte tokens)


def build_tiny_flux2_klein(directory: Path, seed: int = 0, is_distilled: bool = False) -> Path:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer(directory / "_tokenizer_src", QWEN3_CHAT_TEMPLATE)
    text_encoder = tiny_qwen3(len(tokenizer), hidden_size=16, layers=28)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=IMAGE_SIZE)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # statistics a trained VAE would have gathered
        vae.bn.running_mean.copy_(torch.randn(16, generator=generator) * 0.5)
        vae.bn.running_var.copy_(torch.rand(16, generator=generator) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=is_distilled)
    pipe.save_pretrained(directory)
    return directory
