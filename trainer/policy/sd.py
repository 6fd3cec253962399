"""Stable Diffusion 1.x / 2.x through diffusers: DDPO's model, trained with stochastic DDIM.

Loads a ``StableDiffusionPipeline`` from a local directory or a hub id (``local_files_only`` for
directories and when ``HF_HUB_OFFLINE`` is set; no safety checker), keeps the VAE and the CLIP
text encoder frozen, and trains the UNet (LoRA or full, see ``finetune.py``). LoRA adapts DDPO's
modules by default: ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` of every attention layer (self-
and cross-attention). Classifier-free guidance runs both branches in one batch exactly as the
pipeline does ([uncond, cond] with the empty negative prompt, ``u + s (c - u)``), so
``nfe_per_sample`` is 2 with guidance.

The network output at integer timestep t is epsilon or v, whichever the scheduler's
``prediction_type`` says (SD 2.x 768 px models predict v); ``DDIMSampler`` turns it into DDPO's
stochastic DDIM step. Pipelines that ship another scheduler (SD 1.4's PNDM) are sampled with a
``DDIMScheduler`` built from the same config, as DDPO does.

Latents -> images: ``vae.decode(z / scaling_factor)`` (SD's VAE has no shift), then [-1, 1] ->
uint8, the pipeline's own post-processing; the pruner's "vae" decoder does the same for x0-previews.
"""

from __future__ import annotations


import torch

from epgrpo.trainer.policy.base import Conditioning, register_policy
from epgrpo.trainer.policy.finetune import parse_targets, resolve_dtype
from epgrpo.trainer.policy.latent import LatentPipelinePolicy, load_pipeline, pipeline_location
from epgrpo.trainer.samplers import DDIMSampler, Sampler, SamplerOptions

# DDPO's LoRA: the attention processors' q/k/v/out projections of every UNet attention layer
DEFAULT_UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class SDPolicy(LatentPipelinePolicy):
    trained_component = "unet"

    def __init__(self, path: str, *, device: str = "cpu", dtype: str = "auto", guidance_scale: float = 5.0,
                 resolution: int = 0, lora_rank: int = 0, lora_alpha: float = 0.0, lora_targets=None,
                 gradient_checkpointing: bool = False, preview_decoder: str = ""):
        from diffusers import StableDiffusionPipeline

        local = pipeline_location(path, "sd", "CompVis/stable-diffusion-v1-4")
        device = torch.device(device)
        torch_dtype = resolve_dtype(dtype, device)
        pipe = load_pipeline(StableDiffusionPipeline, path, local, torch_dtype, safety_checker=None,
                             requires_safety_checker=False)
        resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        if resolution <= 0 or resolution % pipe.vae_scale_factor:
            raise ValueError(f"model.resolution: expected a multiple of {pipe.vae_scale_factor} "
                             f"(the VAE's downsampling factor), got {resolution}")
        # finetune's default targets are SD3's (attn.add_q_proj, ...): the UNet's are DDPO's
        targets = (parse_targets(lora_targets) if lora_targets else []) or list(DEFAULT_UNET_LORA_TARGETS)
        self.adopt_pipeline(pipe, path, device=device, dtype=torch_dtype, lora_rank=lora_rank,
                            lora_alpha=lora_alpha, lora_targets=targets, gradient_checkpointing=gradient_checkpointing)
        self.guidance_scale = float(guidance_scale)
        self.nfe_per_sample = 2 if self.cfg else 1
        if preview_decoder:
            self.preview_decoder = preview_decoder
        self.resolution = resolution
        side = resolution // pipe.vae_scale_factor
        self.latent_shape = (pipe.unet.config.in_channels, side, side)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encodes each distinct prompt once, then gathers rows; the negative prompt is the
        pipeline's default, the empty prompt."""
        unique, rows = self.distinct(prompts)
        with torch.no_grad():
            embeds, neg_embeds = self.pipe.encode_prompt(unique, self.device, 1, self.cfg, negative_prompt=None)
        cond = {"prompt_embeds": embeds[rows]}
        if self.cfg:
            cond["negative_prompt_embeds"] = neg_embeds[rows]
        return cond

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Epsilon (or v) at integer timestep ``t`` (a scalar tensor, as the pipeline passes it)."""
        timestep = torch.as_tensor(t, device=self.device)
        embeds = cond["prompt_embeds"]
        if self.cfg:  # one batch [uncond, cond], as the pipeline does
            x = torch.cat([x, x])
            embeds = torch.cat([cond["negative_prompt_embeds"], embeds])
        out = self.run_transformer(sample=x, timestep=timestep, encoder_hidden_states=embeds)
        if not self.cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    def make_sampler(self, num_steps: int, options: SamplerOptions) -> Sampler:
        """DDPO's stochastic DDIM on the pipeline's noise schedule (a DDIMScheduler built from its config)."""
        return DDIMSampler.from_scheduler(self.pipe.scheduler, num_steps, options.eta).to(self.device)



@register_policy("sd")
def _sd_factory(path: str = "", device: str = "cpu", dtype: str = "auto", guidance_scale: float = 5.0,
                resolution: int = 0, lora_rank: int = 0, lora_alpha: float = 0.0, lora_targets: str = "",
                gradient_checkpointing: bool = False, preview_decoder: str = ""):
    return SDPolicy(path, device=device, dtype=dtype, guidance_scale=guidance_scale, resolution=resolution,
                    lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
                    gradient_checkpointing=gradient_checkpointing, preview_decoder=preview_decoder)
