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
from epgrpo.protos.v1 import oip_pb2, oip_pb2_grpc, pruner_pb2, pruner_pb2_grpc, reward_pb2, reward_pb2_grpc, tensor_pb2
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
