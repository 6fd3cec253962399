"""Waves: the trainer keeps denoising while a service call is in flight.

An iteration's groups are split into waves, each a ``rollout_steps`` generator. The driver
advances one wave until it needs a pruning decision, hands that call to a thread and advances the
next wave meanwhile; it returns to a wave once its decision has arrived. A wave that has finished
is handed to ``on_finish`` (decode + score its final images, also off the denoising thread).
Every trajectory draws its own noise, so a wave's paths do not depend on the other waves: the
survivors, rewards and update equal those of one wave (tested).
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import Callable, Generator, Sequence

import torch

from epgrpo.trainer.rollout import DecisionRequest, PruneSession, RolloutResult

Rollout = Generator[DecisionRequest, dict, RolloutResult]


def split_waves(count: int, waves: int) -> list[range]:
    """``count`` groups in at most ``waves`` contiguous, nearly equal waves (none empty)."""
    waves = max(1, min(waves, count))
    bounds = [round(k * count / waves) for k in range(waves + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def run_waves(rollouts: Sequence[Rollout], sessions: Sequence[PruneSession | None], executor: Executor,
              on_finish: Callable[[int, RolloutResult], None] = lambda k, result: None) -> list[RolloutResult]:
    """Drives the rollouts to the end, overlapping each one's pruning calls with the others' steps."""
    results: dict[int, RolloutResult] = {}
    answers: dict[int, dict | None] = {k: None for k in range(len(rollouts))}  # what to send each ready wave
    started: set[int] = set()
    in_flight: dict[Future, int] = {}
    ready = list(range(len(rollouts)))
    try:
        while ready or in_flight:
            for k in ready:  # advance every ready wave up to its next decision (or its end)
                try:
                    request = rollouts[k].send(answers[k]) if k in started else next(rollouts[k])
                except StopIteration as done:
                    results[k] = done.value
                    on_finish(k, done.value)
                    continue
                started.add(k)
                if sessions[k] is None:
                    raise ValueError("pruner: a pruning schedule needs a pruner")
                in_flight[executor.submit(sessions[k].decide, request.step, request.sigma, request.groups)] = k
            ready = []
            if in_flight:
                done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for future in sorted(done, key=in_flight.get):  # wave order: deterministic
                    k = in_flight.pop(future)
                    answers[k] = future.result()  # a failed call raises here
                    ready.append(k)
    finally:
        for future in in_flight:
            future.cancel()
        for rollout in rollouts:
            rollout.close()
    return [results[k] for k in range(len(rollouts))]


def concat_results(results: Sequence[RolloutResult], first_groups: Sequence[int]) -> RolloutResult:
    """One RolloutResult of several waves; ``first_groups[k]`` = index of wave k's first group."""
    if len(results) == 1 and first_groups[0] == 0:
        return results[0]
    previews = [r.previews for r in results]
    return RolloutResult(
        prompts=[p for r in results for p in r.prompts],
        group_index=torch.cat([r.group_index + g for r, g in zip(results, first_groups)]),
        trajectory_ids=torch.cat([r.trajectory_ids for r in results]),
        latents=torch.cat([r.latents for r in results]),
        log_probs=torch.cat([r.log_probs for r in results]),
        nfe=sum(r.nfe for r in results),
        nfe_full=sum(r.nfe_full for r in results),
        survivors_per_step=[sum(v) for v in zip(*(r.survivors_per_step for r in results))],
        previews=None if any(p is None for p in previews) else torch.cat(previews),
    )
