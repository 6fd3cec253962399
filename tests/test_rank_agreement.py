"""How data-parallel ranks agree on service failures (the pieces; tests/test_distributed.py runs them
with 2 real ranks): one rank's failure makes every rank retry, one rank's give-up stops every rank."""

from types import SimpleNamespace

import pytest

from epgrpo.trainer.clients import (PeerGaveUp, PeerRejected, PeerServiceFailure, RetryBudget, ServiceCallError,
                                    ServicesUnavailable)
from epgrpo.trainer.loop import Trainer


class Ended(Exception):
    def code(self):
        import grpc

        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "stream ended"


def ranks(*others):
    """A trainer whose other ranks report ``others`` (0 fine, 1 retryable failure, 2 gave up)."""
    return SimpleNamespace(dist=SimpleNamespace(counts=lambda mine: [mine, *others]))


def own_failure():
    return ServiceCallError("pruner", "PruneRollout", Ended())


class Rejected(Ended):
    def code(self):
        import grpc

        return grpc.StatusCode.INVALID_ARGUMENT


def rejected():
    return ServiceCallError("reward", "Score", Rejected())


def gave_up():
    return ServicesUnavailable("iteration 1", 5.0, 3, own_failure())


@pytest.mark.parametrize("mine,others,raised", [
    (None, (0,), None),
    (None, (1,), PeerServiceFailure),
    ("failure", (0,), ServiceCallError),
    ("failure", (2,), PeerGaveUp),
    (None, (1, 2), PeerGaveUp),
    ("gave_up", (0,), ServicesUnavailable),
    ("gave_up", (1,), ServicesUnavailable),
    # a rejected call (not retryable) stops every rank without a checkpoint: none waits in a save's barrier
    ("rejected", (0,), ServiceCallError),
    (None, (3,), PeerRejected),
    ("gave_up", (3,), PeerRejected),
    ("failure", (3, 2), PeerRejected),
])
def test_every_rank_raises_when_any_failed_and_stops_when_any_gave_up(mine, others, raised):
    failure = {"failure": own_failure(), "gave_up": gave_up(), "rejected": rejected(), None: None}[mine]
    if raised is None:
        assert Trainer.agree_on_failures(ranks(*others), failure) is None
        return
    with pytest.raises(raised) as info:
        Trainer.agree_on_failures(ranks(*others), failure)
    if failure is not None and raised in (ServiceCallError, ServicesUnavailable):
        assert info.value is failure  # a rank's own error is the one it reports
    if raised is PeerServiceFailure:
        assert info.value.retryable  # so the retry budget retries it like the rank's own failure
    if raised is PeerRejected:  # the CLI's exit 2 for a rejected call, on every rank
        assert isinstance(info.value, ServiceCallError) and not info.value.retryable


def test_the_give_up_decision_is_the_common_one():
    clock = [0.0]
    calls = []

    def attempt(_limit):
        calls.append(1)
        clock[0] += 1.0
        raise own_failure()

    agreed = []

    def agree(mine):  # another rank gives up at the second failure although this one has budget left
        agreed.append(mine)
        return len(agreed) == 2

    budget = RetryBudget(total_s=100.0, sleep=lambda s: None, clock=lambda: clock[0])
    with pytest.raises(ServicesUnavailable, match="gave up after 2 attempts"):
        budget.call(attempt, "iteration 1", agree=agree)
    assert agreed == [False, False] and len(calls) == 2
    with pytest.raises(ServicesUnavailable, match="gave up after 1 attempts over the 0 s"):  # out of budget: always
        RetryBudget(total_s=0.0, sleep=lambda s: None).call(attempt, "iteration 1", agree=lambda mine: mine)
