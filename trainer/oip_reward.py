"""Rewards from any Open Inference Protocol (KServe v2) server: Triton, KServe, MLServer, or the
epgrpo reward service's own OIP front. Each reward name is a model name on that server.

Selected by the reward address: ``reward.address=oip://host:port`` with optional query settings
``?images=IMAGES&prompts=PROMPTS&output=SCORE&version=`` naming the model's input and output
tensors (``prompts=`` empty: the models take no prompt input). Images go as UINT8 [N, H, W, C], prompts
as BYTES [N], the output is read as a float vector of N scores (any numeric datatype). Weighted
combination happens here, as the reward service would do it. Same interface as ``RewardClient``.
A model whose metadata declares a ``GROUP`` input (``&group=`` names it otherwise) is group-aware:
it gets each image's group id there, in requests holding whole groups.
A bearer token is sent when $EPGRPO_OIP_TOKEN (else $EPGRPO_REWARD_TOKEN, else $EPGRPO_TOKEN) is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import parse_qs, urlsplit

import grpc
import numpy as np

from epgrpo.protos import codec
from epgrpo.protos.channel import create_channel
from epgrpo.protos.oip_codec import decode_tensor, encode_bytes
from epgrpo.protos.v1 import oip_pb2, oip_pb2_grpc
from epgrpo.trainer.reward_client import group_chunks

OIP_SERVICE = "inference.GRPCInferenceService"
TOKEN_VARIABLES = ("EPGRPO_OIP_TOKEN", "EPGRPO_REWARD_TOKEN", "EPGRPO_TOKEN")
SCHEME = "oip://"


def is_oip_address(address: str) -> bool:
    return address.startswith(SCHEME)


@dataclass(frozen=True)
class OipTarget:
    address: str  # host:port (several, comma-separated, for round-robin)
    images: str = "IMAGES"
    prompts: str = "PROMPTS"  # "" = no prompt input
    output: str = "SCORE"
    version: str = ""
    group: str = "GROUP"  # the input a group-aware model declares for each image's group id

    @classmethod
    def parse(cls, url: str) -> "OipTarget":
        if not is_oip_address(url):
            raise ValueError(f"reward.address: expected oip://host:port[?images=..&prompts=..&output=..], got {url!r}")
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(query) - {"images", "prompts", "output", "version", "group"}
        if unknown or not parts.netloc:
            raise ValueError(f"reward.address {url!r}: expected oip://host:port with settings images, prompts, "
                             f"output, version, group; got {sorted(unknown) or 'no host:port'}")
        return cls(parts.netloc, **query)


class OipRewardError(RuntimeError):
    pass


class OipRewardClient:
    """``require`` / ``score`` / ``close`` like ``RewardClient``, over ``ModelInfer``."""

    def __init__(self, url: str, deadline_s: float = 60.0, max_batch: int = 256):
        self.target = OipTarget.parse(url)
        self.address = url
        self.channel = create_channel(self.target.address, [OIP_SERVICE])
        self.stub = oip_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.deadline_s, self.max_batch = deadline_s, max_batch
        # A bearer token for servers that want one (our reward service in the compose stack does).
        token = next((os.environ[k] for k in TOKEN_VARIABLES if os.environ.get(k)), "")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._group_input: dict[str, str | None] = {}  # model -> its GROUP input's name (group-aware), or None

    @classmethod
    def from_config(cls, section) -> "OipRewardClient":
        return cls(section.address, deadline_s=section.deadline_s)

    def _call(self, method: str, request):
        try:
            return getattr(self.stub, method)(request, timeout=self.deadline_s, metadata=self.metadata)
        except grpc.RpcError as e:
            raise OipRewardError(f"OIP server {self.target.address} {method} failed: {e.code().name}: {e.details()}") from e

    def require(self, names: Sequence[str], field: str) -> None:
        """Fails fast, before any work, when a model is missing or not ready."""
        missing = []
        for name in names:
            try:
                ready = self._call("ModelReady", oip_pb2.ModelReadyRequest(name=name, version=self.target.version)).ready
            except OipRewardError:  # some servers answer NOT_FOUND for unknown models
                ready = False
            if not ready:
                missing.append(name)
        if missing:
            raise ValueError(f"{field}: OIP server {self.target.address} has no ready model {', '.join(missing)}")

    def group_input(self, model: str) -> str | None:
        """The model's ``GROUP`` input when its metadata declares one (a group-aware reward), else None;
        asked once per model. Servers whose metadata fails or lacks it get no groups."""
        if model not in self._group_input:
            try:
                meta = self._call("ModelMetadata", oip_pb2.ModelMetadataRequest(name=model, version=self.target.version))
                self._group_input[model] = next((t.name for t in meta.inputs if t.name == self.target.group), None)
            except OipRewardError:
                self._group_input[model] = None
        return self._group_input[model]

    def infer(self, model: str, images: np.ndarray, prompts: Sequence[str], request_id: str = "",
              groups: Sequence | None = None) -> np.ndarray:
        """float32 [N] scores of one model for one chunk (``groups``: each image's group, sent as the
        model's GROUP input when it declares one)."""
        tensor = oip_pb2.ModelInferRequest.InferInputTensor
        request = oip_pb2.ModelInferRequest(
            model_name=model, model_version=self.target.version, id=request_id,
            inputs=[tensor(name=self.target.images, datatype="UINT8", shape=list(images.shape))],
            outputs=[oip_pb2.ModelInferRequest.InferRequestedOutputTensor(name=self.target.output)],
            raw_input_contents=[np.ascontiguousarray(images, dtype=np.uint8).tobytes()],
        )
        if self.target.prompts:
            request.inputs.append(tensor(name=self.target.prompts, datatype="BYTES", shape=[len(prompts)]))
            request.raw_input_contents.append(encode_bytes(list(prompts)))
        group_input = self.group_input(model) if groups is not None else None
        if group_input:
            request.inputs.append(tensor(name=group_input, datatype="BYTES", shape=[len(groups)]))
            request.raw_input_contents.append(encode_bytes([str(g) for g in groups]))
        response = self._call("ModelInfer", request)
        for i, out in enumerate(response.outputs):
            if out.name == self.target.output:
                raw = response.raw_output_contents[i] if response.raw_output_contents else None
                scores = decode_tensor(out.name, out.datatype, list(out.shape), raw, out.contents)
                scores = np.asarray(scores, dtype=np.float32).reshape(-1)
                if scores.shape != (len(images),):
                    raise OipRewardError(f"model {model!r}: output {out.name} has {scores.size} values for {len(images)} images")
                return scores
        raise OipRewardError(f"model {model!r}: no output named {self.target.output!r} in the response "
                             f"(got {[o.name for o in response.outputs]})")

    def score(self, images: np.ndarray, prompts: Sequence[str], rewards: Sequence[tuple[str, float]],
              request_id: str = "", groups: Sequence | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Combined scores [N] (sum of weight * model score) and each model's raw scores. ``groups`` (each
        image's group) go to models that declare a GROUP input (group-aware rewards), in requests that
        hold whole groups."""
        raw = {}
        for name, _ in rewards:
            if groups is not None and self.group_input(name):
                chunks = group_chunks([str(g) for g in groups], images[:1].nbytes, codec.DEFAULT_MAX_REQUEST_BYTES,
                                      self.max_batch)
                order = np.concatenate(chunks)
                scores = np.concatenate([self.infer(name, images[c], [prompts[i] for i in c], request_id,
                                                    [groups[i] for i in c]) for c in chunks])
                raw[name] = np.empty_like(scores)
                raw[name][order] = scores
            else:
                raw[name] = np.concatenate([self.infer(name, images[s:s + self.max_batch], prompts[s:s + self.max_batch],
                                                       request_id) for s in range(0, len(images), self.max_batch)])
        combined = sum(float(w) * raw[name].astype(np.float64) for name, w in rewards)
        return np.asarray(combined, dtype=np.float32), raw

    def close(self) -> None:
        self.channel.close()
