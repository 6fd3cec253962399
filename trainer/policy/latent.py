"""What every latent diffusers pipeline adapter (SD3, SD 1.x/2.x, FLUX) shares: offline loading,
VAE decoding, the VAE a launched pruner loads, and export in the format the stock pipeline loads.

Latents -> images: ``vae.decode(z / scaling_factor + shift_factor)``, then [-1, 1] -> uint8, the
pipelines' own post-processing (SD's VAE has no shift); the pruner's "vae" decoder does the same
for x0-previews (tested to agree).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from epgrpo.trainer.policy.finetune import FineTunedPolicy


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for local files only."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def pipeline_location(path: str, family: str, example: str) -> bool:
    """Whether ``model.path`` is a local pipeline directory (else a hub id); raises naming it."""
    if not path:
        raise ValueError(f"model.path: the {family} model needs a pipeline directory or hub id (e.g. {example})")
    local = Path(path).is_dir()
    if not local and Path(path).exists():
        raise ValueError(f"model.path: {path} is not a pipeline directory")
    return local


def text_tokens(requested: int, stock: int, most: int, family: str) -> int:
    """``model.max_sequence_length`` for ``family``: 0 means the stock pipeline's count, so exported
    weights meet the conditioning they were trained with; ValueError naming the option outside 1..most."""
    tokens = requested or stock
    if not 1 <= tokens <= most:
        raise ValueError(f"model.max_sequence_length: expected 1..{most} for {family}, got {tokens}")
    return tokens


def load_pipeline(pipeline_class, path: str, local: bool, torch_dtype: torch.dtype | dict, **kwargs):
    """``pipeline_class.from_pretrained``, without downloads for a local directory (or offline);
    ``torch_dtype`` may name a dtype per component ({"default": ..., "vae": ...})."""
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; older ones only know it
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return pipeline_class.from_pretrained(path, torch_dtype=torch_dtype, local_files_only=local or offline(),
                                              **kwargs)


def vae_decode_to_uint8(vae, latents: torch.Tensor, batch_size: int = 8) -> np.ndarray:
    """Latents [N, C, h, w] -> uint8 images [N, H, W, 3] (the pipelines' post-processing)."""
    out = []
    with torch.no_grad():
        for chunk in latents.split(batch_size):
            z = chunk.to(vae.device, vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            image = vae.decode(z, return_dict=False)[0].float()
            out.append(((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(out).numpy()


def vae_directory(model_path: str, vae, scratch_dir: Path) -> str:
    """A directory the pruner's ``--vae`` accepts for this VAE: the local pipeline directory when
    the model came from one, else the loaded VAE saved once into ``scratch_dir`` (hub ids)."""
    if (Path(model_path) / "vae" / "config.json").is_file():
        return str(Path(model_path).resolve())
    target = Path(scratch_dir) / "preview_vae"
    if not (target / "config.json").is_file():
        vae.save_pretrained(target)
    return str(target.resolve())


class LatentPipelinePolicy(FineTunedPolicy):
    """A FineTunedPolicy around a diffusers pipeline (``self.pipe``, ``self.vae``, ``self.path``)
    whose trained network is the pipeline component ``trained_component``."""

    preview_decoder = "vae"
    trained_component = "transformer"  # "unet" for SD 1.x/2.x
    pipe = vae = None
    path = ""
    guidance_scale = 1.0

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance: both branches in one batch, 2 model calls per sample."""
        return self.guidance_scale > 1.0

    def distinct(self, prompts: list[str]) -> tuple[list[str], torch.Tensor]:
        """The distinct prompts (text encoders are large: each is encoded once) and, per prompt,
        the row of its encoding."""
        unique = list(dict.fromkeys(prompts))
        return unique, torch.tensor([unique.index(p) for p in prompts], device=self.device)

    def adopt_pipeline(self, pipe, path: str, *, device: torch.device, dtype: torch.dtype, lora_rank: int = 0,
                       lora_alpha: float = 0.0, lora_targets=None, gradient_checkpointing: bool = False) -> None:
        """Freezes every network of ``pipe`` but the trained component (VAE, text encoders) on
        ``device``, and sets up LoRA / full fine-tuning of the trained one."""
        trained = getattr(pipe, self.trained_component)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module) and module is not trained:
                module.to(device).requires_grad_(False).eval()
        self.setup_finetuning(trained, device=device, dtype=dtype, lora_rank=lora_rank, lora_alpha=lora_alpha,
                              lora_targets=lora_targets, gradient_checkpointing=gradient_checkpointing)
        self.pipe, self.vae, self.path = pipe, pipe.vae, path

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return vae_decode_to_uint8(self.vae, latents)

    def preview_decoder_source(self, scratch_dir: Path) -> str:
        return vae_directory(self.path, self.vae, scratch_dir)

    def export(self, out_dir: Path) -> list[Path]:
        """LoRA: ``lora/pytorch_lora_weights.safetensors`` for the stock pipeline's
        ``load_lora_weights(out_dir / "lora")``; full fine-tuning: ``<component>/`` for the
        component class's ``from_pretrained``."""
        if self.lora_config is None:
            target = Path(out_dir) / self.trained_component
            self.transformer.save_pretrained(target)
            self.write_sampling_settings(target)
            return [target]
        target = Path(out_dir) / "lora"
        component = self.trained_component
        layers = {k: v.detach().cpu().contiguous() for k, v in self.lora_state_dict().items()}
        type(self.pipe).save_lora_weights(target, **{
            f"{component}_lora_layers": layers,
            # without the metadata diffusers would assume alpha = rank and scale the LoRA differently
            f"{component}_lora_adapter_metadata": self.lora_config.to_dict(),
        })
        self.write_sampling_settings(target)
        return [target]

    def write_sampling_settings(self, target: Path) -> None:
        """``sampling.json`` next to the exported weights: the pipeline arguments they were trained
        under, for ``pipe(prompt, **json.load(open("sampling.json")))`` (the T5 token count changes the
        conditioning: a LoRA trained on 128 tokens sampled with the stock 256 sees other embeddings)."""
        settings = {"max_sequence_length": getattr(self, "max_sequence_length", None)}
        settings = {k: v for k, v in settings.items() if v}
        if settings:
            (Path(target) / "sampling.json").write_text(json.dumps(settings, indent=1) + "\n")
