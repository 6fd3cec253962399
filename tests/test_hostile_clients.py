"""Services against hostile clients, authenticated or not, as real processes on loopback: the
methods anyone may call (health) stay small and never take the slots authenticated calls need,
compressed requests are refused before they inflate, and requests that would expand far past
their wire size are refused before they do. RSS is read from /proc (tests/test_memory_flood.py).
The in-process cases (stream state, keepalive, logs) are in tests/test_service_limits.py."""

from __future__ import annotations

import secrets
import time

import grpc
import numpy as np
import pytest
from epgrpo.protos import codec
from epgrpo.protos.oip_codec import encode_bytes
from epgrpo.protos.v1 import oip_pb2, oip_pb2_grpc, pruner_pb2, reward_pb2, reward_pb2_grpc, tensor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_memory_flood import Sampler, rss_mib

MiB = 2**20
JPEG = [tensor_pb2.RewardSpec(name="jpeg_compressibility", weight=1.0)]
TOKEN = secrets.token_hex(16)
AUTH = (("authorization", f"Bearer {TOKEN}"),)
BUDGET_MIB = 128


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    """A reward service with a token, a 128 MiB budget and 40 concurrency slots."""
    from epgrpo.trainer.launch import LocalService

    service = LocalService("reward", "epgrpo.services.reward.main",
                           ["--rewards", "jpeg_compressibility", "--device", "cpu", "--torch-threads", "1",
                            "--max-inflight-mb", str(BUDGET_MIB), "--max-concurrent-rpcs", "40"],
                           tmp_path_factory.mktemp("hostile"), env={"EPGRPO_TOKEN": TOKEN})
    yield service
    service.stop()


def _channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 256 * MiB)])


def _score(channel, n: int = 4) -> int:
    images = np.random.default_rng(n).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    request = reward_pb2.ScoreRequest(images=codec.encode(images), prompts=[""] * n, rewards=JPEG)
    return len(reward_pb2_grpc.RewardServiceStub(channel).Score(request, timeout=20, metadata=AUTH).scores)


def _settle(pid: int) -> float:
    time.sleep(0.3)
    return rss_mib(pid)


def test_idle_health_watchers_never_starve_authenticated_calls(reward):
    with _channel(reward.address) as channel, _channel(reward.address) as probe:
        health = health_pb2_grpc.HealthStub(probe)
        watches, outcomes = [], []
        for _ in range(48):  # more than the 40 slots of --max-concurrent-rpcs
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            watches.append(watch)
            try:
                outcomes.append(health_pb2.HealthCheckResponse.ServingStatus.Name(next(watch).status))
            except grpc.RpcError as e:
                outcomes.append(e.code().name)
                assert "streams are open already" in e.details(), e.details()
        try:
            assert outcomes.count("SERVING") == 16 and outcomes.count("RESOURCE_EXHAUSTED") == 32, outcomes
            # beside 16 idle watchers: authenticated calls and probes are served
            assert [_score(channel) for _ in range(3)] == [4, 4, 4]
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        finally:
            for watch in watches:
                watch.cancel()
        time.sleep(0.3)  # cancelled watchers give their slots back
        again = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        try:
            assert next(again).status == health_pb2.HealthCheckResponse.SERVING
        finally:
            again.cancel()


def test_health_messages_are_tiny_and_held_by_nobody(reward):
    pid = reward.process.pid
    with _channel(reward.address) as probe:
        health = health_pb2_grpc.HealthStub(probe)
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="x" * MiB), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 4096 bytes" in info.value.details(), info.value.details()
        start = _settle(pid)
        sampler = Sampler(pid, reward.address)
        watches, codes = [], []
        try:
            for i in range(16):  # 16 x 4 MiB service names: ~64-200 MiB held while they watch, if parsed
                watch = health.Watch(health_pb2.HealthCheckRequest(service=chr(97 + i) * (4 * MiB)), timeout=60)
                watches.append(watch)
                try:
                    next(watch)
                    codes.append("OK")
                except grpc.RpcError as e:
                    codes.append(e.code().name)
            held = _settle(pid) - start
        finally:
            for watch in watches:
                watch.cancel()
            sampler.stop()
        print(f"\n16 Watch streams of 4 MiB names: RSS start {start:.0f} MiB, peak +{sampler.peak - start:.0f}, "
              f"held +{held:.0f} MiB; {set(codes)}")
        assert codes == ["RESOURCE_EXHAUSTED"] * 16, codes
        assert held < 24 and sampler.peak - start < 48, (held, sampler.peak - start)


