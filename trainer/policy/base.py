"""The model adapter interface the one training loop talks to, and the adapter registry.

An adapter turns prompts into conditioning, gives the velocity at (x_t, sigma), decodes latents
to uint8 images, names its trainable parameters and can act as the frozen reference policy.
Adding a model (FLUX, Qwen-Image, ...) means one new adapter class registered here; the loop,
the sampler and the GRPO code do not change.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable

import numpy as np
import torch

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
    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Predicted velocity eps - x0 at noise level sigma ([B] or scalar); guidance included."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Clean latents -> uint8 images [B, H, W, C]."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the optimizer updates."""

    @abstractmethod
    def reference(self) -> contextlib.AbstractContextManager:
        """Context in which ``velocity`` is the frozen reference policy's."""

    def train(self, mode: bool = True) -> None:  # noqa: B027 - optional hook
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable weights, for checkpoints."""
        return {}


_REGISTRY: dict[str, Callable[..., PolicyAdapter]] = {}


def register_policy(name: str):
    def decorator(factory):
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def create_policy(name: str, **options) -> PolicyAdapter:
    if name not in _REGISTRY:
        raise ValueError(f"model.name: unknown model {name!r}; available: {', '.join(available_policies())}")
    return _REGISTRY[name](**options)
