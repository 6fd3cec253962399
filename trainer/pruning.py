"""What the trainer does when the pruner cannot be reached: ``pruner.on_unavailable``.

``retry`` (default): the iteration is re-run within ``pruner.retry_budget_s``, then the run saves
a checkpoint and stops (see ``Trainer.iteration_with_retries``).
``no_prune``: the affected groups go on unpruned - the rollout keeps every live trajectory from
that checkpoint on - and each such group is counted (``pruner_fallback_groups`` in metrics.jsonl)
and logged. The run stays correct (advantages are per group); it just spends the full NFE there.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from epgrpo.trainer.clients import ServiceCallError
from epgrpo.trainer.rollout import GroupState, check_survivors

log = logging.getLogger("epgrpo.trainer.pruning")

POLICIES = ("retry", "no_prune")


class FallbackPruneSession:
    """Wraps a pruning stream; after a retryable failure every group keeps all its trajectories."""

    def __init__(self, stream, rollout_id: str):
        self.stream = stream
        self.rollout_id = rollout_id
        self.failed: ServiceCallError | None = None
        self.fallback_groups: set[str] = set()

    def decide(self, step: int, sigma: float, groups: Sequence[GroupState]) -> dict[str, list[int]]:
        if self.failed is None:
            try:
                return self.stream.decide(step, sigma, groups)
            except ServiceCallError as e:
                if not e.retryable:
                    raise
                self.failed = e
                log.warning("rollout %s: pruner unavailable at step %d (%s); %d groups continue unpruned",
                            self.rollout_id, step, e, len(groups))
        self.fallback_groups.update(g.group_id for g in groups)
        return {g.group_id: list(g.trajectory_ids) for g in groups}


def select_or_keep_all(pruner, group_id: str, ids: list[int], scores, keep: int) -> tuple[list[int], bool]:
    """full_ovf's selection, or every id (and True) when the pruner is unreachable."""
    try:
        return pruner.select_by_scores(group_id, ids, scores, keep, use_budget=False), False
    except ServiceCallError as e:
        if not e.retryable:
            raise
        log.warning("group %s: pruner unavailable (%s); trained unpruned", group_id, e)
        return list(ids), True


def select_after_sampling(pruner, batch, rewards, iteration: int, keep: int, fallback: bool) -> tuple:
    """``full_ovf``: the pruner picks each group's max-variance subset of the final rewards.
    Returns the kept rows of ``batch`` and how many groups went on unpruned (``fallback``: the
    pruner was unreachable for them)."""
    rows, fell_back = [], 0
    for g in torch.unique(batch.group_index).tolist():
        members = (batch.group_index == g).nonzero().flatten()
        ids = batch.trajectory_ids[members].tolist()
        scores = rewards[members.cpu().numpy()]
        if fallback:
            kept, unpruned = select_or_keep_all(pruner, f"it{iteration}-g{g}", ids, scores, keep)
            fell_back += unpruned
        else:
            kept = pruner.select_by_scores(f"it{iteration}-g{g}", ids, scores, keep)
        check_survivors(f"it{iteration}-g{g}", kept, ids, min(keep, len(ids)), "after sampling (full_ovf)")
        kept = set(kept)
        rows += [m for m, t in zip(members.tolist(), ids) if t in kept]
    return torch.tensor(sorted(rows), device=batch.group_index.device), fell_back
