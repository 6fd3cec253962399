"""Builds a tiny randomly initialised CLIP directory in the layout real weights use.

For tests and benchmarks (no hub access on our machines), and for trying the CLIP rewards without
real weights: ``python -m epgrpo.services.reward.backends.tiny_clip DIR [--aesthetic-head]``.
Scores from it are meaningless; loading and computing go through exactly the code real weights use.
"""

from __future__ import annotations

import argparse
import string
import sys
from pathlib import Path

import torch

# Byte-pair vocabulary of single characters (no merges): every prompt tokenises, nothing to download.
_CHARS = string.ascii_lowercase + string.digits + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def tiny_vocab() -> dict[str, int]:
    vocab = {c: i for i, c in enumerate(_CHARS)}
    vocab.update({c + "</w>": len(_CHARS) + i for i, c in enumerate(_CHARS)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def save_tiny_clip(directory: str | Path, *, image_size: int = 32, patch_size: int = 8, hidden: int = 32,
                   layers: int = 2, projection_dim: int = 16, max_tokens: int = 32, seed: int = 0,
                   aesthetic_head: bool = False) -> Path:
    """Writes config.json, model.safetensors, tokenizer and processor files (and, optionally, an
    aesthetic head ``aesthetic_head.safetensors`` with the LAION MLP's layer names) to ``directory``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    directory = Path(directory)
    vocab = tiny_vocab()
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_tokens)
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=max_tokens,
                         eos_token_id=eos, bos_token_id=bos, pad_token_id=eos),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
        head = _laion_head(projection_dim) if aesthetic_head else None
    model.save_pretrained(directory)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    if head is not None:
        from safetensors.torch import save_file

        save_file(head, str(directory / "aesthetic_head.safetensors"))
    return directory


def _laion_head(in_features: int) -> dict[str, torch.Tensor]:
    """Random weights named like LAION's MLP (Linear at indices 0, 2, 4, 6, 7; Dropout in between),
    at a quarter of its widths (1024, 128, 64, 16, 1)."""
    widths = [in_features, 256, 32, 16, 4, 1]
    state = {}
    for index, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), zip(widths, widths[1:])):
        state[f"layers.{index}.weight"] = torch.randn(fan_out, fan_in) / fan_in ** 0.5
        state[f"layers.{index}.bias"] = torch.randn(fan_out) * 0.1
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--aesthetic-head", action="store_true", help="also write aesthetic_head.safetensors")
    args = parser.parse_args(argv)
    print(save_tiny_clip(args.directory, image_size=args.image_size, aesthetic_head=args.aesthetic_head))
    return 0


if __name__ == "__main__":
    sys.exit(main())
