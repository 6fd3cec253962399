"""Malformed requests, hundreds per RPC: each gets a precise status naming the field; the
servers never answer UNKNOWN or INTERNAL and stay SERVING."""

import math
import re

import grpc
import numpy as np
import pytest
from conftest import BackgroundServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc, reward_pb2, reward_pb2_grpc, tensor_pb2

PRECISE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
# "<field>[i].<sub>: ..." at the start of every message
FIELD = re.compile(r"^(images|prompts|metadata|rewards|checkpoint|open|keep|strategy|decoder|proxy_rewards|first message|"
                   r"message|seed)[\w\[\].]*[: ]")
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SEEN: dict[str, dict[str, int]] = {}


@pytest.fixture(scope="module")
def servers():
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar
    from epgrpo.services.reward.main import build_registrar as reward_registrar

    reward = BackgroundServer(reward_registrar(["digit", "jpeg_compressibility"], max_batch=64))
    pruner = BackgroundServer(pruner_registrar(reward.address))
    channels = {name: grpc.insecure_channel(s.address, options=[("grpc.max_send_message_length", 256 << 20)])
                for name, s in (("reward", reward), ("pruner", pruner))}
    yield channels
    for c in channels.values():
        c.close()
    pruner.stop()
    reward.stop()
    print("\nstatuses seen:", SEEN)


def check(rpc_name: str, call, channel) -> None:
    """Calls; a rejection must be precise and name the field. Then the server must be SERVING."""
    try:
        call()
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
        assert code in PRECISE, f"{rpc_name}: {code} {e.details()}"
        assert FIELD.match(e.details()), f"{rpc_name}: message does not start with a field: {e.details()!r}"
    SEEN.setdefault(rpc_name, {}).setdefault(code.name, 0)
    SEEN[rpc_name][code.name] += 1
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


dtypes = st.sampled_from(["uint8", "float32", "bfloat16", "int64", "float8", "", "UINT8"])
shapes = st.lists(st.integers(-1, 5), min_size=0, max_size=5)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def tensors(draw, dtype=dtypes, shape=shapes):
    shape_, dtype_ = draw(shape), draw(dtype)
    size = math.prod(d for d in shape_ if d > 0) if shape_ else 1
    itemsize = {"uint8": 1, "float16": 2, "bfloat16": 2, "float32": 4, "int64": 8, "float64": 8}.get(dtype_, 1)
    # mostly the right byte count (so deeper checks are reached), sometimes not
    n = draw(st.sampled_from([size * itemsize, size * itemsize, size * itemsize + 1, max(0, size - 1), 0]))
    return tensor_pb2.Tensor(dtype=dtype_, shape=shape_, data=bytes(n))


reward_names = st.sampled_from(["digit", "jpeg_compressibility", "clip", "", "DIGIT"])
specs = st.lists(st.builds(tensor_pb2.RewardSpec, name=reward_names, weight=st.floats(allow_nan=True, allow_infinity=True)),
                 max_size=3)
prompts = st.lists(st.sampled_from(["a handwritten digit 3", "no digit here", "", "digits 1 and 2"]), max_size=6)


@SETTINGS
@given(images=tensors(), prompts=prompts, rewards=specs, n_meta=st.integers(0, 4))
def test_reward_score_malformed(servers, images, prompts, rewards, n_meta):
    request = reward_pb2.ScoreRequest(images=images, prompts=prompts, rewards=rewards,
                                      metadata=[tensor_pb2.Metadata(fields={"digit": "x"})] * n_meta)
    stub = reward_pb2_grpc.RewardServiceStub(servers["reward"])
    check("reward.Score", lambda: stub.Score(request, timeout=30), servers["reward"])


@SETTINGS
@given(n=st.integers(1, 3), extra_prompts=st.integers(1, 100))
def test_reward_score_too_many_prompts(servers, n, extra_prompts):
    images = tensor_pb2.Tensor(dtype="uint8", shape=[n, 16, 16, 1], data=bytes(n * 256))
    request = reward_pb2.ScoreRequest(images=images, prompts=["a handwritten digit 1"] * (n + extra_prompts),
                                      rewards=[tensor_pb2.RewardSpec(name="digit", weight=1)])
    stub = reward_pb2_grpc.RewardServiceStub(servers["reward"])
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("prompts")


