"""Advantages, the clipped loss, and the importance ratio on unchanged parameters."""

import numpy as np
import pytest
import torch

from epgrpo.trainer.grpo import clipped_policy_loss, group_advantages


def test_advantages_use_each_groups_own_mean_and_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(rewards, groups, clip=100.0)
    for g in (0, 1):
        r = rewards[groups == g].double().numpy()
        expected = (r - r.mean()) / (r.std() + 1e-4)
        np.testing.assert_allclose(adv[groups == g].numpy(), expected, rtol=1e-5)


def test_advantages_of_survivors_ignore_pruned_trajectories():
    """Pruned trajectories' rewards must not leak into the survivors' statistics."""
    survivors = torch.tensor([0.1, 0.9, 0.2, 0.8])
    pruned = torch.tensor([0.5, 0.5, 0.5, 0.5])
    only = group_advantages(survivors, torch.zeros(4, dtype=torch.long))
    mixed = group_advantages(torch.cat([survivors, pruned]), torch.zeros(8, dtype=torch.long))[:4]
    r = survivors.double().numpy()
    np.testing.assert_allclose(only.numpy(), (r - r.mean()) / (r.std() + 1e-4), rtol=1e-5)
    assert not torch.allclose(only, mixed)


def test_advantages_are_clipped():
    rewards = torch.tensor([0.0] * 99 + [1.0])
    adv = group_advantages(rewards, torch.zeros(100, dtype=torch.long), clip=5.0)
    assert adv.max() == 5.0


def test_loss_with_ratio_one_is_minus_mean_advantage_and_gradient_is_minus_a_grad_logp():
    logp = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    terms = clipped_policy_loss(logp, logp.detach(), adv, clip_range=1e-4)
    assert terms.ratio_mean == 1.0 and terms.clip_fraction == 0.0
    torch.testing.assert_close(terms.loss, -adv.mean())
    terms.loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 3)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clipping_removes_the_gradient_beyond_the_trust_region(sign):
    old = torch.zeros(1)
    new = torch.tensor([sign * 0.5], requires_grad=True)  # ratio far outside 1 +- 0.2
    adv = torch.tensor([sign])  # the direction that would push further out
    terms = clipped_policy_loss(new, old, adv, clip_range=0.2)
    terms.loss.backward()
    assert new.grad.abs().item() == 0.0 and terms.clip_fraction == 1.0


def test_kl_term_is_added_with_beta():
    logp = torch.zeros(2)
    kl = torch.tensor([0.5, 1.5])
    terms = clipped_policy_loss(logp, logp, torch.zeros(2), 1e-4, kl=kl, beta=0.1)
    torch.testing.assert_close(terms.loss, torch.tensor(0.1))
