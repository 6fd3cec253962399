"""Per-rollout pruning state: the schedule, each group's live trajectories, and the decisions.

Pure (no grpc calls): the servicer turns an OpenRollout into a :class:`RolloutSession` and asks
it for one decision per GroupCheckpoint. Errors are the service's typed exceptions naming the
proto field, so the servicer only has to let them propagate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from epgrpo.services.common.errors import FailedPrecondition, InvalidArgument, show
from epgrpo.services.pruner import ovf


@dataclass(frozen=True)
class ScheduledCheckpoint:
    step: int  # before this (0-based) denoising step ...
    keep: int  # ... only this many trajectories per group remain


@dataclass
class _GroupState:
    next_index: int = 0  # index into the schedule of the group's next checkpoint
    live_ids: tuple[int, ...] | None = None  # None until the first checkpoint fixes the group
    last_step: int | None = None


def check_ids(trajectory_ids: Sequence[int], field: str = "checkpoint.trajectory_ids") -> list[int]:
    ids = [int(i) for i in trajectory_ids]
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        duplicates = sorted({i for i in ids if i in seen or seen.add(i)})
        raise InvalidArgument(f"{field}: expected unique ids, got duplicates {duplicates}")
    return ids


def check_scores(scores, n: int, field: str = "checkpoint.scores") -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size != n:
        raise InvalidArgument(f"{field}: expected {n} values (one per trajectory id), got {values.size}")
    if not np.isfinite(values).all():
        raise InvalidArgument(f"{field}: expected finite values, got {int((~np.isfinite(values)).sum())} NaN/Inf")
    return values


def strategy_or_raise(strategy: int, field: str) -> ovf.SelectFn:
    try:
        return ovf.strategy_function(strategy)
    except ValueError as exc:
        raise InvalidArgument(f"{field}: {str(exc).partition(': ')[2]}") from None


def select_survivors(
    ids: list[int], scores: np.ndarray, keep: int, strategy: int, seed: int, group_id: str, step: int
) -> list[int]:
    """Ascending surviving ids; ids and scores already validated, 1 <= keep <= len(ids)."""
    select = ovf.strategy_function(strategy)
    kept = select(scores, keep, ovf.selection_rng(seed, group_id, step))
    return sorted(ids[i] for i in kept)


@dataclass
class RolloutSession:
    """One rollout's schedule and per-group state (lives as long as the client's stream)."""

    schedule: tuple[ScheduledCheckpoint, ...]
    num_steps: int
    strategy: int = 0
    seed: int = 0
    rollout_id: str = ""
    _groups: dict[str, _GroupState] = field(default_factory=dict, repr=False)

    @classmethod
    def create(
        cls, schedule: Sequence[tuple[int, int]], num_steps: int, strategy: int = 0, seed: int = 0, rollout_id: str = ""
    ) -> "RolloutSession":
        """Validates an OpenRollout's contents; errors name the ``open.*`` field."""
        if num_steps < 2:
            raise InvalidArgument(
                f"open.num_steps: expected >= 2 (checkpoints lie in [1, num_steps)), got {num_steps}"
            )
        if not schedule:
            raise InvalidArgument("open.schedule: expected at least one checkpoint, got none")
        entries = []
        for i, (step, keep) in enumerate(schedule):
            step, keep = int(step), int(keep)
            if not 1 <= step < num_steps:
                raise InvalidArgument(f"open.schedule[{i}].step: expected 1 <= step < num_steps={num_steps}, got {step}")
            if keep < 1:
                raise InvalidArgument(f"open.schedule[{i}].keep: expected >= 1, got {keep}")
            if entries and step <= entries[-1].step:
                raise InvalidArgument(
                    f"open.schedule[{i}].step: expected steps strictly increasing, got {step} after {entries[-1].step}"
                )
            if entries and keep >= entries[-1].keep:
                raise InvalidArgument(
                    f"open.schedule[{i}].keep: expected keeps strictly decreasing, got {keep} after {entries[-1].keep}"
                )
            entries.append(ScheduledCheckpoint(step, keep))
        strategy_or_raise(strategy, "open.strategy")
        return cls(tuple(entries), int(num_steps), int(strategy), int(seed), rollout_id)

    @property
    def num_groups(self) -> int:
        return len(self._groups)

    def expected_step(self, group_id: str) -> int | None:
        """The step of the group's next checkpoint, None once the group has passed all of them."""
        index = self._groups.get(group_id, _GroupState()).next_index
        return self.schedule[index].step if index < len(self.schedule) else None

    def decide(self, group_id: str, step: int, trajectory_ids: Sequence[int], scores) -> tuple[list[int], int]:
        """Survivor ids (ascending) and ``keep`` at the group's next checkpoint.

        State changes only when the decision succeeds, so a rejected message leaves the
        session as it was.
        """
        keep, ids = self.validate(group_id, step, trajectory_ids)
        values = check_scores(scores, len(ids))
        state = self._groups.get(group_id, _GroupState())
        survivors = select_survivors(ids, values, keep, self.strategy, self.seed, group_id, step)
        self._groups[group_id] = _GroupState(state.next_index + 1, tuple(survivors), step)
        return survivors, keep

    def validate(self, group_id: str, step: int, trajectory_ids: Sequence[int]) -> tuple[int, list[int]]:
        """(keep, ids) if a checkpoint for these ids at this step is acceptable now; else raises.

        The servicer calls this before paying for proxy scores, so a misplaced checkpoint never
        reaches the reward service.
        """
        if not group_id:
            raise InvalidArgument("checkpoint.group_id: expected a non-empty id")
        state = self._groups.get(group_id, _GroupState())
        expected = self.expected_step(group_id)
        if expected is None:
            raise FailedPrecondition(
                f"checkpoint.step: group {show(group_id)} has passed every scheduled checkpoint "
                f"(last at step {self.schedule[-1].step}), got step {step}"
            )
        if step != expected:
            after = "" if state.last_step is None else f" after step {state.last_step}"
            raise FailedPrecondition(
                f"checkpoint.step: expected step {expected} (group {show(group_id)}'s next scheduled "
                f"checkpoint{after}), got {step}"
            )
        keep = self.schedule[state.next_index].keep
        ids = check_ids(trajectory_ids)
        if state.live_ids is None:
            if len(ids) < keep:
                raise InvalidArgument(
                    f"checkpoint.trajectory_ids: expected at least keep={keep} ids at group {show(group_id)}'s "
                    f"first checkpoint, got {len(ids)}"
                )
        elif set(ids) != set(state.live_ids):
            unknown = sorted(set(ids) - set(state.live_ids))
            missing = sorted(set(state.live_ids) - set(ids))
            raise FailedPrecondition(
                f"checkpoint.trajectory_ids: expected exactly the {len(state.live_ids)} survivors of step "
                f"{state.last_step} for group {show(group_id)}; unknown ids {unknown}, missing ids {missing}"
            )
        return keep, ids
