"""Dynamic batching: concurrent score requests for one backend are merged into one model call.

Pure asyncio + numpy (no grpc). A request waits at most ``max_delay_s`` after the oldest waiting
request arrived (less when ``max_size`` images are already waiting); then every waiting request
with the same image shape, up to ``max_size`` images, goes to the backend as one batch, and each
caller receives exactly its own slice. Requests of other shapes wait for the next call. A request
larger than ``max_size`` runs alone (it is never split).

When a merged call fails (say one request's prompt names no digit), each request of that batch is
re-run alone, so every caller gets its own result or its own error with its own sample indices.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger("epgrpo.reward.batching")

ScoreFn = Callable[[np.ndarray, list, list], np.ndarray]


@dataclass
class _Pending:
    images: np.ndarray
    prompts: list[str]
    metadata: list[dict[str, str]]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple:
        return self.images.shape[1:], self.images.dtype.str


@dataclass
class BatchStats:
    calls: int = 0  # backend calls made (merged or not)
    requests: int = 0  # requests answered
    images: int = 0
    largest: int = 0  # most requests merged into one call
    fallbacks: int = 0  # merged calls that failed and were re-run request by request


class DynamicBatcher:
    """Merges concurrent ``submit`` calls into calls of ``fn(images, prompts, metadata)`` run on
    ``executor`` (one at a time per batcher). Must be used from one event loop."""

    def __init__(self, fn: ScoreFn, max_size: int, max_delay_s: float, executor: Executor | None = None,
                 name: str = "backend"):
        if max_size < 1 or max_delay_s < 0:
            raise ValueError(f"max_size >= 1 and max_delay_s >= 0 expected, got {max_size}, {max_delay_s}")
        self.fn, self.max_size, self.max_delay_s = fn, max_size, max_delay_s
        self.executor, self.name = executor, name
        self.stats = BatchStats()
        self._queue: deque[_Pending] = deque()
        self._arrival: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict[str, str]]) -> np.ndarray:
        """This request's float32 [N] scores (or the exception scoring it alone raised)."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrival = asyncio.Event()
            self._worker = loop.create_task(self._run(), name=f"batcher-{self.name}")
        pending = _Pending(images, list(prompts), list(metadata), loop.create_future())
        self._queue.append(pending)
        self._arrival.set()
        return await pending.future

    def _queued_images(self, key: tuple) -> int:
        return sum(len(p.images) for p in self._queue if p.key == key)

    async def _run(self) -> None:
        # The worker ends when the queue is empty (``submit`` starts a new one), so no task outlives
        # the traffic or the server's event loop.
        while self._queue:
            oldest = self._queue[0]
            # Wait for company until the oldest request's deadline or a full batch.
            while self._queued_images(oldest.key) < self.max_size:
                remaining = oldest.arrived + self.max_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take(oldest.key)
            try:
                await self._execute(batch)
            except Exception as exc:  # noqa: BLE001 - never leave a caller waiting forever
                log.exception("%s: batch failed outside the backend call", self.name)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)

    def _take(self, key: tuple) -> list[_Pending]:
        """Removes and returns the waiting requests of ``key`` (FIFO, at most max_size images, at
        least one request); cancelled ones are dropped."""
        batch, size, kept = [], 0, deque()
        while self._queue:
            p = self._queue.popleft()
            if p.future.done():  # the caller went away (deadline, cancellation)
                continue
            if p.key == key and (not batch or size + len(p.images) <= self.max_size):
                batch.append(p)
                size += len(p.images)
            else:
                kept.append(p)
        self._queue = kept
        return batch

    async def _call(self, images: np.ndarray, prompts: list, metadata: list) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.fn, images, prompts, metadata)

    async def _execute(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        self.stats.calls += 1
        self.stats.requests += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        self.stats.images += sum(len(p.images) for p in batch)
        if len(batch) == 1:
            await self._settle(batch[0], self._call(batch[0].images, batch[0].prompts, batch[0].metadata))
            return
        images = np.concatenate([p.images for p in batch])
        # Metadata is per image: a request without any gets empty dicts so offsets stay aligned.
        metadata = [m for p in batch for m in (p.metadata or [{}] * len(p.images))]
        if not any(metadata):
            metadata = []
        start = time.perf_counter()
        try:
            scores = await self._call(images, [s for p in batch for s in p.prompts], metadata)
        except Exception as exc:  # noqa: BLE001 - each request is re-run alone to get its own error
            log.debug("%s: merged call of %d requests failed (%s); re-running them one by one", self.name, len(batch), exc)
            self.stats.fallbacks += 1
            self.stats.calls += len(batch)
            for p in batch:
                await self._settle(p, self._call(p.images, p.prompts, p.metadata))
            return
        log.debug("%s: %d requests, %d images in one call, %.1f ms", self.name, len(batch), len(images),
                  1000 * (time.perf_counter() - start))
        offset = 0
        for p in batch:
            part = scores[offset:offset + len(p.images)]
            offset += len(p.images)
            if not p.future.done():
                p.future.set_result(part)

    async def _settle(self, pending: _Pending, call) -> None:
        try:
            result = await call
        except Exception as exc:  # noqa: BLE001 - delivered to the caller
            if not pending.future.done():
                pending.future.set_exception(exc)
            return
        if not pending.future.done():
            pending.future.set_result(result)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for p in self._queue:
            if not p.future.done():
                p.future.cancel()
        self._queue.clear()
