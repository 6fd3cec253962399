"""The Flow-GRPO SDE sampler for rectified-flow models (SD3, FLUX, the flow toy)."""

from __future__ import annotations

import torch

from epgrpo.trainer.samplers.base import Sampler, StepResult, gaussian_kl
from epgrpo.trainer.samplers.flow_sde import ode_step, sde_step, sigma_grid, x0_preview


KL_FORMS = ("exact", "flow_grpo")


class FlowSampler(Sampler):
    """Steps along a sigma grid from 1 to 0; the network's output is the velocity eps - x0.

    ``sigma_guard`` replaces sigma in (1 - sigma) where sigma == 1 (default: the grid's second
    value, as Flow-GRPO does).
    """

    reads = ("shift", "noise_level")

    def __init__(self, sigmas: torch.Tensor, noise_level: float = 0.7, sigma_guard: float | None = None):
        if sigmas.ndim != 1 or len(sigmas) < 2:
            raise ValueError(f"sigmas: expected a 1-D grid of at least 2 values, got shape {list(sigmas.shape)}")
        self.sigmas = sigmas
        self.noise_level = noise_level
        self.sigma_guard = float(sigmas[1]) if sigma_guard is None else sigma_guard
        self.num_steps = len(sigmas) - 1

    @classmethod
    def uniform(cls, num_steps: int, shift: float = 1.0, noise_level: float = 0.7) -> "FlowSampler":
        """The time-shifted grid uniform in t (``sigma_grid``), without a tiny last interval."""
        return cls(sigma_grid(num_steps, shift), noise_level)

    def timestep(self, i: int) -> torch.Tensor:
        return self.sigmas[i]

    def noise_std(self, i: int) -> float:
        return float(self.sigmas[i])

    def interval(self, i: int) -> float:
        return float(self.sigmas[i] - self.sigmas[i + 1])

    def step(self, x, model_out, i, noise=None, sample=None) -> StepResult:
        return sde_step(x, model_out, self.sigmas[i], self.sigmas[i + 1], self.noise_level, self.sigma_guard,
                        noise=noise, sample=sample)

    def deterministic_step(self, x, model_out, i) -> torch.Tensor:
        return ode_step(x, model_out, self.sigmas[i], self.sigmas[i + 1])

    def x0(self, x, model_out, i) -> torch.Tensor:
        return x0_preview(x, model_out, self.sigmas[i])

    def kl(self, mean, mean_ref, std, i=None) -> torch.Tensor:
        """``exact``: (mean - mean_ref)^2 / (2 (std_t sqrt|dt|)^2), the KL of the step's Gaussians.
        ``flow_grpo``: Flow-GRPO's train_sd3.py form, divided by 2 std_t^2 without dt, i.e. the exact
        KL times |dt| (with the same beta, 1/|dt| times weaker than ``exact``)."""
        exact = gaussian_kl(mean, mean_ref, std)
        if self.kl_form == "exact":
            return exact
        if i is None:
            raise ValueError("kl: train.kl_form=flow_grpo needs the step index")
        return exact * (self.sigmas[i] - self.sigmas[i + 1]).float()

    def with_kl_form(self, form: str) -> "FlowSampler":
        if form not in KL_FORMS:
            raise ValueError(f"train.kl_form: expected one of {', '.join(KL_FORMS)}, got {form!r}")
        moved = self.to(self.sigmas.device)
        moved.kl_form = form
        return moved

    def to(self, device) -> "FlowSampler":
        moved = FlowSampler(self.sigmas.to(device), self.noise_level, self.sigma_guard)
        moved.kl_form = self.kl_form
        return moved
