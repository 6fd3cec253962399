"""The sampler interface every rollout, evaluation and GRPO update goes through (pure torch)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class SamplerOptions:
    """What the training config says about sampling; each sampler reads the fields it knows."""

    shift: float = 0.0  # flow: time shift of the sigma grid; 0 = the model's own (toys: 1.0)
    noise_level: float = 0.7  # flow: SDE noise level a
    eta: float = 1.0  # ddim: eta (1 = DDPO's stochastic DDIM, 0 = deterministic DDIM)


@dataclass
class StepResult:
    sample: torch.Tensor  # x' (float32)
    log_prob: torch.Tensor  # [B], float32, mean over non-batch dims
    mean: torch.Tensor  # the Gaussian's mean (float32)
    std: torch.Tensor  # [B, 1, ...] the Gaussian's std


def per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] value as float32 [B, 1, ..., 1], broadcastable against ``like``."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def gaussian_step(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor | None,
                  sample: torch.Tensor | None) -> StepResult:
    """Draws x' = mean + std * noise (or scores the given ``sample``) with its fp32 log-density,
    averaged over the non-batch dimensions."""
    if sample is None:
        if noise is None:
            raise ValueError("step: give either noise (to sample) or sample (to score)")
        sample = mean + std * noise.float()
    sample = sample.float()
    log_prob = -((sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return StepResult(sample, log_prob.mean(dim=tuple(range(1, mean.ndim))), mean, std)


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussian policies sharing std, per sample, averaged over non-batch dims."""
    kl = (mean - mean_ref) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, mean.ndim)))


class Sampler(ABC):
    """A grid of ``num_steps`` denoising steps; step ``i`` goes from x_i to x_{i+1}.

    ``model_out`` is what the policy's network returns at (x_i, ``timestep(i)``): a velocity for
    flow models, epsilon or v for diffusion models. Every method is pure and batch-elementwise,
    so a trajectory's path does not depend on which others share its batch.
    """

    num_steps: int
    #: what ``eval.sampler=auto`` evaluates: the stochastic policy itself (diffusion models trained
    #: at eta > 0) or the deterministic sampler (flow models: the probability-flow ODE)
    stochastic_eval: bool = False

    @abstractmethod
    def timestep(self, i: int) -> torch.Tensor:
        """The scalar the network is conditioned on at step i (sigma for flow, t for diffusion)."""

    @abstractmethod
    def noise_std(self, i: int) -> float:
        """The noise scale of x_i (flow: sigma_i; diffusion: sqrt(1 - alphabar_t)); sent to the pruner."""

    @abstractmethod
    def step(self, x: torch.Tensor, model_out: torch.Tensor, i: int, noise: torch.Tensor | None = None,
             sample: torch.Tensor | None = None) -> StepResult:
        """The stochastic policy step: sample x_{i+1} with ``noise``, or score a given ``sample``."""

    @abstractmethod
    def deterministic_step(self, x: torch.Tensor, model_out: torch.Tensor, i: int) -> torch.Tensor:
        """The noise-free step (probability-flow ODE / DDIM with eta = 0)."""

    @abstractmethod
    def x0(self, x: torch.Tensor, model_out: torch.Tensor, i: int) -> torch.Tensor:
        """The clean-sample estimate at x_i, free given the model output already computed."""

    def interval(self, i: int) -> float:
        """The length |dt| of step i in the model's time in [0, 1] (GRPO-Guard's step reweighting)."""
        raise NotImplementedError(f"{type(self).__name__} does not define its step lengths")

    #: the sampling options (SamplerOptions fields) this sampler uses; the others are refused when set
    reads: tuple[str, ...] = ()
    #: train.kl_form: "exact" (the KL of the step's Gaussians) or "flow_grpo" (flow samplers only)
    kl_form: str = "exact"

    def kl(self, mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor, i: int | None = None) -> torch.Tensor:
        """KL of the policy's step ``i`` Gaussian to the reference's (same std), per sample."""
        return gaussian_kl(mean, mean_ref, std)

    def with_kl_form(self, form: str) -> "Sampler":
        """This sampler with the KL regulariser of ``train.kl_form``."""
        if form != "exact":
            raise ValueError(f"train.kl_form: {form!r} needs a flow model's SDE sampler (its std_t without dt); "
                             f"{type(self).__name__} has the exact Gaussian KL only: use train.kl_form=exact")
        return self

    @abstractmethod
    def to(self, device) -> "Sampler":
        """The same sampler with its tables on ``device``."""