def test_compressed_requests_are_refused_before_they_inflate(reward):
    pid = reward.process.pid
    with _channel(reward.address) as channel:
        start = _settle(pid)
        sampler = Sampler(pid, reward.address)
        try:
            with pytest.raises(grpc.RpcError) as info:  # 48 MiB of one letter: ~50 KB on the wire, no token
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="a" * (48 * MiB)),
                                                          timeout=20, compression=grpc.Compression.Gzip)
            images = np.zeros((40, 512, 512, 3), np.uint8)  # 30 MiB of zeros: ~30 KB gzipped, with the token
            with pytest.raises(grpc.RpcError) as scored:
                reward_pb2_grpc.RewardServiceStub(channel).Score(
                    reward_pb2.ScoreRequest(images=codec.encode(images), prompts=[""] * 40, rewards=JPEG),
                    timeout=20, metadata=AUTH, compression=grpc.Compression.Gzip)
        finally:
            sampler.stop()
        for error in (info.value, scored.value):
            assert error.code() == grpc.StatusCode.UNIMPLEMENTED, (error.code(), error.details())
            assert "gzip' is disabled" in error.details(), error.details()
        print(f"\ngzip bombs: RSS start {start:.0f} MiB, peak +{sampler.peak - start:.0f} MiB")
        assert sampler.peak - start < 24
        assert _score(channel) == 4  # uncompressed calls are served as before


# -- requests that expand far past their wire size ------------------------------------------------
def _raw_call(channel, method: str, payload: bytes):
    """Sends already-serialized bytes (the client never parses what it sends)."""
    return channel.unary_unary(method)(payload, timeout=30, metadata=AUTH)


def _oip_request(images: np.ndarray, prompts_shape=None, raw_prompts: bytes | None = None, typed=False):
    tensor = oip_pb2.ModelInferRequest.InferInputTensor
    request = oip_pb2.ModelInferRequest(model_name="jpeg_compressibility")
    request.inputs.append(tensor(name="IMAGES", datatype="UINT8", shape=list(images.shape)))
    if typed:
        request.inputs[0].contents.uint_contents.extend(images.reshape(-1).tolist())
        return request
    request.raw_input_contents.append(images.astype(np.uint8).tobytes())
    if prompts_shape is not None:
        request.inputs.append(tensor(name="PROMPTS", datatype="BYTES", shape=prompts_shape))
        request.raw_input_contents.append(raw_prompts)
    return request


def test_requests_are_counted_before_they_expand(reward):
    pid = reward.process.pid
    four = codec.encode(np.zeros((4, 8, 8, 3), np.uint8))
    fields = {f"k{i}": "v" for i in range(40_000)}
    cases = {  # name: (method, serialized request, status, words of the message)
        "1M two-character prompts": ("/epgrpo.v1.RewardService/Score", reward_pb2.ScoreRequest(
            images=four, prompts=["ab"] * 1_000_000, rewards=JPEG), "RESOURCE_EXHAUSTED", "more than 131072 fields"),
        "200k metadata entries": ("/epgrpo.v1.RewardService/Score", reward_pb2.ScoreRequest(
            images=four, prompts=[""] * 4, metadata=[tensor_pb2.Metadata(fields={"a": "b"})] * 200_000,
            rewards=JPEG), "RESOURCE_EXHAUSTED", "more than 131072 fields"),
        "4 entries of 40k fields": ("/epgrpo.v1.RewardService/Score", reward_pb2.ScoreRequest(
            images=four, prompts=[""] * 4, metadata=[tensor_pb2.Metadata(fields=fields)] * 4, rewards=JPEG),
            "RESOURCE_EXHAUSTED", "more than 131072 fields"),
        "5 prompts for 4 images": ("/epgrpo.v1.RewardService/Score", reward_pb2.ScoreRequest(
            images=four, prompts=["ab"] * 5, rewards=JPEG), "INVALID_ARGUMENT", "prompts: expected 4 prompts"),
        "OIP: 1M BYTES prompts for 2 images": ("/inference.GRPCInferenceService/ModelInfer", _oip_request(
            np.zeros((2, 8, 8, 3)), [1_000_000], encode_bytes([""] * 1_000_000)), "INVALID_ARGUMENT",
            "PROMPTS: expected 2 elements"),
        "OIP: UINT8 contents of 256 + 7": ("/inference.GRPCInferenceService/ModelInfer", _oip_request(
            np.full((1, 2, 2, 3), 263), typed=True), "INVALID_ARGUMENT", "inputs[0] (IMAGES.contents: UINT8 values"),
    }
    payloads = {name: (method, request.SerializeToString(), code, words)
                for name, (method, request, code, words) in cases.items()}
    del cases
    with _channel(reward.address) as channel:
        start = _settle(pid)
        sampler = Sampler(pid, reward.address)
        seen = {}
        try:
            for name, (method, payload, code, words) in payloads.items():
                begun = time.perf_counter()
                with pytest.raises(grpc.RpcError) as info:
                    _raw_call(channel, method, payload)
                seen[name] = (info.value.code().name, round(time.perf_counter() - begun, 2))
                assert info.value.code().name == code and words in info.value.details(), (name, info.value.details())
            # a valid OIP request of typed contents: 8 x 256 x 256 x 3 = 1.5 M values, ~2 MiB on the wire
            images = np.random.default_rng(0).integers(0, 256, (8, 256, 256, 3), dtype=np.uint8)
            response = oip_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                _oip_request(images, typed=True), timeout=60, metadata=AUTH)
            assert response.outputs[0].shape == [8]
        finally:
            sampler.stop()
    print(f"\nexpanding requests: RSS start {start:.0f} MiB, peak +{sampler.peak - start:.0f} MiB; {seen}; "
          f"health {set(sampler.health)} x{len(sampler.health)}")
    assert sampler.peak - start < 80, sampler.peak - start
    assert set(sampler.health) == {"SERVING"}


