"""The reward service's Open Inference Protocol front: our stubs (raw and typed contents, errors,
UNIMPLEMENTED for Triton-only calls) and NVIDIA's tritonclient in its own process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from epgrpo.protos.oip_codec import encode_bytes
from epgrpo.protos.v1 import oip_pb2, oip_pb2_grpc
from epgrpo.services.reward.backends.base import create_backend
from epgrpo.services.reward.config import BatchingConfig
from epgrpo.services.reward.main import build_registrar

sys.path.insert(0, str(Path(__file__).parent))
PROBE = Path(__file__).parent / "tritonclient_probe.py"


@pytest.fixture(scope="module")
def registrar():
    return build_registrar(["digit", "jpeg_compressibility"], batching=BatchingConfig(max_size=16))


@pytest.fixture
def server(background_server, registrar):
    return background_server(registrar)


def digit_inputs():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8), ["a handwritten digit 1", "digit 2", "a 3"]


def infer_request(model, images, prompts, raw=True, **extra) -> oip_pb2.ModelInferRequest:
    tensor = oip_pb2.ModelInferRequest.InferInputTensor
    request = oip_pb2.ModelInferRequest(model_name=model, id="r-7", **extra)
    request.inputs.append(tensor(name="IMAGES", datatype="UINT8", shape=list(images.shape)))
    if prompts is not None:
        request.inputs.append(tensor(name="PROMPTS", datatype="BYTES", shape=[len(prompts)]))
    if raw:
        request.raw_input_contents.append(images.tobytes())
        if prompts is not None:
            request.raw_input_contents.append(encode_bytes(prompts))
    else:
        request.inputs[0].contents.uint_contents.extend(images.reshape(-1).tolist())
        if prompts is not None:
            request.inputs[1].contents.bytes_contents.extend(p.encode() for p in prompts)
    return request


def test_health_metadata_and_inference_with_our_stubs(server):
    images, prompts = digit_inputs()
    expected = create_backend("digit").score(images, prompts)
    with grpc.insecure_channel(server.address) as channel:
        stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(oip_pb2.ServerLiveRequest(), timeout=30).live
        assert stub.ServerReady(oip_pb2.ServerReadyRequest(), timeout=30).ready
        assert stub.ModelReady(oip_pb2.ModelReadyRequest(name="digit"), timeout=30).ready
        assert not stub.ModelReady(oip_pb2.ModelReadyRequest(name="clip"), timeout=30).ready
        assert not stub.ModelReady(oip_pb2.ModelReadyRequest(name="digit", version="2"), timeout=30).ready
        metadata = stub.ModelMetadata(oip_pb2.ModelMetadataRequest(name="digit"), timeout=30)
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
            ("IMAGES", "UINT8", [-1, -1, -1, -1]), ("PROMPTS", "BYTES", [-1])]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("SCORE", "FP32", [-1])]
        assert list(metadata.versions) == ["1"]
        for raw in (True, False):
            response = stub.ModelInfer(infer_request("digit", images, prompts, raw=raw), timeout=30)
            assert response.id == "r-7" and response.model_name == "digit"
            assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [("SCORE", "FP32", [3])]
            np.testing.assert_allclose(np.frombuffer(response.raw_output_contents[0], "<f4"), expected, atol=1e-6)
        jpeg = stub.ModelInfer(infer_request("jpeg_compressibility", images, None), timeout=30)  # no prompts needed
        np.testing.assert_array_equal(np.frombuffer(jpeg.raw_output_contents[0], "<f4"),
                                      create_backend("jpeg_compressibility").score(images, [""] * 3))


def test_errors_name_the_field(server):
    images, prompts = digit_inputs()
    with grpc.insecure_channel(server.address) as channel:
        stub = oip_pb2_grpc.GRPCInferenceServiceStub(channel)
        cases = [
            (infer_request("clip", images, prompts), grpc.StatusCode.NOT_FOUND, "model_name: no model 'clip'"),
            (infer_request("digit", images, prompts, model_version="3"), grpc.StatusCode.NOT_FOUND, "only version 1"),
            (infer_request("digit", images, prompts[:2]), grpc.StatusCode.INVALID_ARGUMENT, "PROMPTS: expected 3 elements"),
            (infer_request("digit", images, ["a cat", *prompts[1:]]), grpc.StatusCode.INVALID_ARGUMENT, "prompts[0]"),
            (infer_request("digit", images, prompts, outputs=[oip_pb2.ModelInferRequest.InferRequestedOutputTensor(name="LOGITS")]),
             grpc.StatusCode.INVALID_ARGUMENT, "outputs[0].name"),
        ]
        wrong_type = infer_request("digit", images, prompts)
        wrong_type.inputs[0].datatype = "FP32"
        cases.append((wrong_type, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].datatype: IMAGES must be UINT8"))
        short = infer_request("digit", images, prompts)
        short.raw_input_contents[0] = images.tobytes()[:-1]
        cases.append((short, grpc.StatusCode.INVALID_ARGUMENT, "expected 768 raw bytes"))
        for request, code, message in cases:
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, timeout=30)
            assert caught.value.code() == code and message in caught.value.details(), caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelMetadata(oip_pb2.ModelMetadataRequest(name="nope"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # A Triton-only RPC (model repository index) is not part of the protocol we serve.
        index = channel.unary_unary("/inference.GRPCInferenceService/RepositoryIndex",
                                    request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as caught:
            index(b"", timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_tritonclient_in_its_own_process(server):
    from tritonclient_probe import inputs  # numpy only; the probe process imports tritonclient

    result = subprocess.run([sys.executable, str(PROBE), server.address], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["live"] and out["ready"] and out["digit_ready"] and not out["nope_ready"]
    assert out["server"]["name"] == "epgrpo-reward"
    meta = out["digit_metadata"]
    assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [("IMAGES", "UINT8"), ("PROMPTS", "BYTES")]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [("SCORE", "FP32", ["-1"])]
    images, prompts = inputs()
    np.testing.assert_allclose(out["digit"], create_backend("digit").score(images, prompts), atol=1e-6)
    np.testing.assert_array_equal(np.float32(out["jpeg"]), create_backend("jpeg_compressibility").score(images, [""] * 5))
    assert out["repository_index"]["status"] == "StatusCode.UNIMPLEMENTED"
    assert out["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert out["bad_prompt"]["status"] == "StatusCode.INVALID_ARGUMENT" and "prompts[0]" in out["bad_prompt"]["message"]
