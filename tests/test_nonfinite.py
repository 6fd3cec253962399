"""Non-finite rewards or log-probs: the update is skipped with a logged reason, weights untouched."""

import numpy as np
import torch

from epgrpo.trainer.config import load_config
from epgrpo.trainer.grpo import group_advantages
from epgrpo.trainer.loop import Trainer
from epgrpo.trainer.optimize import policy_update
from epgrpo.trainer.rollout import rollout, sample_seeds
from epgrpo.trainer.samplers import FlowSampler


class NaNRewards:
    """A reward source that returns NaN for one sample (e.g. a broken external scorer)."""

    def score(self, images, prompts, rewards, request_id="", groups=None):
        values = np.linspace(0, 1, len(images)).astype(np.float32)
        values[1] = np.nan
        return values, {"digit": values}


def snapshot(policy):
    return {k: v.clone() for k, v in policy.state_dict().items()}


def unchanged(policy, before):
    return all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())


def test_nan_reward_skips_the_iteration(tiny_policy_factory, tmp_path, caplog):
    policy = tiny_policy_factory()
    config = load_config(None, ["prune.mode=grpo", "prune.group_size=4", "sampling.num_steps=4",
                                "train.prompts_per_iteration=2", f"out_dir={tmp_path}", "launch_services=false"])
    trainer = Trainer(config, policy, NaNRewards(), pruner=None)
    before = snapshot(policy)
    record = trainer.iteration(1)
    assert "non-finite rewards" in record["skipped"] and "weights untouched" in record["skipped"]
    assert unchanged(policy, before)
    assert "iteration 1 skipped" in caplog.text


def test_nan_log_probs_skip_the_optimizer_step(tiny_policy_factory):
    policy = tiny_policy_factory()
    sampler = FlowSampler.uniform(4)
    batch = rollout(policy, ["a handwritten digit 1"], 4, sampler, seeds=sample_seeds(0, 0, 4))
    batch.latents[2, 1] = float("nan")  # a corrupted sample makes its log-prob NaN
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    before = snapshot(policy)
    stats = policy_update(policy, optimizer, batch, group_advantages(torch.arange(4.0), batch.group_index), sampler,
                          clip_range=0.2, beta=0.04, inner_epochs=2, max_grad_norm=1.0,
                          train_batch_size=4)
    assert len(stats) == 1 and "non-finite" in stats[0].skipped
    assert unchanged(policy, before)
    assert all(p.grad is None for p in policy.trainable_parameters())
