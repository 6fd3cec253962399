"""Expand-and-Prune rollouts: sample groups of trajectories with the policy's sampler, stopping
the trajectories the pruner drops at the scheduled checkpoint steps.

**Pruning at step s** decides on the x0-previews of x_s (the latents after s denoising steps),
computed from the model call that step s makes at x_s anyway; only the survivors then take step
s (x_s -> x_{s+1}) and the steps after it. A pruned trajectory has cost s + 1 model calls, the
preview included: nothing is computed twice and nothing extra is computed. NFE per group = the
sum over steps of the trajectories that made that step's call (x2 with classifier-free guidance).
Every trajectory draws its noise from its own generator, so a trajectory's path does not depend
on which others are in the batch (pruned or not), on the batch size, or on the rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator, Protocol, Sequence

import numpy as np
import torch

from epgrpo.trainer.policy.base import PolicyAdapter, select
from epgrpo.trainer.samplers import Sampler


@dataclass
class GroupState:
    """What the pruner is told about one group at a checkpoint."""

    group_id: str
    trajectory_ids: list[int]
    previews: torch.Tensor  # [n, C, H, W] x0-previews of the live trajectories
    prompt: str


class PruneSession(Protocol):
    def decide(self, step: int, sigma: float, groups: Sequence[GroupState]) -> dict[str, list[int]]:
        """Survivor ids per group id."""


@dataclass
class RolloutResult:
    prompts: list[str]  # per kept trajectory
    group_index: torch.Tensor  # [K] index into the iteration's prompt list
    trajectory_ids: torch.Tensor  # [K] ids within the expanded batch
    latents: torch.Tensor  # [K, S + 1, C, H, W] x at every step of the kept trajectories
    log_probs: torch.Tensor  # [K, S] rollout log-probs (NaN for ODE steps)
    nfe: int  # transformer calls actually made
    nfe_full: int  # what the same groups would cost without pruning
    survivors_per_step: list[int] = field(default_factory=list)
    previews: torch.Tensor | None = None  # [K, S, C, H, W] x0-previews (row i: at x_i), when recorded

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]

    def keep(self, rows: torch.Tensor) -> "RolloutResult":
        """The subset of kept rows (used by post-sampling selection)."""
        return RolloutResult(
            [self.prompts[i] for i in rows.tolist()], self.group_index[rows], self.trajectory_ids[rows],
            self.latents[rows], self.log_probs[rows], self.nfe, self.nfe_full, self.survivors_per_step,
            None if self.previews is None else self.previews[rows],
        )


def sample_seeds(seed: int, iteration: int, count: int, rank: int = 0) -> list[int]:
    """Distinct, reproducible per-trajectory seeds (never identical noise across samples/ranks)."""
    state = np.random.SeedSequence([seed, rank, iteration]).generate_state(count, dtype=np.uint64)
    return [int(s >> np.uint64(1)) for s in state]


def _iteration_rng(seed: int, iteration: int, purpose: int) -> np.random.Generator:
    """Per-iteration randomness derived from (seed, iteration): reproducible, identical on every
    rank, and nothing to checkpoint."""
    return np.random.default_rng(np.random.SeedSequence([seed, iteration, purpose]))


def sde_window(num_steps: int, size: int, lo: int, hi: int, seed: int, iteration: int) -> list[int]:
    """Flow-GRPO-Fast: ``size`` consecutive SDE steps starting at a random step in [lo, hi - size];
    all other steps are deterministic. ``size`` 0 = the default (every step but the last)."""
    if size <= 0:
        return list(range(num_steps - 1))
    start = int(_iteration_rng(seed, iteration, 1).integers(lo, hi - size + 1))
    return list(range(start, start + size))


def train_step_subset(steps: Sequence[int], fraction: float, seed: int, iteration: int) -> list[int]:
    """A random ``fraction`` (at least one) of the SDE steps to train on this iteration (Flow-GRPO's
    timestep fraction; the same steps for every trajectory so they batch together)."""
    steps = sorted(steps)
    count = max(1, int(round(len(steps) * fraction)))
    if count >= len(steps):
        return steps
    chosen = _iteration_rng(seed, iteration, 2).choice(len(steps), size=count, replace=False)
    return sorted(steps[k] for k in chosen)


def micro_batch_order(count: int, seed: int, iteration: int, rank: int = 0) -> torch.Tensor:
    """A random order of an iteration's ``count`` trajectories for its optimizer steps (Flow-GRPO and
    DDPO shuffle their samples before splitting them into steps); derived from (seed, iteration, rank):
    reproducible and nothing to checkpoint, so a resumed run trains on the same micro-batches."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, iteration, 3, rank]))
    return torch.from_numpy(rng.permutation(count))


