"""Qwen-Image (and Qwen-Image-2512) through diffusers' ``QwenImagePipeline``: the real policy.

Loads the pipeline from a local directory or a hub id (``local_files_only`` for directories and
when ``HF_HUB_OFFLINE`` is set), keeps the VAE and the Qwen2.5-VL text encoder frozen and trains
the transformer (LoRA or full, ``finetune.py``). Default LoRA targets: the attention projections of
both streams and both streams' MLPs, the list Flow-GRPO's Qwen-Image recipe (verl's flowgrpo
example) adapts.

Latents stay **unpacked** ``[B, z_dim, h, w]`` in the trainer (h = resolution / vae_scale_factor),
so the rollout's per-trajectory noise and the x0-previews work unchanged; ``predict`` packs them
into the pipeline's 2x2 patch tokens (``QwenImagePipeline._pack_latents``), passes ``img_shapes``
and timestep = sigma (the pipeline's t / 1000) and unpacks the velocity.

Text: the pipeline's own ``encode_prompt`` (the chat template, Qwen2.5-VL's last hidden state with
the template's first 34 tokens dropped, variable length with a mask), each distinct prompt once.

Guidance: ``sampling.guidance_scale`` > 1 is the pipeline's true CFG (its ``true_cfg_scale``)
against ``model.negative_prompt`` (encoded once): ``neg + s (pos - neg)`` rescaled per token to the
conditional prediction's norm, two transformer calls as the pipeline makes them (``nfe_per_sample``
2). Qwen-Image has no guidance embedding.

Sigma grid: the pipeline's, ``linspace(1, 1/N, N)`` shifted at ``mu`` = ``calculate_shift`` of
the packed sequence length, then 0; ``sampling.shift`` does not apply.

Latents -> images: ``x / (1 / latents_std) + latents_mean`` per channel, decoded as a one-frame
video and the frame taken, then [-1, 1] -> uint8; the pruner's decoder for an
``AutoencoderKLQwenImage`` (``services/pruner/vae_families.py``) does the same for x0-previews.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from epgrpo.trainer.policy.base import Conditioning, register_policy
from epgrpo.trainer.policy.finetune import resolve_dtype
from epgrpo.trainer.policy.latent import LatentPipelinePolicy, load_pipeline, pipeline_location, text_tokens
from epgrpo.trainer.policy.pipeline_grid import pipeline_sigmas
from epgrpo.trainer.samplers import FlowSampler, Sampler, SamplerOptions

MAX_TEXT_TOKENS = 1024  # QwenImagePipeline refuses a longer max_sequence_length
STOCK_TEXT_TOKENS = 512  # the stock pipeline's default max_sequence_length
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                "txt_mlp.net.0.proj", "txt_mlp.net.2")


def _local_vae_scale_factor(path: str) -> int | None:
    """QwenImagePipeline's vae_scale_factor (2 ** len(temperal_downsample)) from vae/config.json."""
    config = Path(path) / "vae" / "config.json"
    if not config.is_file():
        return None
    downsample = json.loads(config.read_text()).get("temperal_downsample")
    return 2 ** len(downsample) if downsample is not None else None


def check_resolution(resolution: int, vae_scale_factor: int | None, family: str) -> None:
    multiple = 2 * (vae_scale_factor or 1)  # 2x2 latent patches per token
    if vae_scale_factor and resolution % multiple:
        raise ValueError(f"model.resolution: expected a multiple of {multiple} (the VAE's factor "
                         f"{vae_scale_factor} x {family}'s 2x2 latent packing), got {resolution}")


