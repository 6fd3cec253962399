"""Wan 2.x text-to-video (Wan 2.1 T2V 1.3B/14B, Wan 2.2 TI2V-5B) through diffusers: the real policy.

Loads a ``WanPipeline`` from a local directory or a hub id (``local_files_only`` for directories
and when ``HF_HUB_OFFLINE`` is set), keeps the VAE and the UMT5 text encoder frozen, and trains the
transformer (LoRA or full, see ``finetune.py``; FSDP shards its ``blocks``, ``fsdp.py``).

Latents keep the VAE's layout ``[C, F', h, w]`` (F' = (F - 1) / 4 + 1 latent frames, h = w =
resolution / 8 for Wan 2.1) through the rollout, the pruner protocol and checkpoints; the
transformer patchifies them itself.

Sigma grid: the pipeline's own scheduler (Wan 2.1 ships UniPC with flow sigmas and ``flow_shift``)
is set on a copy for ``sampling.num_steps``: its sigmas (the first is 1 - 1e-6) are the grid of our
own per-trajectory SDE/ODE steps, and its integer timesteps (sigma x 1000, truncated) are what the
transformer is conditioned on, as in the pipeline. UniPC itself is a multistep solver with history,
so its ``step`` cannot serve trajectories that are pruned, regrouped into waves and re-scored by
the GRPO update; we step each trajectory with the Flow-GRPO SDE (``samplers/flow_sde.py``) on that
grid, as flow_grpo's Wan trainer does (guard: the grid's second sigma).

Guidance: true classifier-free guidance with the negative prompt (the pipeline's default, ""),
``u + s (c - u)`` at ``sampling.guidance_scale`` (Wan 2.1 recommends 5; off at <= 1), both branches
in one batch (``nfe_per_sample`` 2). Text: UMT5 embeddings as ``WanPipeline.encode_prompt`` makes
them (zeroed past the real tokens, padded to ``model.max_sequence_length`` tokens), each distinct
prompt encoded once, the negative prompt once per run. The transformer cross-attends to the padding
too, so the padded length changes the video: ``model.max_sequence_length`` defaults to WanPipeline's
512 (what Wan was trained with).

Latents -> video: ``vae.decode(z * latents_std + latents_mean)`` per channel, then [-1, 1] ->
uint8 ``[B, T, H, W, C]``, the pipeline's post-processing; the pruner's VAE decoder does the same
for x0-previews of any number of latent frames (``services/pruner/decode_wan.py``).

Wan 2.2: TI2V-5B (48 latent channels, spatial factor 16, per-token timesteps: ``expand_timesteps``)
samples text-to-video with the same code. A14B's two experts (``transformer`` at timesteps >=
``boundary_ratio`` x 1000, ``transformer_2`` below, as the pipeline switches them) are one trained
network here (``WanExperts``): each step's batch shares one timestep, so one expert runs per call;
LoRA adapts both (disabled together for the reference) and exports ``lora/`` and ``lora_2/`` (the
latter for ``load_lora_weights(..., load_into_transformer_2=True)``). Full fine-tuning of the two
14B experts (and so FSDP, which shards one transformer's blocks) is refused: LoRA only.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from epgrpo.trainer.policy.base import Conditioning, register_policy
from epgrpo.trainer.policy.finetune import parse_targets, resolve_dtype
from epgrpo.trainer.policy.latent import LatentPipelinePolicy, load_pipeline, pipeline_location, text_tokens
from epgrpo.trainer.samplers import FlowSampler, Sampler, SamplerOptions

NEGATIVE_PROMPT = ""  # WanPipeline's default (negative_prompt=None is "")
MAX_UMT5_TOKENS = 512  # WanPipeline pads to 512
STOCK_TEXT_TOKENS = 512  # the stock pipeline's default max_sequence_length
DEFAULT_RESOLUTION = 480  # the pipeline's default height (480p); our videos are square
DEFAULT_NUM_FRAMES = 81  # the pipeline's default
# flow_grpo's Wan targets (suffixes): self- and cross-attention q/k/v/out of every block, plus the
# image-conditioning projections where a checkpoint has them (I2V); none of the FFN
WAN_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class PipelineTimestepSampler(FlowSampler):
    """The Flow-GRPO SDE on a pipeline's sigma grid whose network is conditioned on the pipeline's
    own timesteps (Wan: UniPC's sigma x 1000 truncated to integers), not on sigma."""

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor, noise_level: float = 0.7,
                 sigma_guard: float | None = None):
        super().__init__(sigmas, noise_level, sigma_guard)
        if timesteps.shape != (self.num_steps,):
            raise ValueError(f"timesteps: expected {self.num_steps} values, got shape {list(timesteps.shape)}")
        self.timesteps = timesteps

    def timestep(self, i: int) -> torch.Tensor:
        return self.timesteps[i]

    def to(self, device) -> "PipelineTimestepSampler":
        return PipelineTimestepSampler(self.sigmas.to(device), self.timesteps.to(device), self.noise_level,
                                       self.sigma_guard)


