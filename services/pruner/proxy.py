"""Proxy scores from the reward service: the pruner is a client of RewardService.Score.

The aio channel is created on first use, inside the event loop that serves the pruner (aio
channels are bound to the loop they were created in). Upstream failures become the pruner's
own statuses: the reward service rejecting the request (bad reward name, bad prompt) is the
pruner client's fault and stays INVALID_ARGUMENT; anything else (down, deadline, internal error,
a malformed answer) is UNAVAILABLE, never UNKNOWN or INTERNAL.

Group-aware rewards (RewardInfo.group_aware, asked once per channel with ListRewards) score each
image against the rest of its group: the servicer then sends a group's previews in one request
(``whole_group``), never split into chunks.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Callable, Mapping, Sequence

import grpc
import numpy as np

from epgrpo.protos import codec
from epgrpo.protos.reward_names import served_name
from epgrpo.protos.channel import DEFAULT_MAX_MESSAGE_BYTES, is_budget_rejection
from epgrpo.protos.v1 import reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.services.common.errors import InvalidArgument, Unavailable

log = logging.getLogger("epgrpo.pruner.proxy")

DEFAULT_DEADLINE_S = 30.0
# Backoff between Score attempts the reward service's memory budget turned away (within the deadline).
BUDGET_INITIAL_BACKOFF_S = 0.1
BUDGET_MAX_BACKOFF_S = 2.0
DEFAULT_MAX_REQUEST_BYTES = codec.DEFAULT_MAX_REQUEST_BYTES  # per Score call (see codec.batch_slices)
DEFAULT_MAX_IMAGES = codec.DEFAULT_MAX_REQUEST_ITEMS
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
        self._group_aware: set[str] | None = None  # from ListRewards, per channel

    def _get_stub(self) -> reward_pb2_grpc.RewardServiceStub:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            # First use, or a server restarted on another loop: a channel cannot move between loops.
            self._channel = self._channel_factory()
            self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)
            self._loop = loop
            self._group_aware = None
        return self._stub

    async def group_aware(self, rewards: Sequence[tuple[str, float]]) -> bool:
        """Whether any of these rewards scores a group jointly (ListRewards, asked once per channel; a
        reward the service does not list is not, and its Score call will say why)."""
        self._get_stub()  # (a new loop's channel forgets what the last one learnt)
        if self._group_aware is None:
            try:
                response = await self._with_backoff("ListRewards", reward_pb2.ListRewardsRequest(), "ListRewards")
                self._group_aware = {r.name for r in response.rewards if r.group_aware}
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise Unavailable(f"reward service at {self.address} failed: ListRewards: {exc.code().name}: "
                                      f"{exc.details()}") from None
                self._group_aware = set()  # a scorer serving Score only: it knows no groups
        return any(name in self._group_aware for name, _ in rewards)

    async def score(
        self,
        images_uint8: np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, str]],
        rewards: Sequence[tuple[str, float]],
        request_id: str = "",
        whole_group: bool = False,
    ) -> np.ndarray:
        """float64 [N] combined scores of uint8 images [N, H, W, C]; prompts N, metadata 0 or N.
        ``whole_group``: the images are one group for a group-aware reward: one request, never chunks."""
        n = int(images_uint8.shape[0])
        if n == 0:
            return np.zeros(0)
        if whole_group:
            if images_uint8.nbytes > 0.95 * DEFAULT_MAX_MESSAGE_BYTES:  # room left for prompts and metadata
                raise InvalidArgument(
                    f"checkpoint.previews: a group-aware proxy reward scores a group in one request, but this "
                    f"group's {n} decoded images take {images_uint8.nbytes} bytes, over the "
                    f"{DEFAULT_MAX_MESSAGE_BYTES} byte message limit; use smaller groups or previews")
            slices = [slice(0, n)]
        else:
            slices = codec.batch_slices(n, images_uint8[:1].nbytes, self.max_request_bytes, self.max_images)
        specs = [tensor_pb2.RewardSpec(name=name, weight=weight) for name, weight in rewards]
        calls = [
            self._score_chunk(images_uint8[part], prompts[part], metadata[part], specs,
                              request_id if len(slices) == 1 else f"{request_id}#{k}")
            for k, part in enumerate(slices)
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
            response = await self._with_backoff("Score", request, request_id)
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

    async def _with_backoff(self, method: str, request, request_id: str):
        """One ``method`` call (Score, ListRewards); a rejection by the reward service's full memory
        budget is retried with jittered exponential backoff until ``deadline_s`` has passed since the
        first attempt (any other failure, and a too-large message, is raised at once)."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.deadline_s
        backoff = BUDGET_INITIAL_BACKOFF_S
        while True:
            try:
                return await getattr(self._get_stub(), method)(request, timeout=max(0.05, give_up_at - loop.time()))
            except grpc.aio.AioRpcError as exc:
                wait = min(backoff * random.uniform(0.5, 1.0), give_up_at - loop.time())
                if not is_budget_rejection(exc) or wait <= 0:
                    raise
                log.info("reward service over its memory budget for %s; retrying in %.2f s", request_id, wait)
                await asyncio.sleep(wait)
                backoff = min(2 * backoff, BUDGET_MAX_BACKOFF_S)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = self._loop = None


class RoutedScorer:
    """Proxy rewards spread over several reward services (``--reward-route NAME=ADDRESS``): each
    reward is scored by its route, or by the default service; the combined score is the sum of the
    services' weighted sums, which is the one service's combination (a weighted sum) split by reward."""

    def __init__(self, default: ProxyScorer, routes: Mapping[str, ProxyScorer]):
        self.default = default
        self.routes = dict(routes)

    def split(self, rewards: Sequence[tuple[str, float]]) -> list[tuple[ProxyScorer, list[tuple[str, float]]]]:
        """(scorer, its rewards) in order of first appearance."""
        parts: dict[int, tuple[ProxyScorer, list]] = {}
        for name, weight in rewards:
            scorer = self.routes.get(name, self.routes.get(served_name(name), self.default))  # frames(x) goes where x goes
            parts.setdefault(id(scorer), (scorer, []))[1].append((name, weight))
        return list(parts.values())

    async def group_aware(self, rewards: Sequence[tuple[str, float]]) -> bool:
        return any(await asyncio.gather(*(scorer.group_aware(specs) for scorer, specs in self.split(rewards))))

    async def score(self, images_uint8: np.ndarray, prompts: Sequence[str], metadata: Sequence[Mapping[str, str]],
                    rewards: Sequence[tuple[str, float]], request_id: str = "", whole_group: bool = False) -> np.ndarray:
        parts = self.split(rewards)
        if len(parts) == 1:
            scorer, specs = parts[0]
            return await scorer.score(images_uint8, prompts, metadata, specs, request_id, whole_group)
        scores = await asyncio.gather(*(scorer.score(images_uint8, prompts, metadata, specs, f"{request_id}@{k}",
                                                     whole_group)
                                        for k, (scorer, specs) in enumerate(parts)))
        return np.sum(scores, axis=0)

    async def close(self) -> None:
        for scorer in {id(s): s for s in (self.default, *self.routes.values())}.values():
            await scorer.close()
