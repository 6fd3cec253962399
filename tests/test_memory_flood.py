"""The in-flight memory budget under floods of near-limit requests against real service processes
(loopback only): reward Score floods and pruner rollout streams. The accounting and in-process
admission tests are in tests/test_budget_accounting.py."""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from epgrpo.protos import codec
from epgrpo.protos.channel import is_budget_rejection
from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc, reward_pb2, tensor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

MiB = 2**20
JPEG = [tensor_pb2.RewardSpec(name="jpeg_compressibility", weight=1.0)]


# -- floods against real processes ---------------------------------------------------------------
def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Sampler:
    """Peak RSS of a process (every 10 ms) and its health (every 200 ms, own connection) meanwhile."""

    def __init__(self, pid: int, address: str):
        self.pid, self.peak, self.health, self.stop_event = pid, rss_mib(pid), [], threading.Event()
        self.channel = grpc.insecure_channel(address)
        self.threads = [threading.Thread(target=self._rss), threading.Thread(target=self._health)]
        for t in self.threads:
            t.start()

    def _rss(self):
        while not self.stop_event.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            time.sleep(0.01)

    def _health(self):
        stub = health_pb2_grpc.HealthStub(self.channel)
        while not self.stop_event.is_set():
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                self.health.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
            except grpc.RpcError as e:
                self.health.append(e.code().name)
            time.sleep(0.2)

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join()
        self.channel.close()


# RSS a service may show above its idle RSS + budget: allocator slack (freed pages glibc keeps
# until trimmed), grpc's connection buffers, the 64 KiB windows of calls not read yet. Measured
# (2 busy cores): peak - start = 234-240 MiB for the 200 MiB reward flood below (34-40 over),
# 45-81 MiB for the 160 MiB pruner; without a budget, the reward flood takes ~110 MiB per flooder.
OVERHEAD_MIB = 80


@pytest.mark.slow
def test_a_flood_of_near_limit_requests_stays_within_the_budget(tmp_path):
    from epgrpo.trainer.reward_client import RewardClient
    from epgrpo.trainer.launch import LocalService

    budget_mib, limit_mib = 200, 40
    service = LocalService("reward", "epgrpo.services.reward.main",
                           ["--rewards", "jpeg_compressibility", "--device", "cpu", "--torch-threads", "1",
                            "--max-inflight-mb", str(budget_mib), "--max-message-mb", str(limit_mib)], tmp_path)
    flood_channels = []
    client = RewardClient(service.address, deadline_s=30, retry_budget_s=60)
    try:
        small = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
        client.score(small, [""] * 8, [("jpeg_compressibility", 1.0)])  # warm: lazy imports, first allocations
        time.sleep(0.3)
        start_rss = rss_mib(service.process.pid)
        # 50 images of 512x512 RGB: 37.5 MiB, legal under the 40 MiB limit
        big = reward_pb2.ScoreRequest(
            images=codec.encode(np.random.default_rng(1).integers(0, 256, (50, 512, 512, 3), dtype=np.uint8)),
            prompts=[""] * 50, rewards=JPEG).SerializeToString()
        flood_channels = [grpc.insecure_channel(service.address, options=[("grpc.max_send_message_length", 64 * MiB)])
                          for _ in range(3)]
        calls = [c.unary_unary("/epgrpo.v1.RewardService/Score") for c in flood_channels]
        codes: dict[str, int] = {}
        rejections: list[grpc.RpcError] = []
        lock = threading.Lock()
        flood_until = time.monotonic() + 4.0

        def flood(i: int) -> None:
            while time.monotonic() < flood_until:  # back to back, never backing off
                try:
                    calls[i % len(calls)](big, timeout=60)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                    with lock:
                        rejections.append(e)
                with lock:
                    codes[code] = codes.get(code, 0) + 1

        sampler = Sampler(service.process.pid, service.address)
        flooders = [threading.Thread(target=flood, args=(i,)) for i in range(12)]
        for t in flooders:
            t.start()
        time.sleep(0.5)
        well_behaved = []  # a trainer beside the flood: small batches, backing off when turned away
        while time.monotonic() < flood_until:
            well_behaved.append(len(client.score(small, [""] * 8, [("jpeg_compressibility", 1.0)])[0]))
        for t in flooders:
            t.join()
        sampler.stop()
        end_rss = rss_mib(service.process.pid)

        peak = sampler.peak - start_rss
        print(f"\nreward flood: RSS start {start_rss:.0f} MiB, peak +{peak:.0f} MiB (budget {budget_mib}), "
              f"end {end_rss:.0f} MiB; statuses {codes}; well-behaved calls {len(well_behaved)} after "
              f"{client.retry.retries} retries; health {set(sampler.health)} x{len(sampler.health)}")
        assert peak <= budget_mib + OVERHEAD_MIB, peak
        assert codes.get("OK", 0) >= 2 and codes.get("RESOURCE_EXHAUSTED", 0) >= 5, codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        for e in rejections:
            assert is_budget_rejection(e) and "--max-inflight-mb" in e.details(), e.details()
        assert well_behaved and all(n == 8 for n in well_behaved)
        assert set(sampler.health) == {"SERVING"}, sampler.health
        assert end_rss < start_rss + budget_mib / 2  # nothing the flood sent is kept once it ends
    finally:
        for c in flood_channels:
            c.close()
        client.close()
        service.stop()


