"""GRPO-Guard (arXiv 2510.22319; Flow-GRPO's ``train_sd3_GRPO_Guard``): GRPO with a normalised
per-step importance ratio and per-step loss reweighting.

With the step's Gaussian std s (= std_t sqrt(-dt) on the flow grid) and x' = mu_old + s xi drawn
by the rollout policy, Flow-GRPO's log-ratio is mean((x' - mu_old)^2 - (x' - mu)^2) / (2 s^2)
= mean(xi (mu - mu_old)) / s - mean((mu - mu_old)^2) / (2 s^2): its mean drifts below 0 by a term
that grows as s shrinks, so the ratio's mean falls below 1 unequally across steps and the clip
acts on the bias rather than on the policy change. GRPO-Guard adds that term back and rescales by s:

    ratio = exp((logp - logp_old + mean((mu - mu_old)^2) / (2 s^2)) * s) = exp(mean(xi (mu - mu_old)))

whose mean stays at 1 at every step, and divides each step's clipped loss by its length |dt|
(``algo.guard_step_weight``) so that the steps contribute gradients of one scale.
"""

from __future__ import annotations

import torch

from epgrpo.trainer.algorithms.base import register_algorithm
from epgrpo.trainer.algorithms.grpo import GRPO
from epgrpo.trainer.grpo import LossTerms


def guard_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor,
                      old_mean: torch.Tensor, std: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                      interval: float | None, kl: torch.Tensor | None = None, beta: float = 0.0) -> LossTerms:
    """GRPO-Guard's clipped loss of one step; ``interval`` = |dt| of the step (None: no reweighting)."""
    scale = std.mean()  # one std per step on the grid (the mean makes it a scalar, as the reference)
    dims = tuple(range(1, mean.ndim))
    bias = ((mean - old_mean) ** 2).mean(dim=dims) / (2 * scale**2)
    ratio = torch.exp((log_prob - old_log_prob + bias) * scale)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    if interval is not None:
        policy_loss = policy_loss / interval
    kl_mean = kl.mean() if kl is not None else torch.zeros((), device=log_prob.device)
    with torch.no_grad():
        clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean().item()
        approx_kl = (0.5 * (log_prob - old_log_prob) ** 2).mean().item()
    return LossTerms(policy_loss + beta * kl_mean, policy_loss, kl_mean, ratio.mean().item(), clip_fraction, approx_kl)


class GuardStepLoss:
    """``policy_update``'s per-step loss for GRPO-Guard (it needs the old step means)."""

    needs_old_mean = True

    def __init__(self, step_weight: bool):
        self.step_weight = step_weight

    def __call__(self, step, old_log_prob, old_mean, advantages, clip_range, kl, beta, i, sampler) -> LossTerms:
        interval = sampler.interval(i) if self.step_weight else None
        return guard_policy_loss(step.log_prob, old_log_prob, step.mean, old_mean, step.std, advantages, clip_range,
                                 interval, kl, beta)


@register_algorithm
class GRPOGuard(GRPO):
    name = "grpo_guard"
    options = ("guard_step_weight",)

    def __init__(self, config):
        super().__init__(config)
        self.step_loss = GuardStepLoss(self.o.guard_step_weight)
