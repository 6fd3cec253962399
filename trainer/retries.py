"""Retrying an iteration whose service calls failed, in step across data-parallel ranks.

Every remote call of an iteration precedes the optimizer step, so a failed attempt changed no
weights and can be re-run. With several ranks (without FSDP) the ranks first learn, in one
collective before the iteration's first other collective, whether a service failed on any of them:
then they all re-run the iteration, and they give up together, so the checkpoint saved on the way
out is one every rank writes. The calls inside that agreement are all of an iteration's: the
rollout's pruning streams, the reward scoring and ``prune.mode=full_ovf``'s Prune after sampling.
Evaluation (scored on rank 0 only) ends with an agreement of its own: a failure there stops every
rank at the same point. Under FSDP a rank cannot re-run its sharded rollout alone: it stops.
"""

from __future__ import annotations

from epgrpo.trainer.clients import (PeerGaveUp, PeerRejected, PeerServiceFailure, RetryBudget, ServiceCallError,
                                    ServicesUnavailable)

# What a rank tells the others about its service calls (the worst one wins).
FINE, FAILED, GAVE_UP, REJECTED = 0, 1, 2, 3


def failure_code(failure: Exception | None) -> int:
    if failure is None:
        return FINE
    if isinstance(failure, ServicesUnavailable):
        return GAVE_UP
    return FAILED if failure.retryable else REJECTED


class IterationRetries:
    """Mixed into ``Trainer`` (trainer/loop.py): needs ``dist``, ``fsdp``, ``c``, ``rng``, the NFE
    counters and ``iteration``."""

    @property
    def ranks_retry_together(self) -> bool:
        """Data-parallel ranks (without FSDP) retry a failed iteration in step: a rank whose service
        call failed does not re-run its rollout alone while the others wait in the reward gather."""
        return self.dist.world_size > 1 and self.fsdp is None

    def agree_on_failures(self, failure: Exception | None) -> None:
        """Raises on every rank when a service failed on any: the rank's own error, else a peer's.
        A rejected call (not retryable) stops every rank without a checkpoint (exit 2 everywhere);
        a give-up stops every rank with one; a retryable failure makes every rank re-run."""
        worst = max(self.dist.counts(failure_code(failure)))
        if worst == REJECTED:  # no rank saves: one that did would wait in the save's barrier for the others
            raise failure if failure_code(failure) == REJECTED else PeerRejected()
        if worst == GAVE_UP:  # someone gave up: everyone stops (and saves the same checkpoint)
            raise failure if isinstance(failure, ServicesUnavailable) else PeerGaveUp()
        if worst == FAILED:
            raise failure if failure is not None else PeerServiceFailure()

    def evaluate_in_step(self, iteration: int) -> tuple[dict, object]:
        """``evaluate`` on the ranks that evaluate, then (with several ranks) an agreement every rank
        joins: a service failure while scoring on rank 0 stops every rank here, at the same
        iteration, so all of them save the same checkpoint (or none, when the call was rejected).
        Evaluation is not retried beyond the reward client's own budget: it changes no weights and
        is redone when the run resumes (``Trainer._run``)."""
        failure, result = None, ({}, None)
        if self.evaluates:
            try:
                result = self.evaluate(iteration)
            except (ServiceCallError, ServicesUnavailable) as e:
                if self.dist.world_size == 1:
                    raise
                failure = e
        if self.dist.world_size > 1:
            if isinstance(failure, ServiceCallError) and failure.retryable:  # past the client's budget already
                failure = ServicesUnavailable(f"evaluation at iteration {iteration}", 0.0, 1, failure)
            self.agree_on_failures(failure)
        return result

    def iteration_with_retries(self, iteration: int) -> dict:
        """``iteration`` run again from its start when a service call failed retryably (e.g. the
        pruning stream broke because a replica died), within ``pruner.retry_budget_s``. Every
        remote call precedes the optimizer step, so a failed attempt changed no weights; the
        prompt sampler and NFE counters are rewound, so the retry is the same iteration, counted once."""
        state = (self.rng.getstate(), self.nfe_cumulative, self.nfe_full_cumulative)
        # Under FSDP a rank cannot re-run its rollout alone: the others are inside the sharded forward
        # calls, whose collectives would pair with the wrong ones. It stops at once instead (see cli).
        budget = RetryBudget(0.0 if self.fsdp is not None else self.c.pruner.retry_budget_s)

        def rewind():
            self.rng.setstate(state[0])
            self.nfe_cumulative, self.nfe_full_cumulative = state[1], state[2]

        try:
            agree = (lambda mine: max(self.dist.counts(int(mine))) > 0) if self.ranks_retry_together else None
            record = budget.call(lambda _limit: self.iteration(iteration), f"iteration {iteration}", on_retry=rewind,
                                 agree=agree)
        except ServicesUnavailable:
            rewind()  # a checkpoint saved now must resume exactly at this iteration
            raise
        if budget.retries:
            record["service_retries"] = budget.retries
        return record
