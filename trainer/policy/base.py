"""The model adapter interface the one training loop talks to, and the adapter registry.

An adapter turns prompts into conditioning, gives the network's output at (x_t, t), builds the
sampler that fits its model (flow SDE or stochastic DDIM), decodes latents to uint8 images, names
its trainable parameters and can act as the frozen reference policy. Adding a model means one new
adapter class and a factory registered here; the loop, the samplers and the GRPO code do not change.

A factory's keyword parameters are the options of its family: ``create_policy`` passes the
``model.*`` options the user set plus what the trainer always gives (device, dtype, progress,
guidance_scale), and refuses an option the factory does not declare (unless it takes ``**kwargs``).
Adapters around a diffusers transformer get LoRA / full fine-tuning, the reference policy and mixed
precision from ``finetune.FineTunedPolicy``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from epgrpo.trainer.samplers import FlowSampler, Sampler, SamplerOptions

Conditioning = dict[str, torch.Tensor]  # every tensor has the batch dimension first


def select(cond: Conditioning, index: torch.Tensor) -> Conditioning:
    """The conditioning rows of the given trajectories."""
    return {k: v[index] for k, v in cond.items()}


class PolicyAdapter(ABC):
    #: transformer calls per velocity evaluation of one sample (2 with classifier-free guidance)
    nfe_per_sample: int = 1
    #: what the pruner's decoder must do with x0-previews ("pixel" = identity)
    preview_decoder: str = "pixel"

    device: torch.device
    latent_shape: tuple[int, ...]  # (C, H, W) of one sample

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Conditioning for a batch of prompts (rows in prompt order)."""

    @abstractmethod
    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The network's output at (x, t), guidance included, in float32: the velocity eps - x0 at
        sigma = t for flow models, epsilon (or v) at timestep t for diffusion models."""

    def make_sampler(self, num_steps: int, options: SamplerOptions) -> Sampler:
        """The sampler of this model family (default: the Flow-GRPO SDE on the shifted uniform grid)."""
        return FlowSampler.uniform(num_steps, options.shift or 1.0, options.noise_level).to(self.device)

    def preview_decoder_source(self, scratch_dir: Path) -> str | None:
        """The directory of the VAE the pruner needs to decode this model's x0-previews (served as
        ``preview_decoder``), when the trainer launches the pruner itself; None for pixel models.
        ``scratch_dir`` may receive a copy when the model did not come from a local directory."""
        return None

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Clean latents -> uint8 images [B, H, W, C]."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the optimizer updates."""

    @abstractmethod
    def reference(self) -> contextlib.AbstractContextManager:
        """Context in which ``predict`` is the frozen reference policy's."""

    def train(self, mode: bool = True) -> None:  # noqa: B027 - optional hook
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable weights by name, for checkpoints (LoRA weights only, with LoRA)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copies checkpointed trainable weights in place (the optimizer keeps its parameters)."""
        if state:
            raise NotImplementedError(f"{type(self).__name__} cannot load trainable weights")

    def export(self, out_dir: Path) -> list[Path]:
        """Writes the trained weights in the model's own format (what users load); returns the paths."""
        from safetensors.torch import save_file

        path = Path(out_dir) / "policy.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, path)
        return [path]


_REGISTRY: dict[str, Callable[..., PolicyAdapter]] = {}
# Built-in adapters register on import; imported only when asked for (no pipeline code otherwise).
_BUILTIN = {"toy_digits": "epgrpo.trainer.policy.toy", "toy_digits_ddpm": "epgrpo.trainer.policy.toy_ddpm",
            "toy_video": "epgrpo.trainer.policy.toy_video",
            "sd3": "epgrpo.trainer.policy.sd3", "sd": "epgrpo.trainer.policy.sd", "flux": "epgrpo.trainer.policy.flux",
            "wan": "epgrpo.trainer.policy.wan"}
_BUILTIN.update({name: f"epgrpo.trainer.policy.{name}" for name in ("qwen_image", "flux2_klein", "z_image")})  # the 2026 image families


def register_policy(name: str):
    def decorator(factory):
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_policies() -> list[str]:
    return sorted({*_REGISTRY, *_BUILTIN})


# Factory options and the config keys they come from. The trainer passes every factory device, dtype,
# progress and sampling.guidance_scale, plus the model.* options the user set; a factory declares
# the ones its family takes (a plugin with **kwargs takes any).
_CONFIG_KEYS = {"guidance_scale": "sampling.guidance_scale", "progress": "progress"}
#: Options the trainer itself uses with every family: given to a factory that declares them, never refused.
SHARED_OPTIONS = ("progress", "preview_decoder", "preview_vae")


def _factory(name: str) -> Callable[..., PolicyAdapter]:
    """The factory registered as ``name``; ``package.module:name`` imports a plugin module first."""
    module, _, short = name.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"model.name: cannot import adapter module {module!r}: {e}") from None
        name = short
    elif name in _BUILTIN and name not in _REGISTRY:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise ValueError(f"model.name: unknown model {name!r}; available: {', '.join(available_policies())}")
    return _REGISTRY[name]


def policy_options(name: str) -> list[str] | None:
    """The keyword options the factory of model ``name`` declares (in order); None when it takes
    any (``**kwargs``)."""
    params = inspect.signature(_factory(name)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in keyword]


def _model_defaults() -> dict:
    """The ``model`` section's options with their defaults (the values of options the user did not set)."""
    from epgrpo.trainer.config import ModelConfig

    return {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name != "name"}


def _is_default(value, default) -> bool:
    return isinstance(value, bool) == isinstance(default, bool) and isinstance(value, (str, int, float)) \
        and value == default


def check_policy_options(name: str, options: dict) -> dict:
    """The options to call model ``name``'s factory with. An option the factory does not declare is
    dropped when it is at its config default (or one of ``SHARED_OPTIONS``), else refused with a
    ValueError naming its config key; a factory with ``**kwargs`` takes everything. Loads no model."""
    declared = policy_options(name)
    if declared is None:
        return dict(options)
    defaults = {**_model_defaults(), "guidance_scale": 1.0}  # sampling.guidance_scale 1 = no guidance
    passed = {}
    for key, value in options.items():
        if key in declared:
            passed[key] = value
        elif not (key in SHARED_OPTIONS or (key in defaults and _is_default(value, defaults[key]))):
            own = [o for o in declared if o in defaults and o not in _CONFIG_KEYS]
            raise ValueError(f"{_CONFIG_KEYS.get(key, f'model.{key}')}: not an option of model {name!r} "
                             f"(its options: {', '.join(own)})")
    return passed


def create_policy(name: str, **options) -> PolicyAdapter:
    """The adapter registered as ``name`` (``package.module:name`` imports a plugin module first),
    built from ``options`` once ``check_policy_options`` accepted them."""
    return _factory(name)(**check_policy_options(name, options))
