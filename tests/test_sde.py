"""The SDE step and its log-prob against an independent float64 computation."""

import math

import numpy as np
import pytest
import torch

from epgrpo.trainer.samplers.flow_sde import gaussian_kl, ode_step, sde_step, sigma_grid, x0_preview


def reference_step(x, v, sigma, sigma_next, a, guard, xi):
    """Float64 NumPy transcription of the SDE step in trainer/samplers/flow_sde.py's docstring, element
    by element."""
    x, v, xi = (np.asarray(t, dtype=np.float64) for t in (x, v, xi))
    dt = sigma_next - sigma
    s_for_denominator = guard if sigma == 1.0 else sigma
    std_t = a * math.sqrt(sigma / (1.0 - s_for_denominator))
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * math.sqrt(-dt)
    sample = mean + std * xi
    # log N(sample; mean, std^2) per element, then the mean over non-batch dims
    logp = np.log(1.0 / (std * math.sqrt(2 * math.pi))) - (sample - mean) ** 2 / (2 * std**2)
    return sample, logp.reshape(len(x), -1).mean(axis=1), mean, std


@pytest.mark.parametrize("i", [0, 1, 4, 8])
@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
def test_sde_step_matches_float64_reference(i, a):
    g = torch.Generator().manual_seed(i)
    sigmas = sigma_grid(10, shift=3.0)
    x, v, xi = (torch.randn(5, 2, 6, 6, generator=g) for _ in range(3))
    out = sde_step(x, v, float(sigmas[i]), float(sigmas[i + 1]), a, float(sigmas[1]), noise=xi)
    sample, logp, mean, std = reference_step(x, v, float(sigmas[i]), float(sigmas[i + 1]), a, float(sigmas[1]), xi)
    np.testing.assert_allclose(out.sample.numpy(), sample, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.mean.numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.log_prob.numpy(), logp, rtol=1e-5, atol=1e-5)
    assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (5,)


def test_log_prob_of_given_sample_scores_that_sample_and_is_fp32_for_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    x, v, xi = (torch.randn(3, 1, 4, 4, generator=g) for _ in range(3))
    drawn = sde_step(x, v, 0.8, 0.7, 0.7, 0.9, noise=xi)
    rescored = sde_step(x, v, 0.8, 0.7, 0.7, 0.9, sample=drawn.sample)
    assert torch.equal(drawn.log_prob, rescored.log_prob)
    low = sde_step(x.bfloat16(), v.bfloat16(), 0.8, 0.7, 0.7, 0.9, sample=drawn.sample)
    assert low.log_prob.dtype == torch.float32
    # a sample far from the mean is less likely
    far = sde_step(x, v, 0.8, 0.7, 0.7, 0.9, sample=drawn.sample + 1.0)
    assert (far.log_prob < drawn.log_prob).all()


def test_sigma_one_is_guarded_and_grid_has_no_tiny_last_interval():
    sigmas = sigma_grid(10, shift=3.0)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas[:-1] > sigmas[1:]).all()
    assert float(sigmas[-2] - sigmas[-1]) > 0.05
    x = torch.randn(2, 1, 4, 4)
    out = sde_step(x, torch.randn_like(x), 1.0, float(sigmas[1]), 0.7, float(sigmas[1]), noise=torch.randn_like(x))
    assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.sample).all()


def test_ode_step_and_preview_recover_x0_for_the_true_velocity():
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    sigma = 0.6
    x = (1 - sigma) * x0 + sigma * eps
    v = eps - x0
    torch.testing.assert_close(x0_preview(x, v, sigma), x0)
    torch.testing.assert_close(ode_step(x, v, sigma, 0.0), x0)


def test_gaussian_kl_matches_closed_form_and_is_zero_for_equal_means():
    mean, ref, std = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.full((3, 1, 1, 1), 0.3)
    expected = ((mean.double() - ref.double()) ** 2 / (2 * 0.09)).reshape(3, -1).mean(1)
    torch.testing.assert_close(gaussian_kl(mean, ref, std).double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(gaussian_kl(mean, mean, std), torch.zeros(3))
