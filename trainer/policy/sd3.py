"""Stable Diffusion 3 / 3.5 through diffusers: the real policy.

Loads a ``StableDiffusion3Pipeline`` from a local directory or a hub id (``local_files_only`` for
directories and when ``HF_HUB_OFFLINE`` is set), keeps the VAE and the text encoders frozen,
and trains the transformer (LoRA or full, see ``finetune.py``). Classifier-free guidance runs both
branches in one batch exactly as the pipeline does ([uncond, cond], ``u + s (c - u)``), so
``nfe_per_sample`` is 2 with guidance. T5 is optional: without it diffusers feeds zeros in its
place (a smaller memory footprint; Flow-GRPO keeps it).

Latents -> images: ``vae.decode(z / scaling_factor + shift_factor)``, then [-1, 1] -> uint8, the
pipeline's own post-processing; the pruner's "vae" decoder does the same for x0-previews.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from epgrpo.trainer.policy.base import Conditioning, register_policy
from epgrpo.trainer.policy.finetune import resolve_dtype
from epgrpo.trainer.policy.latent import LatentPipelinePolicy, load_pipeline, pipeline_location
from epgrpo.trainer.samplers import FlowSampler, Sampler, SamplerOptions


STOCK_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length


def _has_t5(path: str) -> bool:
    """False when a local pipeline directory was saved without its T5 encoder."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return True  # a hub id: let diffusers decide
    entry = json.loads(index.read_text()).get("text_encoder_3")
    return bool(entry and entry[0]) and (Path(path) / "text_encoder_3").is_dir()


class SD3Policy(LatentPipelinePolicy):

    def __init__(self, path: str, *, device: str = "cpu", dtype: str = "auto", guidance_scale: float = 4.5,
                 resolution: int = 0, max_sequence_length: int = 0, text_encoder_3: bool = True,
                 lora_rank: int = 0, lora_alpha: float = 0.0, lora_targets=None, gradient_checkpointing: bool = False,
                 preview_decoder: str = ""):
        from diffusers import StableDiffusion3Pipeline

        local = pipeline_location(path, "sd3", "stabilityai/stable-diffusion-3.5-medium")
        device = torch.device(device)
        torch_dtype = resolve_dtype(dtype, device)
        drop_t5 = {} if (text_encoder_3 and _has_t5(path)) else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = load_pipeline(StableDiffusion3Pipeline, path, local, torch_dtype, **drop_t5)
        self.adopt_pipeline(pipe, path, device=device, dtype=torch_dtype, lora_rank=lora_rank,
                            lora_alpha=lora_alpha, lora_targets=lora_targets,
                            gradient_checkpointing=gradient_checkpointing)
        self.guidance_scale = float(guidance_scale)
        self.nfe_per_sample = 2 if self.cfg else 1
        self.max_sequence_length = max_sequence_length or STOCK_T5_TOKENS
        if preview_decoder:
            self.preview_decoder = preview_decoder
        resolution = resolution or pipe.default_sample_size * pipe.vae_scale_factor
        if resolution % (pipe.vae_scale_factor * pipe.transformer.config.patch_size):
            raise ValueError(f"model.resolution: expected a multiple of "
                             f"{pipe.vae_scale_factor * pipe.transformer.config.patch_size}, got {resolution}")
        self.resolution = resolution
        side = resolution // pipe.vae_scale_factor
        self.latent_shape = (pipe.transformer.config.in_channels, side, side)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encodes each distinct prompt once (text encoders are large), then gathers rows."""
        unique, rows = self.distinct(prompts)
        with torch.no_grad():
            embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
                prompt=unique, prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=self.cfg, negative_prompt="",
                max_sequence_length=self.max_sequence_length,
            )
        cond = {"prompt_embeds": embeds[rows], "pooled_projections": pooled[rows]}
        if self.cfg:
            cond.update(negative_prompt_embeds=neg_embeds[rows], negative_pooled_projections=neg_pooled[rows])
        return cond

    def sigmas(self, num_steps: int, shift: float = 0.0) -> torch.Tensor:
        """The grid StableDiffusion3Pipeline samples on with its default arguments (num_steps + 1 values
        from 1 to 0: its scheduler's ``set_timesteps(num_steps)``, the shift from the scheduler config),
        computed on a copy so the pipeline's own scheduler state is untouched; ``shift`` > 0 replaces
        the config's shift (sampling.shift)."""
        config = dict(self.pipe.scheduler.config)
        if shift:
            config["shift"] = shift
        scheduler = type(self.pipe.scheduler).from_config(config)
        scheduler.set_timesteps(num_steps)
        return scheduler.sigmas.float()

    def make_sampler(self, num_steps: int, options: SamplerOptions) -> Sampler:
        """Flow-GRPO's SDE on the pipeline's own grid (Flow-GRPO trains on it too)."""
        return FlowSampler(self.sigmas(num_steps, options.shift), options.noise_level).to(self.device)

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        timestep = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).expand(x.shape[0]) * 1000.0
        embeds, pooled = cond["prompt_embeds"], cond["pooled_projections"]
        if self.cfg:  # one batch [uncond, cond], as the pipeline does
            x, timestep = torch.cat([x, x]), torch.cat([timestep, timestep])
            embeds = torch.cat([cond["negative_prompt_embeds"], embeds])
            pooled = torch.cat([cond["negative_pooled_projections"], pooled])
        v = self.run_transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled)
        if not self.cfg:
            return v
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + self.guidance_scale * (v_cond - v_uncond)



@register_policy("sd3")
def _sd3_factory(path: str = "", device: str = "cpu", dtype: str = "auto", guidance_scale: float = 4.5,
                 resolution: int = 0, max_sequence_length: int = 0, text_encoder_3: bool = True,
                 lora_rank: int = 0, lora_alpha: float = 0.0, lora_targets: str = "",
                 gradient_checkpointing: bool = False, preview_decoder: str = ""):
    return SD3Policy(path, device=device, dtype=dtype, guidance_scale=guidance_scale, resolution=resolution,
                     max_sequence_length=max_sequence_length, text_encoder_3=text_encoder_3, lora_rank=lora_rank,
                     lora_alpha=lora_alpha, lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing,
                     preview_decoder=preview_decoder)
