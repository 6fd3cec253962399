"""Algorithms as plug-ins: each loss transcribed independently in float64 here, GRPO-Guard's ratio
normalisation on the toy, MixGRPO's window schedule, and the per-algorithm option checks."""

import math

import pytest
import torch

from epgrpo.trainer.algorithms.awm import awm_loss, matching_log_prob
from epgrpo.trainer.algorithms.grpo_guard import guard_policy_loss
from epgrpo.trainer.algorithms.nft import nft_loss, optimality_weight
from epgrpo.trainer.algorithms import create_algorithm
from epgrpo.trainer.cli import main
from epgrpo.trainer.config import load_config
from epgrpo.trainer.grpo import clipped_policy_loss, group_advantages
from epgrpo.trainer.monitors import reward_judge_gap, zero_std_ratio
from epgrpo.trainer.optimize import policy_update
from epgrpo.trainer.rollout import rollout, sample_seeds
from epgrpo.trainer.samplers import FlowSampler

PROMPTS = ["a handwritten digit 3", "a handwritten digit 8"]


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- GRPO-Guard ---------------------------------------------------------------------------------
def test_guard_ratio_statistics_equal_a_float64_transcription():
    b, d = 6, 3 * 4 * 4
    mean_old, delta, xi = randn(b, 3, 4, 4, seed=0), 0.02 * randn(b, 3, 4, 4, seed=1), randn(b, 3, 4, 4, seed=2)
    std, clip, dt = 0.05, 1e-3, 0.1
    mean, x = mean_old + delta, mean_old + std * xi
    logp = lambda m: (-((x - m) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean((1, 2, 3))
    adv = torch.linspace(-2, 2, b)
    terms = guard_policy_loss(logp(mean), logp(mean_old), mean, mean_old, torch.full((b, 1, 1, 1), std), adv, clip, dt)

    # float64, element by element: ratio = exp(mean(xi * (mu - mu_old))) (the bias-corrected, rescaled log-ratio)
    ratios, losses = [], []
    for k in range(b):
        xs, ms, mos = (t[k].double().flatten().tolist() for t in (x, mean, mean_old))
        log_ratio = sum(((xx - mo) ** 2 - (xx - m) ** 2) / (2 * std**2) for xx, m, mo in zip(xs, ms, mos)) / d
        bias = sum((m - mo) ** 2 for m, mo in zip(ms, mos)) / d / (2 * std**2)
        r = math.exp((log_ratio + bias) * std)
        a = float(adv[k])
        ratios.append(r)
        losses.append(max(-a * r, -a * min(max(r, 1 - clip), 1 + clip)))
    assert terms.ratio_mean == pytest.approx(sum(ratios) / b, rel=1e-5)
    assert terms.clip_fraction == pytest.approx(sum(abs(r - 1) > clip for r in ratios) / b)
    assert terms.policy_loss.item() == pytest.approx(sum(losses) / b / dt, rel=1e-4)
    # the same ratio as exp(mean(xi * delta)): its mean stays near 1 whatever std is
    direct = [math.exp(float((xi[k].double() * delta[k].double()).mean())) for k in range(b)]
    assert ratios == pytest.approx(direct, rel=1e-6)


def test_guard_keeps_the_ratio_mean_at_one_where_grpo_drifts_on_the_toy(tiny_policy_factory):
    """The same policy change seen by both ratios at every step of a toy rollout: Flow-GRPO's mean
    falls below 1, the more the smaller the step's std; GRPO-Guard's stays at 1."""
    policy, sampler = tiny_policy_factory(), FlowSampler.uniform(5)
    batch = rollout(policy, PROMPTS, 8, sampler, seeds=sample_seeds(5, 1, 16))
    cond = policy.encode_prompts(batch.prompts)

    def steps():
        with torch.no_grad():
            return [sampler.step(batch.latents[:, i], policy.predict(batch.latents[:, i], sampler.timestep(i), cond), i,
                                 sample=batch.latents[:, i + 1]) for i in range(4)]

    old = steps()
    adv = group_advantages(torch.linspace(0, 1, 16) ** 2, batch.group_index)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-2)
    policy_update(policy, optimizer, batch, adv, sampler, clip_range=10.0, beta=0.0, inner_epochs=1,
                  max_grad_norm=1e9, train_batch_size=16)
    plain, guard = [], []
    for o, n in zip(old, steps()):
        plain.append(clipped_policy_loss(n.log_prob, o.log_prob, adv, 1e-4).ratio_mean)
        guard.append(guard_policy_loss(n.log_prob, o.log_prob, n.mean, o.mean, n.std, adv, 1e-4, None).ratio_mean)
    stds = [float(o.std.mean()) for o in old]
    assert stds == sorted(stds, reverse=True)
    assert plain[-1] < 0.9 and plain[-1] < plain[0]  # drifts, most where the std is smallest
    assert all(abs(g - 1) < 0.03 for g in guard), guard
    assert max(abs(g - 1) for g in guard) < 0.2 * max(abs(p - 1) for p in plain)


# -- DiffusionNFT -------------------------------------------------------------------------------
def test_nft_loss_equals_a_float64_transcription():
    b = 5
    v, v_old, x0, eps = (randn(b, 2, 3, 3, seed=s) for s in range(4))
    v = (v_old + 0.1 * v).requires_grad_()
    t = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.1]).reshape(b, 1, 1, 1)
    xt = (1 - t) * x0 + t * eps
    adv = torch.tensor([-7.0, -1.0, 0.0, 2.5, 6.0])
    v_ref = v_old + 0.05
    beta, clip, kl_beta = 0.7, 5.0, 0.3
    terms = nft_loss(v, v_old, v_ref, x0, xt, t, adv, nft_beta=beta, adv_clip=clip, kl_beta=kl_beta)

    total, kl_total = 0.0, 0.0
    for k in range(b):
        a = min(max(float(adv[k]), -clip), clip)
        r = min(max(a / clip / 2 + 0.5, 0.0), 1.0)
        vv, vo, vr = (q[k].detach().double().flatten() for q in (v, v_old, v_ref))
        x, xtk, tk = x0[k].double().flatten(), xt[k].double().flatten(), float(t[k])
        pos, neg = xtk - tk * (beta * vv + (1 - beta) * vo), xtk - tk * ((1 + beta) * vo - beta * vv)
        term = lambda p: float((((p - x) ** 2) / max(float((p - x).abs().mean()), 1e-5)).mean())
        total += clip * (r * term(pos) + (1 - r) * term(neg)) / beta
        kl_total += float(((vv - vr) ** 2).mean())
    assert terms.policy_loss.item() == pytest.approx(total / b, rel=1e-5)
    assert terms.loss.item() == pytest.approx(total / b + kl_beta * kl_total / b, rel=1e-5)
    assert optimality_weight(adv, clip).tolist() == pytest.approx([0.0, 0.4, 0.5, 0.75, 1.0])
    terms.loss.backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()


