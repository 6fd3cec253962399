"""The pruner over the wire: a real pruner server, a real reward server, real sync clients."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import torch
from conftest import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epgrpo.protos import codec
from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc, reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.services.pruner.main import build_registrar
from epgrpo.services.pruner.ovf import ovf_select

SCHEDULE = [(5, 24), (7, 12)]
NUM_STEPS = 10
GROUP = 48


def open_request(**overrides) -> pruner_pb2.PruneStreamRequest:
    fields = dict(rollout_id="r0", schedule=[pruner_pb2.Checkpoint(step=s, keep=k) for s, k in SCHEDULE],
                  num_steps=NUM_STEPS, proxy_rewards=[tensor_pb2.RewardSpec(name="digit", weight=1.0)])
    fields.update(overrides)
    return pruner_pb2.PruneStreamRequest(open=pruner_pb2.OpenRollout(**fields))


def checkpoint(group_id="g0", step=5, ids=range(GROUP), scores=None, **fields) -> pruner_pb2.GroupCheckpoint:
    if scores is not None:
        fields["scores"] = pruner_pb2.ScoreList(values=list(scores))
    return pruner_pb2.GroupCheckpoint(group_id=group_id, step=step, trajectory_ids=list(ids), **fields)


def pixel_reference(previews: np.ndarray) -> np.ndarray:
    """The pixel decoder's contract, written out independently of the service code."""
    return np.rint(np.clip((previews.astype(np.float32) + 1) / 2, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def digit_previews() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits bilinear-upsampled to 16x16 in [-1, 1] ([N, 1, 16, 16] float32) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images[:400].astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    images = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return images.clamp(-1, 1).numpy(), digits.target[:400]


class Pruner:
    """A pruner server, its servicer, and a sync channel to it."""

    def __init__(self, server, register):
        self.servicer = register.servicer
        self.channel = grpc.insecure_channel(server.address)
        self.stub = pruner_pb2_grpc.PrunerServiceStub(self.channel)
        self.streams: list[RolloutStream] = []

    def stream(self) -> "RolloutStream":
        self.streams.append(RolloutStream(self.stub))
        return self.streams[-1]

    def assert_serving(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        for service in ("", "epgrpo.v1.PrunerService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING

    def wait_sessions(self, expected: int, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.servicer.active_sessions != expected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.servicer.active_sessions == expected

    def close(self) -> None:
        for stream in self.streams:
            stream.requests.put(None)  # ends the client's request-sending thread
        self.channel.close()


class RolloutStream:
    """One PruneRollout call driven like the trainer drives it: send a checkpoint, read its decision."""

    def __init__(self, stub):
        self.requests: queue.Queue = queue.Queue()
        self.responses = stub.PruneRollout(iter(self.requests.get, None), timeout=60)

    def send(self, message) -> None:
        if isinstance(message, pruner_pb2.GroupCheckpoint):
            message = pruner_pb2.PruneStreamRequest(checkpoint=message)
        self.requests.put(message)

    def ask(self, cp: pruner_pb2.GroupCheckpoint) -> pruner_pb2.PruneDecision:
        self.send(cp)
        return next(self.responses)

    def finish(self) -> list:
        self.requests.put(None)
        return list(self.responses)


@pytest.fixture(scope="module")
def reward_registrar():
    # Building the backends (loading the digit classifiers) is the slow part: once per module.
    from epgrpo.services.reward.main import build_registrar as reward_registrar

    return reward_registrar(["digit", "digit_judge", "jpeg_compressibility"])


@pytest.fixture
def reward_server(background_server, reward_registrar):
    return background_server(reward_registrar)


def start_pruner(background_server, reward_address: str, **kwargs) -> Pruner:
    register = build_registrar(reward_address, **kwargs)
    return Pruner(background_server(register), register)


@pytest.fixture
def pruner(background_server, reward_server):
    pruner = start_pruner(background_server, reward_server.address)
    yield pruner
    pruner.close()


def test_rollout_with_scores_prunes_by_ovf(pruner):
    rng = np.random.default_rng(0)
    stream = pruner.stream()
    stream.send(open_request(proxy_rewards=[]))  # scores need no reward service
    live = {g: list(range(1000 * g, 1000 * g + GROUP)) for g in range(2)}
    for step, keep in SCHEDULE:
        for g in range(2):
            scores = rng.uniform(size=len(live[g])).astype(np.float32)
            decision = stream.ask(checkpoint(f"g{g}", step, live[g], scores))
            assert (decision.group_id, decision.step, decision.keep) == (f"g{g}", step, keep)
            assert list(decision.survivor_ids) == sorted(live[g][i] for i in ovf_select(scores, keep))
            np.testing.assert_array_equal(np.array(decision.proxy_scores, np.float32), scores)
            live[g] = list(decision.survivor_ids)
        assert pruner.servicer.active_sessions == 1
    assert stream.finish() == []
    assert [len(v) for v in live.values()] == [12, 12]
    pruner.wait_sessions(0)


def test_rollout_with_previews_scores_through_the_reward_service(pruner, reward_server, digit_previews):
    images, labels = digit_previews
    reward_channel = grpc.insecure_channel(reward_server.address)
    reward = reward_pb2_grpc.RewardServiceStub(reward_channel)
    pruner.servicer.scorer.max_images = 5  # several concurrent Score calls per checkpoint, reassembled in order
    stream = pruner.stream()
    stream.send(open_request())
    rng = np.random.default_rng(1)
    groups = {g: rng.choice(len(images), GROUP, replace=False) for g in range(2)}  # trajectory id -> image
    live = {g: list(range(GROUP)) for g in range(2)}
    for step, keep in SCHEDULE:
        for g, digit in ((0, 3), (1, 7)):
            previews = images[groups[g][live[g]]]
            prompt = f"a handwritten digit {digit}"
            # Group 1 travels as bfloat16, as a GPU trainer would send it.
            tensor = codec.encode(previews) if g == 0 else codec.encode(torch.from_numpy(previews).bfloat16())
            decision = stream.ask(checkpoint(f"g{g}", step, live[g], previews=tensor, prompts=[prompt]))
            sent = codec.to_numpy(tensor)
            expected = reward.Score(reward_pb2.ScoreRequest(
                images=codec.encode(pixel_reference(sent)), prompts=[prompt] * len(sent),
                rewards=[tensor_pb2.RewardSpec(name="digit", weight=1.0)]), timeout=30).scores
            proxy = np.array(decision.proxy_scores)
            np.testing.assert_allclose(proxy, expected, atol=1e-5)
            assert np.ptp(proxy) > 0.1  # the digits differ, so the reward must tell them apart
            assert list(decision.survivor_ids) == sorted(live[g][i] for i in ovf_select(proxy, keep))
            live[g] = list(decision.survivor_ids)
    # OVF keeps both ends: right digits (high reward) and wrong ones (low reward) survive.
    kept_labels = labels[groups[0][live[0]]]
    assert (kept_labels == 3).any() and (kept_labels != 3).any()
    assert stream.finish() == []
    pruner.wait_sessions(0)
    reward_channel.close()


def test_unary_prune(pruner, digit_previews):
    scores = np.random.default_rng(2).normal(size=16).astype(np.float32)
    ids = list(range(100, 116))
    decision = pruner.stub.Prune(pruner_pb2.PruneRequest(checkpoint=checkpoint("u", 3, ids, scores), keep=4),
                                 timeout=10)
    assert list(decision.survivor_ids) == sorted(ids[i] for i in ovf_select(scores, 4)) and decision.keep == 4

    def random_survivors(seed):
        request = pruner_pb2.PruneRequest(checkpoint=checkpoint("u", 3, ids, scores), keep=4, seed=seed,
                                          strategy=pruner_pb2.STRATEGY_RANDOM)
        return list(pruner.stub.Prune(request, timeout=10).survivor_ids)

    assert random_survivors(1) == random_survivors(1) != random_survivors(2)

    images, _ = digit_previews
    request = pruner_pb2.PruneRequest(
        checkpoint=checkpoint("u", 3, range(8), previews=codec.encode(images[:8]), prompts=["a handwritten digit 0"]),
        keep=2, proxy_rewards=[tensor_pb2.RewardSpec(name="digit", weight=1.0)])
    decision = pruner.stub.Prune(request, timeout=30)
    assert list(decision.survivor_ids) == sorted(ovf_select(np.array(decision.proxy_scores), 2).tolist())
    assert decision.proxy_scores[0] > 0.5  # images[0] is a 0


def _previews(n=GROUP, shape=(1, 16, 16), dtype=np.float32, fill=0.0, cut_bytes=0):
    tensor = codec.encode(np.full((n, *shape), fill, dtype=dtype))
    tensor.data = tensor.data[:len(tensor.data) - cut_bytes]
    return tensor


FP, IA = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT
OPEN = open_request()
SCORES = dict(scores=np.linspace(0, 1, GROUP))
PROMPT = dict(prompts=["a handwritten digit 1"])
BAD_STREAMS = {  # messages sent; the last one is bad -> code, text that details() must contain
    "first message not open": ([checkpoint(**SCORES)], FP, "first message must be 'open'"),
    "second open": ([OPEN, OPEN], FP, "expected 'checkpoint'"),
    "bad schedule": ([open_request(schedule=[pruner_pb2.Checkpoint(step=5, keep=24),
                                             pruner_pb2.Checkpoint(step=7, keep=30)])], IA, "open.schedule[1].keep"),
    "missing num_steps": ([open_request(num_steps=0)], IA, "open.num_steps"),
    "unknown decoder": ([open_request(decoder="vae9")], IA, "open.decoder"),
    "step out of order": ([OPEN, checkpoint(step=7, **SCORES)], FP, "checkpoint.step: expected step 5"),
    "step repeated": ([OPEN, checkpoint(**SCORES), checkpoint(ids=range(24), scores=np.zeros(24))], FP,
                      "checkpoint.step: expected step 7"),
    "unknown ids": ([OPEN, checkpoint(**SCORES), checkpoint(step=7, ids=range(100, 124), scores=np.zeros(24))], FP,
                    "checkpoint.trajectory_ids"),
    "duplicate ids": ([OPEN, checkpoint(ids=[1] * GROUP, **SCORES)], IA, "checkpoint.trajectory_ids"),
    "NaN scores": ([OPEN, checkpoint(scores=[np.nan] * GROUP)], IA, "checkpoint.scores"),
    "too few scores": ([OPEN, checkpoint(scores=[0.0] * 3)], IA, "checkpoint.scores"),
    "missing proxy": ([OPEN, checkpoint()], IA, "checkpoint.proxy"),
    "previews byte length": ([OPEN, checkpoint(previews=_previews(cut_bytes=1), **PROMPT)], IA,
                             "checkpoint.previews.data"),
    "previews ndim": ([OPEN, checkpoint(previews=codec.encode(np.zeros((GROUP, 16, 16), np.float32)), **PROMPT)], IA,
                      "checkpoint.previews.shape"),
    "previews count": ([OPEN, checkpoint(previews=_previews(n=40), **PROMPT)], IA, "checkpoint.previews.shape"),
    "previews dtype": ([OPEN, checkpoint(previews=_previews(dtype=np.uint8), **PROMPT)], IA,
                       "checkpoint.previews.dtype"),
    "previews channels": ([OPEN, checkpoint(previews=_previews(shape=(4, 16, 16)), **PROMPT)], IA,
                          "checkpoint.previews.shape"),
    "NaN previews": ([OPEN, checkpoint(previews=_previews(fill=np.nan), **PROMPT)], IA, "checkpoint.previews"),
    "prompt count": ([OPEN, checkpoint(previews=_previews(), prompts=["a", "b"])], IA, "checkpoint.prompts"),
    "previews without proxy rewards": ([open_request(proxy_rewards=[]), checkpoint(previews=_previews(), **PROMPT)],
                                       IA, "open.proxy_rewards"),
    "unknown proxy reward": ([open_request(proxy_rewards=[tensor_pb2.RewardSpec(name="nope", weight=1)]),
                              checkpoint(previews=_previews(), **PROMPT)], IA, "reward service rejected"),
}


@pytest.mark.parametrize("messages,code,field", BAD_STREAMS.values(), ids=BAD_STREAMS.keys())
def test_bad_stream_requests_get_precise_statuses(pruner, messages, code, field):
    stream = pruner.stream()
    for message in messages:
        stream.send(message)
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream.responses:  # decisions for the good messages before the bad one
            pass
    assert info.value.code() == code, info.value.details()
    assert field in info.value.details()
    pruner.assert_serving()
    pruner.wait_sessions(0)


BAD_UNARY = {
    "keep 0": (pruner_pb2.PruneRequest(checkpoint=checkpoint(**SCORES), keep=0), "keep"),
    "keep above N": (pruner_pb2.PruneRequest(checkpoint=checkpoint(**SCORES), keep=GROUP + 1), "keep"),
    "unknown strategy": (pruner_pb2.PruneRequest(checkpoint=checkpoint(**SCORES), keep=4, strategy=9), "strategy"),
    "previews without rewards": (pruner_pb2.PruneRequest(checkpoint=checkpoint(previews=_previews(), **PROMPT),
                                                         keep=4), "proxy_rewards"),
}


@pytest.mark.parametrize("request_,field", BAD_UNARY.values(), ids=BAD_UNARY.keys())
def test_bad_unary_requests(pruner, request_, field):
    with pytest.raises(grpc.RpcError) as info:
        pruner.stub.Prune(request_, timeout=10)
    assert info.value.code() == IA and info.value.details().startswith(field + ":"), info.value.details()
    pruner.assert_serving()


def test_client_cancel_ends_the_session(pruner):
    stream = pruner.stream()
    stream.send(open_request(proxy_rewards=[]))
    assert len(stream.ask(checkpoint(**SCORES)).survivor_ids) == 24
    assert pruner.servicer.active_sessions == 1
    stream.responses.cancel()
    pruner.wait_sessions(0)
    pruner.assert_serving()


def test_reward_service_down_is_unavailable(background_server):
    pruner = start_pruner(background_server, f"127.0.0.1:{free_port()}", reward_deadline_s=5.0)
    try:
        stream = pruner.stream()
        stream.send(open_request())
        with pytest.raises(grpc.RpcError) as info:
            stream.ask(checkpoint(previews=_previews(), **PROMPT))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert "reward service" in info.value.details()
        # Scores need no reward service: the pruner still decides those.
        request = pruner_pb2.PruneRequest(checkpoint=checkpoint(**SCORES), keep=4)
        assert len(pruner.stub.Prune(request, timeout=10).survivor_ids) == 4
        pruner.assert_serving()
        pruner.wait_sessions(0)
    finally:
        pruner.close()


def test_command_line_serves_and_stops_on_sigterm(tmp_path):
    port_file = tmp_path / "port"
    env = dict(os.environ, EPGRPO_REWARD_ADDRESS="127.0.0.1:1")
    process = subprocess.Popen([sys.executable, "-m", "epgrpo.services.pruner.main", "--port", "0",
                                "--port-file", str(port_file), "--grace", "0.5"], env=env)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert port_file.exists(), "the pruner did not start"
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}") as channel:
            stub = pruner_pb2_grpc.PrunerServiceStub(channel)
            decision = stub.Prune(pruner_pb2.PruneRequest(checkpoint=checkpoint(**SCORES), keep=2), timeout=10)
            assert list(decision.survivor_ids) == [0, 47]
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
