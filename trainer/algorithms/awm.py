"""Advantage Weighted Matching (arXiv 2509.25050; Flow-Factory ``trainers/awm.py``): the
flow-matching loss on the iteration's clean samples, weighted by their advantages through a
PPO-clipped ratio of matching likelihoods.

Rollouts are ODE samples. For each kept sample x0 and training time t (``algo.awm_time_sampling``),
x_t = (1 - t) x0 + t eps and the matching log-likelihood is log p = w(-mean((v - (eps - x0))^2), t)
in float64 (``algo.awm_weighting``: uniform, t, t^2, Huber, generalised Huber), for the current and
the old (sampling) policy at the same (x_t, t, eps):

    ratio = exp(log p - log p_old),   L = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))
                                          + train.beta mean((v - v_ref)^2).

At ratio 1 the gradient is A times the flow-matching gradient: samples above their group's mean are
matched, those below are un-matched. Differences from the reference: the clip range is symmetric
(train.clip_range); the old policy is the sampling policy (no EMA sampler, no EMA KL term);
logit-normal times are not stratified.
"""

from __future__ import annotations

import torch

from epgrpo.trainer.algorithms.base import Algorithm, register_algorithm
from epgrpo.trainer.algorithms.forward import forward_noise, forward_update, require_flow, trajectory_rng, velocity_kl
from epgrpo.trainer.algorithms.nft import grid_times
from epgrpo.trainer.grpo import LossTerms


def matching_log_prob(v: torch.Tensor, target: torch.Tensor, t: torch.Tensor, weighting: str = "uniform",
                      ghuber_power: float = 0.25) -> torch.Tensor:
    """AWM's weighted matching log-likelihood per sample (float64 inside, float32 out)."""
    log_prob = -((v.double() - target.double()) ** 2).mean(dim=tuple(range(1, v.ndim)))
    t = t.double().flatten()
    if weighting == "t":
        log_prob = log_prob * t
    elif weighting == "t2":
        log_prob = log_prob * t**2
    elif weighting == "huber":
        log_prob = -(torch.sqrt(-log_prob + 1e-10) - 1e-5) * t
    elif weighting == "ghuber":
        eps = torch.tensor(1e-10, dtype=torch.float64, device=log_prob.device)
        log_prob = -((-log_prob + eps) ** ghuber_power - eps**ghuber_power) * t / ghuber_power
    return log_prob.float()


def awm_loss(v, v_old, v_ref, x0, t, eps, advantages, *, clip_range: float, kl_beta: float, weighting: str = "uniform",
             ghuber_power: float = 0.25) -> LossTerms:
    target = eps - x0
    log_prob = matching_log_prob(v, target, t, weighting, ghuber_power)
    with torch.no_grad():
        old_log_prob = matching_log_prob(v_old, target, t, weighting, ghuber_power)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    kl = velocity_kl(v, v_ref).mean()
    with torch.no_grad():
        clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean().item()
        approx_kl = (0.5 * (log_prob - old_log_prob) ** 2).mean().item()
    return LossTerms(policy_loss + kl_beta * kl, policy_loss, kl, ratio.mean().item(), clip_fraction, approx_kl)


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


@register_algorithm
class AWM(Algorithm):
    name = "awm"
    options = ("awm_weighting", "awm_ghuber_power", "awm_time_sampling", "awm_timesteps")

    @classmethod
    def validate(cls, config) -> None:
        o = config.algo
        if o.awm_timesteps < 0:
            raise ValueError(f"algo.awm_timesteps: expected >= 0, got {o.awm_timesteps}")
        if not o.awm_ghuber_power > 0:
            raise ValueError(f"algo.awm_ghuber_power: expected > 0, got {o.awm_ghuber_power}")

    def check_sampler(self, sampler) -> None:
        require_flow(sampler, self.name)

    def sde_steps(self, iteration: int) -> list[int]:
        return []

    def train_steps(self, batch, iteration: int) -> list[int]:
        return []

    def times(self, sampler, iteration: int, trajectory_ids: list[int]) -> torch.Tensor:
        o, seed = self.o, self.c.train.seed
        count = o.awm_timesteps or sampler.num_steps
        if o.awm_time_sampling == "discrete":
            return grid_times(sampler, min(count, sampler.num_steps), seed, iteration, trajectory_ids)
        draws = []
        for t in trajectory_ids:
            generator = trajectory_rng(seed, iteration, t, 6)
            if o.awm_time_sampling == "uniform":
                u = torch.rand(count, generator=generator)
            else:
                u = torch.sigmoid(torch.randn(count, generator=generator))
            draws.append(u.clamp(1e-3, 1.0))  # t = 0 has no noise to match
        return shifted(torch.stack(draws), self.c.sampling.shift or 1.0)  # sampling.shift 0 (the model's grid): unshifted

    def loss(self, v, v_old, v_ref, x0, xt, t, eps, advantages) -> LossTerms:
        return awm_loss(v, v_old, v_ref, x0, t, eps, advantages, clip_range=self.c.train.clip_range,
                        kl_beta=self.c.train.beta, weighting=self.o.awm_weighting, ghuber_power=self.o.awm_ghuber_power)

    def update(self, policy, optimizer, batch, advantages, sampler, *, iteration, train_steps, trajectory_offset=0,
               **options):
        ids = (batch.trajectory_ids + trajectory_offset).tolist()
        times = self.times(sampler, iteration, ids)
        noise = forward_noise(policy.latent_shape, self.c.train.seed, iteration, ids, times.shape[1])
        return forward_update(policy, optimizer, batch, advantages, times, noise, self.loss, **options)