def test_nft_gradient_pulls_good_samples_in_and_pushes_bad_ones_out():
    """r = 1: the loss is the x0-matching loss of v itself; r = 0: its gradient points the other way
    at v = v_old (the implicit negative policy mirrors v about v_old)."""
    x0, eps = randn(1, 4, seed=0), randn(1, 4, seed=1)
    t = torch.full((1, 1), 0.5)
    xt = (1 - t) * x0 + t * eps
    v_old = randn(1, 4, seed=2)
    grads = []
    for adv in (5.0, -5.0):
        v = v_old.clone().requires_grad_()
        terms = nft_loss(v, v_old, None, x0, xt, t, torch.tensor([adv]), nft_beta=1.0, adv_clip=5.0, kl_beta=0.0)
        terms.loss.backward()
        grads.append(v.grad)
    torch.testing.assert_close(grads[0], -grads[1])
    target = eps - x0  # descending the r = 1 gradient moves v toward the flow-matching target
    assert float(((v_old - 1e-3 * grads[0] - target) ** 2).sum()) < float(((v_old - target) ** 2).sum())


# -- AWM ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighting", ["uniform", "t", "t2", "huber", "ghuber"])
def test_awm_loss_equals_a_float64_transcription(weighting):
    b, clip, p = 4, 0.05, 0.25
    v_old, x0, eps = (randn(b, 2, 3, 3, seed=s) for s in range(3))
    v = v_old + 0.05 * randn(b, 2, 3, 3, seed=9)
    t = torch.tensor([0.9, 0.6, 0.4, 0.2]).reshape(b, 1, 1, 1)
    adv = torch.tensor([1.5, -0.5, 2.0, -3.0])
    terms = awm_loss(v, v_old, None, x0, t, eps, adv, clip_range=clip, kl_beta=0.0, weighting=weighting,
                     ghuber_power=p)

    def logp(vk, k):
        mse = float(((vk[k].double() - (eps[k].double() - x0[k].double())) ** 2).mean())
        tk = float(t[k])
        return {"uniform": -mse, "t": -mse * tk, "t2": -mse * tk * tk,
                "huber": -(math.sqrt(mse + 1e-10) - 1e-5) * tk,
                "ghuber": -((mse + 1e-10) ** p - 1e-10**p) * tk / p}[weighting]

    losses, ratios = [], []
    for k in range(b):
        r = math.exp(logp(v, k) - logp(v_old, k))
        a = float(adv[k])
        ratios.append(r)
        losses.append(max(-a * r, -a * min(max(r, 1 - clip), 1 + clip)))
    assert terms.policy_loss.item() == pytest.approx(sum(losses) / b, rel=1e-4)
    assert terms.ratio_mean == pytest.approx(sum(ratios) / b, rel=1e-5)
    assert matching_log_prob(v_old, eps - x0, t, weighting, p).dtype == torch.float32