class WanExperts(torch.nn.Module):
    """Wan 2.2 A14B's two experts as one network: ``high`` (the pipeline's ``transformer``) at
    timesteps >= ``boundary``, ``low`` (``transformer_2``) below, the pipeline's switch. What
    ``FineTunedPolicy`` calls on its transformer (LoRA, gradient checkpointing) reaches both."""

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module, boundary: float):
        super().__init__()
        self.high, self.low, self.boundary = high, low, float(boundary)

    def forward(self, *, timestep: torch.Tensor, **inputs):
        # every row of a call is at the same step (the rollout and the update batch by step)
        expert = self.high if float(timestep.flatten()[0]) >= self.boundary else self.low
        return expert(timestep=timestep, **inputs)

    def add_adapter(self, config) -> None:
        self.high.add_adapter(config)
        self.low.add_adapter(config)

    def disable_adapters(self) -> None:
        self.high.disable_adapters()
        self.low.disable_adapters()

    def enable_adapters(self) -> None:
        self.high.enable_adapters()
        self.low.enable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        self.high.enable_gradient_checkpointing()
        self.low.enable_gradient_checkpointing()


def _check_experts(transformer_2, boundary_ratio, lora_rank: int) -> bool:
    """Whether the pipeline has two experts; raises for what the adapter cannot train."""
    if not transformer_2 and boundary_ratio is None:
        return False
    if not (transformer_2 and boundary_ratio is not None):
        raise ValueError(f"model.path: a Wan pipeline with transformer_2 {'set' if transformer_2 else 'unset'} and "
                         f"boundary_ratio {boundary_ratio}: two experts need both")
    if lora_rank <= 0:
        raise ValueError("model.lora_rank: Wan 2.2 A14B (two 14B experts) trains with LoRA only (full fine-tuning "
                         "and FSDP shard one transformer); set model.lora_rank > 0")
    return True


def _check_size(resolution: int, num_frames: int, spatial: int = 8, patch: int = 2, temporal: int = 4) -> None:
    if resolution <= 0 or resolution % (spatial * patch):
        raise ValueError(f"model.resolution: expected a positive multiple of {spatial * patch} (the VAE's factor "
                         f"{spatial} x the transformer's {patch}x{patch} patches), got {resolution}")
    if num_frames <= 0 or (num_frames - 1) % temporal:
        raise ValueError(f"model.num_frames: expected 1 + {temporal}k frames (the VAE's temporal factor {temporal}: "
                         f"1, 5, ..., 81), got {num_frames}")


def _check_local(path: str, lora_rank: int) -> None:
    """What a local pipeline directory says, before minutes of loading."""
    index = Path(path) / "model_index.json"
    if index.is_file():
        config = json.loads(index.read_text())
        _check_experts((config.get("transformer_2") or [None])[0], config.get("boundary_ratio"), lora_rank)


