"""DiffusionNFT (arXiv 2509.16117; NVlabs/DiffusionNFT, Flow-Factory ``trainers/nft.py``): online RL
on the forward process, no likelihoods.

Rollouts are deterministic ODE samples (any solver would do; under Expand-and-Prune the expanded
group is ODE-sampled, pruned on its previews, and the survivors' clean samples are trained on).
Group-normalised advantages A (clipped to +-M, M = train.adv_clip) become optimality weights
r = clamp(A / M / 2 + 1/2, 0, 1). At training times t drawn from the sampling grid (a random subset
of train.timestep_fraction of its steps per sample), with x_t = (1 - t) x0 + t eps, the current
velocity v and the old (sampling) policy's v_old mix into implicit positive and negative policies

    v+ = beta v + (1 - beta) v_old,        v- = (1 + beta) v_old - beta v,

whose x0-predictions x0± = x_t - t v± are matched to x0 with the reference's adaptive weight
(each squared error divided by the sample's detached mean absolute error, floored at 1e-5):

    L = M mean( r L+ / beta + (1 - r) L- / beta ) + train.beta mean((v - v_ref)^2).

Differences from the reference: the old policy is the one that sampled this iteration (the
reference's decay_type 0; its soft-updated old copy, decay_type 1/2, is not kept), and sampling uses
the configured guidance (set sampling.guidance_scale=1 for the reference's CFG-free sampling).
"""

from __future__ import annotations

import torch

from epgrpo.trainer.algorithms.base import Algorithm, register_algorithm
from epgrpo.trainer.algorithms.forward import forward_noise, forward_update, require_flow, trajectory_rng, velocity_kl
from epgrpo.trainer.grpo import LossTerms

WEIGHT_FLOOR = 1e-5


def optimality_weight(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """r in [0, 1] from advantages: clamp(clamp(A, -M, M) / M / 2 + 1/2, 0, 1)."""
    return torch.clamp(advantages.clamp(-adv_clip, adv_clip) / adv_clip / 2.0 + 0.5, 0.0, 1.0)


def _adaptive_mse(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        weight = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=WEIGHT_FLOOR)
    return ((x0_pred - x0) ** 2 / weight).mean(dim=dims)


def nft_loss(v, v_old, v_ref, x0, xt, t, advantages, *, nft_beta: float, adv_clip: float, kl_beta: float) -> LossTerms:
    r = optimality_weight(advantages, adv_clip)
    v_old = v_old.detach()
    positive = nft_beta * v + (1 - nft_beta) * v_old
    negative = (1 + nft_beta) * v_old - nft_beta * v
    per_sample = (r * _adaptive_mse(xt - t * positive, x0) + (1 - r) * _adaptive_mse(xt - t * negative, x0)) / nft_beta
    policy_loss = (per_sample * adv_clip).mean()
    kl = velocity_kl(v, v_ref).mean()
    with torch.no_grad():
        deviation = ((v - v_old) ** 2).mean().item()
    # ratio/clip statistics do not exist here: ratio_mean reports r's mean, approx_kl the drift from v_old
    return LossTerms(policy_loss + kl_beta * kl, policy_loss, kl, r.mean().item(), 0.0, deviation)


def grid_times(sampler, count: int, seed: int, iteration: int, trajectory_ids: list[int]) -> torch.Tensor:
    """[K, count] sigmas of the sampling grid (steps 0..n-1), a random subset per trajectory."""
    steps = sampler.num_steps
    rows = [torch.randperm(steps, generator=trajectory_rng(seed, iteration, t, 5))[:count] for t in trajectory_ids]
    return sampler.sigmas.cpu().float()[torch.stack(rows)]


@register_algorithm
class NFT(Algorithm):
    name = "nft"
    options = ("nft_beta",)

    @classmethod
    def validate(cls, config) -> None:
        if not config.algo.nft_beta > 0:
            raise ValueError(f"algo.nft_beta: expected > 0, got {config.algo.nft_beta}")

    def check_sampler(self, sampler) -> None:
        require_flow(sampler, self.name)

    def sde_steps(self, iteration: int) -> list[int]:
        return []  # ODE sampling: no step is stochastic, no log-prob is recorded

    def train_steps(self, batch, iteration: int) -> list[int]:
        return []  # trained on the clean samples' forward process, not on rollout steps

    def times(self, sampler, iteration: int, trajectory_ids: list[int]) -> torch.Tensor:
        count = max(1, int(round(sampler.num_steps * self.c.train.timestep_fraction)))
        return grid_times(sampler, count, self.c.train.seed, iteration, trajectory_ids)

    def loss(self, v, v_old, v_ref, x0, xt, t, eps, advantages) -> LossTerms:
        return nft_loss(v, v_old, v_ref, x0, xt, t, advantages, nft_beta=self.o.nft_beta,
                        adv_clip=self.c.train.adv_clip, kl_beta=self.c.train.beta)

    def update(self, policy, optimizer, batch, advantages, sampler, *, iteration, train_steps, trajectory_offset=0,
               **options):
        ids = (batch.trajectory_ids + trajectory_offset).tolist()
        times = self.times(sampler, iteration, ids)
        noise = forward_noise(policy.latent_shape, self.c.train.seed, iteration, ids, times.shape[1])
        return forward_update(policy, optimizer, batch, advantages, times, noise, self.loss, **options)
