"""A group's checkpoint in several byte-bounded parts (GroupCheckpoint.group_size): the same
decision as in one message, the trainer's PrunerStream splitting by bytes, precise errors for bad
parts, and groups larger than the server's message limit going through only when split."""

from __future__ import annotations

import itertools
import queue
import time

import grpc
import numpy as np
import pytest
import torch
from epgrpo.protos import codec
from epgrpo.protos.channel import PRUNER_SERVICE
from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc, tensor_pb2
from epgrpo.services.common.server import ServerConfig
from epgrpo.services.pruner.main import build_registrar
from epgrpo.services.pruner.ovf import ovf_select
from epgrpo.trainer.clients import PrunerClient, ServiceCallError
from epgrpo.trainer.rollout import GroupState
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

SCHEDULE = [(5, 24), (7, 12)]
NUM_STEPS = 10
GROUP = 48
DIGIT = [("digit", 1.0)]
IA, FP = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


def open_request(rewards=DIGIT, rollout_id="r0") -> pruner_pb2.PruneStreamRequest:
    return pruner_pb2.PruneStreamRequest(open=pruner_pb2.OpenRollout(
        rollout_id=rollout_id, schedule=[pruner_pb2.Checkpoint(step=s, keep=k) for s, k in SCHEDULE],
        num_steps=NUM_STEPS, proxy_rewards=[tensor_pb2.RewardSpec(name=n, weight=w) for n, w in rewards]))


def part(group_id="g0", step=5, ids=range(GROUP), group_size=0, previews=None, scores=None,
         prompt="a handwritten digit 3") -> pruner_pb2.PruneStreamRequest:
    checkpoint = pruner_pb2.GroupCheckpoint(group_id=group_id, step=step, trajectory_ids=list(ids),
                                            group_size=group_size)
    if scores is not None:
        checkpoint.scores.values.extend(float(s) for s in scores)
    else:
        checkpoint.previews.CopyFrom(codec.encode(previews if previews is not None
                                                  else np.zeros((len(checkpoint.trajectory_ids), 1, 16, 16),
                                                                np.float32)))
        checkpoint.prompts.append(prompt)
    return pruner_pb2.PruneStreamRequest(checkpoint=checkpoint)