@pytest.mark.slow
def test_rollout_streams_beyond_the_budget_are_refused_not_grown(tmp_path):
    from epgrpo.trainer.launch import LocalService

    reward = LocalService("reward", "epgrpo.services.reward.main",
                          ["--rewards", "jpeg_compressibility", "--device", "cpu", "--torch-threads", "1"], tmp_path)
    budget_mib = 160
    pruner = LocalService("pruner", "epgrpo.services.pruner.main",
                          ["--reward-address", reward.address, "--max-inflight-mb", str(budget_mib),
                           "--max-message-mb", "16"], tmp_path)
    channel = grpc.insecure_channel(pruner.address, options=[("grpc.max_send_message_length", 64 * MiB)])
    stub = pruner_pb2_grpc.PrunerServiceStub(channel)
    # 16 previews of 3x256x256 float32: 12 MiB per checkpoint
    previews = codec.encode(np.random.default_rng(0).random((16, 3, 256, 256), dtype=np.float32) * 2 - 1)
    streams: list[tuple[queue.Queue, object]] = []  # requests and responses of the open rollouts

    def open_rollout(i: int) -> str:
        """Opens a rollout, sends one checkpoint of previews, reads its decision, keeps the stream open."""
        requests: queue.Queue = queue.Queue()
        requests.put(pruner_pb2.PruneStreamRequest(open=pruner_pb2.OpenRollout(
            rollout_id=f"r{i}", schedule=[pruner_pb2.Checkpoint(step=3, keep=8), pruner_pb2.Checkpoint(step=6, keep=2)],
            num_steps=10, proxy_rewards=JPEG)))
        requests.put(pruner_pb2.PruneStreamRequest(checkpoint=pruner_pb2.GroupCheckpoint(
            group_id="g", step=3, trajectory_ids=list(range(16)), previews=previews, prompts=["x"])))
        responses = stub.PruneRollout(iter(requests.get, None), timeout=60)
        streams.append((requests, responses))  # a dropped call object would cancel the rollout
        try:
            assert len(next(responses).survivor_ids) == 8
            return "OK"
        except grpc.RpcError as e:
            assert is_budget_rejection(e) and "--max-inflight-mb" in e.details(), e.details()
            return e.code().name

    try:
        open_rollout(-1)  # warm
        streams.pop()[0].put(None)
        time.sleep(0.5)
        start_rss = rss_mib(pruner.process.pid)
        sampler = Sampler(pruner.process.pid, pruner.address)
        outcomes = [open_rollout(i) for i in range(6)]
        sampler.stop()
        peak = sampler.peak - start_rss
        print(f"\npruner: RSS start {start_rss:.0f} MiB, peak +{peak:.0f} MiB (budget {budget_mib}); "
              f"rollouts {outcomes}; health {set(sampler.health)}")
        # each open stream keeps 3 x 16 MiB (its next read) + its last 12 MiB checkpoint: two fit in 160 MiB
        assert outcomes == ["OK", "OK"] + ["RESOURCE_EXHAUSTED"] * 4, outcomes
        assert peak <= budget_mib + OVERHEAD_MIB, peak
        assert set(sampler.health) == {"SERVING"}
        for requests, _ in streams:  # the rollouts end: their reservations come back
            requests.put(None)
        streams.clear()
        time.sleep(0.5)
        assert open_rollout(99) == "OK"
    finally:
        for requests, _ in streams:
            requests.put(None)
        channel.close()
        pruner.stop()
        reward.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))
