"""The Flow-GRPO SDE policy step and its log-probability (pure torch, no I/O).

Rectified flow: x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0, sampling from
sigma = 1 (noise) to 0 (clean). One SDE step sigma -> sigma' (dt = sigma' - sigma < 0), noise level a:

    std_t = a sqrt(sigma / (1 - sigma))            (sigma = 1 guarded by the grid's 2nd value)
    mean  = x (1 + std_t^2 / (2 sigma) dt) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt
    x'    = mean + std_t sqrt(-dt) xi

The log-prob of x' is the Gaussian density N(mean, (std_t sqrt(-dt))^2), computed in float32 and
averaged over all non-batch dimensions (bf16 log-probs drift; per-element averaging keeps
importance ratios near 1, so Flow-GRPO's clip range 1e-4 is on the right scale).
"""

from __future__ import annotations

import torch

from epgrpo.trainer.samplers.base import StepResult, gaussian_kl, gaussian_step
from epgrpo.trainer.samplers.base import per_sample as _per_sample

__all__ = ["sigma_grid", "sde_step", "ode_step", "x0_preview", "gaussian_kl", "StepResult"]


def sigma_grid(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """num_steps + 1 sigmas from 1 to 0, time-shifted like SD3 (sigma' = s t / (1 + (s - 1) t)).

    Uniform in t, so the last interval is not the tiny 0.001 -> 0 sliver that
    ``FlowMatchEulerDiscreteScheduler.set_timesteps`` leaves (whose near-zero std explodes log-probs).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
    if not shift > 0:
        raise ValueError(f"shift: expected > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    sigma_guard: float,
    noise: torch.Tensor | None = None,
    sample: torch.Tensor | None = None,
) -> StepResult:
    """One Flow-GRPO SDE step. Give ``noise`` to sample x', or ``sample`` to score a given x'.

    ``sigma``/``sigma_next`` are scalars or per-sample [B] tensors; ``sigma_guard`` replaces sigma
    in (1 - sigma) where sigma == 1 (Flow-GRPO uses the grid's second value).
    """
    x = x.float()
    v = v.float()
    sigma = _per_sample(sigma, x)
    sigma_next = _per_sample(sigma_next, x)
    dt = sigma_next - sigma
    one_minus = 1 - torch.where(sigma == 1, torch.full_like(sigma, sigma_guard), sigma)
    std_t = noise_level * torch.sqrt(sigma / one_minus)
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return gaussian_step(mean, std_t * torch.sqrt(-dt), noise, sample)


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Deterministic Euler step of the probability-flow ODE."""
    x = x.float()
    return x + v.float() * (_per_sample(sigma_next, x) - _per_sample(sigma, x))


def x0_preview(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """The clean-sample estimate x0 = x - sigma v, free given the velocity already computed."""
    return x.float() - _per_sample(sigma, x) * v.float()
