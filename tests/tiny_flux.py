"""Tiny random FLUX.1 pipelines for tests: real diffusers/transformers classes, built offline.

A CLIP text encoder (hidden 32; its pooled output is the transformer's pooled projection) with the
character-level tokenizer of tests/tiny_sd3.py, a 2-layer T5 encoder (d_model 32) with a
character-level Unigram T5 tokenizer written here (no hub, no sentencepiece file), a
``FluxTransformer2DModel`` with one double-stream and one single-stream block, a 2-block
``AutoencoderKL`` (latents at half resolution, FLUX-style scaling and shift factors, no quant convs)
and a ``FlowMatchEulerDiscreteScheduler`` configured like FLUX.1-dev's (dynamic shifting). Saved with
``save_pretrained`` so tests load them through the same ``from_pretrained(..., local_files_only=True)``
path as a real checkpoint.

32x32 images give 16x16x4 latents, packed by FluxPipeline into 8x8=64 tokens of 16 channels.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tiny_sd3 import tiny_clip_text, tiny_vae

IMAGE_SIZE = 32  # pixels; latents are 16x16 with 4 channels, packed into 64 tokens of 16 channels
MAX_T5_TOKENS = 16  # a max_sequence_length that fits short prompts ("a red cat" is 11 T5 tokens)


def _t5_tokenizer():
    """A T5 (Unigram) tokenizer over single characters: every word splits into "▁" and its letters."""
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + ".,'!?-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=512)


def build_tiny_flux(directory: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Saves a random tiny FluxPipeline to ``directory`` and returns it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, text_config = tiny_clip_text(directory, hidden_act="quick_gelu")
    tokenizer_2 = _t5_tokenizer()
    t5_config = T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    vae = tiny_vae(IMAGE_SIZE, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                   scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5_config), tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.save_pretrained(directory)
    return directory
