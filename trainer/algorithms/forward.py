"""Forward-process updates (DiffusionNFT, AWM): training on the clean samples of an iteration's kept
trajectories, re-noised along the rectified flow, instead of on the recorded reverse steps.

For a kept trajectory with clean sample x0 (whatever solver produced it), training time t and
noise eps: x_t = (1 - t) x0 + t eps, the matching target is v = eps - x0, and the policy's
velocity at (x_t, t) is compared with the same call of the *old* policy (the parameters that
sampled the iteration). The old velocities come free with the first forward when the epoch makes
one optimizer step (the parameters are still the sampling ones; the value is detached), else from
a no-grad pass first, as ``optimize.policy_update`` does for log-probs.

Times and noise derive from (train.seed, iteration, trajectory id, k): every rank, any batching and
a resumed run draw the same ones. Micro-batching, optimizer-step cadence, gradient all-reduce,
zero-weight padding and non-finite skipping are those of ``policy_update``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from epgrpo.trainer.grpo import LossTerms
from epgrpo.trainer.optimize import UpdateStats, add_terms, apply_step, micro_batch_plan
from epgrpo.trainer.policy.base import select
from epgrpo.trainer.samplers import FlowSampler

# (v, v_old, v_ref | None, x0, x_t, t [B,1..], eps, advantages [B]) -> LossTerms
ForwardLoss = Callable[..., LossTerms]


def require_flow(sampler, algorithm: str) -> None:
    if not isinstance(sampler, FlowSampler):
        raise ValueError(f"train.algorithm: {algorithm} trains on the rectified-flow forward process; model "
                         f"{type(sampler).__name__} is not a flow model (use grpo, grpo_guard or mixgrpo)")


def trajectory_rng(seed: int, iteration: int, trajectory: int, purpose: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, iteration, trajectory, purpose]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def forward_noise(shape, seed: int, iteration: int, trajectory_ids: list[int], count: int) -> torch.Tensor:
    """[K, count, *shape] noise, one stream per trajectory."""
    return torch.stack([torch.randn((count, *shape), generator=trajectory_rng(seed, iteration, t, 7))
                        for t in trajectory_ids])


def forward_update(policy, optimizer, batch, advantages: torch.Tensor, times: torch.Tensor, noise: torch.Tensor,
                   loss_fn: ForwardLoss, *, beta: float, inner_epochs: int, max_grad_norm: float,
                   train_batch_size: int, gradient_accumulation: int = 0, optimizer_steps: int = 0,
                   sync_gradients=None, after_step=None, micro_batches: int = 0, order: torch.Tensor | None = None,
                   **_unused) -> list[UpdateStats]:
    """Optimises ``loss_fn`` over every (kept trajectory, training time k): ``times`` [K, T] in (0, 1],
    ``noise`` [K, T, *latent]. ``beta`` > 0 adds the reference's velocity (``v_ref``) for the loss's KL term."""
    count, num_times = times.shape
    cond = policy.encode_prompts(batch.prompts)
    x0_all = batch.final.to(policy.device)
    times, noise = times.to(policy.device), noise.to(policy.device)
    advantages = advantages.to(policy.device)
    chunks, real, step_groups = micro_batch_plan(count, train_batch_size, policy.device, micro_batches=micro_batches,
                                                 optimizer_steps=optimizer_steps,
                                                 gradient_accumulation=gradient_accumulation, order=order)
    params = policy.trainable_parameters()

    def inputs(rows, k):
        t = times[rows, k].reshape(-1, *([1] * (x0_all.ndim - 1)))
        x0, eps = x0_all[rows], noise[rows, k]
        return x0, (1 - t) * x0 + t * eps, t, eps

    old: dict[tuple[int, int], torch.Tensor] = {}
    if len(step_groups) > 1:
        with torch.no_grad():
            for c, rows in enumerate(chunks):
                for k in range(num_times):
                    x0, xt, t, _ = inputs(rows, k)
                    old[k, c] = policy.predict(xt, t.flatten(), select(cond, rows)).float()
    results = []
    policy.train(True)
    for epoch in range(inner_epochs):
        sums = dict(loss=0.0, policy_loss=0.0, kl=0.0, ratio_mean=0.0, clip_fraction=0.0, approx_kl=0.0)
        grad_norms, skipped = [], ""
        for group in step_groups:
            optimizer.zero_grad(set_to_none=True)
            group_count = max(1, sum(len(chunks[c]) for c in group if c < real))
            local_loss = 0.0
            for c in group:
                rows = chunks[c]
                weight = len(rows) / group_count / num_times if c < real else 0.0
                for k in range(num_times):
                    x0, xt, t, eps = inputs(rows, k)
                    v = policy.predict(xt, t.flatten(), select(cond, rows)).float()
                    if (k, c) not in old:
                        old[k, c] = v.detach()
                    v_ref = None
                    if beta > 0:
                        with torch.no_grad(), policy.reference():
                            v_ref = policy.predict(xt, t.flatten(), select(cond, rows)).float()
                    terms = loss_fn(v, old[k, c], v_ref, x0, xt, t, eps, advantages[rows])
                    (terms.loss * weight).backward()
                    if c >= real:
                        continue
                    local_loss += terms.loss.item() * weight
                    add_terms(sums, terms, len(rows))
            grad_norm, skipped = apply_step(params, optimizer, local_loss, max_grad_norm, sync_gradients, after_step)
            grad_norms.append(grad_norm)
            if skipped:
                break
        optimizer.zero_grad(set_to_none=True)
        means = {key: value / (count * num_times) for key, value in sums.items()}
        results.append(UpdateStats(grad_norm=sum(grad_norms) / len(grad_norms), logp_drift=0.0,
                                   optimizer_steps=len(grad_norms) - bool(skipped), skipped=skipped, **means))
        if skipped:
            break
    return results


def velocity_kl(v: torch.Tensor, v_ref: torch.Tensor | None) -> torch.Tensor:
    """The references' 'v-based KL': mean squared velocity difference to the reference, per sample."""
    if v_ref is None:
        return torch.zeros(v.shape[0], device=v.device)
    return ((v - v_ref) ** 2).mean(dim=tuple(range(1, v.ndim)))
