"""The ``algo`` config section: every algorithm's options in one typed dataclass.

Each algorithm declares the options it reads (``Algorithm.options``); setting another algorithm's
option away from its default stops the run naming the option and the algorithm (like ``model.*``
options per model family).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

AwmWeighting = Literal["uniform", "t", "t2", "huber", "ghuber"]
AwmTimeSampling = Literal["discrete", "uniform", "logit_normal"]


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class AlgorithmConfig:
    guard_step_weight: bool = _opt(True, "grpo_guard: divide each step's clipped loss by its step length |dt| "
                                   "(GRPO-Guard's step reweighting); false = the ratio normalisation alone")
    mixgrpo_shift_interval: int = _opt(25, "mixgrpo: iterations between two moves of the SDE window (MixGRPO: 25); "
                                       "the window size is sampling.sde_window_size (0 = MixGRPO's 4) and it moves "
                                       "within sampling.sde_window_range (empty = every step but the last)")
    mixgrpo_stride: int = _opt(1, "mixgrpo: steps the SDE window moves at each shift (MixGRPO: 1)")
    mixgrpo_roll_back: bool = _opt(False, "mixgrpo: when the window reaches the end of its range, start again at "
                                   "the beginning; false = it stays at the end")
    nft_beta: float = _opt(1.0, "nft: DiffusionNFT's beta mixing the current and old velocities into the implicit "
                           "positive v+ = beta v + (1 - beta) v_old and negative v- = (1 + beta) v_old - beta v")
    awm_weighting: AwmWeighting = _opt("uniform", "awm: time weighting of the matching log-likelihood (Flow-Factory's "
                                       "awm_weighting: uniform | t | t2 | huber | ghuber)")
    awm_ghuber_power: float = _opt(0.25, "awm: power of the generalised Huber weighting (awm_weighting=ghuber)")
    awm_time_sampling: AwmTimeSampling = _opt("uniform", "awm: training times per sample: discrete (the sampling "
                                              "grid's sigmas) | uniform in (0, 1) | logit_normal, time-shifted by "
                                              "sampling.shift when it is set (> 0)")
    awm_timesteps: int = _opt(0, "awm: training times per sample and iteration; 0 = sampling.num_steps")
