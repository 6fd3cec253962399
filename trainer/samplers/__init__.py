"""Samplers: the stochastic policy step, its log-prob, the deterministic step and x0-previews.

The rollout, the pruner protocol and the GRPO update call a ``Sampler`` and never know which
one it is. ``flow`` is the Flow-GRPO SDE for rectified-flow models (SD3, FLUX, the flow toy);
``ddim`` is DDPO's stochastic DDIM for epsilon/v-prediction diffusion models (SD 1.x/2.x, the
diffusion toy). A policy adapter builds the sampler that fits its model (``make_sampler``).
"""

from epgrpo.trainer.samplers.base import Sampler, SamplerOptions, StepResult, gaussian_kl
from epgrpo.trainer.samplers.ddim import DDIMSampler
from epgrpo.trainer.samplers.flow import FlowSampler

__all__ = ["Sampler", "SamplerOptions", "StepResult", "gaussian_kl", "FlowSampler", "DDIMSampler"]
