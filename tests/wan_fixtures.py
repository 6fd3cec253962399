"""Shared parts of the Wan 2.x tests: the tiny random WanPipeline builds (once per session), the
adapter with the tiny sizes, the rollout's seeded noise and the stock pipeline run on the adapter's
grid (the reference the adapter is compared with)."""

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from epgrpo.trainer.grpo import group_advantages
from epgrpo.trainer.optimize import policy_update
from epgrpo.trainer.policy.base import create_policy
from epgrpo.trainer.rollout import rollout, sample_ode, sample_seeds
from epgrpo.trainer.samplers import SamplerOptions

PROMPTS = ["a red cat", "a blue dog"]
SEEDS = [11, 12]
STEPS, GUIDANCE = 4, 5.0
SIDE, FRAMES, TOKENS = 32, 5, 16  # tiny_wan.RESOLUTION, NUM_FRAMES, MAX_TOKENS
LATENT_SHAPE = (16, 2, 4, 4)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The models are tiny: intra-op threads cost more than they save on 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory):
    from tiny_wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("tiny-wan"))


def make_policy(path, **options):
    options = {"guidance_scale": GUIDANCE, "max_sequence_length": TOKENS, "resolution": SIDE, "num_frames": FRAMES,
               "progress": False, **options}
    return create_policy("wan", path=str(path), device="cpu", **options)


def seed_noise(latent_shape=LATENT_SHAPE) -> torch.Tensor:
    """The rollout's per-trajectory noise [B, C, F', h, w], one generator per seed."""
    return torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in SEEDS])


def euler_on_the_pipelines_grid(pipe):
    """A FlowMatchEulerDiscreteScheduler that, asked for N steps, takes the sigmas and timesteps the
    pipeline's own UniPC scheduler gives for N: the deterministic Euler (probability-flow ODE) step
    on Wan's grid, what the adapter's ODE sampling does."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    unipc_class, unipc_config = type(pipe.scheduler), pipe.scheduler.config

    class EulerOnUniPCGrid(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            unipc = unipc_class.from_config(unipc_config)
            unipc.set_timesteps(num_inference_steps)
            super().set_timesteps(sigmas=unipc.sigmas[:-1].numpy(), timesteps=unipc.timesteps.numpy(), device=device)

    return EulerOnUniPCGrid(shift=1.0)  # shift 1: the given sigmas are used as they are


def load_pipeline(path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = euler_on_the_pipelines_grid(pipe)
    return pipe


def pipeline_sample(pipe, output_type, guidance_scale=GUIDANCE):
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance_scale, height=SIDE, width=SIDE,
                num_frames=FRAMES, max_sequence_length=TOKENS, latents=seed_noise(), output_type=output_type).frames


def to_uint8(frames01: np.ndarray) -> np.ndarray:
    return (frames01 * 255).round().astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_wan_ti2v_dir(tmp_path_factory):
    """Wan 2.2 TI2V-like: per-token timesteps (expand_timesteps), flow_shift 5."""
    from tiny_wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("tiny-wan-ti2v"), seed=1, flow_shift=5.0, expand_timesteps=True)




@pytest.fixture(scope="session")
def tiny_wan_a14b_dir(tmp_path_factory):
    """Wan 2.2 A14B-like: two experts, the second below boundary_ratio 0.8 (timesteps < 800: with 4
    steps at [999, 900, 750, 500], steps 0-1 run `transformer`, steps 2-3 `transformer_2`)."""
    from tiny_wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("tiny-wan-a14b"), seed=2, boundary_ratio=0.8)


