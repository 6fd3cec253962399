"""GRPO policy updates on an iteration's kept trajectories (the loss side of the loop)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from epgrpo.trainer.grpo import clipped_policy_loss
from epgrpo.trainer.policy.base import PolicyAdapter, select
from epgrpo.trainer.rollout import RolloutResult
from epgrpo.trainer.samplers import Sampler


@dataclass
class UpdateStats:
    loss: float
    policy_loss: float
    kl: float
    ratio_mean: float
    clip_fraction: float
    approx_kl: float
    grad_norm: float  # mean over the epoch's optimizer steps (before clipping)
    logp_drift: float  # max |rollout log-prob - recomputed log-prob| before the update
    optimizer_steps: int = 0
    skipped: str = ""  # reason an optimizer step was skipped, if one was


def trained_steps(batch: RolloutResult) -> list[int]:
    """The stochastic steps (deterministic steps have no log-prob and are not trained on)."""
    return [i for i in range(batch.log_probs.shape[1]) if torch.isfinite(batch.log_probs[:, i]).all()]


def _chunks(count: int, size: int, device) -> list[torch.Tensor]:
    return [torch.arange(s, min(s + size, count), device=device) for s in range(0, count, size)]


def equal_shares(micro_batches: int, steps: int) -> list[list[int]]:
    """Exactly ``steps`` consecutive shares of the micro-batches, sizes differing by at most one
    (train.optimizer_steps); fewer micro-batches than steps is refused, naming the options."""
    if micro_batches < steps:
        raise ValueError(f"train.optimizer_steps: {steps} optimizer steps per inner epoch need at least {steps} "
                         f"micro-batches, the iteration has {micro_batches} (lower train.train_batch_size or "
                         f"train.optimizer_steps)")
    sizes = [micro_batches // steps + (k < micro_batches % steps) for k in range(steps)]  # the larger ones first
    starts = [sum(sizes[:k]) for k in range(steps)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes)]


def micro_batch_plan(count: int, train_batch_size: int, device, *, micro_batches: int = 0, optimizer_steps: int = 0,
                     gradient_accumulation: int = 0, order: torch.Tensor | None = None):
    """(micro-batches of row indices, how many carry weight, the micro-batches of each optimizer step).

    Rows go in micro-batches of ``train_batch_size``; at least ``micro_batches`` of them (the extra
    ones repeat the first with zero weight: every rank makes the same calls). An optimizer step
    follows every ``gradient_accumulation`` micro-batches (0 = one per inner epoch), or exactly
    ``optimizer_steps`` steps over equal shares. With several steps, ``order`` (a permutation of the
    rows) shuffles which rows each micro-batch takes."""
    chunks = _chunks(count, train_batch_size, device)
    real = len(chunks)  # micro-batches with weight; the ones after them are padding
    chunks += chunks[:1] * max(0, micro_batches - real)
    if optimizer_steps > 0:  # Flow-GRPO's cadence: accumulate over 1/optimizer_steps of the micro-batches
        step_groups = equal_shares(len(chunks), optimizer_steps)
    else:
        per_step = len(chunks) if gradient_accumulation <= 0 else min(gradient_accumulation, len(chunks))
        step_groups = [list(range(s, min(s + per_step, len(chunks)))) for s in range(0, len(chunks), per_step)]
    if order is not None and len(step_groups) > 1:  # shuffled micro-batches: each step sees a mix of groups
        order = order.to(device)
        chunks = [order[rows] for rows in chunks[:real]]
        chunks += chunks[:1] * max(0, micro_batches - real)
    return chunks, real, step_groups


def add_terms(sums: dict[str, float], terms, rows: int) -> None:
    """Row-weighted sums of a loss's statistics, divided once at the end (exact when every term is equal)."""
    for key in sums:
        value = getattr(terms, key)
        sums[key] += (value.item() if torch.is_tensor(value) else value) * rows


def apply_step(params, optimizer, local_loss: float, max_grad_norm: float, sync_gradients=None,
               after_step=None) -> tuple[float, str]:
    """Ends one optimizer step over the accumulated gradient: all-reduce, clip, step (and EMA).
    Returns (gradient norm before clipping, "" or why the step was skipped)."""
    if not math.isfinite(local_loss):  # poison the gradient so that every rank skips this step
        for p in params:
            p.grad = torch.full_like(p, float("nan"))
    if sync_gradients is not None:
        sync_gradients(params)
    # on FSDP's DTensors the norm is the global one (a collective), replicated on every rank
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item() if params else 0.0
    if not math.isfinite(grad_norm):
        return grad_norm, f"non-finite loss ({local_loss}) or gradient norm ({grad_norm})"
    optimizer.step()
    if after_step is not None:
        after_step()
    return grad_norm, ""


