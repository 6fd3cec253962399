"""Error details stay short: a client value echoed in a status is cut to a prefix with its length,
and no status message exceeds 1 KiB. A 100 KB model or reward name sent with stock clients (default
channel options, so the default 8 KiB metadata limit) gets the clear error, not RESOURCE_EXHAUSTED
"Stream removed" from a status too large for the client to read."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from epgrpo.protos import codec
from epgrpo.protos.v1 import oip_pb2, oip_pb2_grpc, pruner_pb2, pruner_pb2_grpc, reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.services.common.errors import MAX_DETAILS_BYTES, InvalidArgument, bounded, show, status_for
from epgrpo.services.common.server import map_errors

LONG = "a" * 100_000
CUT = "(100000 chars)"


def rejected(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert len(error.details().encode()) <= MAX_DETAILS_BYTES, len(error.details().encode())
    return error


def images(n: int = 2) -> np.ndarray:
    return np.zeros((n, 8, 8, 3), np.uint8)


def test_show_cuts_long_values_to_a_prefix_with_their_length():
    assert show("digit") == "'digit'"
    shown = show(LONG)
    assert shown.startswith("'aaaa") and shown.endswith(f"…' {CUT}") and len(shown) < 80
    assert show(b"x" * 5000).endswith("(5000 bytes)")
    assert show(list(range(10_000))).endswith("(10000 items)")


def test_bounded_caps_any_message_at_1_kib_in_utf8():
    assert bounded("short") == "short"
    for text in ("x" * 5000, "é" * 5000, "€" * 3000 + "x"):
        capped = bounded(text)
        assert len(capped.encode()) <= MAX_DETAILS_BYTES and capped.startswith(text[:100])
    code, message = status_for(InvalidArgument("prompts[0]: " + LONG))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(message.encode()) <= MAX_DETAILS_BYTES


def test_map_errors_caps_expected_and_unexpected_errors():
    class Context:
        async def abort(self, code, details):
            raise RuntimeError((code, details))

    class Servicer:
        @map_errors
        async def Expected(self, request, context):
            raise InvalidArgument("name: " + LONG)

        @map_errors
        async def Bug(self, request, context):
            raise KeyError(LONG)

    for method in ("Expected", "Bug"):
        with pytest.raises(RuntimeError) as info:
            asyncio.run(getattr(Servicer(), method)(None, Context()))
        code, details = info.value.args[0]
        assert code == (grpc.StatusCode.INVALID_ARGUMENT if method == "Expected" else grpc.StatusCode.INTERNAL)
        assert len(details.encode()) <= MAX_DETAILS_BYTES, method


def test_reward_score_with_a_long_reward_name(services):
    reward, _ = services
    request = reward_pb2.ScoreRequest(images=codec.encode(images()), prompts=["p", "q"],
                                      rewards=[tensor_pb2.RewardSpec(name=LONG, weight=1.0)])
    with grpc.insecure_channel(reward.address) as channel:
        error = rejected(lambda: reward_pb2_grpc.RewardServiceStub(channel).Score(request, timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("rewards[0].name: unknown reward 'aaaa") and CUT in error.details()
    assert "jpeg_compressibility" in error.details()  # the rest of the message survives


def test_oip_model_metadata_and_infer_with_a_long_model_name(services):
    reward, _ = services
    tensor = oip_pb2.ModelInferRequest.InferInputTensor
    with grpc.insecure_channel(reward.address) as channel:
        stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
        error = rejected(lambda: stub.ModelMetadata(oip_pb2.ModelMetadataRequest(name=LONG), timeout=30))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details().startswith("name: no model 'aaaa") and CUT in error.details()
        error = rejected(lambda: stub.ModelMetadata(
            oip_pb2.ModelMetadataRequest(name="jpeg_compressibility", version=LONG), timeout=30))
        assert error.code() == grpc.StatusCode.NOT_FOUND and CUT in error.details()

        infer = oip_pb2.ModelInferRequest(model_name=LONG, inputs=[tensor(name="IMAGES", datatype="UINT8",
                                                                          shape=[2, 8, 8, 3])],
                                          raw_input_contents=[images().tobytes()])
        error = rejected(lambda: stub.ModelInfer(infer, timeout=30))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details().startswith("model_name: no model 'aaaa") and CUT in error.details()

        infer.model_name = "jpeg_compressibility"
        infer.inputs[0].datatype = LONG
        error = rejected(lambda: stub.ModelInfer(infer, timeout=30))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("inputs[0].datatype:") and CUT in error.details()


def test_pruner_with_a_long_reward_name_decoder_and_group_id(services):
    _, pruner = services
    previews = codec.encode(np.zeros((4, 3, 8, 8), np.float32))

    def prune(**fields):
        checkpoint = pruner_pb2.GroupCheckpoint(group_id=fields.pop("group_id", "g"), step=2,
                                                trajectory_ids=[0, 1, 2, 3], previews=previews, prompts=["p"])
        return pruner_pb2.PruneRequest(checkpoint=checkpoint, keep=2, **fields)

    with grpc.insecure_channel(pruner.address) as channel:
        stub = pruner_pb2_grpc.PrunerServiceStub(channel)
        error = rejected(lambda: stub.Prune(prune(proxy_rewards=[tensor_pb2.RewardSpec(name=LONG, weight=1.0)]),
                                            timeout=30))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown reward 'aaaa" in error.details() and CUT in error.details()

        spec = [tensor_pb2.RewardSpec(name="jpeg_compressibility", weight=1.0)]
        error = rejected(lambda: stub.Prune(prune(proxy_rewards=spec, decoder=LONG), timeout=30))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("decoder: unknown decoder 'aaaa") and CUT in error.details()

        def stream(rollout_id, group_id):
            opened = pruner_pb2.OpenRollout(rollout_id=rollout_id, num_steps=10,
                                            schedule=[pruner_pb2.Checkpoint(step=4, keep=2)])
            yield pruner_pb2.PruneStreamRequest(open=opened)
            checkpoint = pruner_pb2.GroupCheckpoint(group_id=group_id, step=3, trajectory_ids=[0, 1, 2, 3],
                                                    scores=pruner_pb2.ScoreList(values=[0, 1, 2, 3]))
            yield pruner_pb2.PruneStreamRequest(checkpoint=checkpoint)

        # ids are logged, so they are bounded (256 characters): a longer one is refused naming its field
        for rollout_id, group_id, field in ((LONG, "g", "open.rollout_id"), ("r", LONG, "checkpoint.group_id")):
            error = rejected(lambda: list(stub.PruneRollout(stream(rollout_id, group_id), timeout=30)))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details() == f"{field}: expected at most 256 characters, got 100000", error.details()
        long_group = "a" * 250  # within the bound, still cut in the message (SHOW_CHARS)
        error = rejected(lambda: list(stub.PruneRollout(stream("r", long_group), timeout=30)))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details().startswith("checkpoint.step: expected step 4 (group 'aaaa") and "(250 chars)" in error.details()
