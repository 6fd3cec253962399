"""Tiny random Wan 2.1 text-to-video pipelines for tests: real diffusers/transformers classes, built offline.

A 2-layer ``UMT5EncoderModel`` (d_model 32) with the character-level Unigram T5 tokenizer of
tests/tiny_flux.py (no hub, no sentencepiece file), a 2-layer ``WanTransformer3DModel`` (patches
1x2x2, text_dim 32), an ``AutoencoderKLWan`` of base width 3 with Wan 2.1's layout (16 latent
channels, spatial factor 8, temporal factor 4, causal: the first latent frame is the first video
frame alone; the default latents_mean/std) and Wan 2.1's scheduler, UniPC with flow sigmas and
``flow_shift`` 3. Saved with ``save_pretrained`` so tests load them through the same
``from_pretrained(..., local_files_only=True)`` path as a real checkpoint.

32x32 videos of 5 frames give latents [16, 2, 4, 4]: 2 latent frames of 2x2 patches = 8 tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_flux import _t5_tokenizer

RESOLUTION = 32  # pixels; latents are 4x4
NUM_FRAMES = 5  # video frames; latent frames (5 - 1) / 4 + 1 = 2
MAX_TOKENS = 16  # a max_sequence_length that fits short prompts ("a red cat" is 11 tokens)


def build_tiny_wan(directory: Path, seed: int = 0, flow_shift: float = 3.0, boundary_ratio: float | None = None,
                   **pipeline_config) -> Path:
    """Saves a random tiny WanPipeline to ``directory`` and returns it. ``boundary_ratio``: Wan 2.2
    A14B-like, a second expert (``transformer_2``, other random weights) below it; ``pipeline_config``:
    WanPipeline's other settings (expand_timesteps)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _t5_tokenizer()
    text_config = UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    transformer_config = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    transformer = WanTransformer3DModel(**transformer_config)
    if boundary_ratio is not None:
        pipeline_config.update(boundary_ratio=boundary_ratio, transformer_2=WanTransformer3DModel(**transformer_config))
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=flow_shift)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=UMT5EncoderModel(text_config), transformer=transformer,
                       vae=vae, scheduler=scheduler, **pipeline_config)
    pipe.save_pretrained(directory)
    return directory
