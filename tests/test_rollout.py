"""Expand-and-Prune rollouts: transformer calls, batch invariance, the first-epoch ratio."""

import torch

from epgrpo.services.pruner.ovf import ovf_select
from epgrpo.trainer.grpo import group_advantages
from epgrpo.trainer.optimize import policy_update, trained_steps
from epgrpo.trainer.rollout import rollout, sample_seeds
from epgrpo.trainer.samplers import FlowSampler

PROMPTS = ["a handwritten digit 3", "a handwritten digit 8"]


class CallLog:
    """Wraps a policy so every velocity call records which trajectory rows it computed."""

    def __init__(self, policy):
        self.policy = policy
        self.calls: list[list[int]] = []
        encode, velocity = policy.encode_prompts, policy.predict

        def encode_with_rows(prompts):
            cond = encode(prompts)
            cond["row"] = torch.arange(len(prompts))
            return cond

        def logged_velocity(x, sigma, cond):
            self.calls.append(cond["row"].tolist())
            return velocity(x, sigma, cond)

        policy.encode_prompts, policy.predict = encode_with_rows, logged_velocity


class OvfOnPreviewMean:
    """An in-process pruner: OVF on each preview's mean brightness."""

    def __init__(self):
        self.decisions = []

    def decide(self, step, sigma, groups):
        out = {}
        for g in groups:
            keep = dict(SCHEDULE)[step]
            scores = g.previews.mean(dim=(1, 2, 3)).numpy()
            out[g.group_id] = [g.trajectory_ids[i] for i in ovf_select(scores, keep)]
            self.decisions.append((step, g.group_id, list(g.trajectory_ids), out[g.group_id]))
        return out


SCHEDULE = [(2, 4), (5, 2)]  # decide on the previews of x_2 and x_5


def test_pruned_trajectories_get_no_further_transformer_calls(tiny_policy_factory):
    policy = tiny_policy_factory()
    log = CallLog(policy)
    pruner = OvfOnPreviewMean()
    sampler = FlowSampler.uniform(8)
    result = rollout(policy, PROMPTS, 8, sampler, seeds=sample_seeds(0, 1, 16),
                     schedule=SCHEDULE, pruner=pruner)
    assert len(log.calls) == 8  # one batched call per step
    live = set(range(16))
    for step, rows in enumerate(log.calls):
        assert set(rows) == live, f"step {step}: computed {sorted(rows)}, live {sorted(live)}"
        for s, group_id, sent, kept in pruner.decisions:  # decided on this step's previews, after its call
            if s == step:
                assert set(sent) <= live
                live -= set(sent) - set(kept)
    assert result.nfe == 16 * 3 + 8 * 3 + 4 * 2 == sum(len(r) for r in log.calls)
    assert result.nfe_full == 16 * 8
    assert result.survivors_per_step == [16] * 3 + [8] * 3 + [4] * 2
    assert sorted(result.trajectory_ids.tolist()) == sorted(live)
    assert (result.group_index.bincount() == 2).all()


def test_survivors_follow_the_same_path_as_in_the_unpruned_rollout(tiny_policy_factory):
    policy = tiny_policy_factory()
    sampler = FlowSampler.uniform(8)
    seeds = sample_seeds(0, 2, 16)
    full = rollout(policy, PROMPTS, 8, sampler, seeds=seeds)
    pruned = rollout(policy, PROMPTS, 8, sampler, seeds=seeds, schedule=SCHEDULE,
                     pruner=OvfOnPreviewMean())
    rows = pruned.trajectory_ids
    torch.testing.assert_close(pruned.latents, full.latents[rows], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pruned.log_probs[:, :-1], full.log_probs[rows, :-1], atol=1e-4, rtol=1e-5)


def test_every_trajectory_and_rank_gets_distinct_noise():
    seeds = sample_seeds(0, 5, 64) + sample_seeds(0, 5, 64, rank=1) + sample_seeds(0, 6, 64)
    assert len(set(seeds)) == len(seeds)
    assert sample_seeds(0, 5, 64) == sample_seeds(0, 5, 64)


def test_ratio_is_exactly_one_for_unchanged_parameters(tiny_policy_factory):
    policy = tiny_policy_factory()
    sampler = FlowSampler.uniform(6)
    batch = rollout(policy, PROMPTS, 4, sampler, seeds=sample_seeds(1, 1, 8))
    assert trained_steps(batch) == [0, 1, 2, 3, 4]  # the last (ODE) step is not trained
    rewards = torch.linspace(0, 1, 8)
    adv = group_advantages(rewards, batch.group_index)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)  # parameters stay unchanged
    stats = policy_update(policy, optimizer, batch, adv, sampler, clip_range=1e-4, beta=0.0,
                          inner_epochs=2, max_grad_norm=1.0, train_batch_size=3)
    for s in stats:  # both epochs: the parameters never changed, so every ratio is exactly 1
        assert s.ratio_mean == 1.0 and s.clip_fraction == 0.0 and s.approx_kl == 0.0
    assert stats[0].logp_drift < 1e-3  # rollout log-probs agree with the recomputed ones


def test_update_changes_policy_but_not_reference(tiny_policy_factory):
    policy = tiny_policy_factory()
    sampler = FlowSampler.uniform(6)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    ref_before = {k: v.clone() for k, v in policy._reference_transformer.state_dict().items()}
    batch = rollout(policy, PROMPTS, 4, sampler, seeds=sample_seeds(1, 2, 8))
    adv = group_advantages(torch.randn(8, generator=torch.Generator().manual_seed(0)), batch.group_index)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    stats = policy_update(policy, optimizer, batch, adv, sampler, clip_range=0.2, beta=0.04,
                          inner_epochs=2, max_grad_norm=1.0, train_batch_size=8)
    assert stats[0].kl == 0.0 and stats[1].kl > 0.0  # KL to the frozen reference appears after a step
    assert stats[1].ratio_mean != 1.0
    changed = [k for k in before if not torch.equal(before[k], policy.state_dict()[k])]
    assert changed
    for k, v in policy._reference_transformer.state_dict().items():
        assert torch.equal(v, ref_before[k])


def test_stochastic_evaluation_is_reproducible_per_seed_and_is_the_policys_sampler(tiny_policy_factory):
    from epgrpo.trainer.rollout import sample_eval, sample_ode

    policy = tiny_policy_factory()
    sampler = FlowSampler.uniform(5)
    prompts, seeds = PROMPTS * 2, [11, 12, 13, 14]
    first = sample_eval(policy, prompts, seeds, sampler, stochastic=True)
    again = sample_eval(policy, prompts[::-1], seeds[::-1], sampler, stochastic=True, batch_size=3)
    torch.testing.assert_close(first, again.flip(0), atol=1e-5, rtol=1e-5)  # per-seed, batch-independent
    torch.testing.assert_close(sample_eval(policy, prompts, seeds, sampler, stochastic=False),
                               sample_ode(policy, prompts, seeds, sampler))
    assert not torch.allclose(first, sample_ode(policy, prompts, seeds, sampler), atol=1e-3)
