"""Waves: the same iteration sampled in several waves gives the same survivors, rewards and
weights as one wave, and a wave's pruning call overlaps the other waves' denoising."""

import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from epgrpo.trainer.clients import PrunerClient

from epgrpo.trainer.reward_client import RewardClient
from epgrpo.trainer.config import load_config
from epgrpo.trainer.loop import Trainer
from epgrpo.trainer.rollout import rollout, rollout_steps, sample_seeds
from epgrpo.trainer.samplers import FlowSampler
from epgrpo.trainer.waves import concat_results, run_waves, split_waves


def test_split_waves_covers_every_group_once():
    for count in range(1, 12):
        for waves in range(1, 6):
            parts = split_waves(count, waves)
            assert [g for part in parts for g in part] == list(range(count))
            assert len(parts) == min(count, waves) and all(len(p) >= 1 for p in parts)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


class GatedOvfOnMean:
    """An in-process pruner keeping the extremes of the previews' mean brightness. Its first
    decision does not return before ``wait_for`` is set (another wave's first decision started):
    only a driver that advances other waves while a decision is in flight gets past it."""

    def __init__(self, keeps, wait_for: threading.Event | None = None):
        self.keeps, self.wait_for, self.started = dict(keeps), wait_for, threading.Event()
        self.overlapped = None

    def decide(self, step, sigma, groups):
        self.started.set()
        if self.wait_for is not None and self.overlapped is None:
            self.overlapped = self.wait_for.wait(timeout=30)
        out = {}
        for g in groups:
            order = g.previews.mean(dim=(1, 2, 3)).argsort().tolist()
            k = self.keeps[step]
            out[g.group_id] = sorted(g.trajectory_ids[i] for i in order[:k // 2] + order[len(order) - (k - k // 2):])
        return out


def test_waves_equal_one_rollout_and_overlap_the_decisions(tiny_policy_factory):
    from concurrent.futures import ThreadPoolExecutor

    policy = tiny_policy_factory()
    sampler, schedule = FlowSampler.uniform(6), [(2, 4), (4, 2)]
    prompts = [f"a handwritten digit {d}" for d in (1, 4, 7, 9)]
    seeds, ids = sample_seeds(0, 3, 4 * 8), [f"g{g}" for g in range(4)]
    whole = rollout(policy, prompts, 8, sampler, seeds=seeds, schedule=schedule, group_ids=ids,
                    pruner=GatedOvfOnMean(schedule))
    pruners, rollouts, waves = [], [], split_waves(4, 3)
    for wave in waves:  # wave k's first decision waits for wave k+1's to start
        pruners.append(GatedOvfOnMean(schedule))
        rollouts.append(rollout_steps(policy, prompts[wave.start:wave.stop], 8, sampler, schedule=schedule,
                                      seeds=seeds[wave.start * 8:wave.stop * 8], group_ids=ids[wave.start:wave.stop],
                                      first_trajectory=wave.start * 8))
    for k in range(len(pruners) - 1):
        pruners[k].wait_for = pruners[k + 1].started
    finished = []
    with ThreadPoolExecutor(4) as executor:
        parts = run_waves(rollouts, pruners, executor, on_finish=lambda k, r: finished.append(k))
    waved = concat_results(parts, [w.start for w in waves])
    assert sorted(finished) == [0, 1, 2]
    assert torch.equal(waved.trajectory_ids, whole.trajectory_ids) and torch.equal(waved.group_index, whole.group_index)
    torch.testing.assert_close(waved.latents, whole.latents, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(waved.log_probs, whole.log_probs, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert (waved.nfe, waved.nfe_full, waved.survivors_per_step) == (whole.nfe, whole.nfe_full, whole.survivors_per_step)
    # each wave's first decision was still in flight when the next wave asked for its own
    assert [p.overlapped for p in pruners] == [True, True, None]


@pytest.fixture
def services(background_server):
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar
    from epgrpo.services.reward.main import build_registrar as reward_registrar

    reward = background_server(reward_registrar(["digit", "digit_judge"]))
    pruner = background_server(pruner_registrar(reward.address))
    return reward, pruner


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["expand_prune", "full_ovf"])
def test_training_in_waves_gives_the_same_survivors_rewards_and_weights(services, tiny_policy_factory, tmp_path,
                                                                        mode):
    reward, pruner = services
    results = {}
    for waves in (1, 3):
        out = tmp_path / f"waves{waves}"
        config = load_config(None, [
            f"prune.mode={mode}", "prune.group_size=8", "prune.steps=[2,4]", "prune.keeps=[4,2]",
            "sampling.num_steps=6", f"sampling.waves={waves}", "train.iterations=2", "train.prompts_per_iteration=4",
            "eval.samples_per_prompt=1", "eval.every=0", f"out_dir={out}", "launch_services=false", "progress=false"])
        clients = RewardClient(reward.address), PrunerClient(pruner.address)
        try:
            Trainer(config, tiny_policy_factory(), *clients).run()
        finally:
            for client in clients:
                client.close()
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[waves] = metrics, load_file(out / "policy.safetensors")
    (one, weights_one), (three, weights_three) = results[1], results[3]
    for a, b in zip(one, three):
        for key in ("nfe", "nfe_full", "survivors_per_step", "kept"):
            assert a[key] == b[key], key
        for key in ("reward_mean", "reward_std", "reward_mean_all_final", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), key
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_three[name], value, rtol=1e-6, atol=1e-6)
