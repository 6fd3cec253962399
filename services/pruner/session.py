"""Per-rollout pruning state: the schedule, each group's live trajectories, and the decisions.

Pure (no grpc calls): the servicer turns an OpenRollout into a :class:`RolloutSession` and asks
it for one decision per group checkpoint. A group's checkpoint may come as several parts
(GroupCheckpoint.group_size > 0, so that no message exceeds the size limit): the session keeps the
ids and proxy scores of the parts so far (never their previews) and decides once it holds
``group_size`` ids. A group-aware proxy reward (one that scores a preview against the rest of its
group) cannot score a part alone: then :meth:`RolloutSession.collect` keeps each part's decoded
images instead, and the group is scored, once, when its last part arrives (:meth:`finish`). Errors
are the service's typed exceptions naming the proto field, so the servicer only has to let them
propagate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from epgrpo.services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, show
from epgrpo.services.common.limits import check_id
from epgrpo.services.pruner import ovf


# Bounds on one stream's state: trajectories per group, groups per rollout (a rollout has a few dozen).
MAX_GROUP_SIZE = 4096
MAX_GROUPS = 4096


@dataclass(frozen=True)
class ScheduledCheckpoint:
    step: int  # before this (0-based) denoising step ...
    keep: int  # ... only this many trajectories per group remain


@dataclass
class _GroupState:
    next_index: int = 0  # index into the schedule of the group's next checkpoint
    live_ids: tuple[int, ...] | None = None  # None until the first checkpoint fixes the group
    last_step: int | None = None


@dataclass
class _PendingParts:
    """A group's checkpoint whose parts have not all arrived: their ids and scores, nothing more."""

    step: int
    group_size: int
    part_shape: tuple[int, ...] | None  # per-trajectory proxy shape: () scores, (C, H, W) previews
    ids: list[int] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    parts: int = 0
    payloads: list[Any] = field(default_factory=list)  # what `collect` keeps to score the group later


@dataclass(frozen=True)
class GroupDecision:
    """One group's decision at one checkpoint (over all its parts)."""

    group_id: str
    step: int
    trajectory_ids: list[int]  # every live id, in the order the parts brought them
    scores: np.ndarray  # float64, one per id
    survivors: list[int]  # ascending
    keep: int
    parts: int = 1


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "scores" if shape == () else "previews"