class QwenImagePolicy(LatentPipelinePolicy):

    def __init__(self, path: str, *, device: str = "cpu", dtype: str = "auto", guidance_scale: float = 4.0,
                 negative_prompt: str = "", resolution: int = 0, max_sequence_length: int = 512,
                 lora_rank: int = 0, lora_alpha: float = 0.0, lora_targets=None, gradient_checkpointing: bool = False,
                 preview_decoder: str = "", progress: bool = True):
        from diffusers import QwenImagePipeline

        local = pipeline_location(path, "qwen_image", "Qwen/Qwen-Image")
        if not (math.isfinite(guidance_scale) and guidance_scale >= 1.0):
            raise ValueError(f"sampling.guidance_scale: expected a finite number >= 1 for qwen_image (its true CFG "
                             f"scale; 1 = off), got {guidance_scale!r}")
        max_sequence_length = text_tokens(max_sequence_length, STOCK_TEXT_TOKENS, MAX_TEXT_TOKENS, "qwen_image")
        device = torch.device(device)
        torch_dtype = resolve_dtype(dtype, device)
        if resolution and local:  # before minutes of loading when the VAE's config is at hand
            check_resolution(resolution, _local_vae_scale_factor(path), "Qwen-Image")
        pipe = load_pipeline(QwenImagePipeline, path, local, torch_dtype)
        pipe.set_progress_bar_config(disable=not progress)
        resolution = resolution or pipe.default_sample_size * pipe.vae_scale_factor
        check_resolution(resolution, pipe.vae_scale_factor, "Qwen-Image")
        self.adopt_pipeline(pipe, path, device=device, dtype=torch_dtype, lora_rank=lora_rank,
                            lora_alpha=lora_alpha, lora_targets=lora_targets or LORA_TARGETS,
                            gradient_checkpointing=gradient_checkpointing)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.nfe_per_sample = 2 if self.cfg else 1
        self.max_sequence_length = max_sequence_length
        if preview_decoder:
            self.preview_decoder = preview_decoder
        self.resolution = resolution
        side = resolution // pipe.vae_scale_factor
        self.latent_shape = (pipe.transformer.config.in_channels // 4, side, side)
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def image_seq_len(self) -> int:
        _, h, w = self.latent_shape
        return (h // 2) * (w // 2)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [B, L, D], mask [B, L]); the pipeline returns no mask when nothing is padded."""
        with torch.no_grad():
            embeds, mask = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                                   max_sequence_length=self.max_sequence_length)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Each distinct prompt encoded once (Qwen2.5-VL is 7B), rows gathered; the negative prompt
        is encoded once on its own, as the pipeline does, and cached."""
        unique, rows = self.distinct(prompts)
        embeds, mask = self._encode(unique)
        cond = {"prompt_embeds": embeds[rows], "prompt_embeds_mask": mask[rows]}
        if self.cfg:
            if self._negative is None:
                self._negative = self._encode([self.negative_prompt])
            neg_embeds, neg_mask = self._negative
            cond.update(negative_prompt_embeds=neg_embeds.expand(len(prompts), -1, -1),
                        negative_prompt_embeds_mask=neg_mask.expand(len(prompts), -1))
        return cond

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> the pipeline's tokens [B, h/2 * w/2, 4C]."""
        b, c, h, w = x.shape
        return self.pipe._pack_latents(x, b, c, h, w)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pipeline's tokens -> [B, C, h, w] (its unpacking gives [B, C, 1, h, w])."""
        return self.pipe._unpack_latents(tokens, self.resolution, self.resolution, self.pipe.vae_scale_factor)[:, :, 0]

    def _velocity(self, hidden, timestep, embeds, mask, img_shapes) -> torch.Tensor:
        mask = None if bool(mask.all()) else mask  # what encode_prompt hands the pipeline when nothing is padded
        return self.run_transformer(hidden_states=hidden, timestep=timestep, encoder_hidden_states=embeds,
                                    encoder_hidden_states_mask=mask, img_shapes=img_shapes)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        batch, _, h, w = x.shape
        # the pipeline passes t / 1000 with t = sigma * 1000 (float32): the same bits as here
        timestep = (torch.as_tensor(sigma, dtype=torch.float32, device=self.device) * 1000.0 / 1000.0).expand(batch)
        hidden = self.pack(x)
        img_shapes = [[(1, h // 2, w // 2)]] * batch
        v = self._velocity(hidden, timestep, cond["prompt_embeds"], cond["prompt_embeds_mask"], img_shapes)
        if self.cfg:  # two calls as the pipeline makes them (the branches' text lengths differ)
            v_neg = self._velocity(hidden, timestep, cond["negative_prompt_embeds"],
                                   cond["negative_prompt_embeds_mask"], img_shapes)
            combined = v_neg + self.guidance_scale * (v - v_neg)
            v = combined * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
        return self.unpack(v)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        config = self.pipe.scheduler.config
        mu = calculate_shift(self.image_seq_len, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        return pipeline_sigmas(self.pipe.scheduler, num_steps, mu)

    def make_sampler(self, num_steps: int, options: SamplerOptions) -> Sampler:
        if options.shift != 1.0:
            warnings.warn(f"sampling.shift={options.shift} does not apply to qwen_image: it samples on the "
                          f"pipeline's resolution-dependent shifted grid", stacklevel=2)
        return FlowSampler(self.sigmas(num_steps), options.noise_level).to(self.device)

    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> np.ndarray:
        config, out = self.vae.config, []
        with torch.no_grad():
            for chunk in latents.split(batch_size):
                z = chunk.to(self.vae.device, self.vae.dtype)
                mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(z.device, z.dtype)
                inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, -1, 1, 1).to(z.device, z.dtype)
                image = self.vae.decode((z / inverse_std + mean).unsqueeze(2), return_dict=False)[0][:, :, 0].float()
                out.append(((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        return torch.cat(out).numpy()


@register_policy("qwen_image")
def _qwen_image_factory(path: str = "", device: str = "cpu", dtype: str = "auto", guidance_scale: float = 4.0,
                        negative_prompt: str = "", resolution: int = 0, max_sequence_length: int = 0,
                        lora_rank: int = 0, lora_alpha: float = 0.0, lora_targets: str = "",
                        gradient_checkpointing: bool = False, preview_decoder: str = "", progress: bool = True):
    return QwenImagePolicy(path, device=device, dtype=dtype, guidance_scale=guidance_scale,
                           negative_prompt=negative_prompt, resolution=resolution,
                           max_sequence_length=max_sequence_length, lora_rank=lora_rank, lora_alpha=lora_alpha,
                           lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing,
                           preview_decoder=preview_decoder, progress=progress)
