"""Proxy scores from the reward service: the pruner is a client of RewardService.Score.

The aio channel is created on first use, inside the event loop that serves the pruner (aio
channels are bound to the loop they were created in). Upstream failures become the pruner's
own statuses: the reward service rejecting the request (bad reward name, bad prompt) is the
pruner client's fault and stays INVALID_ARGUMENT; anything else (down, deadline, internal error,
a malformed answer) is UNAVAILABLE, never UNKNOWN or INTERNAL.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Mapping, Sequence

import grpc
import numpy as np

from epgrpo.protos import codec
from epgrpo.protos.v1 import reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.services.common.errors import InvalidArgument, Unavailable

log = logging.getLogger("epgrpo.pruner.proxy")

DEFAULT_DEADLINE_S = 30.0
# Per Score call; well under the channels' 64 MiB limit (see protos/channel.py).
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
DEFAULT_MAX_IMAGES = 256
# Rejections that are about what the pruner's client asked for, not about the reward service.
_CLIENT_FAULT_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


class ProxyScorer:
    """Scores decoded previews with the reward service. ``channel_factory`` makes an aio channel.

    Large batches (e.g. 48 decoded 1024² RGB images = 150 MB) go out as several concurrent
    Score calls of at most ``max_request_bytes`` / ``max_images`` each, so no request hits the
    channels' message-size limit or the reward service's batch limit.
    """

    def __init__(self, channel_factory: Callable[[], grpc.aio.Channel], deadline_s: float = DEFAULT_DEADLINE_S,
                 address: str = "the reward service", max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 max_images: int = DEFAULT_MAX_IMAGES):
        if not deadline_s > 0:
            raise ValueError(f"reward deadline: expected > 0 seconds, got {deadline_s}")
        self._channel_factory = channel_factory
        self.deadline_s = float(deadline_s)
        self.address = address
        self.max_request_bytes = max_request_bytes
        self.max_images = max_images
        self._channel: grpc.aio.Channel | None = None
        self._stub: reward_pb2_grpc.RewardServiceStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _get_stub(self) -> reward_pb2_grpc.RewardServiceStub:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            # First use, or a server restarted on another loop: a channel cannot move between loops.
            self._channel = self._channel_factory()
            self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)
            self._loop = loop
        return self._stub

    async def score(
        self,
        images_uint8: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, str]],
        rewards: Sequence[tuple[str, float]],
        request_id: str = "",
    ) -> np.ndarray:
        """float64 [N] combined scores of uint8 images [N, H, W, C]; prompts N, metadata 0 or N."""
        n = int(images_uint8.shape[0])
        if n == 0:
            return np.zeros(0)
        per_image = max(1, images_uint8[:1].nbytes)
        size = max(1, min(self.max_images, self.max_request_bytes // per_image))
        specs = [tensor_pb2.RewardSpec(name=name, weight=weight) for name, weight in rewards]
        calls = [
            self._score_chunk(images_uint8[lo:lo + size], prompts[lo:lo + size], metadata[lo:lo + size], specs,
                              request_id if n <= size else f"{request_id}#{lo // size}")
            for lo in range(0, n, size)
        ]
        if len(calls) == 1:
            return await calls[0]
        tasks = [asyncio.ensure_future(call) for call in calls]
        try:
            return np.concatenate(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:  # one chunk failed: the others' answers are of no use any more
                task.cancel()
            raise

    async def _score_chunk(self, images: np.ndarray, prompts, metadata, specs, request_id: str) -> np.ndarray:
        n = int(images.shape[0])
        request = reward_pb2.ScoreRequest(
            images=codec.encode(images),
            prompts=list(prompts),
            metadata=[tensor_pb2.Metadata(fields=dict(m)) for m in metadata],
            rewards=specs,
            request_id=request_id,
        )
        try:
            response = await self._get_stub().Score(request, timeout=self.deadline_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in _CLIENT_FAULT_CODES:
                raise InvalidArgument(
                    f"the reward service rejected the proxy request (proxy_rewards, prompts or metadata): "
                    f"{code.name}: {exc.details()}"
                ) from None
            log.warning("reward service call %s failed: %s: %s", request_id, code.name, exc.details())
            raise Unavailable(f"reward service at {self.address} failed: {code.name}: {exc.details()}") from None
        scores = np.asarray(response.scores, dtype=np.float64)
        if scores.size != n or not np.isfinite(scores).all():
            raise Unavailable(
                f"reward service at {self.address} answered {scores.size} scores "
                f"({int((~np.isfinite(scores)).sum())} non-finite) for {n} images"
            )
        return scores

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = self._loop = None