def check_ids(trajectory_ids: Sequence[int], field: str = "checkpoint.trajectory_ids") -> list[int]:
    if len(trajectory_ids) > MAX_GROUP_SIZE:  # counted before anything is copied
        raise InvalidArgument(f"{field}: expected at most {MAX_GROUP_SIZE} ids (trajectories of one group), "
                              f"got {len(trajectory_ids)}")
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
    _pending: dict[str, _PendingParts] = field(default_factory=dict, repr=False)

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

    def received(self, group_id: str) -> int:
        """Ids the parts of the group's current checkpoint brought so far (0 when none is pending)."""
        pending = self._pending.get(group_id)
        return 0 if pending is None else len(pending.ids)

    def incomplete(self) -> list[str]:
        """One line per group whose current checkpoint still misses parts (for the end of a stream)."""
        return [f"group {show(g)} at step {p.step}: {len(p.ids)} of group_size={p.group_size} ids received"
                for g, p in self._pending.items()]

    def decide(self, group_id: str, step: int, trajectory_ids: Sequence[int], scores) -> tuple[list[int], int]:
        """Survivor ids (ascending) and ``keep`` at the group's next checkpoint, all ids in one message.

        State changes only when the decision succeeds, so a rejected message leaves the
        session as it was.
        """
        decision = self.add(group_id, step, trajectory_ids, scores)
        assert decision is not None  # a whole group decides at once
        return decision.survivors, decision.keep

    def add(self, group_id: str, step: int, trajectory_ids: Sequence[int], scores, group_size: int = 0,
            part_shape: tuple[int, ...] | None = None) -> GroupDecision | None:
        """Adds one message of a group's checkpoint (the whole group when ``group_size`` is 0) with
        its proxy scores; the decision once the group's ids are complete, else None.

        Validates like :meth:`validate` first; a rejected message leaves the session as it was.
        """
        keep, ids = self.validate(group_id, step, trajectory_ids, group_size, part_shape)
        values = check_scores(scores, len(ids))
        if group_id not in self._pending and (not group_size or group_size == len(ids)):
            return self._decide(group_id, step, ids, values, keep, 1)  # a whole group: nothing to hold
        whole = self._hold(group_id, step, ids, group_size, part_shape, scores=values)
        return None if whole is None else self._decide(group_id, step, whole.ids, np.concatenate(whole.scores),
                                                        keep, whole.parts)

    def collect(self, group_id: str, step: int, trajectory_ids: Sequence[int], group_size: int,
                part_shape: tuple[int, ...] | None, payload: Any) -> _PendingParts | None:
        """Adds one message of a group's checkpoint without scores, keeping ``payload`` (the servicer's
        decoded images of it); the group's parts (ids and payloads, in arrival order) once its ids are
        complete, else None. Then :meth:`finish` decides on the whole group's scores.

        Validates like :meth:`add`; a rejected message leaves the session as it was.
        """
        _, ids = self.validate(group_id, step, trajectory_ids, group_size, part_shape)
        return self._hold(group_id, step, ids, group_size, part_shape, payload=payload)

    def _hold(self, group_id: str, step: int, ids: list[int], group_size: int, part_shape, *, scores=None,
              payload: Any = None) -> _PendingParts | None:
        """Keeps one validated part (its scores or its payload); the group's parts once its ids are
        complete (and no longer held), else None."""
        pending = self._pending.get(group_id)
        if pending is None:
            pending = self._pending[group_id] = _PendingParts(step, int(group_size) or len(ids), part_shape)
        pending.ids.extend(ids)
        if scores is not None:
            pending.scores.append(scores)
        if payload is not None:
            pending.payloads.append(payload)
        pending.parts += 1
        if len(pending.ids) < pending.group_size:
            return None
        del self._pending[group_id]
        return pending

    def finish(self, group_id: str, collected: _PendingParts, scores) -> GroupDecision:
        """The decision on a group :meth:`collect` completed, with the proxy scores of all its ids."""
        values = check_scores(scores, len(collected.ids))
        keep = self.schedule[self._groups.get(group_id, _GroupState()).next_index].keep
        return self._decide(group_id, collected.step, collected.ids, values, keep, collected.parts)

    def _decide(self, group_id: str, step: int, ids: list[int], values: np.ndarray, keep: int,
                parts: int) -> GroupDecision:
        state = self._groups.get(group_id, _GroupState())
        survivors = select_survivors(ids, values, keep, self.strategy, self.seed, group_id, step)
        self._groups[group_id] = _GroupState(state.next_index + 1, tuple(survivors), step)
        return GroupDecision(group_id, step, ids, values, survivors, keep, parts)

    def validate(self, group_id: str, step: int, trajectory_ids: Sequence[int], group_size: int = 0,
                 part_shape: tuple[int, ...] | None = None) -> tuple[int, list[int]]:
        """(keep, this message's ids) if this message of a group's checkpoint is acceptable now; else raises.

        ``group_size`` as in GroupCheckpoint (0: the message is the whole group); ``part_shape`` the
        per-trajectory shape of its proxy, () for scores, (C, H, W) for previews, None if unknown
        (then not compared with the group's other parts). The servicer calls this before paying
        for proxy scores, so a misplaced checkpoint never reaches the reward service.
        """
        if not group_id:
            raise InvalidArgument("checkpoint.group_id: expected a non-empty id")
        check_id(group_id, "checkpoint.group_id")
        group_size = int(group_size)
        if not 0 <= group_size <= MAX_GROUP_SIZE:
            raise InvalidArgument(f"checkpoint.group_size: expected 0 to {MAX_GROUP_SIZE} (0: this message is the "
                                  f"whole group), got {group_size}")
        if group_id not in self._groups and group_id not in self._pending and \
                len(self._groups) + len(self._pending) >= MAX_GROUPS:
            raise ResourceExhausted(f"checkpoint.group_id: this rollout has {MAX_GROUPS} groups already, the most "
                                    "one stream may hold; open another rollout")
        state = self._groups.get(group_id, _GroupState())
        pending = self._pending.get(group_id)
        if pending is not None:
            return self._validate_part(group_id, state, pending, step, trajectory_ids, group_size, part_shape)
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
        if group_size and not ids:
            raise InvalidArgument(f"checkpoint.trajectory_ids: expected at least one id in each part of a "
                                  f"group_size={group_size} checkpoint, got none")
        if group_size and len(ids) > group_size:
            raise InvalidArgument(f"checkpoint.trajectory_ids: expected at most group_size={group_size} ids, "
                                  f"got {len(ids)}")
        if state.live_ids is None:
            if (group_size or len(ids)) < keep:
                what = f"group_size: expected at least keep={keep}" if group_size else \
                    f"trajectory_ids: expected at least keep={keep} ids"
                raise InvalidArgument(f"checkpoint.{what} at group {show(group_id)}'s first checkpoint, "
                                      f"got {group_size or len(ids)}")
        elif group_size:
            if group_size != len(state.live_ids):
                raise FailedPrecondition(
                    f"checkpoint.group_size: expected {len(state.live_ids)} (the survivors of step "
                    f"{state.last_step} for group {show(group_id)}), got {group_size}")
            self._check_known(group_id, state, ids)
        elif set(ids) != set(state.live_ids):
            unknown = sorted(set(ids) - set(state.live_ids))
            missing = sorted(set(state.live_ids) - set(ids))
            raise FailedPrecondition(
                f"checkpoint.trajectory_ids: expected exactly the {len(state.live_ids)} survivors of step "
                f"{state.last_step} for group {show(group_id)}; unknown ids {unknown}, missing ids {missing}"
            )
        return keep, ids

    @staticmethod
    def _check_known(group_id: str, state: _GroupState, ids: list[int]) -> None:
        unknown = sorted(set(ids) - set(state.live_ids))
        if unknown:
            raise FailedPrecondition(
                f"checkpoint.trajectory_ids: expected survivors of step {state.last_step} for group "
                f"{show(group_id)}; unknown ids {unknown}")

    def _validate_part(self, group_id: str, state: _GroupState, pending: _PendingParts, step: int,
                       trajectory_ids: Sequence[int], group_size: int,
                       part_shape: tuple[int, ...] | None) -> tuple[int, list[int]]:
        """A further part of a checkpoint whose first part(s) arrived already."""
        where = f"group {show(group_id)}'s checkpoint at step {pending.step}"
        if step != pending.step:
            raise InvalidArgument(
                f"checkpoint.step: {where} is incomplete ({len(pending.ids)} of group_size={pending.group_size} "
                f"ids received); expected its remaining parts at step {pending.step}, got step {step}")
        if group_size != pending.group_size:
            raise InvalidArgument(f"checkpoint.group_size: expected {pending.group_size} like the earlier parts of "
                                  f"{where}, got {group_size}")
        if part_shape is not None and pending.part_shape is not None and part_shape != pending.part_shape:
            if () in (part_shape, pending.part_shape):
                raise InvalidArgument(f"checkpoint.proxy: expected {_shape_text(pending.part_shape)} like the earlier "
                                      f"parts of {where}, got {_shape_text(part_shape)}")
            raise InvalidArgument(f"checkpoint.previews.shape: expected [n, {', '.join(map(str, pending.part_shape))}] "
                                  f"like the earlier parts of {where}, got [n, {', '.join(map(str, part_shape))}]")
        ids = check_ids(trajectory_ids)
        if not ids:
            raise InvalidArgument(f"checkpoint.trajectory_ids: expected at least one id in each part of {where}, "
                                  "got none")
        repeated = sorted(set(ids).intersection(pending.ids))
        if repeated:
            raise InvalidArgument(f"checkpoint.trajectory_ids: ids {repeated} came already in an earlier part of "
                                  f"{where}")
        if len(pending.ids) + len(ids) > pending.group_size:
            raise InvalidArgument(
                f"checkpoint.trajectory_ids: expected at most group_size={pending.group_size} ids over the parts of "
                f"{where}; {len(pending.ids)} came before, this part has {len(ids)}")
        if state.live_ids is not None:
            self._check_known(group_id, state, ids)
        return self.schedule[state.next_index].keep, ids
