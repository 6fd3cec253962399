"""FLUX.2 [klein] (4B/9B, base and distilled) through diffusers' ``Flux2KleinPipeline``: the real policy.

Loads the pipeline from a local directory or a hub id (``local_files_only`` for directories and
when ``HF_HUB_OFFLINE`` is set), keeps the VAE and the Qwen3 text encoder frozen and trains the
transformer (LoRA or full, ``finetune.py``). Default LoRA targets: every attention projection of
the double-stream blocks and the fused q/k/v + MLP input projection of the single-stream blocks
(``attn.to_qkv_mlp_proj``): the FLUX.1 recipe's attention projections carried over to FLUX.2's
block layout. A single-stream block's fused output ``attn.to_out`` cannot be named by a suffix
without also naming the double-stream blocks' ``attn.to_out`` list; add it with a full name if needed.

Latents: the trainer's latents are the pipeline's own noise shape, **patchified but unpacked**
``[B, 4 C, h, w]`` (C = the VAE's latent channels, h = resolution / vae_scale_factor / 2), what
``Flux2KleinPipeline.prepare_latents`` draws; ``predict`` packs them into tokens ``[B, h w, 4 C]``
with the pipeline's 4-D position ids (t, h, w, l) and unpacks the velocity.

Text: the pipeline's ``encode_prompt`` (Qwen3 chat template with thinking off, hidden states 9, 18
and 27 stacked, padded to ``model.max_sequence_length``), each distinct prompt once.

Guidance: the base models run true CFG against the empty prompt when ``sampling.guidance_scale`` > 1
(``neg + s (pos - neg)``, two transformer calls as the pipeline makes them, ``nfe_per_sample`` 2);
step-distilled checkpoints (``is_distilled``) run without guidance, and a guidance scale > 1 is
refused for them (the pipeline would silently ignore it).

Sigma grid: the pipeline's, ``linspace(1, 1/N, N)`` shifted at ``compute_empirical_mu(tokens, N)``
(which depends on the step count), then 0; ``sampling.shift`` does not apply.

Latents -> images: ``x * sqrt(bn.running_var + eps) + bn.running_mean``, unpatchify, ``vae.decode``,
[-1, 1] -> uint8; the pruner's decoder for an ``AutoencoderKLFlux2`` does the same for x0-previews.
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
from epgrpo.trainer.policy.qwen_image import check_resolution
from epgrpo.trainer.samplers import FlowSampler, Sampler, SamplerOptions

MAX_TEXT_TOKENS = 512  # the pipeline's tokenizer_max_length
STOCK_TEXT_TOKENS = 512  # the stock pipeline's default max_sequence_length
NEGATIVE_PROMPT = ""  # Flux2KleinPipeline's unconditional branch
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "attn.to_qkv_mlp_proj")


def _local_vae_scale_factor(path: str) -> int | None:
    config = Path(path) / "vae" / "config.json"
    if not config.is_file():
        return None
    channels = json.loads(config.read_text()).get("block_out_channels")
    return 2 ** (len(channels) - 1) if channels else None


class Flux2KleinPolicy(LatentPipelinePolicy):

    def __init__(self, path: str, *, device: str = "cpu", dtype: str = "auto", guidance_scale: float = 1.0,
                 resolution: int = 0, max_sequence_length: int = 512, lora_rank: int = 0, lora_alpha: float = 0.0,
                 lora_targets=None, gradient_checkpointing: bool = False, preview_decoder: str = "",
                 progress: bool = True):
        from diffusers import Flux2KleinPipeline

        local = pipeline_location(path, "flux2_klein", "black-forest-labs/FLUX.2-klein-base-4B")
        if not (math.isfinite(guidance_scale) and guidance_scale >= 1.0):
            raise ValueError(f"sampling.guidance_scale: expected a finite number >= 1 for flux2_klein (1 = off), "
                             f"got {guidance_scale!r}")
        max_sequence_length = text_tokens(max_sequence_length, STOCK_TEXT_TOKENS, MAX_TEXT_TOKENS, "flux2_klein")
        device = torch.device(device)
        torch_dtype = resolve_dtype(dtype, device)
        if resolution and local:
            check_resolution(resolution, _local_vae_scale_factor(path), "FLUX.2")
        pipe = load_pipeline(Flux2KleinPipeline, path, local, torch_dtype)
        if pipe.config.is_distilled and guidance_scale > 1.0:
            raise ValueError(f"sampling.guidance_scale: {path} is step-distilled (is_distilled) and runs without "
                             f"guidance; expected 1, got {guidance_scale}")
        pipe.set_progress_bar_config(disable=not progress)
        resolution = resolution or pipe.default_sample_size * pipe.vae_scale_factor
        check_resolution(resolution, pipe.vae_scale_factor, "FLUX.2")
        self.adopt_pipeline(pipe, path, device=device, dtype=torch_dtype, lora_rank=lora_rank,
                            lora_alpha=lora_alpha, lora_targets=lora_targets or LORA_TARGETS,
                            gradient_checkpointing=gradient_checkpointing)
        self.guidance_scale = float(guidance_scale)
        self.nfe_per_sample = 2 if self.cfg else 1
        self.max_sequence_length = max_sequence_length
        if preview_decoder:
            self.preview_decoder = preview_decoder
        self.resolution = resolution
        side = resolution // pipe.vae_scale_factor // 2
        self.latent_shape = (pipe.transformer.config.in_channels, side, side)
        self._negative: torch.Tensor | None = None

    @property
    def image_seq_len(self) -> int:
        _, h, w = self.latent_shape
        return h * w

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            embeds, _text_ids = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
        return embeds

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Each distinct prompt encoded once (each is tokenized on its own, padded to the same
        length), rows gathered; with CFG the empty prompt is encoded once and cached."""
        unique, rows = self.distinct(prompts)
        cond = {"prompt_embeds": self._encode(unique)[rows]}
        if self.cfg:
            if self._negative is None:
                self._negative = self._encode([NEGATIVE_PROMPT])
            cond["negative_prompt_embeds"] = self._negative.expand(len(prompts), -1, -1)
        return cond

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> tokens [B, h w, C] (``Flux2KleinPipeline._pack_latents``)."""
        return self.pipe._pack_latents(x)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        _, h, w = self.latent_shape
        return tokens.permute(0, 2, 1).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def _velocity(self, hidden, timestep, embeds, img_ids) -> torch.Tensor:
        txt_ids = self.pipe._prepare_text_ids(embeds).to(self.device)
        return self.run_transformer(hidden_states=hidden, timestep=timestep, guidance=None,
                                    encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        batch = x.shape[0]
        # the pipeline passes t / 1000 with t = sigma * 1000 (float32): the same bits as here
        timestep = (torch.as_tensor(sigma, dtype=torch.float32, device=self.device) * 1000.0 / 1000.0).expand(batch)
        hidden = self.pack(x)
        img_ids = self.pipe._prepare_latent_ids(x).to(self.device)
        v = self._velocity(hidden, timestep, cond["prompt_embeds"], img_ids)
        if self.cfg:  # two calls as the pipeline makes them
            v_neg = self._velocity(hidden, timestep, cond["negative_prompt_embeds"], img_ids)
            v = v_neg + self.guidance_scale * (v - v_neg)
        return self.unpack(v)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return pipeline_sigmas(self.pipe.scheduler, num_steps, compute_empirical_mu(self.image_seq_len, num_steps))

    def make_sampler(self, num_steps: int, options: SamplerOptions) -> Sampler:
        if options.shift != 1.0:
            warnings.warn(f"sampling.shift={options.shift} does not apply to flux2_klein: it samples on the "
                          f"pipeline's grid shifted at compute_empirical_mu", stacklevel=2)
        return FlowSampler(self.sigmas(num_steps), options.noise_level).to(self.device)

    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> np.ndarray:
        bn, out = self.vae.bn, []
        with torch.no_grad():
            for chunk in latents.split(batch_size):
                z = chunk.to(self.vae.device, self.vae.dtype)
                mean = bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
                std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(z.device, z.dtype)
                z = self.pipe._unpatchify_latents(z * std + mean)
                image = self.vae.decode(z, return_dict=False)[0].float()
                out.append(((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        return torch.cat(out).numpy()


@register_policy("flux2_klein")
def _flux2_klein_factory(path: str = "", device: str = "cpu", dtype: str = "auto", guidance_scale: float = 1.0,
                         resolution: int = 0, max_sequence_length: int = 0, lora_rank: int = 0,
                         lora_alpha: float = 0.0, lora_targets: str = "", gradient_checkpointing: bool = False,
                         preview_decoder: str = "", progress: bool = True):
    return Flux2KleinPolicy(path, device=device, dtype=dtype, guidance_scale=guidance_scale, resolution=resolution,
                            max_sequence_length=max_sequence_length, lora_rank=lora_rank, lora_alpha=lora_alpha,
                            lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing,
                            preview_decoder=preview_decoder, progress=progress)