# -- MixGRPO ------------------------------------------------------------------------------------
def test_mixgrpo_window_slides_as_the_paper_schedules_it():
    config = load_config(None, ["train.algorithm=mixgrpo", "sampling.num_steps=25", "sampling.sde_window_size=4"])
    algorithm = create_algorithm(config)
    starts = [algorithm.sde_steps(it)[0] for it in range(1, 600)]
    assert starts[:25] == [0] * 25 and starts[25:50] == [1] * 25  # moves 1 step every 25 iterations
    assert max(starts) == 24 - 4 and starts[-1] == 20  # never into the last step; stays at the end
    assert all(algorithm.sde_steps(it) == list(range(s, s + 4)) for it, s in zip(range(1, 600), starts))
    rolling = create_algorithm(load_config(None, ["train.algorithm=mixgrpo", "sampling.num_steps=6",
                                                  "prune.mode=grpo", "algo.mixgrpo_shift_interval=2",
                                                  "algo.mixgrpo_stride=1",
                                                  "algo.mixgrpo_roll_back=true", "sampling.sde_window_size=2"]))
    assert [rolling.sde_steps(it)[0] for it in range(1, 11)] == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]


def test_mixgrpo_trains_only_the_window_steps_of_an_expand_and_prune_rollout(tiny_policy_factory):
    config = load_config(None, ["train.algorithm=mixgrpo", "sampling.num_steps=6", "sampling.sde_window_size=2",
                                "prune.mode=grpo",
                                "algo.mixgrpo_shift_interval=1", "algo.mixgrpo_stride=2"])
    algorithm = create_algorithm(config)
    policy, sampler = tiny_policy_factory(), FlowSampler.uniform(6)
    for iteration, window in [(1, [0, 1]), (2, [2, 3])]:
        steps = algorithm.sde_steps(iteration)
        assert steps == window
        batch = rollout(policy, PROMPTS, 4, sampler, seeds=sample_seeds(0, iteration, 8), sde_steps=steps)
        assert algorithm.train_steps(batch, iteration) == window
        assert torch.isnan(batch.log_probs[:, [i for i in range(6) if i not in window]]).all()


# -- options, monitors --------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm,foreign", [("grpo", "algo.nft_beta=0.5"), ("nft", "algo.guard_step_weight=false"),
                                               ("awm", "algo.mixgrpo_stride=2"), ("mixgrpo", "algo.awm_timesteps=3"),
                                               ("grpo_guard", "algo.awm_weighting=t")])
def test_an_option_of_another_algorithm_exits_2_naming_it(algorithm, foreign, tmp_path, capsys):
    assert main(["train", f"train.algorithm={algorithm}", foreign, f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert foreign.split("=")[0] in err and repr(algorithm) in err


def test_forward_process_algorithms_refuse_a_diffusion_model():
    from epgrpo.trainer.samplers import DDIMSampler

    ddim = DDIMSampler(torch.linspace(0.99, 0.01, 1000), [900, 500, 100], 1000, 1.0)
    for name in ("nft", "awm"):
        with pytest.raises(ValueError, match="train.algorithm: " + name):
            create_algorithm(load_config(None, [f"train.algorithm={name}"])).check_sampler(ddim)


def test_zero_std_ratio_and_the_reward_judge_gap():
    rewards = torch.tensor([1.0, 1.0, 0.2, 0.5, 0.3, 0.3, 0.3])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    assert zero_std_ratio(rewards, groups) == pytest.approx(2 / 3)
    first = {"reward": 0.5, "judge": 0.6}
    assert reward_judge_gap(first, None) == {"reward_judge_gap": pytest.approx(-0.1), "reward_judge_gap_growth": 0.0}
    later = reward_judge_gap({"reward": 0.9, "judge": 0.7}, first)
    assert later == {"reward_judge_gap": pytest.approx(0.2), "reward_judge_gap_growth": pytest.approx(0.3)}
    assert reward_judge_gap({"reward": 0.9}, first) == {}
