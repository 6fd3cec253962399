"""MixGRPO (arXiv 2507.21802; Tencent-Hunyuan/MixGRPO): a window of consecutive SDE steps that slides
along the trajectory over training; every step outside it is an ODE step, and only the window's
steps are trained (with the GRPO loss).

Window size w = sampling.sde_window_size (0 = MixGRPO's 4). The window starts at the first step of
its range (sampling.sde_window_range, empty = every step but the last) and moves by
``algo.mixgrpo_stride`` steps every ``algo.mixgrpo_shift_interval`` iterations (MixGRPO's progressive
strategy: w = 4, interval 25, stride 1 over 25 steps). At the end of the range it stays there, or
starts over with ``algo.mixgrpo_roll_back``. Under Expand-and-Prune the pruning steps stay where
prune.steps says, wherever the window is; NFE counts the SDE and the ODE steps alike.

Not implemented: MixGRPO-Flash's higher-order ODE solver with a compressed grid after the window
(the rollout's steps are one-step samplers); the ODE steps after the window are Euler steps.
"""

from __future__ import annotations

from epgrpo.trainer.algorithms.base import register_algorithm
from epgrpo.trainer.algorithms.grpo import GRPO

DEFAULT_WINDOW = 4  # MixGRPO's window size


def window_positions(num_steps: int, size: int, lo: int, hi: int, stride: int) -> list[int]:
    """The window's start steps in order: lo, lo + stride, ... up to hi - size."""
    return list(range(lo, hi - size + 1, stride))


def window_start(iteration: int, positions: list[int], shift_interval: int, roll_back: bool) -> int:
    """The start at ``iteration`` (1-based): it moves every ``shift_interval`` iterations."""
    moves = (iteration - 1) // shift_interval
    return positions[moves % len(positions)] if roll_back else positions[min(moves, len(positions) - 1)]


@register_algorithm
class MixGRPO(GRPO):
    name = "mixgrpo"
    options = ("mixgrpo_shift_interval", "mixgrpo_stride", "mixgrpo_roll_back")

    @staticmethod
    def window(config) -> tuple[int, int, int]:
        s = config.sampling
        size = s.sde_window_size or min(DEFAULT_WINDOW, s.num_steps - 1)
        lo, hi = s.sde_window_range or [0, s.num_steps - 1]
        return size, lo, hi

    @classmethod
    def validate(cls, config) -> None:
        o = config.algo
        for key in ("mixgrpo_shift_interval", "mixgrpo_stride"):
            if getattr(o, key) < 1:
                raise ValueError(f"algo.{key}: expected >= 1, got {getattr(o, key)}")
        size, lo, hi = cls.window(config)
        if not (0 <= lo and hi <= config.sampling.num_steps and hi - lo >= size):
            raise ValueError(f"sampling.sde_window_range: expected 0 <= lo, hi <= num_steps="
                             f"{config.sampling.num_steps}, hi - lo >= the window size {size}, got {[lo, hi]}")

    def sde_steps(self, iteration: int) -> list[int]:
        size, lo, hi = self.window(self.c)
        positions = window_positions(self.c.sampling.num_steps, size, lo, hi, self.o.mixgrpo_stride)
        start = window_start(iteration, positions, self.o.mixgrpo_shift_interval, self.o.mixgrpo_roll_back)
        return list(range(start, start + size))
