"""RewardService over real gRPC: scores equal in-process ones, bad requests get INVALID_ARGUMENT
naming the field and leave the server SERVING, reflection, and the CLI's SIGTERM shutdown."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from epgrpo.protos import codec
from epgrpo.protos.v1 import reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.services.reward.backends import digit_data, digits
from epgrpo.services.reward.backends.base import create_backend
from epgrpo.services.reward.main import build_registrar

SERVICE = "epgrpo.v1.RewardService"
DEADLINE_S = 30


@pytest.fixture(scope="module")
def registrar():
    return build_registrar(["digit", "jpeg_compressibility"])


@pytest.fixture
def stub(background_server, registrar):
    server = background_server(registrar)
    with grpc.insecure_channel(server.address) as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel), channel


def digit_batch(n=24):
    images, labels = digits.real_digits()
    _, test_idx = digits.digit_split()
    idx = test_idx[:n]
    return digit_data.to_uint8(images[idx]), [f"a handwritten digit {d}" for d in labels[idx]]


def score_request(images, prompts, rewards, **extra) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(
        images=codec.encode(images), prompts=prompts,
        rewards=[tensor_pb2.RewardSpec(name=n, weight=w) for n, w in rewards], **extra,
    )


def test_score_matches_the_in_process_backends(stub, caplog):
    stub, _ = stub
    images, prompts = digit_batch()
    caplog.set_level(logging.DEBUG, logger="epgrpo.reward.servicer")
    request = score_request(images, prompts, [("digit", 1.0), ("jpeg_compressibility", 0.25)], request_id="req-42")
    response = stub.Score(request, timeout=DEADLINE_S)
    digit_local = create_backend("digit").score(images, prompts, [])
    jpeg_local = create_backend("jpeg_compressibility").score(images, prompts, [])
    assert [(r.name, r.weight) for r in response.per_reward] == [("digit", 1.0), ("jpeg_compressibility", 0.25)]
    np.testing.assert_allclose(response.per_reward[0].scores, digit_local, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.float32(response.per_reward[1].scores), jpeg_local)
    expected = digit_local.astype(np.float64) + 0.25 * jpeg_local.astype(np.float64)
    np.testing.assert_allclose(response.scores, expected, rtol=1e-6, atol=1e-6)
    assert np.mean(response.per_reward[0].scores) > 0.8  # held-out real digits, true prompts
    assert any("req-42" in r.getMessage() for r in caplog.records), "one DEBUG line per request with its id"


def test_metadata_travels_to_the_backend(stub):
    stub, _ = stub
    images, _ = digit_batch(4)
    request = score_request(images, ["no digit named here"] * 4, [("digit", 1.0)])
    request.metadata.add().fields["digit"] = "1"
    with pytest.raises(grpc.RpcError) as caught:  # metadata must be empty or one per image
        stub.Score(request, timeout=DEADLINE_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "metadata" in caught.value.details()
    for _ in range(3):
        request.metadata.add().fields["digit"] = "1"
    response = stub.Score(request, timeout=DEADLINE_S)
    assert len(response.scores) == 4


def test_list_rewards_describes_what_is_served(stub):
    stub, _ = stub
    rewards = stub.ListRewards(reward_pb2.ListRewardsRequest(), timeout=DEADLINE_S).rewards
    assert [r.name for r in rewards] == ["digit", "jpeg_compressibility"]
    assert all(r.description and r.inputs and r.range for r in rewards)
    assert "digit" in rewards[0].inputs and rewards[0].range == "[0, 1]"


def _bad_requests():
    images, prompts = digit_batch(3)
    ok = [("digit", 1.0)]
    as_float = tensor_pb2.Tensor(dtype="float32", shape=[3, 16, 16, 1], data=images.astype(np.float32).tobytes())
    short = tensor_pb2.Tensor(dtype="uint8", shape=[3, 16, 16, 1], data=images.tobytes()[:-5])
    flat = tensor_pb2.Tensor(dtype="uint8", shape=[3, 16, 16], data=images.tobytes())
    return {
        "wrong dtype": (reward_pb2.ScoreRequest(images=as_float, prompts=prompts, rewards=[tensor_pb2.RewardSpec(name="digit", weight=1)]), "images.dtype"),
        "byte length": (reward_pb2.ScoreRequest(images=short, prompts=prompts, rewards=[tensor_pb2.RewardSpec(name="digit", weight=1)]), "images.data"),
        "3-D images": (reward_pb2.ScoreRequest(images=flat, prompts=prompts, rewards=[tensor_pb2.RewardSpec(name="digit", weight=1)]), "images.shape"),
        "prompt count": (score_request(images, prompts[:1], ok), "prompts: expected 3 prompts"),
        "unknown reward": (score_request(images, prompts, [("digit", 1.0), ("clip", 1.0)]), "rewards[1].name: unknown reward 'clip'"),
        "nan weight": (score_request(images, prompts, [("digit", float("nan"))]), "rewards[0].weight"),
        "no rewards": (score_request(images, prompts, []), "rewards: expected at least one"),
        "prompt without digit": (score_request(images, ["a cat", *prompts[1:]], ok), "prompts[0]"),
        "no images": (reward_pb2.ScoreRequest(prompts=prompts, rewards=[tensor_pb2.RewardSpec(name="digit", weight=1)]), "images.dtype"),
    }


def test_bad_requests_get_invalid_argument_naming_the_field_and_server_keeps_serving(stub):
    stub, channel = stub
    for case, (request, field) in _bad_requests().items():
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(request, timeout=DEADLINE_S)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{case}: {caught.value.code()}"
        assert field in caught.value.details(), f"{case}: {caught.value.details()!r}"
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE_S).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    images, prompts = digit_batch(2)
    assert len(stub.Score(score_request(images, prompts, [("digit", 1.0)]), timeout=DEADLINE_S).scores) == 2


def test_oversized_batch_is_resource_exhausted(background_server):
    server = background_server(build_registrar(["jpeg_compressibility"], max_batch=4))
    with grpc.insecure_channel(server.address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        images = np.zeros((5, 8, 8, 3), np.uint8)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(score_request(images, [""] * 5, [("jpeg_compressibility", 1.0)]), timeout=DEADLINE_S)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "images.shape" in caught.value.details() and "4" in caught.value.details()


def test_reflection_lists_the_service(stub):
    _, channel = stub
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=DEADLINE_S)
    names = [s.name for r in responses for s in r.list_services_response.service]
    assert SERVICE in names


def test_build_registrar_fails_fast_on_unknown_rewards():
    with pytest.raises(ValueError, match="unknown reward 'nope'; known rewards: aesthetic, clipscore, digit, "):
        build_registrar(["jpeg_compressibility", "nope"])
    with pytest.raises(ValueError, match="at least one"):
        build_registrar([" ", ""])


def test_cli_serves_and_exits_cleanly_on_sigterm(tmp_path):
    port_file, log_path = tmp_path / "port", tmp_path / "server.log"
    command = [sys.executable, "-m", "epgrpo.services.reward.main", "--port", "0", "--port-file", str(port_file),
               "--rewards", "jpeg_compressibility", "--device", "cpu", "--grace", "1"]
    with open(log_path, "w") as log_file:  # a file, not a pipe: a chatty server can't block on it
        process = subprocess.Popen(command, env=os.environ.copy(), stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert process.poll() is None, f"server exited early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, "no port file within 60 s"
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{int(port_file.read_text())}") as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            images = np.full((2, 16, 16, 3), 128, np.uint8)
            response = stub.Score(score_request(images, ["", ""], [("jpeg_compressibility", 1.0)]), timeout=DEADLINE_S)
            assert len(response.scores) == 2 and all(s < 0 for s in response.scores)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0, log_path.read_text()
        assert "shutting down" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
