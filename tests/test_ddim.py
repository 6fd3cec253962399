"""The stochastic DDIM sampler against an independent float64 transcription of DDPO's
``ddim_step_with_logprob`` and against diffusers' own ``DDIMScheduler.step``."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from epgrpo.trainer.samplers import DDIMSampler

SD14 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


def scheduler(**overrides) -> DDIMScheduler:
    return DDIMScheduler(**{**SD14, **overrides})


def ddpo_reference(sched: DDIMScheduler, num_steps: int, t: int, out, x, eta: float, xi):
    """DDPO's step, line by line, in float64 NumPy: previous timestep t - T/n, alphas, x0, the
    variance of DDIM's _get_variance, the mean, the sample and the mean Gaussian log-density."""
    out, x, xi = (np.asarray(a, dtype=np.float64) for a in (out, x, xi))
    alphas = sched.alphas_cumprod.double().numpy()
    prev = t - sched.config.num_train_timesteps // num_steps
    prev = min(max(prev, 0), sched.config.num_train_timesteps - 1)  # DDPO clamps the previous timestep
    alpha_t = alphas[t]
    alpha_prev = alphas[prev] if prev >= 0 else float(sched.final_alpha_cumprod)  # (always >= 0 after the clamp)
    beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
    if sched.config.prediction_type == "epsilon":
        x0 = (x - beta_t**0.5 * out) / alpha_t**0.5
        eps = out
    else:
        x0 = alpha_t**0.5 * x - beta_t**0.5 * out
        eps = alpha_t**0.5 * out + beta_t**0.5 * x
    if sched.config.clip_sample:
        r = sched.config.clip_sample_range
        x0 = np.clip(x0, -r, r)
    variance = (beta_prev / beta_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance**0.5
    mean = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * eps
    sample = mean + std * xi
    logp = -((sample - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return sample, logp.reshape(len(x), -1).mean(axis=1), mean, x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("i", [0, 3, 9])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("alpha_to_one", [False, True])  # True: the diffusion toy's scheduler
def test_step_matches_float64_transcription_of_ddpo(prediction_type, eta, i, clip, alpha_to_one):
    sched = scheduler(prediction_type=prediction_type, clip_sample=clip, set_alpha_to_one=alpha_to_one)
    sampler = DDIMSampler.from_scheduler(sched, 10, eta=eta)
    g = torch.Generator().manual_seed(i)
    x, out, xi = (torch.randn(4, 3, 5, 5, generator=g) for _ in range(3))
    step = sampler.step(x, out, i, noise=xi)
    t = sampler.timesteps[i]
    sample, logp, mean, x0 = ddpo_reference(sched, 10, t, out, x, eta, xi)
    np.testing.assert_allclose(step.sample.numpy(), sample, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(step.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(step.log_prob.numpy(), logp, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(sampler.x0(x, out, i).numpy(), x0, rtol=1e-5, atol=1e-5)
    assert step.log_prob.dtype == torch.float32 and step.log_prob.shape == (4,)
    rescored = sampler.step(x, out, i, sample=step.sample)  # scoring the drawn sample gives its log-prob
    torch.testing.assert_close(rescored.log_prob, step.log_prob)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eta_zero_step_is_diffusers_ddim_step(prediction_type):
    sched = scheduler(prediction_type=prediction_type)
    sched.set_timesteps(8)
    sampler = DDIMSampler.from_scheduler(sched, 8)
    assert sampler.timesteps == sched.timesteps.tolist()
    g = torch.Generator().manual_seed(1)
    x, out = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    for i, t in enumerate(sched.timesteps):
        stock = sched.step(out, t, x, eta=0.0)
        torch.testing.assert_close(sampler.deterministic_step(x, out, i), stock.prev_sample, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sampler.x0(x, out, i), stock.pred_original_sample, rtol=1e-5, atol=1e-6)


def test_stochastic_step_has_diffusers_variance_and_the_kl_is_the_mean_gap():
    sched = scheduler()
    sched.set_timesteps(10)
    sampler = DDIMSampler.from_scheduler(sched, 10, eta=1.0)
    for i, t in enumerate(sched.timesteps.tolist()):
        prev = t - 100
        expected = sched._get_variance(t, prev) ** 0.5
        assert sampler.std(i) == pytest.approx(float(expected), rel=1e-5)
        assert sampler.noise_std(i) == pytest.approx(float((1 - sched.alphas_cumprod[t]) ** 0.5), rel=1e-6)
    x = torch.randn(3, 1, 4, 4)
    a, b = sampler.step(x, torch.randn_like(x), 2, noise=torch.zeros_like(x)), sampler.step(x, torch.zeros_like(x), 2,
                                                                                          noise=torch.zeros_like(x))
    kl = sampler.kl(a.mean, b.mean, a.std)
    expected = ((a.mean - b.mean) ** 2 / (2 * sampler.std(2) ** 2)).reshape(3, -1).mean(1)
    torch.testing.assert_close(kl, expected)
    assert torch.equal(sampler.kl(a.mean, a.mean, a.std), torch.zeros(3))


def test_zero_eta_has_no_log_prob_and_bad_options_are_named():
    sampler = DDIMSampler.from_scheduler(scheduler(), 4, eta=1.0)
    sampler.eta = 0.0
    with pytest.raises(ValueError, match="zero variance"):
        sampler.step(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0, noise=torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMSampler.from_scheduler(scheduler(prediction_type="sample"), 4)
    with pytest.raises(ValueError, match="thresholding"):
        DDIMSampler.from_scheduler(scheduler(thresholding=True), 4)


def test_the_last_stochastic_step_keeps_a_variance_with_set_alpha_to_one_as_ddpo():
    """DDPO's last step uses alphas_cumprod[0] (the clamped previous timestep), not final_alpha_cumprod = 1:
    sampling.sde_last_step works on the diffusion toy's scheduler; the deterministic step stays diffusers'."""
    sched = scheduler(set_alpha_to_one=True)
    sampler = DDIMSampler.from_scheduler(sched, 10, eta=1.0)
    a, a0 = float(sched.alphas_cumprod[sampler.timesteps[-1]]), float(sched.alphas_cumprod[0])
    assert sampler.std(9) == pytest.approx(((1 - a0) / (1 - a)) ** 0.5 * (1 - a / a0) ** 0.5, rel=1e-9)
    assert sampler.std(9) > 0
    x, out = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.isfinite(sampler.step(x, out, 9, noise=torch.randn_like(x)).log_prob).all()
    sched.set_timesteps(10)
    torch.testing.assert_close(sampler.deterministic_step(x, out, 9), sched.step(out, sched.timesteps[-1], x).prev_sample,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("steps", [10, 50])
def test_eta_beyond_what_the_grid_allows_is_refused_at_start_naming_the_option(steps):
    largest = DDIMSampler.from_scheduler(scheduler(), steps).max_eta()
    assert 1.0 <= largest < 1.1  # DDPO's eta = 1 fits; eta in (1.1, 2] used to fail mid-rollout
    with pytest.raises(ValueError, match=r"sampling.eta: expected 0 <= eta <= 1\.0.* got 1.5"):
        DDIMSampler.from_scheduler(scheduler(), steps, eta=1.5)
    edge = DDIMSampler.from_scheduler(scheduler(), steps, eta=largest)  # the largest allowed still has a real mean
    x = torch.randn(2, 1, 4, 4)
    for i in range(steps):
        assert torch.isfinite(edge.step(x, torch.randn_like(x), i, noise=torch.randn_like(x)).mean).all()
