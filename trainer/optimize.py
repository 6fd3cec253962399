"""One GRPO policy update on an iteration's kept trajectories (the loss side of the loop)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from epgrpo.trainer.grpo import clipped_policy_loss
from epgrpo.trainer.policy.base import PolicyAdapter, select
from epgrpo.trainer.rollout import RolloutResult
from epgrpo.trainer.sde import gaussian_kl, sde_step


@dataclass
class UpdateStats:
    loss: float
    policy_loss: float
    kl: float
    ratio_mean: float
    clip_fraction: float
    approx_kl: float
    grad_norm: float
    logp_drift: float  # max |rollout log-prob - recomputed log-prob| before the update
    skipped: str = ""  # reason the optimizer step was skipped, if it was


def trained_steps(batch: RolloutResult) -> list[int]:
    """The SDE steps (ODE steps have no log-prob and are not trained on)."""
    return [i for i in range(batch.log_probs.shape[1]) if torch.isfinite(batch.log_probs[:, i]).all()]


def policy_update(
    policy: PolicyAdapter,
    optimizer: torch.optim.Optimizer,
    batch: RolloutResult,
    advantages: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise_level: float,
    clip_range: float,
    beta: float,
    inner_epochs: int,
    max_grad_norm: float,
    train_batch_size: int,
) -> list[UpdateStats]:
    """Clipped GRPO + KL over every (trajectory, SDE step); one optimizer step per inner epoch.

    The old log-probs are recomputed with the unchanged parameters in the same batches as the
    new ones, so the first epoch's ratio is exactly 1 (the rollout's own log-probs can differ in
    the last bits when batch composition differs; that drift is reported as ``logp_drift``).
    """
    steps = trained_steps(batch)
    cond = policy.encode_prompts(batch.prompts)
    count = len(batch.prompts)
    chunks = [torch.arange(s, min(s + train_batch_size, count), device=policy.device)
              for s in range(0, count, train_batch_size)]
    sigma_guard = float(sigmas[1])
    advantages = advantages.to(policy.device)
    old_log_probs: dict[tuple[int, int], torch.Tensor] = {}
    params = policy.trainable_parameters()
    results = []
    policy.train(True)
    for epoch in range(inner_epochs):
        optimizer.zero_grad(set_to_none=True)
        sums = dict(loss=0.0, policy_loss=0.0, kl=0.0, ratio_mean=0.0, clip_fraction=0.0, approx_kl=0.0)
        drift = 0.0
        for i in steps:
            for c, rows in enumerate(chunks):
                x, x_next = batch.latents[rows, i], batch.latents[rows, i + 1]
                step_cond = select(cond, rows)
                v = policy.velocity(x, sigmas[i], step_cond)
                step = sde_step(x, v, sigmas[i], sigmas[i + 1], noise_level, sigma_guard, sample=x_next)
                if epoch == 0:
                    old_log_probs[i, c] = step.log_prob.detach()
                    drift = max(drift, (old_log_probs[i, c] - batch.log_probs[rows, i]).abs().max().item())
                kl = None
                if beta > 0:
                    with torch.no_grad(), policy.reference():
                        v_ref = policy.velocity(x, sigmas[i], step_cond)
                    mean_ref = sde_step(x, v_ref, sigmas[i], sigmas[i + 1], noise_level, sigma_guard, sample=x_next).mean
                    kl = gaussian_kl(step.mean, mean_ref, step.std)
                terms = clipped_policy_loss(step.log_prob, old_log_probs[i, c], advantages[rows], clip_range, kl, beta)
                weight = len(rows) / count / len(steps)
                (terms.loss * weight).backward()
                for key in sums:
                    value = getattr(terms, key)
                    sums[key] += (value.item() if torch.is_tensor(value) else value) * weight
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item() if params else 0.0
        skipped = ""
        if not math.isfinite(grad_norm) or not math.isfinite(sums["loss"]):
            skipped = f"non-finite loss ({sums['loss']}) or gradient norm ({grad_norm})"
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
        results.append(UpdateStats(grad_norm=grad_norm, logp_drift=drift, skipped=skipped, **sums))
        if skipped:
            break
    optimizer.zero_grad(set_to_none=True)
    return results
