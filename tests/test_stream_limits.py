"""Streams and slow peers on real in-process servers (port 0): keepalive drops a vanished client
host and idle streams end, group-awareness is learnt again after the reward service restarts, a
rollout stream's state is capped and budgeted, and a slow reward never blocks the others. The
test rewards and helpers are shared with tests/test_service_limits.py."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from epgrpo.protos import codec
from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc, reward_pb2_grpc, tensor_pb2
from epgrpo.services.common.server import ServerConfig
from epgrpo.services.reward.backends.base import RewardBackend
from test_service_limits import Brightness, WinRate, reward_registrar


# -- 7: keepalive and idle streams ----------------------------------------------------------------------------
class FreezingProxy:
    """A TCP proxy in front of a server; ``freeze()`` stops forwarding both ways with the sockets
    left open, as when a client host vanishes without closing its connection."""

    def __init__(self, target_port: int):
        import socket

        self.target_port, self.frozen, self.closed = target_port, threading.Event(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket

        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source, sink):
        source.settimeout(0.05)
        while not self.closed.is_set():
            if self.frozen.is_set():
                time.sleep(0.05)  # reads nothing: the peer's writes pile up in the kernel buffers
                continue
            try:
                data = source.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            try:
                sink.sendall(data)
            except OSError:
                return

    def freeze(self):
        self.frozen.set()

    def close(self):
        self.closed.set()
        self.listener.close()
        for s in self.sockets:
            s.close()


def _open_rollout(channel, requests):
    """Opens a rollout and brings its first decision; returns the response iterator (the stream stays open)."""
    stub = pruner_pb2_grpc.PrunerServiceStub(channel)
    requests.put(pruner_pb2.PruneStreamRequest(open=pruner_pb2.OpenRollout(
        rollout_id="r", schedule=[pruner_pb2.Checkpoint(step=1, keep=2), pruner_pb2.Checkpoint(step=2, keep=1)],
        num_steps=4)))
    requests.put(pruner_pb2.PruneStreamRequest(checkpoint=pruner_pb2.GroupCheckpoint(
        group_id="g", step=1, trajectory_ids=[0, 1, 2], scores=pruner_pb2.ScoreList(values=[0.0, 0.5, 1.0]))))
    responses = stub.PruneRollout(iter(requests.get, None), timeout=60)
    assert len(next(responses).survivor_ids) == 2
    return responses


def _wait_until(predicate, seconds: float) -> float:
    start = time.monotonic()
    while not predicate() and time.monotonic() - start < seconds:
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_vanished_client_host_is_dropped_by_keepalive_and_an_idle_stream_ends(background_server):
    import queue

    from epgrpo.services.pruner.main import build_registrar as pruner_registrar

    register = pruner_registrar("127.0.0.1:1")
    server = background_server(register, ServerConfig(keepalive_s=1.0, keepalive_timeout_s=1.0, stream_idle_s=None))
    budget, servicer = server.running.budget, register.servicer
    proxy = FreezingProxy(server.port)
    requests: queue.Queue = queue.Queue()
    channel = grpc.insecure_channel(f"127.0.0.1:{proxy.port}")
    try:
        responses = _open_rollout(channel, requests)
        assert budget.held > 0 and servicer.active_sessions == 1
        proxy.freeze()  # the client host is gone: no FIN, no RST, no ping answered
        waited = _wait_until(lambda: budget.held == 0 and servicer.active_sessions == 0, 15)
        assert budget.held == 0 and servicer.active_sessions == 0, (budget.held, servicer.active_sessions)
        print(f"\nvanished client dropped after {waited:.1f} s (keepalive 1 s + 1 s)")
    finally:
        requests.put(None)
        channel.close()
        proxy.close()

    idle = background_server(register, ServerConfig(stream_idle_s=1.0))
    requests = queue.Queue()
    with grpc.insecure_channel(idle.address) as channel:
        responses = _open_rollout(channel, requests)  # connected, answering pings, but sends nothing more
        with pytest.raises(grpc.RpcError) as info:
            next(responses)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "--stream-idle-timeout" in info.value.details()
        requests.put(None)
    assert _wait_until(lambda: idle.running.budget.held == 0, 5) < 5


# -- 8: group-awareness is learnt again when the reward service comes back ---------------------------------
def test_the_pruner_relearns_group_awareness_after_the_reward_service_restarts(background_server):
    from conftest import BackgroundServer
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar

    first = BackgroundServer(reward_registrar({"proxy": Brightness()}))  # not group-aware
    port = first.port
    pruner = background_server(pruner_registrar(first.address, reward_deadline_s=10))
    previews = np.random.default_rng(3).random((6, 1, 4, 4), dtype=np.float32) * 2 - 1

    def rollout() -> list[float]:
        messages = [pruner_pb2.PruneStreamRequest(open=pruner_pb2.OpenRollout(
            rollout_id="r", schedule=[pruner_pb2.Checkpoint(step=1, keep=2)], num_steps=3,
            proxy_rewards=[tensor_pb2.RewardSpec(name="proxy", weight=1.0)]))]
        messages += [pruner_pb2.PruneStreamRequest(checkpoint=pruner_pb2.GroupCheckpoint(
            group_id="g", step=1, trajectory_ids=list(range(lo, lo + 2)), group_size=6,
            previews=codec.encode(previews[lo:lo + 2]), prompts=["x"])) for lo in (0, 2, 4)]
        with grpc.insecure_channel(pruner.address) as channel:
            (decision,) = list(pruner_pb2_grpc.PrunerServiceStub(channel).PruneRollout(iter(messages), timeout=30))
        return list(decision.proxy_scores)

    decoded = np.rint(np.clip((previews + 1) / 2, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(rollout(), Brightness().score(decoded, [""] * 6), atol=1e-6)
    first.stop()  # the operator restarts the reward service with a group-aware reward of the same name
    second = background_server(reward_registrar({"proxy": WinRate()}), ServerConfig(port=port))
    whole_group = WinRate().score(decoded, [""] * 6)  # ranks over all 6: they sum to 3, not 3 x 1
    time.sleep(0.5)
    scores = rollout()
    np.testing.assert_allclose(scores, whole_group, atol=1e-6)
    assert second.port == port


# -- 14: a slow reward never blocks the others; a cancelled request never runs ------------------------------
class RemoteJudge(RewardBackend):
    """A judge answering over the network after ``delay_s`` (as VlmJudge does: concurrent, waits on I/O)."""

    concurrent = True
    waits_on_network = True
    group_aware = True
    delay_s = 1.5

    def _score(self, images, prompts, metadata):
        time.sleep(self.delay_s)
        return np.full(len(images), 0.5)


class SlowModel(RewardBackend):
    """A model reward (one call at a time) that records which requests it ran."""

    delay_s = 0.8

    def __init__(self):
        super().__init__()
        self.ran: list[str] = []

    def _score(self, images, prompts, metadata):
        self.ran.append(prompts[0])
        time.sleep(self.delay_s)
        return np.zeros(len(images))


def test_a_slow_reward_never_blocks_the_others_and_a_cancelled_request_never_runs(background_server):
    from epgrpo.protos.v1 import reward_pb2

    model = SlowModel()
    server = background_server(reward_registrar({"judge": RemoteJudge(), "fast": Brightness(), "model": model}))
    images = codec.encode(np.zeros((2, 8, 8, 3), np.uint8))

    def request(reward: str, prompt: str = "") -> reward_pb2.ScoreRequest:
        return reward_pb2.ScoreRequest(images=images, prompts=[prompt] * 2,
                                       rewards=[tensor_pb2.RewardSpec(name=reward, weight=1.0)])

    with grpc.insecure_channel(server.address) as channel:
        score = reward_pb2_grpc.RewardServiceStub(channel).Score
        start = time.perf_counter()
        judged = [score.future(request("judge"), timeout=30) for _ in range(3)]
        time.sleep(0.2)
        fast_start = time.perf_counter()
        assert len(score(request("fast"), timeout=30).scores) == 2
        fast_s = time.perf_counter() - fast_start
        assert all(len(f.result().scores) == 2 for f in judged)
        judged_s = time.perf_counter() - start
        # a model reward: the second request, cancelled while queued behind the first, never runs
        first = score.future(request("model", "first"), timeout=30)
        time.sleep(0.2)
        second = score.future(request("model", "second"), timeout=30)
        time.sleep(0.1)
        second.cancel()
        third_start = time.perf_counter()
        assert len(score(request("model", "third"), timeout=30).scores) == 2
        third_s = time.perf_counter() - third_start
        first.result()
    print(f"\nfast beside 3 slow judges: {fast_s * 1000:.0f} ms; 3 judges of 1.5 s: {judged_s:.1f} s; "
          f"model request after a cancelled one: {third_s:.1f} s")
    assert fast_s < 1.0, fast_s  # not behind the judges' 1.5 s
    assert judged_s < 2 * RemoteJudge.delay_s + 1.0, judged_s  # side by side, not 3 x 1.5 s
    assert model.ran == ["first", "third"], model.ran


# -- 5: a rollout stream's state is bounded, and what it holds is in the budget ------------------------------
def test_a_rollout_streams_state_is_capped_checked_early_and_budgeted(background_server, monkeypatch):
    from epgrpo.services.pruner import session as session_module
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar

    reward = background_server(reward_registrar({"win": WinRate()}))
    pruner = background_server(pruner_registrar(reward.address, reward_deadline_s=10))
    budget = pruner.running.budget
    monkeypatch.setattr(session_module, "MAX_GROUPS", 8)  # 4,096 in service; 8 keeps the test short

    def opening():
        return pruner_pb2.PruneStreamRequest(open=pruner_pb2.OpenRollout(
            rollout_id="r", schedule=[pruner_pb2.Checkpoint(step=1, keep=1)], num_steps=2,
            proxy_rewards=[tensor_pb2.RewardSpec(name="win", weight=1.0)]))

    def part(group: str, ids, group_size: int, side: int = 4):
        previews = np.zeros((len(ids), 3, side, side), np.float32)
        return pruner_pb2.PruneStreamRequest(checkpoint=pruner_pb2.GroupCheckpoint(
            group_id=group, step=1, trajectory_ids=list(ids), group_size=group_size,
            previews=codec.encode(previews), prompts=["x"]))

    with grpc.insecure_channel(pruner.address) as channel:
        stub = pruner_pb2_grpc.PrunerServiceStub(channel)
        failures = {}
        for name, messages in {
            "group_size=10**9": [opening(), part("g", [0, 1], 10**9)],
            # 2,000 decoded 128x128 RGB images (94 MiB) can never go upstream in one request: refused at part one
            "group-aware group over one request": [opening(), part("g", [0, 1], 2000, side=128)],
            "9 groups, 8 allowed": [opening(), *(part(f"g{i}", [0, 1], 0) for i in range(9))],
        }.items():
            with pytest.raises(grpc.RpcError) as info:
                list(stub.PruneRollout(iter(messages), timeout=30))
            failures[name] = (info.value.code().name, info.value.details())
        # the parts of an incomplete group-aware checkpoint are held in the budget until it completes
        requests = __import__("queue").Queue()
        for message in (opening(), part("g", [0, 1], 4)):
            requests.put(message)
        responses = stub.PruneRollout(iter(requests.get, None), timeout=30)
        time.sleep(0.5)
        held_with_part = budget.held
        requests.put(part("g", [2, 3], 4))
        assert len(next(responses).survivor_ids) == 1
        requests.put(None)
        assert list(responses) == []
    assert failures["group_size=10**9"][0] == "INVALID_ARGUMENT" and "expected 0 to 4096" in failures["group_size=10**9"][1]
    aware = failures["group-aware group over one request"]
    assert aware[0] == "INVALID_ARGUMENT" and "checkpoint.group_size: a group-aware proxy reward" in aware[1], aware
    assert failures["9 groups, 8 allowed"][0] == "RESOURCE_EXHAUSTED" and "8 groups already" in failures["9 groups, 8 allowed"][1]
    # waiting for its next message the stream holds: the next read's worst case (3 x the 64 MiB limit),
    # the message before, and the held part: 2 x 4 x 4 x 3 decoded bytes + 3 x its 14 characters of text
    # (prompts "x", "x"; metadata group=g twice), which go upstream once the group is complete
    expected = 3 * 64 * 2**20 + part("g", [0, 1], 4).ByteSize() + 96 + 3 * 14
    assert held_with_part == expected, (held_with_part, expected)
    assert _wait_until(lambda: budget.held == 0, 5) < 5
