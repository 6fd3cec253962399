"""RolloutSession: schedule validation, per-group state, and precise errors naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from epgrpo.protos.v1 import pruner_pb2
from epgrpo.services.common.errors import FailedPrecondition, InvalidArgument
from epgrpo.services.pruner.ovf import ovf_select
from epgrpo.services.pruner.session import RolloutSession

PAPER_SCHEDULE = [(5, 24), (7, 12)]  # SD3.5 with 10 steps: 48 -> 24 -> 12


def paper_session(**kwargs) -> RolloutSession:
    return RolloutSession.create(PAPER_SCHEDULE, num_steps=10, **kwargs)


@pytest.mark.parametrize(
    "schedule,num_steps,error,field",
    [
        ([(5, 24)], 0, InvalidArgument, "open.num_steps"),
        ([(5, 24)], 1, InvalidArgument, "open.num_steps"),
        ([], 10, InvalidArgument, "open.schedule"),
        ([(0, 24)], 10, InvalidArgument, "open.schedule[0].step"),
        ([(10, 24)], 10, InvalidArgument, "open.schedule[0].step"),
        ([(5, 24), (5, 12)], 10, InvalidArgument, "open.schedule[1].step"),
        ([(5, 24), (4, 12)], 10, InvalidArgument, "open.schedule[1].step"),
        ([(5, 24), (7, 24)], 10, InvalidArgument, "open.schedule[1].keep"),
        ([(5, 12), (7, 24)], 10, InvalidArgument, "open.schedule[1].keep"),
        ([(5, 0)], 10, InvalidArgument, "open.schedule[0].keep"),
        ([(5, 24), (7, 12), (12, 6)], 10, InvalidArgument, "open.schedule[2].step"),
    ],
)
def test_schedule_validation_names_the_field(schedule, num_steps, error, field):
    with pytest.raises(error) as info:
        RolloutSession.create(schedule, num_steps)
    assert str(info.value).startswith(field + ":")


def test_unknown_strategy_names_the_field():
    with pytest.raises(InvalidArgument, match=r"^open\.strategy: "):
        RolloutSession.create(PAPER_SCHEDULE, 10, strategy=9)


def test_paper_schedule_over_two_groups():
    session = paper_session()
    rng = np.random.default_rng(0)
    live = {g: list(range(100 * g, 100 * g + 48)) for g in (0, 1)}
    for step, keep in PAPER_SCHEDULE:
        for g in (0, 1):  # interleaved groups keep independent state
            ids = live[g][::-1]  # any order: scores follow the ids' order
            scores = rng.uniform(size=len(ids))
            survivors, got_keep = session.decide(f"g{g}", step, ids, scores)
            assert got_keep == keep
            assert survivors == sorted(ids[i] for i in ovf_select(scores, keep))
            live[g] = survivors
    assert [len(v) for v in live.values()] == [12, 12]
    assert session.num_groups == 2 and session.expected_step("g0") is None


def test_first_checkpoint_accepts_any_number_of_ids_at_least_keep():
    session = paper_session()
    survivors, keep = session.decide("g", 5, list(range(24)), np.arange(24.0))
    assert keep == 24 and survivors == list(range(24))
    with pytest.raises(InvalidArgument, match=r"^checkpoint\.trajectory_ids: .*at least keep=24"):
        paper_session().decide("g", 5, list(range(23)), np.arange(23.0))


@pytest.mark.parametrize("steps", [[7], [5, 5], [5, 6], [5, 7, 7], [5, 7, 9], [3]])
def test_steps_out_of_order_repeated_or_unscheduled(steps):
    session = paper_session()
    live = list(range(48))
    for step in steps[:-1]:
        live, _ = session.decide("g", step, live, np.linspace(0, 1, len(live)))
    with pytest.raises(FailedPrecondition) as info:
        session.decide("g", steps[-1], live, np.linspace(0, 1, len(live)))
    message = str(info.value)
    assert message.startswith("checkpoint.step:")
    expected = session.expected_step("g")
    assert (f"expected step {expected}" in message) if expected is not None else "passed every" in message


def test_later_checkpoint_needs_exactly_the_survivors():
    session = paper_session()
    survivors, _ = session.decide("g", 5, list(range(48)), np.linspace(0, 1, 48))
    pruned = sorted(set(range(48)) - set(survivors))
    with pytest.raises(FailedPrecondition) as info:
        session.decide("g", 7, survivors[1:] + [pruned[0]], np.zeros(24))
    message = str(info.value)
    assert message.startswith("checkpoint.trajectory_ids:")
    assert f"unknown ids [{pruned[0]}]" in message and f"missing ids [{survivors[0]}]" in message
    with pytest.raises(FailedPrecondition, match=r"missing ids"):
        session.decide("g", 7, survivors[:-1], np.zeros(23))
    # The rejected messages left the state alone: the right survivors still work.
    assert len(session.decide("g", 7, survivors, np.linspace(0, 1, 24))[0]) == 12


def test_duplicate_ids_are_invalid():
    with pytest.raises(InvalidArgument, match=r"^checkpoint\.trajectory_ids: .*duplicates \[3\]"):
        paper_session().decide("g", 5, list(range(47)) + [3], np.zeros(48))


@pytest.mark.parametrize("scores", [np.zeros(47), np.array([np.nan] + [0.0] * 47), np.full(48, np.inf)])
def test_bad_scores_are_invalid(scores):
    session = paper_session()
    with pytest.raises(InvalidArgument, match=r"^checkpoint\.scores: "):
        session.decide("g", 5, list(range(48)), scores)
    assert session.expected_step("g") == 5  # nothing was recorded


def test_empty_group_id_is_invalid():
    with pytest.raises(InvalidArgument, match=r"^checkpoint\.group_id: "):
        paper_session().decide("", 5, list(range(48)), np.zeros(48))


def test_random_strategy_is_seeded_by_seed_group_and_step():
    def survivors(seed, group):
        session = paper_session(strategy=pruner_pb2.STRATEGY_RANDOM, seed=seed)
        return session.decide(group, 5, list(range(48)), np.zeros(48))[0]

    assert survivors(3, "g") == survivors(3, "g")
    assert survivors(3, "g") != survivors(4, "g")
    assert survivors(3, "g") != survivors(3, "h")
    assert len(survivors(3, "g")) == 24