@dataclass
class DecisionRequest:
    """What a rollout needs answered before it goes on: survivors per group at ``step``."""

    step: int
    sigma: float
    groups: list[GroupState]


def rollout(policy: PolicyAdapter, prompts: Sequence[str], group_size: int, sampler: Sampler, *,
            pruner: PruneSession | None = None, schedule: Sequence[tuple[int, int]] = (), **options) -> RolloutResult:
    """Samples ``group_size`` trajectories per prompt; prunes per ``schedule`` [(step, keep)]:
    at step s the pruner sees the previews of x_s and ``keep`` trajectories per group go on.
    Options as ``rollout_steps``; the pruner's decisions are awaited in place."""
    if schedule and pruner is None:
        raise ValueError("pruner: a pruning schedule needs a pruner")
    steps = rollout_steps(policy, prompts, group_size, sampler, schedule=schedule, **options)
    try:
        request = next(steps)
        while True:
            request = steps.send(pruner.decide(request.step, request.sigma, request.groups))
    except StopIteration as done:
        return done.value


def check_survivors(group_id: str, survivors, live: list[int], keep: int, where: str) -> None:
    """A pruner's answer for one group, before any row is picked by it: distinct ids of the group's live
    trajectories, ``keep`` of them (or all of them: the group went on unpruned, pruner.on_unavailable)."""
    if survivors is None:
        raise ValueError(f"pruner answer {where}: no decision for group {group_id}")
    chosen, allowed = list(survivors), set(live)
    strangers = sorted(set(chosen) - allowed)
    if strangers:
        raise ValueError(f"pruner answer {where}: survivors {strangers[:8]} of group {group_id} are not among its "
                         f"live trajectories {sorted(allowed)[:16]}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"pruner answer {where}: group {group_id} names a survivor twice: {chosen}")
    if len(chosen) not in (keep, len(allowed)):
        raise ValueError(f"pruner answer {where}: group {group_id} keeps {len(chosen)} of {len(allowed)} trajectories, "
                         f"the schedule says {keep}")


def check_decisions(decisions: dict, groups: Sequence[GroupState], keep: int, step: int) -> None:
    for g in groups:
        check_survivors(g.group_id, decisions.get(g.group_id), list(g.trajectory_ids), keep, f"at step {step}")


def rollout_steps(
    policy: PolicyAdapter,
    prompts: Sequence[str],
    group_size: int,
    sampler: Sampler,
    *,
    seeds: Sequence[int],
    schedule: Sequence[tuple[int, int]] = (),
    sde_last_step: bool = False,
    group_ids: Sequence[str] | None = None,
    record_previews: bool = False,
    sde_steps: Sequence[int] | None = None,
    batch_size: int = 0,
    first_trajectory: int = 0,
) -> Generator[DecisionRequest, dict[str, list[int]], RolloutResult]:
    """The rollout as a generator: it yields a ``DecisionRequest`` at each pruning step, is sent the
    survivor ids per group id, and returns the ``RolloutResult``. A driver can advance other
    rollouts while a decision is in flight (``trainer/waves.py``).

    ``record_previews`` keeps every step's x0-preview (for analysis: proxy fidelity, what-if pruning).
    ``sde_steps``: the stochastic (trainable) steps, the others are deterministic ODE steps
    (Flow-GRPO-Fast's SDE window); default every step but the last (all with ``sde_last_step``).
    ``batch_size``: trajectories per transformer call (0 = every live one at once); bounds memory.
    ``first_trajectory``: the id of this rollout's first trajectory (ids stay those of the whole
    iteration when its groups are sampled in several waves).
    """
    num_steps = sampler.num_steps
    total = len(prompts) * group_size
    if len(seeds) != total:
        raise ValueError(f"seeds: expected {total} (one per trajectory), got {len(seeds)}")
    device = policy.device
    group_ids = list(group_ids) if group_ids is not None else [f"g{i}" for i in range(len(prompts))]
    group_of = torch.arange(total, device=device) // group_size
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    def noise(rows: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.randn(policy.latent_shape, generator=generators[r]) for r in rows.tolist()]).to(device)

    with torch.no_grad():
        cond_all = policy.encode_prompts([p for p in prompts for _ in range(group_size)])
    latents = torch.zeros((total, num_steps + 1, *policy.latent_shape), device=device)
    log_probs = torch.full((total, num_steps), float("nan"), device=device)
    previews = torch.zeros((total, num_steps, *policy.latent_shape), device=device) if record_previews else None
    live = torch.arange(total, device=device)
    x = noise(live)
    latents[:, 0] = x
    checkpoints = dict(schedule)
    if sde_steps is None:
        sde_steps = range(num_steps if sde_last_step else num_steps - 1)
    stochastic = set(sde_steps)
    nfe, survivors_per_step = 0, []
    for i in range(num_steps):
        # no_grad per block, never across a yield: grad mode is global and other rollouts run in between
        with torch.no_grad():
            survivors_per_step.append(len(live))
            out = batched_predict(policy, x, sampler.timestep(i), select(cond_all, live), batch_size)
            nfe += len(live) * policy.nfe_per_sample
            preview = sampler.x0(x, out, i)
            if previews is not None:
                previews[live, i] = preview
        if i in checkpoints:  # decide on the previews of x_i; the survivors take step i
            groups = [GroupState(group_ids[g], (live[group_of[live] == g] + first_trajectory).tolist(),
                                 preview[group_of[live] == g], prompts[g]) for g in range(len(prompts))]
            decisions = yield DecisionRequest(i, sampler.noise_std(i), groups)
            check_decisions(decisions, groups, checkpoints[i], i)
            keep = torch.tensor(sorted(t - first_trajectory for g in groups for t in decisions[g.group_id]),
                                device=device, dtype=live.dtype)
            rows = torch.searchsorted(live, keep)
            live, x, out = keep, x[rows], out[rows]
        with torch.no_grad():
            if i in stochastic:
                step = sampler.step(x, out, i, noise=noise(live))
                x = step.sample
                log_probs[live, i] = step.log_prob
            else:
                x = sampler.deterministic_step(x, out, i)
            latents[live, i + 1] = x
    kept = live
    return RolloutResult(
        prompts=[prompts[g] for g in group_of[kept].tolist()],
        group_index=group_of[kept],
        trajectory_ids=kept + first_trajectory,
        latents=latents[kept],
        log_probs=log_probs[kept],
        nfe=nfe,
        nfe_full=total * num_steps * policy.nfe_per_sample,
        survivors_per_step=survivors_per_step,
        previews=None if previews is None else previews[kept],
    )


