"""Tiny random SD3 pipelines for tests: real diffusers/transformers classes, built offline.

Two CLIP text encoders (hidden 32) with a character-level tokenizer written here (no hub), a
2-layer ``SD3Transformer2DModel``, a 2-block ``AutoencoderKL`` (latents at half resolution, with
SD3-style scaling and shift factors), no T5. Saved with ``save_pretrained`` so tests load them
through the same ``from_pretrained(..., local_files_only=True)`` path as a real checkpoint.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

IMAGE_SIZE = 32  # pixels; latents are 16x16 with 4 channels
MAX_TOKENS = 12


def _write_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """A byte-level BPE vocabulary with single characters only (every word splits into letters)."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + ".,'!?-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n")
    return vocab_file, merges_file


def tiny_clip_text(directory: Path, **config):
    """(CLIPTokenizer over the in-code vocabulary, a CLIPTextConfig of width 32) the builders share;
    ``config`` adds to or overrides the text config (hidden_act, projection_dim)."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    vocab, merges = _write_tokenizer_files(directory / "_tokenizer_src")
    tokenizer = CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_TOKENS)
    text_config = CLIPTextConfig(**{
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
        "num_hidden_layers": 2, "max_position_embeddings": MAX_TOKENS, "bos_token_id": 0, "eos_token_id": 1,
        "pad_token_id": 1, **config})
    return tokenizer, text_config


def tiny_vae(image_size: int, **config):
    """A 2-block AutoencoderKL with 4 latent channels (downsampling 2); ``config``: the family's
    scaling/shift factors and quant-conv settings."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=4, **config)


def build_tiny_sd3(directory: Path, seed: int = 0, image_size: int = IMAGE_SIZE, num_layers: int = 2,
                   num_heads: int = 4, head_dim: int = 8) -> Path:
    """Saves a random tiny StableDiffusion3Pipeline to ``directory`` and returns it. The size
    options give larger transformers with the same text encoders and VAE (bench/bench_iteration.py:
    a 64 px, 6-layer, width-384 pipeline whose transformer dominates)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, text_config = tiny_clip_text(directory, projection_dim=32, hidden_act="gelu")
    transformer = SD3Transformer2DModel(
        sample_size=image_size // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=num_heads, caption_projection_dim=num_heads * head_dim,
        joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=max(16, image_size // 4),
    )
    vae = tiny_vae(image_size, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                   scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection(text_config), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(directory)
    return directory
