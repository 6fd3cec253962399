"""The diffusion toy (``model.name=toy_digits_ddpm``): an epsilon-prediction model sampled with
DDPO's stochastic DDIM, trained with Expand-and-Prune through the launched services, learns."""

import json

import pytest

from epgrpo.trainer.cli import main
from epgrpo.trainer.policy.base import create_policy
from epgrpo.trainer.samplers import DDIMSampler, SamplerOptions


def test_the_diffusion_toy_builds_a_ddim_sampler_from_its_saved_scheduler():
    policy = create_policy("toy_digits_ddpm", pretrain_steps=3, progress=False)
    sampler = policy.make_sampler(10, SamplerOptions(eta=0.7))
    assert isinstance(sampler, DDIMSampler) and sampler.eta == 0.7 and sampler.stochastic_eval
    assert sampler.timesteps == list(range(999, 0, -100))  # "trailing" spacing: starts at t = T - 1
    assert sampler.prediction_type == "epsilon" and sampler.clip_sample
    assert (policy.model_dir / "scheduler" / "scheduler_config.json").is_file()


@pytest.mark.slow
def test_the_diffusion_toy_learns_with_expand_and_prune(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "model.name=toy_digits_ddpm", "train.iterations=20", "eval.every=0", f"out_dir={out}",
                 "progress=false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # the model's own default schedule prunes late, at {7, 8}: 16 trajectories take steps 0-7, 8 step 8, 4 step 9
    assert summary["nfe_used"] == 20 * 10 * (16 * 8 + 8 * 1 + 4 * 1) and summary["nfe_ratio"] == 140 / 160
    # 20-iteration gains over 5 seeds (pretraining seed = train.seed = s; bench/seed_sweep.py, Intel AVX-512,
    # docs/models.md): +0.266, +0.197, +0.189, +0.207, +0.272; the threshold is under half the smallest
    # so that another CPU's bits, seed or library version does not flip the test
    assert summary["reward_last"] - summary["reward_first"] >= 0.09, summary
    assert summary["judge_last"] > summary["judge_first"], summary
