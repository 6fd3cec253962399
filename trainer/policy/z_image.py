"""Z-Image and Z-Image-Turbo through diffusers' ``ZImagePipeline``: the real policy.

Loads the pipeline from a local directory or a hub id (``local_files_only`` for directories and
when ``HF_HUB_OFFLINE`` is set), keeps the VAE and the Qwen3 text encoder frozen and trains the
transformer (LoRA or full, ``finetune.py``). Default LoRA targets: the attention projections and
the SwiGLU MLP (w1, w2, w3) of every transformer block (main layers and both refiners): the
linear layers of ``ZImageTransformerBlock`` that the Z-Image LoRA trainers adapt, without the adaLN
modulation.

Latents: ``[B, C, h, w]`` (h = resolution / vae_scale_factor), the pipeline's own; the transformer
takes a list of one-frame latents ``[C, 1, h, w]`` per sample and patchifies them itself, so
``predict`` builds that list (its "packing") and stacks the outputs.

The transformer's output points from the image to the noise reversed and its time runs backwards:
``predict`` passes timestep ``(1000 - t) / 1000`` with t = sigma * 1000 and returns the **negated**
output as the velocity, exactly what ``ZImagePipeline`` hands its Euler scheduler.

Text: the pipeline's ``encode_prompt`` (Qwen3 chat template with thinking on, the second-to-last
hidden state, padding removed: variable length), each distinct prompt once; the trainer keeps them
padded with their lengths and hands the transformer the unpadded list.

Guidance: ``sampling.guidance_scale`` s > 1 is classifier-free guidance against
``model.negative_prompt`` (encoded once), computed as the pipeline does, ``pos + (s - 1)(pos - neg)``
with both branches in one transformer call (``nfe_per_sample`` 2): the pipeline's
``guidance_scale`` is s - 1 (Z-Image's recommended 4 is s = 5). Z-Image-Turbo samples without
guidance (s = 1, the pipeline's 0). The pipeline's optional ``cfg_normalization`` and
``cfg_truncation`` are not reproduced (off by default there).

Sigma grid: the pipeline's, ``torch.linspace(1, 1/N, N)`` through its scheduler (Z-Image: static
shift 3, Turbo the same), then 0; ``sampling.shift`` does not apply.

Latents -> images: ``vae.decode(z / scaling_factor + shift_factor)``, the shared latent decode; the
pruner's "vae" decoder does the same for x0-previews.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from epgrpo.trainer.policy.base import Conditioning, register_policy
from epgrpo.trainer.policy.finetune import resolve_dtype
from epgrpo.trainer.policy.latent import LatentPipelinePolicy, load_pipeline, pipeline_location, text_tokens
from epgrpo.trainer.policy.pipeline_grid import pipeline_sigmas
from epgrpo.trainer.policy.qwen_image import check_resolution
from epgrpo.trainer.samplers import FlowSampler, Sampler, SamplerOptions

MAX_TEXT_TOKENS = 1024
STOCK_TEXT_TOKENS = 512  # the stock pipeline's default max_sequence_length
LORA_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _local_vae_scale_factor(path: str) -> int | None:
    config = Path(path) / "vae" / "config.json"
    if not config.is_file():
        return None
    channels = json.loads(config.read_text()).get("block_out_channels")
    return 2 ** (len(channels) - 1) if channels else None


class ZImagePolicy(LatentPipelinePolicy):

    def __init__(self, path: str, *, device: str = "cpu", dtype: str = "auto", guidance_scale: float = 1.0,
                 negative_prompt: str = "", resolution: int = 0, max_sequence_length: int = 512,
                 lora_rank: int = 0, lora_alpha: float = 0.0, lora_targets=None, gradient_checkpointing: bool = False,
                 preview_decoder: str = "", progress: bool = True):
        from diffusers import ZImagePipeline

        local = pipeline_location(path, "z_image", "Tongyi-MAI/Z-Image-Turbo")
        if not (math.isfinite(guidance_scale) and guidance_scale >= 1.0):
            raise ValueError(f"sampling.guidance_scale: expected a finite number >= 1 for z_image (1 = off; the "
                             f"pipeline's guidance_scale + 1), got {guidance_scale!r}")
        max_sequence_length = text_tokens(max_sequence_length, STOCK_TEXT_TOKENS, MAX_TEXT_TOKENS, "z_image")
        device = torch.device(device)
        torch_dtype = resolve_dtype(dtype, device)
        if resolution and local:
            check_resolution(resolution, _local_vae_scale_factor(path), "Z-Image")
        pipe = load_pipeline(ZImagePipeline, path, local, torch_dtype)
        pipe.set_progress_bar_config(disable=not progress)
        resolution = resolution or 1024  # the pipeline's default height and width
        check_resolution(resolution, pipe.vae_scale_factor, "Z-Image")
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
        self.latent_shape = (pipe.transformer.config.in_channels, side, side)
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def image_seq_len(self) -> int:
        _, h, w = self.latent_shape
        return (h // 2) * (w // 2)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings padded with zeros [B, L, D], lengths [B]) of the pipeline's unpadded list."""
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device, do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_sequence_length)
        lengths = torch.tensor([e.shape[0] for e in embeds], device=self.device)
        return torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True), lengths

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Each distinct prompt encoded once, rows gathered; the negative prompt encoded once and cached."""
        unique, rows = self.distinct(prompts)
        embeds, lengths = self._encode(unique)
        cond = {"prompt_embeds": embeds[rows], "prompt_lengths": lengths[rows]}
        if self.cfg:
            if self._negative is None:
                self._negative = self._encode([self.negative_prompt])
            neg_embeds, neg_lengths = self._negative
            cond.update(negative_prompt_embeds=neg_embeds.expand(len(prompts), -1, -1),
                        negative_prompt_lengths=neg_lengths.expand(len(prompts)))
        return cond

    @staticmethod
    def _unpadded(embeds: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        return [e[:n] for e, n in zip(embeds, lengths.tolist())]

    def pack(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, C, h, w] -> the transformer's input, one [C, 1, h, w] per sample."""
        return list(x.unsqueeze(2).unbind(0))

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        batch = x.shape[0]
        t = (torch.as_tensor(sigma, dtype=torch.float32, device=self.device) * 1000.0).expand(batch)
        timestep = (1000 - t) / 1000  # the pipeline's reversed time
        captions = self._unpadded(cond["prompt_embeds"], cond["prompt_lengths"])
        latents = self.pack(x)
        if self.cfg:  # one call over [positive, negative], as the pipeline makes it
            captions += self._unpadded(cond["negative_prompt_embeds"], cond["negative_prompt_lengths"])
            latents, timestep = latents + latents, timestep.repeat(2)
        out = self.run_transformer(x=latents, t=timestep, cap_feats=captions)
        if self.cfg:
            pos, neg = out[:batch], out[batch:]
            out = pos + (self.guidance_scale - 1.0) * (pos - neg)
        return -out.squeeze(2)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        config = self.pipe.scheduler.config
        mu = calculate_shift(self.image_seq_len, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        return pipeline_sigmas(self.pipe.scheduler, num_steps, mu, get_default_z_image_sigmas(num_steps))

    def make_sampler(self, num_steps: int, options: SamplerOptions) -> Sampler:
        if options.shift != 1.0:
            warnings.warn(f"sampling.shift={options.shift} does not apply to z_image: it samples on the "
                          f"pipeline's shifted grid", stacklevel=2)
        return FlowSampler(self.sigmas(num_steps), options.noise_level).to(self.device)


@register_policy("z_image")
def _z_image_factory(path: str = "", device: str = "cpu", dtype: str = "auto", guidance_scale: float = 1.0,
                     negative_prompt: str = "", resolution: int = 0, max_sequence_length: int = 0,
                     lora_rank: int = 0, lora_alpha: float = 0.0, lora_targets: str = "",
                     gradient_checkpointing: bool = False, preview_decoder: str = "", progress: bool = True):
    return ZImagePolicy(path, device=device, dtype=dtype, guidance_scale=guidance_scale,
                        negative_prompt=negative_prompt, resolution=resolution,
                        max_sequence_length=max_sequence_length, lora_rank=lora_rank, lora_alpha=lora_alpha,
                        lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing,
                        preview_decoder=preview_decoder, progress=progress)
