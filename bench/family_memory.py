"""Memory per GPU of the 2026 image families at 1024 px, estimated from parameter counts (not measured:
no GPU and no weights here). The networks are built on the meta device from the released configs
(diffusers' and transformers' classes, the sizes written below), so the parameter counts are exact
for those configs; the memory model on top of them is an estimate:

- LoRA: frozen transformer, text encoder and VAE in bf16 (2 B/param; the text encoder stays
  resident), the LoRA weights in fp32 with their gradient, AdamW moments and EMA (20 B/param);
- full fine-tuning: fp32 weights, gradients and AdamW moments (16 B/param), the frozen reference in
  bf16 (2 B/param) and the EMA shadow in fp32 (4 B/param), alone or FSDP-sharded over 8 GPUs;
- activations of one training forward with gradient checkpointing: each block's input kept
  (tokens x width x 2 B per block) plus one block recomputed (~24 x tokens x width x 2 B), per
  trajectory of ``--train-batch``; rollouts run without gradients (transient).

    python bench/family_memory.py [--rank 32] [--train-batch 2] [--gpus 8]
"""

from __future__ import annotations

import argparse

import torch

GIB = 2 ** 30
QWEN3 = {"4B": dict(hidden_size=2560, num_hidden_layers=36, intermediate_size=9728, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
         "8B": dict(hidden_size=4096, num_hidden_layers=36, intermediate_size=12288, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False)}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_count(module: torch.nn.Module, targets, rank: int) -> int:
    """Parameters of rank-``rank`` LoRA on every Linear whose name ends with a target (peft's suffix match)."""
    return sum(rank * (m.in_features + m.out_features) for name, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def families():
    """(name, transformer, text encoder, VAE, LoRA targets, image tokens at 1024 px, text tokens) per family."""
    import diffusers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

    from epgrpo.trainer.policy import flux2_klein, qwen_image, z_image

    with torch.device("meta"):
        qwen_vl = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
                             num_key_value_heads=4, vocab_size=152064),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)))
        yield ("qwen_image (Qwen-Image, 20B)", diffusers.QwenImageTransformer2DModel(), qwen_vl,
               diffusers.AutoencoderKLQwenImage(), qwen_image.LORA_TARGETS, 64 * 64, 256)
        del qwen_vl
        for size, double, single, heads in (("4B", 5, 20, 24), ("8B", 8, 24, 32)):
            text = Qwen3ForCausalLM(Qwen3Config(**QWEN3[size]))
            transformer = diffusers.Flux2Transformer2DModel(
                num_layers=double, num_single_layers=single, num_attention_heads=heads,
                joint_attention_dim=3 * QWEN3[size]["hidden_size"], guidance_embeds=False)
            label = "4B" if size == "4B" else "9B"
            yield (f"flux2_klein (FLUX.2 [klein] {label})", transformer, text, diffusers.AutoencoderKLFlux2(),
                   flux2_klein.LORA_TARGETS, 64 * 64, 512)
        yield ("z_image (Z-Image(-Turbo), 6B)", diffusers.ZImageTransformer2DModel(), Qwen3ForCausalLM(Qwen3Config(**QWEN3["4B"])),
               diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=16,
                                       down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2),
               z_image.LORA_TARGETS, 64 * 64, 256)


def width(transformer) -> int:
    config = transformer.config
    if "dim" in config:
        return config.dim
    return config.num_attention_heads * config.attention_head_dim


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank")
    parser.add_argument("--train-batch", type=int, default=2, help="trajectories per training forward")
    parser.add_argument("--gpus", type=int, default=8, help="FSDP world size for the sharded full fine-tuning")
    args = parser.parse_args(argv)
    from epgrpo.trainer.fsdp import blocks

    print(f"{'family':40s} {'transformer':>11s} {'text enc':>9s} {'VAE':>6s} {'LoRA':>7s} | GiB per GPU: "
          f"{'LoRA':>6s} {'full, 1 GPU':>11s} {f'full, FSDP x{args.gpus}':>14s}")
    for name, transformer, text, vae, targets, image_tokens, text_tokens in families():
        n_t, n_text, n_vae = count(transformer), count(text), count(vae)
        n_lora = lora_count(transformer, targets, args.rank)
        tokens = image_tokens + text_tokens
        n_blocks = len(blocks(transformer))
        activations = args.train_batch * tokens * width(transformer) * 2 * (n_blocks + 24)
        frozen = 2 * (n_text + n_vae)
        lora = 2 * n_t + frozen + 20 * n_lora + activations
        full_state = (16 + 2 + 4) * n_t
        full = full_state + frozen + activations
        sharded = full_state / args.gpus + frozen + activations
        print(f"{name:40s} {n_t / 1e9:10.2f}B {n_text / 1e9:8.2f}B {n_vae / 1e6:5.0f}M {n_lora / 1e6:6.1f}M | "
              f"{'':12s} {lora / GIB:6.0f} {full / GIB:11.0f} {sharded / GIB:14.0f}")


if __name__ == "__main__":
    main()
