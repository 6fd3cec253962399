"""gRPC RewardService: proto <-> arrays around a RewardScorer (through per-backend dynamic batchers
when batching is on). Holds no reward logic."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from epgrpo.protos.codec import to_numpy
from epgrpo.protos.v1 import reward_pb2, reward_pb2_grpc
from epgrpo.services.common.server import map_errors
from epgrpo.services.reward import metrics as _metrics  # noqa: F401 - registers this service's metric extractors
from epgrpo.services.reward.batching import DynamicBatcher
from epgrpo.services.reward.config import BatchingConfig
from epgrpo.services.reward.scorer import RewardScorer

log = logging.getLogger("epgrpo.reward.servicer")

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
MODALITY_ENUM = {"image": reward_pb2.MODALITY_IMAGE, "video": reward_pb2.MODALITY_VIDEO,
                 "both": reward_pb2.MODALITY_IMAGE_AND_VIDEO}


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, scorer: RewardScorer, batching: BatchingConfig | None = None, workers: int = 1):
        self.scorer = scorer
        # Scoring runs off the event loop (which stays free for health checks and other RPCs) on
        # ``workers`` threads; the scorer keeps models one call at a time, so only backends marked
        # ``concurrent`` (CPU work that releases the GIL) score several requests in parallel.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward-scorer")
        self.batchers: dict[str, DynamicBatcher] = {}
        if batching is not None and batching.enabled:
            # Not for group-aware backends: they are called once per group anyway (merging would save
            # no model call), and a merged batch could join two requests' groups of the same name.
            self.batchers = {
                name: DynamicBatcher(functools.partial(scorer.run_backend, name), batching.max_size,
                                     batching.max_delay_ms / 1000.0, self._executor, name=name)
                for name, backend in scorer.backends.items() if not backend.group_aware
            }

    @map_errors
    async def Score(self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> reward_pb2.ScoreResponse:
        start = time.perf_counter()
        images = to_numpy(request.images, "images", dtypes=("uint8",))  # [N, H, W, C] or videos [N, T, H, W, C]
        prompts = list(request.prompts)
        metadata = [dict(m.fields) for m in request.metadata]
        specs = [(spec.name, spec.weight) for spec in request.rewards]
        combined, per_reward = await self.compute(images, prompts, metadata, specs)
        response = reward_pb2.ScoreResponse(scores=combined.tolist())
        for name, weight, raw in per_reward:
            response.per_reward.add(name=name, weight=weight, scores=raw.tolist())
        log.debug(
            "Score request_id=%s n=%d shape=%s rewards=%s in %.1f ms",
            request.request_id or "-", len(images), list(images.shape),
            ",".join(f"{n}*{w:g}" for n, w in specs), 1000 * (time.perf_counter() - start),
        )
        return response

    async def compute(self, images, prompts, metadata, specs):
        """``RewardScorer.score`` off the event loop, through the batchers when batching is on.
        (The OIP front calls this too, so its requests batch together with ours.)"""
        loop = asyncio.get_running_loop()
        if self.batchers:
            metadata = self.scorer.validate(images, prompts, metadata, specs)  # cheap: on the loop
            raws = await asyncio.gather(*(
                self.batchers[name].submit(images, prompts, metadata) if name in self.batchers else
                loop.run_in_executor(self._executor, self.scorer.run_backend, name, images, prompts, metadata)
                for name, _ in specs))
            return self.scorer.combine(specs, raws)
        return await loop.run_in_executor(self._executor, self.scorer.score, images, prompts, metadata, specs)

    @map_errors
    async def ListRewards(self, request: reward_pb2.ListRewardsRequest, context) -> reward_pb2.ListRewardsResponse:
        def info(fields: dict) -> reward_pb2.RewardInfo:
            return reward_pb2.RewardInfo(**{**fields, "modality": MODALITY_ENUM[fields["modality"]]})

        return reward_pb2.ListRewardsResponse(rewards=[info(f) for f in self.scorer.describe()],
                                              wrappers=[info(f) for f in self.scorer.describe_wrappers()])

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
