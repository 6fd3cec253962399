"""The trainer's OIP reward client against our own OIP endpoint: same scores as the native
RewardService client, fail-fast on missing models, configurable tensor names."""

from __future__ import annotations

import numpy as np
import pytest

from epgrpo.services.reward.main import build_registrar
from epgrpo.trainer.reward_client import RewardClient
from epgrpo.trainer.oip_reward import OipRewardClient, OipRewardError, OipTarget, is_oip_address


@pytest.fixture(scope="module")
def registrar():
    return build_registrar(["digit", "jpeg_compressibility"])


@pytest.fixture
def address(background_server, registrar):
    return background_server(registrar).address


def batch(n=7):
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, (n, 16, 16, 1), dtype=np.uint8), [f"a handwritten digit {i % 10}" for i in range(n)]


def test_parse_target():
    assert OipTarget.parse("oip://h:8001") == OipTarget("h:8001")
    assert OipTarget.parse("oip://h:8001?images=pixels&prompts=&output=logit&version=2") == OipTarget(
        "h:8001", images="pixels", prompts="", output="logit", version="2")
    assert is_oip_address("oip://h:1") and not is_oip_address("h:1")
    with pytest.raises(ValueError, match="colour"):
        OipTarget.parse("oip://h:8001?colour=red")


def test_scores_equal_the_native_client(address):
    images, prompts = batch()
    rewards = [("digit", 1.0), ("jpeg_compressibility", 0.25)]
    oip = OipRewardClient(f"oip://{address}", max_batch=3)  # several chunks
    native = RewardClient(address)
    try:
        combined, raw = oip.score(images, prompts, rewards, request_id="t")
        expected, expected_raw = native.score(images, prompts, rewards)
    finally:
        oip.close()
        native.close()
    assert sorted(raw) == ["digit", "jpeg_compressibility"]
    for name in raw:
        np.testing.assert_allclose(raw[name], expected_raw[name], atol=1e-6)
    np.testing.assert_allclose(combined, expected, atol=1e-5)


def test_require_fails_fast_naming_missing_models(address):
    client = OipRewardClient(f"oip://{address}")
    try:
        client.require(["digit"], "reward.rewards")
        with pytest.raises(ValueError, match=r"reward.rewards: OIP server .* has no ready model pickscore"):
            client.require(["digit", "pickscore"], "reward.rewards")
    finally:
        client.close()


def test_tensor_names_are_sent_as_configured(address):
    images, prompts = batch(2)
    client = OipRewardClient(f"oip://{address}?images=pixels")
    try:
        with pytest.raises(OipRewardError, match=r"INVALID_ARGUMENT: inputs\[0\].name: expected IMAGES, PROMPTS or GROUP, got 'pixels'"):
            client.score(images, prompts, [("digit", 1.0)])
    finally:
        client.close()
    no_prompts = OipRewardClient(f"oip://{address}?prompts=")  # image-only model: no PROMPTS input sent
    try:
        _, raw = no_prompts.score(images, prompts, [("jpeg_compressibility", 1.0)])
        assert raw["jpeg_compressibility"].shape == (2,)
        with pytest.raises(OipRewardError, match="prompts"):  # digit needs the prompt: the server says so
            no_prompts.score(images, prompts, [("digit", 1.0)])
    finally:
        no_prompts.close()


def test_built_from_the_trainer_reward_config(address):
    from epgrpo.trainer.config import RewardConfig

    client = OipRewardClient.from_config(RewardConfig(address=f"oip://{address}", deadline_s=7.0))
    try:
        assert client.deadline_s == 7.0 and client.target.address == address
        client.require(["digit"], "reward.rewards")
    finally:
        client.close()
