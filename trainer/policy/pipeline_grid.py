"""The sigma grid a diffusers flow pipeline samples on, computed on a copy of its scheduler (the
pipeline's own scheduler state is left alone): ``linspace(1, 1/N, N)`` through the scheduler's
shift at the pipeline's ``mu``, then 0; what the 2026 image families share."""

from __future__ import annotations

import numpy as np
import torch


def pipeline_sigmas(scheduler, num_steps: int, mu: float | None = None, sigmas=None) -> torch.Tensor:
    """``num_steps + 1`` float32 sigmas from 1 to 0, as the pipeline's ``retrieve_timesteps`` sets them
    (``sigmas``: the pipeline's own unshifted grid when it is not numpy's linspace)."""
    config = scheduler.config
    copy = type(scheduler).from_config(config)
    extra = {} if mu is None else {"mu": mu}
    if config.get("use_flow_sigmas"):
        copy.set_timesteps(num_steps, **extra)
    else:
        copy.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps) if sigmas is None else sigmas, **extra)
    return copy.sigmas.float()
