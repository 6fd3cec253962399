"""Byte-bounded reward requests and a reward service per reward (trainer and pruner)."""

import json

import numpy as np
import pytest

from epgrpo.protos.codec import batch_slices
from epgrpo.services.reward.scorer import RewardScorer
from epgrpo.trainer.clients import PrunerClient
from epgrpo.trainer.reward_client import RewardClient, RewardRouter, reward_client_from_config
from epgrpo.trainer.config import load_config
from epgrpo.trainer.loop import Trainer


@pytest.mark.parametrize("count, item, limit, items", [(96, 3 * 2**20, 16 * 2**20, 256), (10, 1, 100, 3),
                                                       (1, 2**30, 2**20, 8), (0, 5, 5, 5), (7, 0, 1, 7)])
def test_batch_slices_cover_the_batch_within_both_limits(count, item, limit, items):
    slices = batch_slices(count, item, limit, items)
    assert [i for s in slices for i in range(count)[s]] == list(range(count))
    for s in slices:
        n = s.stop - s.start
        assert 1 <= n <= items and (n == 1 or n * item <= limit)


@pytest.fixture
def reward_pair(background_server):
    from epgrpo.services.reward.main import build_registrar

    return background_server(build_registrar(["jpeg_compressibility"])), background_server(build_registrar(["digit"]))


@pytest.fixture
def score_calls(monkeypatch):
    """(backends of the scoring service, rewards asked for) of every RewardScorer.score call."""
    seen = []
    original = RewardScorer.score

    def spy(self, images, prompts, metadata, specs):
        seen.append((tuple(sorted(self.backends)), tuple(name for name, _ in specs)))
        return original(self, images, prompts, metadata, specs)

    monkeypatch.setattr(RewardScorer, "score", spy)
    return seen


@pytest.mark.slow
def test_a_batch_far_over_the_message_limit_scores_in_chunks(reward_pair):
    jpeg, _ = reward_pair
    images = np.random.default_rng(0).integers(0, 256, (96, 1024, 1024, 3), dtype=np.uint8)  # 302 MB
    client = RewardClient(jpeg.address, deadline_s=120)
    try:
        combined, raw = client.score(images, ["a"] * 96, [("jpeg_compressibility", 2.0)], request_id="big")
        few, _ = client.score(images[[0, 50, 95]], ["a"] * 3, [("jpeg_compressibility", 2.0)])
    finally:
        client.close()
    assert combined.shape == (96,) and np.isfinite(combined).all()
    np.testing.assert_allclose(combined, 2.0 * raw["jpeg_compressibility"], rtol=1e-6)
    np.testing.assert_allclose(combined[[0, 50, 95]], few, rtol=1e-6)  # chunking does not change a score


def test_router_sends_each_reward_to_its_service_and_sums_like_one_service(reward_pair, score_calls):
    jpeg, digit = reward_pair
    seen = score_calls
    config = load_config(None, [f"reward.address={jpeg.address}", f"reward.services.digit={digit.address}"])
    router = reward_client_from_config(config.reward)
    assert isinstance(router, RewardRouter)
    images = np.random.default_rng(1).integers(0, 256, (6, 16, 16, 1), dtype=np.uint8)
    prompts = [f"a handwritten digit {d}" for d in range(6)]
    try:
        router.require(["digit", "jpeg_compressibility"], "reward.rewards")
        with pytest.raises(ValueError, match="does not serve digit_judge"):
            router.require(["digit_judge"], "reward.judge")
        combined, raw = router.score(images, prompts, [("digit", 1.0), ("jpeg_compressibility", 0.5)])
    finally:
        router.close()
    np.testing.assert_allclose(combined, raw["digit"] + 0.5 * raw["jpeg_compressibility"], rtol=1e-6)
    assert sorted(seen) == [(("digit",), ("digit",)), (("jpeg_compressibility",), ("jpeg_compressibility",))]


def test_reward_services_config_is_checked_and_overrides_accumulate():
    config = load_config(None, ["reward.services.ocr=127.0.0.1:1", "reward.services.pickscore.address=10.0.0.2:5",
                                "reward.services.pickscore.deadline_s=9"])
    assert config.reward.services == {"ocr": "127.0.0.1:1", "pickscore": {"address": "10.0.0.2:5", "deadline_s": 9.0}}
    with pytest.raises(ValueError, match="reward.services.ocr.tls_cafe: unknown option"):
        load_config(None, ["reward.services.ocr.tls_cafe=x"])
    with pytest.raises(ValueError, match="reward.services.ocr.address: expected host:port"):
        load_config(None, ["reward.services.ocr.deadline_s=3"])


@pytest.mark.slow
def test_training_with_a_reward_service_per_reward_through_trainer_and_pruner(reward_pair, background_server,
                                                                               tiny_policy_factory, tmp_path,
                                                                               score_calls):
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar

    jpeg, digit = reward_pair
    seen = score_calls
    pruner = background_server(pruner_registrar(jpeg.address, reward_routes={"digit": digit.address}))
    config = load_config(None, [
        "prune.group_size=6", "prune.steps=[2]", "prune.keeps=[3]", "sampling.num_steps=4", "train.iterations=1",
        "train.prompts_per_iteration=2", "reward.rewards=digit:1.0,jpeg_compressibility:0.1", "reward.judge=",
        "eval.samples_per_prompt=1", "eval.every=0", f"reward.address={jpeg.address}",
        f"reward.services.digit={digit.address}", f"out_dir={tmp_path}", "launch_services=false", "progress=false"])
    reward, pruner_client = reward_client_from_config(config.reward), PrunerClient(pruner.address)
    try:
        Trainer(config, tiny_policy_factory(), reward, pruner_client).run()
    finally:
        reward.close()
        pruner_client.close()
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["survivors_per_step"] == [12, 12, 12, 6]
    assert {s for s, _ in seen} == {("digit",), ("jpeg_compressibility",)}  # both services were used
    assert all(backends == names for backends, names in seen)  # and each only for its own reward
