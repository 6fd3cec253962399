"""Flow-GRPO options of the update: gradient accumulation, trained-step subsets, SDE windows,
per-prompt statistics, EMA, and the config checks that guard them."""

import json
import math

import pytest
import torch

from epgrpo.trainer.config import load_config
from epgrpo.trainer.ema import EMA
from epgrpo.trainer.grpo import PromptStatTracker, group_advantages
from epgrpo.trainer.optimize import policy_update
from epgrpo.trainer.rollout import rollout, sample_seeds, sde_window, train_step_subset
from epgrpo.trainer.samplers import FlowSampler

PROMPTS = ["a handwritten digit 3", "a handwritten digit 8"]


def count_velocity_calls(policy):
    calls = []
    velocity = policy.predict

    def counted(x, sigma, cond):
        calls.append(round(float(sigma), 6))
        return velocity(x, sigma, cond)

    policy.predict = counted
    return calls


def test_accumulation_steps_and_exact_first_ratio(tiny_policy_factory):
    policy = tiny_policy_factory()
    sampler = FlowSampler.uniform(5)
    batch = rollout(policy, PROMPTS, 4, sampler, seeds=sample_seeds(3, 1, 8))
    adv = group_advantages(torch.linspace(0, 1, 8), batch.group_index)
    calls = count_velocity_calls(policy)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
    stats = policy_update(policy, optimizer, batch, adv, sampler, clip_range=1e-4, beta=0.0,
                          inner_epochs=2, max_grad_norm=1.0, train_batch_size=3, gradient_accumulation=2,
                          train_steps=[1, 3])
    # 3 micro-batches (3, 3, 2 trajectories), 2 per optimizer step -> 2 steps per epoch
    assert [s.optimizer_steps for s in stats] == [2, 2]
    # the old log-probs come from a no-grad pass in the same micro-batches: ratio exactly 1
    assert all(s.ratio_mean == 1.0 and s.approx_kl == 0.0 for s in stats)
    # only the chosen steps are evaluated: pre-pass + 2 epochs, 3 micro-batches each
    assert sorted(set(calls)) == sorted({round(float(sampler.sigmas[1]), 6), round(float(sampler.sigmas[3]), 6)})
    assert len(calls) == 3 * 3 * 2


@pytest.mark.parametrize("micro_batches, optimizer_steps", [(4, 2), (3, 2), (5, 2), (2, 3)])
def test_optimizer_steps_split_the_micro_batches_and_the_ratio_acts_after_the_first(
        tiny_policy_factory, micro_batches, optimizer_steps):
    policy = tiny_policy_factory()
    sampler = FlowSampler.uniform(4)
    batch = rollout(policy, PROMPTS, 5, sampler, seeds=sample_seeds(4, 1, 10))
    adv = group_advantages(torch.linspace(-1, 1, 10), batch.group_index)
    size = -(-10 // micro_batches)  # trajectories per micro-batch giving that many micro-batches
    assert len(range(0, 10, size)) == micro_batches
    update = lambda: policy_update(policy, torch.optim.SGD(policy.trainable_parameters(), lr=0.5), batch, adv,  # noqa: E731
                                   sampler, clip_range=1e-4, beta=0.0, inner_epochs=1, max_grad_norm=1.0,
                                   train_batch_size=size, optimizer_steps=optimizer_steps)
    if micro_batches < optimizer_steps:  # exactly N steps or none: fewer micro-batches than steps is refused
        with pytest.raises(ValueError, match=f"train.optimizer_steps: {optimizer_steps} optimizer steps per inner "
                                             f"epoch need at least {optimizer_steps} micro-batches"):
            update()
        return
    stats = update()
    assert stats[0].optimizer_steps == optimizer_steps
    # the first micro-batches see ratio 1; those after an optimizer step see the updated policy
    assert stats[0].ratio_mean != 1.0 and stats[0].approx_kl > 0


def test_a_non_finite_loss_skips_the_step_on_every_rank(tiny_policy_factory):
    policy = tiny_policy_factory()
    sampler = FlowSampler.uniform(4)
    batch = rollout(policy, PROMPTS, 2, sampler, seeds=sample_seeds(3, 2, 4))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    seen = []
    stats = policy_update(policy, torch.optim.SGD(policy.trainable_parameters(), lr=1.0), batch,
                          torch.tensor([1.0, float("nan"), 0.0, 0.0]), sampler, clip_range=0.2,
                          beta=0.0, inner_epochs=1, max_grad_norm=1.0, train_batch_size=4,
                          sync_gradients=lambda params: seen.append(all(torch.isnan(p.grad).all() for p in params)))
    assert seen == [True]  # the gradient handed to the all-reduce is poisoned, so no rank steps
    assert stats[0].skipped and stats[0].optimizer_steps == 0
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in before.items())


def test_sde_window_rollout_trains_only_the_window(tiny_policy_factory):
    policy = tiny_policy_factory()
    windows = {tuple(sde_window(10, 3, 0, 6, seed=0, iteration=i)) for i in range(20)}
    assert len(windows) > 1 and all(w[0] >= 0 and w[-1] <= 5 and len(w) == 3 for w in windows)
    assert sde_window(10, 3, 0, 6, 0, 7) == sde_window(10, 3, 0, 6, 0, 7)
    window = [1, 2]
    batch = rollout(policy, PROMPTS, 2, FlowSampler.uniform(5), seeds=sample_seeds(0, 1, 4), sde_steps=window)
    assert [bool(torch.isfinite(batch.log_probs[:, i]).all()) for i in range(5)] == [False, True, True, False, False]
    subsets = [train_step_subset(range(10), 0.3, 0, i) for i in range(10)]
    assert all(len(s) == 3 and s == sorted(s) for s in subsets) and len({tuple(s) for s in subsets}) > 1
    assert train_step_subset([4, 5], 0.01, 0, 1) in ([4], [5]) and train_step_subset([4, 5], 1.0, 0, 1) == [4, 5]


