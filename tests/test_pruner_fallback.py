"""pruner.on_unavailable: no_prune goes on unpruned (counted), retry gives up after its budget."""

import re

import pytest
from conftest import free_port

from epgrpo.trainer.clients import PrunerClient, ServicesUnavailable

from epgrpo.trainer.reward_client import RewardClient
from epgrpo.trainer.config import load_config
from epgrpo.trainer.loop import Trainer


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"  # a port nobody listens on


@pytest.fixture
def reward(background_server):
    from epgrpo.services.reward.main import build_registrar

    return background_server(build_registrar(["digit"]))


def trainer_for(tmp_path, policy, reward_address, *overrides):
    config = load_config(None, [
        "prune.group_size=8", "prune.steps=[2,3]", "prune.keeps=[4,2]", "sampling.num_steps=5",
        "train.prompts_per_iteration=2", "reward.judge=", f"out_dir={tmp_path}", "launch_services=false",
        "progress=false", "pruner.deadline_s=5", *overrides,
    ])
    return Trainer(config, policy, RewardClient(reward_address), PrunerClient(dead_address(), deadline_s=5))


@pytest.mark.parametrize("mode", ["expand_prune", "full_ovf"])
def test_no_prune_fallback_trains_the_full_groups_and_counts_them(tmp_path, reward, tiny_policy_factory, mode):
    trainer = trainer_for(tmp_path, tiny_policy_factory(), reward.address, f"prune.mode={mode}",
                          "pruner.on_unavailable=no_prune")
    record = trainer.iteration(1)
    assert record["pruner_fallback_groups"] == 2
    assert record["kept"] == 2 * 8 and record["nfe"] == record["nfe_full"] == 2 * 8 * 5
    assert "skipped" not in record and record["ratio_mean"] == 1.0


def test_retry_policy_stops_after_the_budget(tmp_path, reward, tiny_policy_factory):
    trainer = trainer_for(tmp_path, tiny_policy_factory(), reward.address, "pruner.retry_budget_s=1")
    with pytest.raises(ServicesUnavailable, match="retry budget"):
        trainer.iteration_with_retries(1)


def test_bad_policy_is_a_config_error():
    with pytest.raises(ValueError, match=re.escape("pruner.on_unavailable: expected retry | no_prune, got 'skip'")):
        load_config(None, ["pruner.on_unavailable=skip"])