def policy_update(
    policy: PolicyAdapter,
    optimizer: torch.optim.Optimizer,
    batch: RolloutResult,
    advantages: torch.Tensor,
    sampler: Sampler,
    *,
    clip_range: float,
    beta: float,
    inner_epochs: int,
    max_grad_norm: float,
    train_batch_size: int,
    gradient_accumulation: int = 0,
    optimizer_steps: int = 0,
    train_steps: Sequence[int] | None = None,
    sync_gradients: Callable[[list[torch.nn.Parameter]], None] | None = None,
    after_step: Callable[[], None] | None = None,
    micro_batches: int = 0,
    order: torch.Tensor | None = None,
    step_loss: Callable | None = None,
) -> list[UpdateStats]:
    """Clipped GRPO + KL over every (trajectory, trained step).

    Trajectories go through the network in micro-batches of ``train_batch_size`` (all trained
    steps of a micro-batch are accumulated); an optimizer step follows every
    ``gradient_accumulation`` micro-batches (0 = one step per inner epoch over everything), or
    ``optimizer_steps`` times per inner epoch over equal shares of the micro-batches. Each
    step's gradient is the mean over its (trajectory, step) terms; ``sync_gradients`` averages
    it across data-parallel ranks before clipping, ``after_step`` runs after each optimizer step
    (EMA). ``train_steps`` restricts training to a subset of the SDE steps (timestep fraction).
    ``micro_batches``: run at least this many micro-batches (FSDP: the most of any rank, since every
    rank must make the same forward/backward calls); the extra ones repeat the first micro-batch
    with zero weight, so they add nothing to the gradient or the statistics. ``order``: a permutation
    of the trajectories that the micro-batches take them in when an inner epoch has several optimizer
    steps (with one, the order changes nothing and is not applied).
    ``step_loss``: the per-step loss ``step_loss(step, old_log_prob, old_mean, advantages, clip_range,
    kl, beta, i, sampler) -> LossTerms`` (GRPO-Guard's); None = ``clipped_policy_loss``. The old
    step means are kept only for a loss with ``needs_old_mean``.

    The old log-probs are recomputed with the unchanged parameters in the same micro-batches as
    the new ones, so the first step's ratio is exactly 1 (the rollout's own log-probs can differ
    in the last bits when batch composition differs; that drift is reported as ``logp_drift``).
    With one optimizer step per epoch they come free with epoch 0's forward; with several, a
    no-grad pass computes them first.
    """
    steps = trained_steps(batch) if train_steps is None else sorted(train_steps)
    if not steps:
        raise ValueError("train_steps: no SDE step to train on")
    cond = policy.encode_prompts(batch.prompts)
    count = len(batch.prompts)
    chunks, real, step_groups = micro_batch_plan(count, train_batch_size, policy.device, micro_batches=micro_batches,
                                                 optimizer_steps=optimizer_steps,
                                                 gradient_accumulation=gradient_accumulation, order=order)
    advantages = advantages.to(policy.device)
    params = policy.trainable_parameters()

    def forward(i: int, rows: torch.Tensor):
        x, x_next = batch.latents[rows, i], batch.latents[rows, i + 1]
        out = policy.predict(x, sampler.timestep(i), select(cond, rows))
        return x, x_next, sampler.step(x, out, i, sample=x_next)

    old_log_probs: dict[tuple[int, int], torch.Tensor] = {}
    old_means: dict[tuple[int, int], torch.Tensor] = {}
    keep_means = getattr(step_loss, "needs_old_mean", False)
    drift = 0.0
    if len(step_groups) > 1:  # parameters change within epoch 0: old log-probs first
        with torch.no_grad():
            for c, rows in enumerate(chunks):
                for i in steps:
                    old_step = forward(i, rows)[2]
                    old_log_probs[i, c] = old_step.log_prob
                    if keep_means:
                        old_means[i, c] = old_step.mean
                    if c < real:
                        drift = max(drift, (old_log_probs[i, c] - batch.log_probs[rows, i]).abs().max().item())
    results = []
    policy.train(True)
    for epoch in range(inner_epochs):
        sums = dict(loss=0.0, policy_loss=0.0, kl=0.0, ratio_mean=0.0, clip_fraction=0.0, approx_kl=0.0)
        grad_norms, skipped = [], ""
        for group in step_groups:
            optimizer.zero_grad(set_to_none=True)
            group_count = max(1, sum(len(chunks[c]) for c in group if c < real))  # padding only: weight 0
            local_loss = 0.0
            for c in group:
                rows = chunks[c]
                weight = len(rows) / group_count / len(steps) if c < real else 0.0
                for i in steps:
                    x, x_next, step = forward(i, rows)
                    if (i, c) not in old_log_probs:
                        old_log_probs[i, c] = step.log_prob.detach()
                        if keep_means:
                            old_means[i, c] = step.mean.detach()
                        drift = max(drift, (old_log_probs[i, c] - batch.log_probs[rows, i]).abs().max().item())
                    kl = None
                    if beta > 0:
                        with torch.no_grad(), policy.reference():
                            out_ref = policy.predict(x, sampler.timestep(i), select(cond, rows))
                        kl = sampler.kl(step.mean, sampler.step(x, out_ref, i, sample=x_next).mean, step.std, i)
                    if step_loss is None:
                        terms = clipped_policy_loss(step.log_prob, old_log_probs[i, c], advantages[rows], clip_range,
                                                    kl, beta)
                    else:
                        terms = step_loss(step, old_log_probs[i, c], old_means.get((i, c)), advantages[rows],
                                          clip_range, kl, beta, i, sampler)
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
        means = {key: value / (count * len(steps)) for key, value in sums.items()}
        results.append(UpdateStats(grad_norm=sum(grad_norms) / len(grad_norms), logp_drift=drift,
                                   optimizer_steps=len(grad_norms) - bool(skipped), skipped=skipped, **means))
        if skipped:
            break
    return results
