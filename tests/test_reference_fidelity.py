"""The recipes the configs attribute to Flow-GRPO against independent transcriptions of Flow-GRPO's
code: the KL form of its train_sd3.py, its EMA warm-up, the optimizer-step cadence; and the example
configs that claim its recipe."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from epgrpo.trainer.config import load_config
from epgrpo.trainer.ema import EMA
from epgrpo.trainer.optimize import equal_shares
from epgrpo.trainer.samplers import DDIMSampler, FlowSampler

CONFIGS = Path(__file__).parent.parent / "trainer" / "configs"


def flow_grpo_kl(mean, mean_ref, sigmas, i, noise_level):
    """train_sd3.py: ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t ** 2),
    with sd3_sde_with_logprob's std_dev_t = sqrt(sigma / (1 - where(sigma == 1, sigma_max, sigma))) * noise_level,
    sigma_max = sigmas[1]; float64 NumPy."""
    sigma, sigma_max = float(sigmas[i]), float(sigmas[1])
    std_dev_t = np.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level
    gap = (np.asarray(mean, np.float64) - np.asarray(mean_ref, np.float64)) ** 2
    return gap.mean(axis=(1, 2, 3)) / (2 * std_dev_t**2)


@pytest.mark.parametrize("i", [0, 4, 8])
def test_flow_grpo_kl_form_is_flow_grpos_expression_and_exact_is_the_gaussian_kl(i):
    sampler = FlowSampler.uniform(10, shift=3.0, noise_level=0.7)
    g = torch.Generator().manual_seed(i)
    x, v, v_ref = (torch.randn(3, 4, 6, 6, generator=g) for _ in range(3))
    step, ref = sampler.step(x, v, i, noise=torch.zeros_like(x)), sampler.step(x, v_ref, i, noise=torch.zeros_like(x))
    flow_grpo = sampler.with_kl_form("flow_grpo").kl(step.mean, ref.mean, step.std, i)
    np.testing.assert_allclose(flow_grpo.numpy(), flow_grpo_kl(step.mean, ref.mean, sampler.sigmas, i, 0.7), rtol=1e-5)
    exact = sampler.kl(step.mean, ref.mean, step.std, i)  # the default form: divided by std_t^2 |dt|
    dt = float(sampler.sigmas[i] - sampler.sigmas[i + 1])
    np.testing.assert_allclose(exact.numpy(), flow_grpo_kl(step.mean, ref.mean, sampler.sigmas, i, 0.7) / dt, rtol=1e-5)
    assert sampler.with_kl_form("flow_grpo").to("cpu").kl_form == "flow_grpo"  # kept when moved


def test_the_flow_grpo_kl_form_is_refused_for_ddim_and_unknown_forms():
    ddim = DDIMSampler.from_scheduler(DDIMScheduler(), 10)
    with pytest.raises(ValueError, match="train.kl_form: 'flow_grpo' needs a flow model's SDE sampler"):
        ddim.with_kl_form("flow_grpo")
    assert ddim.with_kl_form("exact") is ddim
    with pytest.raises(ValueError, match="train.kl_form"):
        load_config(None, ["train.kl_form=other"])


@pytest.mark.parametrize("name", ["sd35_medium_pickscore.yaml", "flux_dev_pickscore.yaml"])
def test_configs_claiming_flow_grpos_pickscore_recipe_use_its_kl_form_and_global_std(name):
    config = load_config(CONFIGS / name, [])
    assert config.train.kl_form == "flow_grpo" and config.train.global_std is True


def test_sd14_ddpo_config_evaluates_at_eta_zero_as_it_says():
    config = load_config(CONFIGS / "sd14_ddpo.yaml", [])
    assert config.sampling.eta == 1.0 and config.eval.sampler == "deterministic"


def flow_grpo_ema(values, decay, interval):
    """Flow-GRPO's EMAModuleWrapper.step(parameters, optimization_step) on a scalar, called after each
    optimizer step with its 0-based index: decay min(decay, (1 + s) / (10 + s)), averaged when
    (s + 1) % interval == 0."""
    shadow, decays = values[0], {}
    for s, value in enumerate(values[1:]):
        if (s + 1) % interval == 0:
            d = min(decay, (1 + s) / (10 + s))
            shadow += (1 - d) * (value - shadow)
            decays[s] = d
    return shadow, decays


@pytest.mark.parametrize("every", [1, 8])
def test_ema_warm_up_counts_optimizer_steps_as_flow_grpo(every):
    weight = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
    ema = EMA([weight], decay=0.9, every=every)
    values = [0.0] + [float(k) for k in range(1, 81)]
    for value in values[1:]:
        with torch.no_grad():
            weight.fill_(value)
        ema.step()
    expected, decays = flow_grpo_ema(values, 0.9, every)
    assert float(ema.shadow[0]) == pytest.approx(expected, rel=1e-6)
    if every == 8:
        assert decays[7] == pytest.approx(8 / 17) and decays[79] == pytest.approx(80 / 89)


@pytest.mark.parametrize("micro_batches, steps, sizes", [(9, 4, [3, 2, 2, 2]), (5, 4, [2, 1, 1, 1]), (8, 2, [4, 4]),
                                                         (5, 2, [3, 2]), (4, 4, [1, 1, 1, 1])])
def test_optimizer_steps_are_exactly_the_number_asked(micro_batches, steps, sizes):
    shares = equal_shares(micro_batches, steps)
    assert [len(s) for s in shares] == sizes and sum(shares, []) == list(range(micro_batches))


def test_more_optimizer_steps_than_micro_batches_is_refused():
    with pytest.raises(ValueError, match="train.optimizer_steps: 4 optimizer steps per inner epoch need at least 4 "
                                         "micro-batches, the iteration has 3"):
        equal_shares(3, 4)


def test_micro_batches_are_shuffled_with_the_runs_seed_when_an_epoch_has_several_steps(tiny_policy_factory):
    from epgrpo.trainer.optimize import policy_update
    from epgrpo.trainer.rollout import micro_batch_order, rollout, sample_seeds

    policy = tiny_policy_factory(lora_rank=4)
    sampler = FlowSampler.uniform(4)
    batch = rollout(policy, ["a handwritten digit 3", "a handwritten digit 8"], 4, sampler, seeds=sample_seeds(0, 1, 8))
    order = micro_batch_order(8, seed=0, iteration=1)
    assert sorted(order.tolist()) == list(range(8)) and order.tolist() != list(range(8))
    assert torch.equal(order, micro_batch_order(8, seed=0, iteration=1))  # derived, so a resume takes the same
    assert not torch.equal(order, micro_batch_order(8, seed=0, iteration=2))
    seen = []
    encode, predict = policy.encode_prompts, policy.predict

    def encode_with_rows(prompts):
        cond = encode(prompts)
        cond["row"] = torch.arange(len(prompts))
        return cond

    def recording(x, sigma, cond):
        seen.append(cond["row"].tolist())
        return predict(x, sigma, cond)

    policy.encode_prompts, policy.predict = encode_with_rows, recording
    options = dict(clip_range=1e-4, beta=0.0, inner_epochs=1, max_grad_norm=1.0, train_batch_size=2, train_steps=[0])
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    policy_update(policy, optimizer, batch, torch.randn(8), sampler, optimizer_steps=2, order=order, **options)
    # a no-grad pass for the old log-probs, then the two steps' micro-batches: the rows in the shuffled order
    assert seen[:4] == seen[4:] == [order[k:k + 2].tolist() for k in range(0, 8, 2)]
    seen.clear()
    policy_update(policy, optimizer, batch, torch.randn(8), sampler, optimizer_steps=1, order=order, **options)
    assert seen == [[0, 1], [2, 3], [4, 5], [6, 7]]  # one step per epoch: the order changes nothing, kept as sampled
