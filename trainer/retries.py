"""Retrying an iteration whose service calls failed, in step across data-parallel ranks.

Every remote call of an iteration precedes the optimizer step, so a failed attempt changed no
weights and can be re-run. With several ranks (without FSDP) the ranks first learn, in one
collective before the iteration's first other collective, whether a service failed on any of them:
then they all re-run the iteration, and they give up together, so the checkpoint saved on the way
out is one every rank writes. Under FSDP a rank cannot re-run its sharded rollout alone: it stops.
"""

from __future__ import annotations

from epgrpo.trainer.clients import PeerGaveUp, PeerServiceFailure, RetryBudget, ServicesUnavailable


class IterationRetries:
    """Mixed into ``Trainer`` (trainer/loop.py): needs ``dist``, ``fsdp``, ``c``, ``rng``, the NFE
    counters and ``iteration``."""

    @property
    def ranks_retry_together(self) -> bool:
        """Data-parallel ranks (without FSDP) retry a failed iteration in step: a rank whose service
        call failed does not re-run its rollout alone while the others wait in the reward gather."""
        return self.dist.world_size > 1 and self.fsdp is None

    def agree_on_failures(self, failure: Exception | None) -> None:
        """Raises on every rank when a service failed on any: the rank's own error, else a peer's."""
        worst = max(self.dist.counts(2 if isinstance(failure, ServicesUnavailable) else int(failure is not None)))
        if worst == 2:  # someone gave up: everyone stops (and saves the same checkpoint)
            raise failure if isinstance(failure, ServicesUnavailable) else PeerGaveUp()
        if worst == 1:
            raise failure if failure is not None else PeerServiceFailure()

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