def test_oversized_message_is_resource_exhausted(servers):
    big = tensor_pb2.Tensor(dtype="uint8", shape=[70, 1024, 1024, 1], data=bytes(70 << 20))  # > 64 MiB limit
    stub = reward_pb2_grpc.RewardServiceStub(servers["reward"])
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(reward_pb2.ScoreRequest(images=big, prompts=["x"] * 70), timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    check("reward.Score", lambda: None, servers["reward"])


ids = st.lists(st.integers(-2, 60), max_size=60)
scores = st.lists(floats, max_size=60)


@st.composite
def checkpoints(draw):
    c = pruner_pb2.GroupCheckpoint(group_id=draw(st.sampled_from(["g0", "g1", ""])), step=draw(st.integers(-1, 12)),
                                   sigma=draw(floats), trajectory_ids=draw(ids), prompts=draw(prompts),
                                   group_size=draw(st.sampled_from([0, 0, 0, -1, 2, 30, 60])))
    kind = draw(st.sampled_from(["scores", "previews", "none"]))
    if kind == "scores":
        c.scores.values.extend(draw(scores))
    elif kind == "previews":
        c.previews.CopyFrom(draw(tensors(dtype=st.sampled_from(["float32", "float16", "uint8", "float64"]))))
    return c


@SETTINGS
@given(checkpoint=checkpoints(), keep=st.integers(-2, 70), strategy=st.integers(0, 5),
       decoder=st.sampled_from(["", "pixel", "vae", "nope"]), rewards=specs)
def test_pruner_prune_malformed(servers, checkpoint, keep, strategy, decoder, rewards):
    request = pruner_pb2.PruneRequest(checkpoint=checkpoint, keep=keep, strategy=strategy, decoder=decoder,
                                      proxy_rewards=rewards)
    stub = pruner_pb2_grpc.PrunerServiceStub(servers["pruner"])
    check("pruner.Prune", lambda: stub.Prune(request, timeout=30), servers["pruner"])


@st.composite
def stream_messages(draw):
    messages = []
    if draw(st.booleans()):
        schedule = draw(st.lists(st.tuples(st.integers(-1, 12), st.integers(-1, 50)), max_size=3))
        messages.append(pruner_pb2.PruneStreamRequest(open=pruner_pb2.OpenRollout(
            schedule=[pruner_pb2.Checkpoint(step=s, keep=k) for s, k in schedule], num_steps=draw(st.integers(-1, 12)),
            strategy=draw(st.integers(0, 4)), decoder=draw(st.sampled_from(["", "pixel", "nope"])),
            proxy_rewards=draw(specs))))
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 5)) == 0:
            messages.append(pruner_pb2.PruneStreamRequest(open=pruner_pb2.OpenRollout(num_steps=10)))
        else:
            messages.append(pruner_pb2.PruneStreamRequest(checkpoint=draw(checkpoints())))
    return messages


@SETTINGS
@given(messages=stream_messages())
def test_pruner_stream_malformed(servers, messages):
    stub = pruner_pb2_grpc.PrunerServiceStub(servers["pruner"])
    check("pruner.PruneRollout", lambda: list(stub.PruneRollout(iter(messages), timeout=30)), servers["pruner"])


def test_steps_out_of_order_and_unknown_ids_are_failed_precondition(servers):
    stub = pruner_pb2_grpc.PrunerServiceStub(servers["pruner"])
    opening = pruner_pb2.PruneStreamRequest(open=pruner_pb2.OpenRollout(
        schedule=[pruner_pb2.Checkpoint(step=3, keep=4), pruner_pb2.Checkpoint(step=5, keep=2)], num_steps=8))
    values = np.linspace(0, 1, 8).tolist()
    first = pruner_pb2.GroupCheckpoint(group_id="g", step=3, trajectory_ids=list(range(8)),
                                       scores=pruner_pb2.ScoreList(values=values))
    for bad in (pruner_pb2.GroupCheckpoint(group_id="g", step=3, trajectory_ids=list(range(4)),
                                           scores=pruner_pb2.ScoreList(values=values[:4])),  # repeated step
                pruner_pb2.GroupCheckpoint(group_id="g", step=5, trajectory_ids=[0, 1, 2, 99],
                                           scores=pruner_pb2.ScoreList(values=values[:4]))):  # unknown id 99
        with pytest.raises(grpc.RpcError) as info:
            list(stub.PruneRollout(iter([opening, pruner_pb2.PruneStreamRequest(checkpoint=first),
                                         pruner_pb2.PruneStreamRequest(checkpoint=bad)]), timeout=30))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.details().startswith("checkpoint.")


@SETTINGS
@given(model=st.sampled_from(["digit", "jpeg_compressibility", "nope", ""]), version=st.sampled_from(["", "1", "7"]),
       inputs=st.lists(st.tuples(st.sampled_from(["IMAGES", "PROMPTS", "OTHER", ""]),
                                 st.sampled_from(["UINT8", "BYTES", "FP32", "INT64", "NOPE"]),
                                 st.lists(st.integers(-1, 5), max_size=5), st.binary(max_size=64)), max_size=3),
       outputs=st.lists(st.sampled_from(["SCORE", "OTHER"]), max_size=2))
def test_oip_model_infer_malformed(servers, model, version, inputs, outputs):
    from epgrpo.protos.v1 import oip_pb2, oip_pb2_grpc

    request = oip_pb2.ModelInferRequest(
        model_name=model, model_version=version,
        inputs=[oip_pb2.ModelInferRequest.InferInputTensor(name=n, datatype=d, shape=s) for n, d, s, _ in inputs],
        outputs=[oip_pb2.ModelInferRequest.InferRequestedOutputTensor(name=o) for o in outputs],
        raw_input_contents=[raw for *_, raw in inputs])
    stub = oip_pb2_grpc.GRPCInferenceServiceStub(servers["reward"])
    try:
        stub.ModelInfer(request, timeout=30)
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:  # OIP clients expect NOT_FOUND for unknown models / versions
        code = e.code()
        assert code in PRECISE | {grpc.StatusCode.NOT_FOUND}, f"{code} {e.details()}"
        assert e.details() and ":" in e.details(), e.details()
    SEEN.setdefault("oip.ModelInfer", {}).setdefault(code.name, 0)
    SEEN["oip.ModelInfer"][code.name] += 1
    health = health_pb2_grpc.HealthStub(servers["reward"]).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