@pytest.fixture(scope="module")
def pruner(reward, tmp_path_factory):
    """A pruner (32 MiB budget, 2 MiB messages) scoring through the token-protected reward service."""
    from epgrpo.trainer.launch import LocalService

    service = LocalService("pruner", "epgrpo.services.pruner.main",
                           ["--reward-address", reward.address, "--max-inflight-mb", "32", "--max-message-mb", "2"],
                           tmp_path_factory.mktemp("hostile-pruner"), env={"EPGRPO_REWARD_TOKEN": TOKEN})
    yield service
    service.stop()


def _prune(n: int, prompt: str, ids=None) -> bytes:
    previews = np.zeros((n, 1, 2, 2), np.float32)
    return pruner_pb2.PruneRequest(checkpoint=pruner_pb2.GroupCheckpoint(
        group_id="g", step=1, trajectory_ids=list(range(n)) if ids is None else ids,
        previews=codec.encode(previews), prompts=[prompt]), keep=2, proxy_rewards=JPEG).SerializeToString()


def test_the_pruner_budgets_what_it_broadcasts_and_caps_what_it_copies(pruner):
    from epgrpo.protos.channel import is_budget_rejection

    pid = pruner.process.pid
    with _channel(pruner.address) as channel:
        call = channel.unary_unary("/epgrpo.v1.PrunerService/Prune")
        assert pruner_pb2.PruneDecision.FromString(call(_prune(8, "a cat"), timeout=30)).keep == 2
        start = _settle(pid)
        sampler = Sampler(pid, pruner.address)
        try:
            with pytest.raises(grpc.RpcError) as long_prompt:  # 1 MiB prompt for 64 trajectories: 64 MiB upstream
                call(_prune(64, "x" * MiB), timeout=30)
            with pytest.raises(grpc.RpcError) as broadcast:  # 16 k characters x 1,024: 48 MiB built, 32 MiB budget
                call(_prune(1024, "y" * 16384), timeout=30)
            with pytest.raises(grpc.RpcError) as ids:  # 500 k ids, 1.9 MiB on the wire
                call(_prune(2, "z", ids=list(range(500_000))), timeout=30)
        finally:
            sampler.stop()
    print(f"\npruner broadcast: RSS start {start:.0f} MiB, peak +{sampler.peak - start:.0f} MiB")
    assert long_prompt.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "checkpoint.prompts[0]: expected at most 16384 characters" in long_prompt.value.details()
    assert broadcast.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not is_budget_rejection(broadcast.value)
    assert "broadcast to the group" in broadcast.value.details() and "whole budget" in broadcast.value.details()
    assert ids.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 4096 ids" in ids.value.details(), ids.value.details()
    assert sampler.peak - start < 48