def batched_predict(policy: PolicyAdapter, x: torch.Tensor, t, cond, batch_size: int = 0) -> torch.Tensor:
    """``policy.predict`` in chunks of ``batch_size`` rows (0 = one call)."""
    if batch_size <= 0 or len(x) <= batch_size:
        return policy.predict(x, t, cond)
    return torch.cat([policy.predict(x[s:s + batch_size], t, {k: v[s:s + batch_size] for k, v in cond.items()})
                      for s in range(0, len(x), batch_size)])


def sample_ode(policy: PolicyAdapter, prompts: Sequence[str], seeds: Sequence[int], sampler: Sampler,
               batch_size: int = 0) -> torch.Tensor:
    """Deterministic samples (probability-flow ODE / DDIM with eta = 0), one per prompt and seed:
    the evaluation sampler."""
    cond = policy.encode_prompts(list(prompts))
    x = torch.stack([torch.randn(policy.latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = x.to(policy.device)
    with torch.no_grad():
        for i in range(sampler.num_steps):
            x = sampler.deterministic_step(x, batched_predict(policy, x, sampler.timestep(i), cond, batch_size), i)
    return x


def sample_eval(policy: PolicyAdapter, prompts: Sequence[str], seeds: Sequence[int], sampler: Sampler,
                stochastic: bool, batch_size: int = 0) -> torch.Tensor:
    """Evaluation samples, one per prompt and seed: deterministic (``sample_ode``) or the policy's own
    stochastic sampler with each sample's noise drawn from its seed (reproducible across evaluations)."""
    if not stochastic:
        return sample_ode(policy, prompts, seeds, sampler, batch_size)
    return rollout(policy, prompts, 1, sampler, seeds=seeds, batch_size=batch_size).final