class WanPolicy(LatentPipelinePolicy):

    def __init__(self, path: str, *, device: str = "cpu", dtype: str = "auto", guidance_scale: float = 5.0,
                 resolution: int = 0, num_frames: int = 0, max_sequence_length: int = MAX_UMT5_TOKENS,
                 lora_rank: int = 0, lora_alpha: float = 0.0, lora_targets=None, gradient_checkpointing: bool = False,
                 preview_decoder: str = "", progress: bool = True):
        from diffusers import WanPipeline

        local = pipeline_location(path, "wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
        max_sequence_length = text_tokens(max_sequence_length, STOCK_TEXT_TOKENS, MAX_UMT5_TOKENS, "wan")
        resolution, num_frames = resolution or DEFAULT_RESOLUTION, num_frames or DEFAULT_NUM_FRAMES
        _check_size(resolution, num_frames)  # Wan 2.1's factors; checked again with the loaded VAE's
        if local:
            _check_local(path, lora_rank)
        device = torch.device(device)
        torch_dtype = resolve_dtype(dtype, device)
        # Wan's VAE runs in fp32 (as its reference code and flow_grpo do): loaded so, not cast up from bf16
        pipe = load_pipeline(WanPipeline, path, local, {"default": torch_dtype, "vae": torch.float32})
        boundary_ratio = pipe.config.boundary_ratio
        self.two_experts = _check_experts(pipe.transformer_2, boundary_ratio, lora_rank)
        pipe.set_progress_bar_config(disable=not progress)
        vae, transformer = pipe.vae, pipe.transformer
        if transformer.config.in_channels != vae.config.z_dim:
            raise ValueError(f"model.path: the transformer takes {transformer.config.in_channels} channels, the VAE "
                             f"makes {vae.config.z_dim}: an image-to-video checkpoint? wan is text-to-video")
        _check_size(resolution, num_frames, pipe.vae_scale_factor_spatial, transformer.config.patch_size[1],
                    pipe.vae_scale_factor_temporal)
        targets = (parse_targets(lora_targets) if lora_targets else []) or list(WAN_LORA_TARGETS)
        finetuning = dict(device=device, dtype=torch_dtype, lora_rank=lora_rank, lora_alpha=lora_alpha,
                          lora_targets=targets, gradient_checkpointing=gradient_checkpointing)
        if self.two_experts:  # the pipeline's switch: transformer at t >= boundary_ratio x num_train_timesteps
            boundary = boundary_ratio * pipe.scheduler.config.num_train_timesteps
            self.adopt_experts(pipe, path, WanExperts(transformer, pipe.transformer_2, boundary), **finetuning)
        else:
            self.adopt_pipeline(pipe, path, **finetuning)
        self.guidance_scale = float(guidance_scale)
        self.nfe_per_sample = 2 if self.cfg else 1
        self.max_sequence_length = max_sequence_length
        if preview_decoder:
            self.preview_decoder = preview_decoder
        self.resolution, self.num_frames = resolution, num_frames
        side = resolution // pipe.vae_scale_factor_spatial
        latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        self.latent_shape = (vae.config.z_dim, latent_frames, side, side)
        self.expand_timesteps = bool(pipe.config.expand_timesteps)
        self._negative: torch.Tensor | None = None

    def adopt_experts(self, pipe, path: str, experts: WanExperts, **finetuning) -> None:
        """``adopt_pipeline`` with both experts as the trained network (LoRA on each)."""
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module) and module not in (experts.high, experts.low):
                module.to(finetuning["device"]).requires_grad_(False).eval()
        self.setup_finetuning(experts, **finetuning)
        self.pipe, self.vae, self.path = pipe, pipe.vae, path

    def export(self, out_dir: Path) -> list[Path]:
        """One transformer: ``LatentPipelinePolicy.export``. Two experts: ``lora/`` for
        ``load_lora_weights(dir)`` and ``lora_2/`` for ``load_lora_weights(dir, load_into_transformer_2=True)``."""
        if not self.two_experts:
            return super().export(out_dir)
        from peft.utils import get_peft_model_state_dict

        targets = []
        for expert, folder in ((self.transformer.high, "lora"), (self.transformer.low, "lora_2")):
            layers = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(expert).items()}
            targets.append(Path(out_dir) / folder)
            type(self.pipe).save_lora_weights(targets[-1], transformer_lora_layers=layers,
                                              transformer_lora_adapter_metadata=self.lora_config.to_dict())
        return targets

    @property
    def tokens_per_sample(self) -> int:
        """Transformer tokens of one video (what the per-token timesteps of Wan 2.2 TI2V cover)."""
        _, frames, h, w = self.latent_shape
        pt, ph, pw = self.pipe.transformer.config.patch_size
        return (frames // pt) * (h // ph) * (w // pw)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_sequence_length, device=self.device)
        return embeds

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encodes each distinct prompt once (UMT5-XXL is large), then gathers rows. With CFG the
        negative prompt is encoded once, on its own as the pipeline does, and cached."""
        unique, rows = self.distinct(prompts)
        cond = {"prompt_embeds": self._encode(unique)[rows]}
        if self.cfg:
            if self._negative is None:
                self._negative = self._encode([NEGATIVE_PROMPT])
            cond["negative_prompt_embeds"] = self._negative.expand(len(prompts), -1, -1)
        return cond

    def predict(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The velocity at the pipeline's timestep (``PipelineTimestepSampler.timestep``, in [0, 1000])."""
        batch = x.shape[0]
        t = torch.as_tensor(timestep, device=self.device)
        # Wan 2.2 TI2V: one timestep per token (all equal without an image condition), as the pipeline
        timestep = t.expand(batch, self.tokens_per_sample) if self.expand_timesteps else t.expand(batch)
        embeds = cond["prompt_embeds"]
        if self.cfg:  # one batch [negative, positive]; the pipeline makes the same two calls one after the other
            x, timestep = torch.cat([x, x]), torch.cat([timestep, timestep])
            embeds = torch.cat([cond["negative_prompt_embeds"], embeds])
        v = self.run_transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds)
        if not self.cfg:
            return v
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + self.guidance_scale * (v_cond - v_uncond)

    def grid(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [N + 1] ending at 0, timesteps [N]) of the pipeline's scheduler for N steps, set on a
        copy so the pipeline's own scheduler state is untouched."""
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(num_steps)
        sigmas, timesteps = scheduler.sigmas.float().cpu(), scheduler.timesteps.cpu()
        if len(sigmas) != num_steps + 1 or len(timesteps) != num_steps or sigmas[-1] != 0 \
                or not torch.all(sigmas[1:] < sigmas[:-1]) or not 0 < sigmas[0] <= 1:
            raise ValueError(f"model.path: the pipeline's scheduler ({type(scheduler).__name__}) does not give a flow "
                             f"sigma grid from 1 to 0 for {num_steps} steps (got {sigmas.tolist()})")
        return sigmas, timesteps

    def make_sampler(self, num_steps: int, options: SamplerOptions) -> Sampler:
        if options.shift != 1.0:
            warnings.warn(f"sampling.shift={options.shift} does not apply to wan: it samples on its scheduler's grid "
                          f"(flow_shift {self.pipe.scheduler.config.get('flow_shift')})", stacklevel=2)
        sigmas, timesteps = self.grid(num_steps)
        return PipelineTimestepSampler(sigmas, timesteps, options.noise_level).to(self.device)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents [B, C, F', h, w] -> uint8 videos [B, T, H, W, 3], one video at a time."""
        return wan_vae_decode_to_uint8(self.vae, latents)


def wan_vae_decode_to_uint8(vae, latents: torch.Tensor, batch_size: int = 1) -> np.ndarray:
    """WanPipeline's decode and post-processing: ``z / (1 / latents_std) + latents_mean`` per channel
    (the pipeline's very operations), ``vae.decode``, [-1, 1] -> uint8 [N, T, H, W, C]."""
    config, out = vae.config, []
    shape = (1, config.z_dim, 1, 1, 1)
    with torch.no_grad():
        mean = torch.tensor(config.latents_mean).view(shape).to(vae.device, vae.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(vae.device, vae.dtype)
        for chunk in latents.split(batch_size):
            video = vae.decode(chunk.to(vae.device, vae.dtype) / inverse_std + mean, return_dict=False)[0].float()
            pixels = ((video / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            out.append(pixels.permute(0, 2, 3, 4, 1).cpu())  # [N, C, T, H, W] -> [N, T, H, W, C]
    return torch.cat(out).numpy()


@register_policy("wan")
def _wan_factory(path: str = "", device: str = "cpu", dtype: str = "auto", guidance_scale: float = 5.0,
                 resolution: int = 0, num_frames: int = 0, max_sequence_length: int = 0,
                 lora_rank: int = 0, lora_alpha: float = 0.0, lora_targets: str = "",
                 gradient_checkpointing: bool = False, preview_decoder: str = "", progress: bool = True):
    return WanPolicy(path, device=device, dtype=dtype, guidance_scale=guidance_scale, resolution=resolution,
                     num_frames=num_frames, max_sequence_length=max_sequence_length, lora_rank=lora_rank,
                     lora_alpha=lora_alpha, lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing,
                     preview_decoder=preview_decoder, progress=progress)
