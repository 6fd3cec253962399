"""Open Inference Protocol (KServe v2) gRPC front of the reward service, on the same port.

Every served reward is a model (version "1"): input ``IMAGES`` (UINT8 [N, H, W, C], C = 1 or 3; for a
video reward UINT8 [N, T, H, W, C], T frames per video, as ModelMetadata's 5-dimensional shape says;
a reward that takes both declares the image shape and accepts videos too),
input ``PROMPTS`` (BYTES, N UTF-8 strings; optional for rewards that ignore the prompt), output
``SCORE`` (FP32 [N], the reward's raw score). A group-aware reward (a win rate within the group)
declares a third input, ``GROUP`` (BYTES, each image's group id; without it the request is one
group): OIP has no per-image metadata, so the group travels as a tensor its metadata announces. Requests go through the same scorer and dynamic
batchers as ``RewardService.Score``. Only the six KServe v2 RPCs exist; Triton-only ones
(repository, statistics, shared memory, ...) answer UNIMPLEMENTED.
"""

from __future__ import annotations

import numpy as np

from epgrpo.protos.codec import WireError
from epgrpo.protos.oip_codec import decode_tensor
from epgrpo.protos.v1 import oip_pb2, oip_pb2_grpc
from epgrpo.services.common.errors import InvalidArgument, NotFound, show
from epgrpo.services.common.server import map_errors
from epgrpo.services.reward.servicer import RewardServicer

OIP_SERVICE_NAME = oip_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
IMAGES, PROMPTS, GROUP, SCORE = "IMAGES", "PROMPTS", "GROUP", "SCORE"
MODEL_VERSION = "1"
PLATFORM = "epgrpo_reward"


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("epgrpo")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


class OipServicer(oip_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, rewards: RewardServicer):
        self.rewards = rewards  # its scorer, executor and batchers are shared

    def _model(self, name: str, version: str, field: str) -> str:
        try:
            self.rewards.scorer.backend(name, field)
        except InvalidArgument:
            served = ", ".join(sorted(self.rewards.scorer.backends))
            raise NotFound(f"{field}: no model {show(name)}; this server's models (rewards) are: {served}, and "
                           "video wrappers of its image rewards such as frames(NAME, k=4)") from None
        if version not in ("", MODEL_VERSION):
            raise NotFound(f"{field}: model {name!r} has only version {MODEL_VERSION}, not {show(version)}")
        return name

    @map_errors
    async def ServerLive(self, request, context):
        return oip_pb2.ServerLiveResponse(live=True)

    @map_errors
    async def ServerReady(self, request, context):
        return oip_pb2.ServerReadyResponse(ready=True)  # backends are loaded before the server starts

    @map_errors
    async def ModelReady(self, request, context):
        try:
            self.rewards.scorer.backend(request.name)
            known = True
        except InvalidArgument:
            known = False
        ready = known and request.version in ("", MODEL_VERSION)
        return oip_pb2.ModelReadyResponse(ready=ready)

    @map_errors
    async def ServerMetadata(self, request, context):
        return oip_pb2.ServerMetadataResponse(name="epgrpo-reward", version=server_version(), extensions=[])

    @map_errors
    async def ModelMetadata(self, request, context):
        name = self._model(request.name, request.version, "name")
        tensor = oip_pb2.ModelMetadataResponse.TensorMetadata
        backend = self.rewards.scorer.backend(name)
        dims = 5 if backend.modality == "video" else 4
        inputs = [tensor(name=IMAGES, datatype="UINT8", shape=[-1] * dims),
                  tensor(name=PROMPTS, datatype="BYTES", shape=[-1])]
        if backend.group_aware:
            inputs.append(tensor(name=GROUP, datatype="BYTES", shape=[-1]))
        return oip_pb2.ModelMetadataResponse(
            name=name, versions=[MODEL_VERSION], platform=PLATFORM, inputs=inputs,
            outputs=[tensor(name=SCORE, datatype="FP32", shape=[-1])],
        )

    @map_errors
    async def ModelInfer(self, request: oip_pb2.ModelInferRequest, context) -> oip_pb2.ModelInferResponse:
        name = self._model(request.model_name, request.model_version, "model_name")
        for i, output in enumerate(request.outputs):
            if output.name != SCORE:
                raise InvalidArgument(f"outputs[{i}].name: model {name!r} has one output, {SCORE}; "
                                      f"got {show(output.name)}")
        images, prompts, groups = self._inputs(request)
        metadata = [{"group": g} for g in groups] if groups is not None else []
        _, per_reward = await self.rewards.compute(images, prompts, metadata, [(name, 1.0)])
        scores = per_reward[0][2].astype("<f4")
        return oip_pb2.ModelInferResponse(
            model_name=name, model_version=MODEL_VERSION, id=request.id,
            outputs=[oip_pb2.ModelInferResponse.InferOutputTensor(name=SCORE, datatype="FP32", shape=[len(scores)])],
            raw_output_contents=[scores.tobytes()],
        )

    @staticmethod
    def _inputs(request: oip_pb2.ModelInferRequest) -> tuple[np.ndarray, list[str], list[str] | None]:
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidArgument(f"raw_input_contents: expected one entry per input ({len(request.inputs)}), got {len(raw)}")
        tensors = {}
        for i, tensor in enumerate(request.inputs):
            if tensor.name not in (IMAGES, PROMPTS, GROUP):
                raise InvalidArgument(f"inputs[{i}].name: expected {IMAGES}, {PROMPTS} or {GROUP}, got {show(tensor.name)}")
            expected = "UINT8" if tensor.name == IMAGES else "BYTES"
            if tensor.datatype != expected:
                raise InvalidArgument(f"inputs[{i}].datatype: {tensor.name} must be {expected}, "
                                      f"got {show(tensor.datatype)}")
            try:
                tensors[tensor.name] = decode_tensor(tensor.name, tensor.datatype, list(tensor.shape),
                                                     raw[i] if raw else None, tensor.contents)
            except WireError as exc:
                raise InvalidArgument(f"inputs[{i}] ({exc})") from None
        if IMAGES not in tensors:
            raise InvalidArgument(f"inputs: expected an input named {IMAGES} (UINT8 [N, H, W, C] or [N, T, H, W, C])")
        images = tensors[IMAGES]
        if images.ndim not in (4, 5):
            raise InvalidArgument(f"{IMAGES}.shape: expected images [N, H, W, C] or videos [N, T, H, W, C], "
                                  f"got {list(images.shape)}")
        prompts = _strings(tensors, PROMPTS, len(images))
        return images, prompts if prompts is not None else [""] * len(images), _strings(tensors, GROUP, len(images))


def _strings(tensors: dict, name: str, count: int) -> list[str] | None:
    """A BYTES input as ``count`` UTF-8 strings (one per image), None when it was not sent."""
    if name not in tensors:
        return None
    try:
        values = [v.decode("utf-8") for v in tensors[name]]
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{name}: expected UTF-8 strings ({exc})") from None
    if len(values) != count:
        raise InvalidArgument(f"{name}: expected {count} elements (one per image), got {len(values)}")
    return values