@pytest.fixture(scope="module")
def digit_previews() -> np.ndarray:
    """sklearn digits upsampled to 16x16 in [-1, 1]: [400, 1, 16, 16] float32."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images[:400].astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]
    images = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return images.clamp(-1, 1).numpy()


@pytest.fixture(scope="module")
def reward_registrar():
    from epgrpo.services.reward.main import build_registrar as reward_registrar

    return reward_registrar(["digit", "jpeg_compressibility"])


@pytest.fixture
def reward_server(background_server, reward_registrar):
    return background_server(reward_registrar)


class Pruner:
    """A pruner server (with its own metrics registry, to count the messages it received)."""

    def __init__(self, background_server, reward_address: str, **config):
        self.registry = CollectorRegistry()
        self.register = build_registrar(reward_address)
        self.server = background_server(self.register, ServerConfig(metrics_registry=self.registry, **config))
        self.address = self.server.address
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length", 256 << 20)])
        self.stub = pruner_pb2_grpc.PrunerServiceStub(self.channel)

    def messages_in(self) -> float:
        labels = {"service": PRUNER_SERVICE, "method": "PruneRollout", "direction": "in"}
        return self.registry.get_sample_value("epgrpo_grpc_messages_total", labels) or 0.0

    def run(self, messages) -> list[pruner_pb2.PruneDecision]:
        """Sends every message, half-closes, returns every decision (raises the stream's error)."""
        return list(self.stub.PruneRollout(iter(messages), timeout=60))

    def assert_serving(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        response = health.Check(health_pb2.HealthCheckRequest(service=PRUNER_SERVICE), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        assert self.register.servicer.active_sessions == 0 or self._wait_sessions()

    def _wait_sessions(self) -> bool:
        deadline = time.monotonic() + 5
        while self.register.servicer.active_sessions and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.register.servicer.active_sessions == 0


@pytest.fixture
def pruner(background_server, reward_server):
    pruner = Pruner(background_server, reward_server.address)
    yield pruner
    pruner.channel.close()


def splits(n: int, sizes) -> list[slice]:
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == n
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def test_split_group_decides_like_one_message(pruner, digit_previews):
    """Two groups over both checkpoints, in one message each vs. in uneven parts with the other
    group's parts in between (and one group as bfloat16): same survivors, same proxy scores."""
    rng = np.random.default_rng(0)
    images = {g: digit_previews[rng.choice(len(digit_previews), GROUP, replace=False)] for g in range(2)}
    wire = {0: lambda x: x, 1: lambda x: torch.from_numpy(x).bfloat16()}  # group 1 travels as bf16
    prompts = {0: "a handwritten digit 3", 1: "a handwritten digit 7"}

    def rollout(split: bool) -> list[list[pruner_pb2.PruneDecision]]:
        requests: queue.Queue = queue.Queue()
        responses = pruner.stub.PruneRollout(iter(requests.get, None), timeout=60)
        requests.put(open_request(rollout_id=f"split{split}"))
        live = {g: list(range(100 * g, 100 * g + GROUP)) for g in range(2)}
        steps = []
        for step, _ in SCHEDULE:
            n = len(live[0])
            sizes = {GROUP: [20, 20, 8], GROUP // 2: [1, 23]}[n] if split else [n]
            rows = {g: [i - 100 * g for i in live[g]] for g in range(2)}
            for s in splits(n, sizes):  # g0 part, g1 part, g0 part, ...
                for g in range(2):
                    requests.put(part(f"g{g}", step, live[g][s], n if split else 0,
                                      previews=wire[g](images[g][rows[g][s]]), prompt=prompts[g]))
            decisions = [next(responses) for _ in range(2)]
            for d in decisions:
                live[int(d.group_id[1:])] = list(d.survivor_ids)
            steps.append(decisions)
        requests.put(None)
        assert list(responses) == []
        return steps

    before = pruner.messages_in()
    whole = rollout(split=False)
    assert pruner.messages_in() - before == 1 + 2 * 2  # open + one message per group and checkpoint
    parts = rollout(split=True)
    assert pruner.messages_in() - before == (1 + 2 * 2) + (1 + 2 * 3 + 2 * 2)
    for (step, keep), a, b in zip(SCHEDULE, whole, parts):
        for da, db in zip(a, b):
            assert (da.group_id, da.step, da.keep) == (db.group_id, db.step, db.keep) == (da.group_id, step, keep)
            np.testing.assert_allclose(db.proxy_scores, da.proxy_scores, atol=1e-6)
            assert list(db.survivor_ids) == list(da.survivor_ids) and len(da.survivor_ids) == keep
            assert np.ptp(da.proxy_scores) > 0.1  # real reward scores, not a degenerate tie
    pruner.assert_serving()


def test_split_scores_decide_like_one_message(pruner):
    """Precomputed scores in parts: OVF over the concatenation, scores answered in arrival order."""
    scores = np.random.default_rng(1).uniform(size=GROUP)
    ids = list(range(1000, 1000 + GROUP))[::-1]
    parts = [part("s", 5, ids[s], GROUP, scores=scores[s]) for s in splits(GROUP, [5, 30, 13])]
    (decision,) = pruner.run([open_request(rewards=[]), *parts])
    assert list(decision.survivor_ids) == sorted(ids[i] for i in ovf_select(scores, 24))
    np.testing.assert_allclose(decision.proxy_scores, scores, atol=1e-6)
    # A group_size equal to the message's ids is the whole group in one part.
    (decision,) = pruner.run([open_request(rewards=[]), part("s", 5, ids, GROUP, scores=scores)])
    assert list(decision.survivor_ids) == sorted(ids[i] for i in ovf_select(scores, 24))


def groups_for(images: np.ndarray, dtype) -> list[GroupState]:
    out = []
    for g, digit in enumerate((3, 7, 1)):
        previews = torch.from_numpy(images[g * GROUP:(g + 1) * GROUP]).to(dtype)
        out.append(GroupState(f"g{g}", list(range(g * GROUP, (g + 1) * GROUP)), previews, f"a handwritten digit {digit}"))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_trainer_stream_splits_by_bytes(pruner, digit_previews, dtype):
    """PrunerStream with a small per-message limit: several parts per group, one decision per
    group, the same decisions as one message per group."""
    groups = groups_for(digit_previews, dtype)
    item = groups[0].previews[:1].nelement() * groups[0].previews.element_size()
    per_part = 10
    results, counts = {}, {}
    for limit in (codec.DEFAULT_MAX_REQUEST_BYTES, per_part * item):
        client = PrunerClient(pruner.address, deadline_s=60, max_request_bytes=limit)
        before = pruner.messages_in()
        live = {g.group_id: g for g in groups}
        decided = []
        with client.open(SCHEDULE, NUM_STEPS, DIGIT, rollout_id=f"limit{limit}") as stream:
            for step, keep in SCHEDULE:
                states = list(live.values())
                decisions = stream.decide(step, 0.5, states)
                assert sorted(decisions) == sorted(live) and all(len(v) == keep for v in decisions.values())
                decided.append(decisions)
                for g in states:
                    rows = [g.trajectory_ids.index(t) for t in decisions[g.group_id]]
                    live[g.group_id] = GroupState(g.group_id, decisions[g.group_id], g.previews[rows], g.prompt)
            sent = stream.messages_sent
        client.close()
        counts[limit] = (sent, pruner.messages_in() - before - 1)  # less the open message
        results[limit] = decided
    whole, split = results.values()
    assert whole == split
    # 3 groups x (48 -> 5 parts of <= 10, then 24 -> 3 parts) vs. 3 x (1 + 1)
    assert counts == {codec.DEFAULT_MAX_REQUEST_BYTES: (6, 6), per_part * item: (3 * (5 + 3), 3 * (5 + 3))}
    pruner.assert_serving()


def test_trainer_parts_keep_the_preview_dtype():
    """What PrunerStream puts on the wire: float16 / bfloat16 / float32 as they are (bit-exact), other
    dtypes as float32, parts of at most max_request_bytes with group_size set only when split."""
    from epgrpo.trainer.clients import PrunerStream

    class Stub:
        def PruneRollout(self, requests, timeout):
            return iter(())

    for dtype, wire in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16"), (torch.float16, "float16"),
                        (torch.float64, "float32")):
        previews = torch.randn(7, 4, 8, 8, dtype=torch.float64).to(dtype)
        wire_item = 4 * 8 * 8 * (4 if dtype == torch.float64 else previews.element_size())
        stream = PrunerStream(Stub(), pruner_pb2.OpenRollout(rollout_id="x"), 5.0, max_request_bytes=3 * wire_item)
        messages = [p() for p in stream._parts(5, 0.1, GroupState("g", list(range(10, 17)), previews, "p"))]
        assert [list(m.checkpoint.trajectory_ids) for m in messages] == [[10, 11, 12], [13, 14, 15], [16]]
        assert {m.checkpoint.group_size for m in messages} == {7}
        assert {m.checkpoint.previews.dtype for m in messages} == {wire}
        sent = torch.cat([codec.to_torch(m.checkpoint.previews) for m in messages])
        assert torch.equal(sent, previews.float() if dtype == torch.float64 else previews)
        whole = [p() for p in PrunerStream(Stub(), pruner_pb2.OpenRollout(), 5.0)._parts(
            5, 0.1, GroupState("g", list(range(7)), previews, "p"))]
        assert len(whole) == 1 and whole[0].checkpoint.group_size == 0  # the wire of old clients


G = {"group_size": GROUP}
FIRST, SECOND = list(range(24)), list(range(24, GROUP))
BAD_PARTS = {  # messages after OPEN; the last one is bad -> code, field that details() starts with
    "parts disagree on step": ([part(ids=FIRST, **G), part(step=7, ids=SECOND, **G)], IA, "checkpoint.step"),
    "parts disagree on group_size": ([part(ids=FIRST, **G), part(ids=SECOND, group_size=40)], IA,
                                     "checkpoint.group_size"),
    "later part says whole group": ([part(ids=FIRST, **G), part(ids=SECOND)], IA, "checkpoint.group_size"),
    "duplicate ids across parts": ([part(ids=FIRST, **G), part(ids=range(20, 44), **G)], IA,
                                   "checkpoint.trajectory_ids"),
    "more ids than group_size": ([part(ids=FIRST, group_size=30), part(ids=SECOND, group_size=30)], IA,
                                 "checkpoint.trajectory_ids"),
    "first part over group_size": ([part(ids=range(GROUP), group_size=30)], IA, "checkpoint.trajectory_ids"),
    "negative group_size": ([part(ids=FIRST, group_size=-1)], IA, "checkpoint.group_size"),
    "group_size below keep": ([part(ids=range(10), group_size=20)], IA, "checkpoint.group_size"),
    "empty part": ([part(ids=FIRST, **G), part(ids=[], **G)], IA, "checkpoint.trajectory_ids"),
    "new step while incomplete": ([part(ids=FIRST, **G), part("g1"), part(step=7, ids=range(24), group_size=24)],
                                  IA, "checkpoint.step"),
    "previews shape differs": ([part(ids=FIRST, **G),
                                part(ids=SECOND, previews=np.zeros((24, 1, 8, 8), np.float32), **G)], IA,
                               "checkpoint.previews.shape"),
    "scores after previews": ([part(ids=FIRST, **G), part(ids=SECOND, scores=np.zeros(24), **G)], IA,
                              "checkpoint.proxy"),
    "group_size not the survivors": ([part(), part(step=7, ids=range(12), group_size=30)], FP,
                                     "checkpoint.group_size"),
    "part with a pruned id": ([part(ids=range(GROUP), scores=np.arange(GROUP)),  # OVF keeps both ends: 0..11, 36..47
                               part(step=7, ids=[0, 20], group_size=24, scores=[0, 0])], FP,
                              "checkpoint.trajectory_ids"),
    "stream ends incomplete": ([part(ids=FIRST, **G)], IA, "checkpoint.group_size"),
}


@pytest.mark.parametrize("messages,code,field", BAD_PARTS.values(), ids=BAD_PARTS.keys())
def test_bad_parts_get_precise_statuses(pruner, messages, code, field):
    with pytest.raises(grpc.RpcError) as info:
        pruner.run([open_request(), *messages])
    assert info.value.code() == code, info.value.details()
    assert info.value.details().startswith(field + ":"), info.value.details()
    pruner.assert_serving()
    # ... and a well-formed split rollout on the same server still works.
    (decision,) = pruner.run([open_request(), part(ids=FIRST, **G), part(ids=SECOND, **G)])
    assert len(decision.survivor_ids) == 24


def test_unary_prune_holds_the_whole_group(pruner):
    request = pruner_pb2.PruneRequest(checkpoint=part(ids=range(8), group_size=16, scores=np.arange(8)).checkpoint,
                                      keep=2)
    with pytest.raises(grpc.RpcError) as info:
        pruner.stub.Prune(request, timeout=10)
    assert info.value.code() == IA and info.value.details().startswith("checkpoint.group_size:")
    request.checkpoint.group_size = 8
    assert list(pruner.stub.Prune(request, timeout=10).survivor_ids) == [0, 7]


def test_group_over_the_message_limit_goes_through_only_split(background_server, reward_server):
    """A 2 MiB server limit and a group of ~4.9 MB previews: RESOURCE_EXHAUSTED in one message,
    one decision when the trainer splits it into 1 MiB parts."""
    pruner = Pruner(background_server, reward_server.address, max_message_bytes=2 << 20)
    rng = np.random.default_rng(3)
    previews = torch.from_numpy(rng.uniform(-1, 1, size=(GROUP, 1, 160, 160)).astype(np.float32))
    assert previews.nelement() * 4 > 4.5e6
    group = GroupState("big", list(range(GROUP)), previews, "anything")
    rewards = [("jpeg_compressibility", 1.0)]

    client = PrunerClient(pruner.address, deadline_s=60, max_request_bytes=64 << 20)  # no splitting
    with pytest.raises(ServiceCallError) as info, client.open(SCHEDULE, NUM_STEPS, rewards) as stream:
        stream.decide(5, 0.5, [group])
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
    client.close()
    pruner.assert_serving()

    client = PrunerClient(pruner.address, deadline_s=60, max_request_bytes=1 << 20)
    before = pruner.messages_in()
    with client.open(SCHEDULE, NUM_STEPS, rewards) as stream:
        decisions = stream.decide(5, 0.5, [group])
        assert stream.messages_sent == 5  # 48 x 102400 B in parts of <= 1 MiB: 10 per part
    client.close()
    assert len(decisions["big"]) == 24 and set(decisions["big"]) <= set(range(GROUP))
    assert pruner.messages_in() - before == 1 + 5
    pruner.assert_serving()
    pruner.channel.close()
