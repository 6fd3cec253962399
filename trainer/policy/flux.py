"""FLUX.1 (dev, schnell and fine-tunes) through diffusers: the real policy.

Loads a ``FluxPipeline`` from a local directory or a hub id (``local_files_only`` for directories
and when ``HF_HUB_OFFLINE`` is set), keeps the VAE and both text encoders (CLIP for the pooled
projection, T5 for the token embeddings) frozen, and trains the transformer (LoRA or full, see
``finetune.py``). The default LoRA targets (``finetune.DEFAULT_LORA_TARGETS``, Flow-GRPO's attention
projections) cover every attention projection of the double-stream blocks and q/k/v of the
single-stream blocks, which have no ``to_out`` (their attention output is fused with the MLP in
``proj_out``). ``model.lora_targets`` can add ``proj_mlp`` and the MLPs (``ff.net.0.proj``, ...);
note that a bare ``proj_out`` suffix would also adapt the transformer's final output layer.

The trainer's latents stay **unpacked** ``[B, C, h, w]`` (C = in_channels / 4, h = w =
resolution / vae_scale_factor), so the per-trajectory noise of the rollout, the x0-previews and
the pruner's generic VAE decoder work unchanged. ``predict`` packs them into FLUX's 2x2 patch tokens
(``FluxPipeline._pack_latents``), calls the transformer exactly as ``FluxPipeline.__call__`` does
(timestep = sigma, image/text position ids, CLIP pooled projection, T5 hidden states, and the
distilled guidance embedding ``sampling.guidance_scale`` when the model has one) and unpacks the
velocity. The Euler/SDE step is elementwise, so stepping unpacked latents is the same as stepping
packed ones.

Guidance: FLUX.1-dev is guidance-distilled, one transformer call per sample (``nfe_per_sample``
1). ``model.true_cfg_scale`` > 1 adds the pipeline's true classifier-free guidance with an empty
negative prompt, ``neg + s (pos - neg)`` (both branches in one batch; ``nfe_per_sample`` 2).

Sigma grid: the pipeline's own, ``linspace(1, 1/N, N)`` shifted by the resolution-dependent
``mu`` (``calculate_shift`` of the packed sequence length) through the scheduler, then 0; so
``sampling.shift`` does not apply.

Latents -> images: ``vae.decode(z / scaling_factor + shift_factor)``, then [-1, 1] -> uint8, what
the pipeline does after unpacking; the pruner's "vae" decoder does the same for x0-previews.
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
from epgrpo.trainer.policy.latent import LatentPipelinePolicy, load_pipeline, pipeline_location
from epgrpo.trainer.samplers import FlowSampler, Sampler, SamplerOptions

MAX_T5_TOKENS = 512  # FluxPipeline's default max_sequence_length, and the most it takes
NEGATIVE_PROMPT = ""  # true CFG's unconditional branch (FluxPipeline's negative_prompt="")


def _local_vae_scale_factor(path: str) -> int | None:
    """FluxPipeline's vae_scale_factor from a local directory's vae/config.json (None without one)."""
    config = Path(path) / "vae" / "config.json"
    if not config.is_file():
        return None
    channels = json.loads(config.read_text()).get("block_out_channels")
    return 2 ** (len(channels) - 1) if channels else None


def _check_resolution(resolution: int, vae_scale_factor: int | None) -> None:
    multiple = 2 * (vae_scale_factor or 1)  # 2x2 latent patches per token
    if vae_scale_factor and resolution % multiple:
        raise ValueError(f"model.resolution: expected a multiple of {multiple} (the VAE's factor "
                         f"{vae_scale_factor} x FLUX's 2x2 latent packing), got {resolution}")


class FluxPolicy(LatentPipelinePolicy):

    def __init__(self, path: str, *, device: str = "cpu", dtype: str = "auto", guidance_scale: float = 3.5,
                 true_cfg_scale: float = 1.0, resolution: int = 0, max_sequence_length: int = 512,
                 lora_rank: int = 0, lora_alpha: float = 0.0, lora_targets=None, gradient_checkpointing: bool = False,
                 preview_decoder: str = "", progress: bool = True):
        from diffusers import FluxPipeline

        local = pipeline_location(path, "flux", "black-forest-labs/FLUX.1-dev")
        if not (math.isfinite(true_cfg_scale) and true_cfg_scale >= 1.0):
            raise ValueError(f"model.true_cfg_scale: expected a finite number >= 1 (1 = off), got {true_cfg_scale!r}")
        max_sequence_length = max_sequence_length or MAX_T5_TOKENS  # 0: the stock pipeline's
        if not 1 <= max_sequence_length <= MAX_T5_TOKENS:
            raise ValueError(f"model.max_sequence_length: expected 1..{MAX_T5_TOKENS} for flux, got {max_sequence_length}")
        device = torch.device(device)
        torch_dtype = resolve_dtype(dtype, device)
        if resolution and local:  # before minutes of loading when the VAE's config is at hand
            _check_resolution(resolution, _local_vae_scale_factor(path))
        pipe = load_pipeline(FluxPipeline, path, local, torch_dtype)
        pipe.set_progress_bar_config(disable=not progress)
        resolution = resolution or pipe.default_sample_size * pipe.vae_scale_factor  # the pipeline's default
        _check_resolution(resolution, pipe.vae_scale_factor)
        self.adopt_pipeline(pipe, path, device=device, dtype=torch_dtype, lora_rank=lora_rank,
                            lora_alpha=lora_alpha, lora_targets=lora_targets,
                            gradient_checkpointing=gradient_checkpointing)
        self.guidance_scale = float(guidance_scale)
        self.guidance_embeds = bool(pipe.transformer.config.guidance_embeds)
        self.true_cfg_scale = float(true_cfg_scale)
        self.nfe_per_sample = 2 if self.cfg else 1
        self.max_sequence_length = max_sequence_length
        if preview_decoder:
            self.preview_decoder = preview_decoder
        self.resolution = resolution
        side = resolution // pipe.vae_scale_factor
        self.latent_shape = (pipe.transformer.config.in_channels // 4, side, side)
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def cfg(self) -> bool:
        """True classifier-free guidance (two branches); FLUX.1-dev's distilled guidance is not this."""
        return self.true_cfg_scale > 1.0

    @property
    def image_seq_len(self) -> int:
        """Packed image tokens per sample (what the pipeline's resolution-dependent shift uses)."""
        _, h, w = self.latent_shape
        return (h // 2) * (w // 2)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            embeds, pooled, _text_ids = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
        return embeds, pooled

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encodes each distinct prompt once (T5-XXL is large), then gathers rows. With true CFG the
        negative prompt is encoded once, on its own as the pipeline does, and cached."""
        unique, rows = self.distinct(prompts)
        embeds, pooled = self._encode(unique)
        cond = {"prompt_embeds": embeds[rows], "pooled_projections": pooled[rows]}
        if self.cfg:
            if self._negative is None:
                self._negative = self._encode([NEGATIVE_PROMPT])
            neg_embeds, neg_pooled = self._negative
            cond.update(negative_prompt_embeds=neg_embeds.expand(len(prompts), -1, -1),
                        negative_pooled_projections=neg_pooled.expand(len(prompts), -1))
        return cond

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> FLUX's tokens [B, h/2 * w/2, 4C]."""
        b, c, h, w = x.shape
        return self.pipe._pack_latents(x, b, c, h, w)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """FLUX's tokens -> [B, C, h, w] (the pipeline's own unpacking, given the pixel size)."""
        return self.pipe._unpack_latents(tokens, self.resolution, self.resolution, self.pipe.vae_scale_factor)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        batch, _, h, w = x.shape
        # FluxPipeline passes t / 1000 with t = sigma * 1000 (float32): the same bits as here
        timestep = (torch.as_tensor(sigma, dtype=torch.float32, device=self.device) * 1000.0 / 1000.0).expand(batch)
        hidden = self.pack(x)
        embeds, pooled = cond["prompt_embeds"], cond["pooled_projections"]
        if self.cfg:  # one batch [negative, positive]; the pipeline makes the same two calls one after the other
            hidden, timestep = torch.cat([hidden, hidden]), torch.cat([timestep, timestep])
            embeds = torch.cat([cond["negative_prompt_embeds"], embeds])
            pooled = torch.cat([cond["negative_pooled_projections"], pooled])
        rows = hidden.shape[0]
        guidance = (torch.full([rows], self.guidance_scale, dtype=torch.float32, device=self.device)
                    if self.guidance_embeds else None)
        img_ids = self.pipe._prepare_latent_image_ids(rows, h // 2, w // 2, self.device, embeds.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=self.device, dtype=embeds.dtype)  # as encode_prompt returns
        v = self.run_transformer(hidden_states=hidden, timestep=timestep, guidance=guidance,
                                 pooled_projections=pooled, encoder_hidden_states=embeds,
                                 txt_ids=txt_ids, img_ids=img_ids)
        if self.cfg:
            v_neg, v_pos = v.chunk(2)
            v = v_neg + self.true_cfg_scale * (v_pos - v_neg)
        return self.unpack(v)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The grid FluxPipeline samples on (num_steps + 1 values from 1 to 0), computed on a copy
        of its scheduler so the pipeline's own scheduler state is untouched."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.pipe.scheduler.config
        scheduler = type(self.pipe.scheduler).from_config(config)
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift(self.image_seq_len, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        if sigmas is None:
            scheduler.set_timesteps(num_steps, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        return scheduler.sigmas.float()

    def make_sampler(self, num_steps: int, options: SamplerOptions) -> Sampler:
        if options.shift:
            warnings.warn(f"sampling.shift={options.shift} does not apply to flux: it samples on the pipeline's "
                          f"resolution-dependent shifted grid", stacklevel=2)
        return FlowSampler(self.sigmas(num_steps), options.noise_level).to(self.device)



@register_policy("flux")
def _flux_factory(path: str = "", device: str = "cpu", dtype: str = "auto", guidance_scale: float = 3.5,
                  true_cfg_scale: float = 1.0, resolution: int = 0, max_sequence_length: int = 0,
                  lora_rank: int = 0, lora_alpha: float = 0.0, lora_targets: str = "",
                  gradient_checkpointing: bool = False, preview_decoder: str = "", progress: bool = True):
    return FluxPolicy(path, device=device, dtype=dtype, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
                      resolution=resolution, max_sequence_length=max_sequence_length, lora_rank=lora_rank,
                      lora_alpha=lora_alpha, lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing,
                      preview_decoder=preview_decoder, progress=progress)
