"""GRPO: Flow-GRPO for flow models, DDPO / DanceGRPO for diffusion models (the clipped policy loss on
the recorded SDE steps, ``optimize.policy_update``). With ``sampling.sde_window_size`` only a window
of consecutive steps is stochastic, at a random position per iteration (Flow-GRPO-Fast)."""

from __future__ import annotations

from epgrpo.trainer.algorithms.base import Algorithm, register_algorithm
from epgrpo.trainer.optimize import policy_update, trained_steps
from epgrpo.trainer.rollout import sde_window, train_step_subset


@register_algorithm
class GRPO(Algorithm):
    name = "grpo"
    #: the per-step loss ``policy_update`` uses (None = ``grpo.clipped_policy_loss``)
    step_loss = None

    def sde_steps(self, iteration: int) -> list[int] | None:
        from epgrpo.trainer.config import sde_window_range

        s = self.c.sampling
        if not s.sde_window_size:
            return None
        lo, hi = sde_window_range(self.c)
        return sde_window(s.num_steps, s.sde_window_size, lo, hi, self.c.train.seed, iteration)

    def train_steps(self, batch, iteration: int) -> list[int]:
        return train_step_subset(trained_steps(batch), self.c.train.timestep_fraction, self.c.train.seed, iteration)

    def update(self, policy, optimizer, batch, advantages, sampler, *, iteration, train_steps, trajectory_offset=0,
               **options):
        return policy_update(policy, optimizer, batch, advantages, sampler, train_steps=train_steps,
                             step_loss=self.step_loss, **options)