def test_sampling_in_chunks_bounds_the_batch_and_keeps_the_samples(tiny_policy_factory):
    policy = tiny_policy_factory()
    sampler, seeds = FlowSampler.uniform(4), sample_seeds(0, 3, 8)
    whole = rollout(policy, PROMPTS, 4, sampler, seeds=seeds)
    sizes = []
    velocity = policy.predict
    policy.predict = lambda x, sigma, cond: sizes.append(len(x)) or velocity(x, sigma, cond)
    chunked = rollout(policy, PROMPTS, 4, sampler, seeds=seeds, batch_size=3)
    assert sizes == [3, 3, 2] * 4
    torch.testing.assert_close(chunked.latents, whole.latents, rtol=1e-5, atol=1e-5)
    assert chunked.nfe == whole.nfe == 8 * 4


def test_prompt_stat_tracker():
    prompts = ["a", "a", "b", "b", "b"]
    rewards = torch.tensor([1.0, 3.0, 0.0, 1.0, 5.0])
    plain = PromptStatTracker()
    torch.testing.assert_close(plain.advantages(prompts, rewards),
                               group_advantages(rewards, torch.tensor([0, 0, 1, 1, 1])), rtol=0, atol=0)
    global_std = PromptStatTracker(global_std=True).advantages(prompts, rewards)
    assert global_std[0].item() == pytest.approx((1 - 2) / (rewards.std(unbiased=False).item() + 1e-4), rel=1e-6)
    buffered = PromptStatTracker(buffer_size=3, min_count=3)
    first = buffered.advantages(["a", "a"], torch.tensor([0.0, 2.0]))  # 2 < min_count: batch statistics
    assert first.tolist() == pytest.approx([-1 / 1.0001, 1 / 1.0001], rel=1e-6)
    second = buffered.advantages(["a"], torch.tensor([4.0]))  # history [0, 2, 4]: mean 2
    assert second.item() == pytest.approx(2 / (math.sqrt(8 / 3) + 1e-4), rel=1e-6)
    restored = PromptStatTracker(buffer_size=3, min_count=3)
    restored.load_state_dict(json.loads(json.dumps(buffered.state_dict())))
    assert restored.buffers == {"a": [0.0, 2.0, 4.0]}
    assert PromptStatTracker(clip=0.5).advantages(prompts, rewards).abs().max().item() == 0.5


def test_ema_warm_up_swap_and_state():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([weight], decay=0.9)
    with torch.no_grad():
        weight.fill_(10.0)
    ema.step()  # decay min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 9.0))
    with ema.applied():
        assert torch.equal(weight.detach(), torch.full((3,), 9.0))
    assert torch.equal(weight.detach(), torch.full((3,), 10.0))
    tensors, meta = ema.state_dict()
    other = EMA([torch.nn.Parameter(torch.zeros(3))], decay=0.9)
    other.load_state_dict(tensors, json.loads(json.dumps(meta)))
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.updates == 1
    sparse = EMA([weight], decay=0.9, every=2)
    sparse.step()
    assert sparse.updates == 0 and torch.equal(sparse.shadow[0], weight.detach())


@pytest.mark.parametrize("override, message", [
    ("train.timestep_fraction=0", "train.timestep_fraction: expected in (0, 1]"),
    ("sampling.sde_window_size=6", "sampling.sde_window_range: expected 0 <= lo, hi <= num_steps=10"),
    ("train.lr_schedule=exp", "train.lr_schedule: expected constant | constant_with_warmup | linear | cosine"),
    ("sampling.guidance_scale=0.5", "sampling.guidance_scale: expected a finite number >= 1"),
    ("model.dtype=fp8", "model.dtype: expected auto | fp32 | bf16 | fp16"),
    ("train.ema_decay=1", "train.ema_decay: expected in [0, 1)"),
    ("train.lr_warmup_iterations=5", "train.lr_schedule: expected a schedule with warm-up"),
])
def test_bad_options_name_the_field(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("|", r"\|")):
        load_config(None, [override])


def test_missing_files_are_reported_before_loading_a_model():
    from epgrpo.trainer.config import check_paths

    with pytest.raises(ValueError, match="train.prompt_file: expected an existing file, got '/no/such/file'"):
        check_paths(load_config(None, ["train.prompt_file=/no/such/file"]))
    with pytest.raises(ValueError, match="train.resume_from: expected an existing directory"):
        check_paths(load_config(None, ["train.resume_from=/no/such/dir"]))
    check_paths(load_config(None, ["train.resume_from=latest"]))


def test_example_configs_load():
    from pathlib import Path

    configs = Path(__file__).parent.parent / "trainer" / "configs"
    sd35 = load_config(configs / "sd35_medium_pickscore.yaml")
    assert (sd35.prune.group_size, sd35.prune.steps, sd35.prune.keeps, sd35.sampling.num_steps) == (48, [5, 7], [24, 12], 10)
    assert (sd35.sampling.noise_level, sd35.train.beta, sd35.train.lr, sd35.train.clip_range) == (0.7, 0.01, 3e-4, 1e-4)
    assert (sd35.model.lora_rank, sd35.model.lora_alpha, sd35.sampling.guidance_scale) == (32, 64, 4.5)
    assert (sd35.train.optimizer_steps, sd35.train.gradient_accumulation) == (2, 0)
    assert load_config(configs / "toy.yaml").model.name == "toy_digits"
