"""``epgrpo-reward --workers N``: backends marked concurrent score requests in parallel; the
others (models) still run one call at a time."""

import asyncio
import threading
import time

import numpy as np
import pytest

from epgrpo.services.reward.backends.base import RewardBackend
from epgrpo.services.reward.scorer import RewardScorer
from epgrpo.services.reward.servicer import RewardServicer


class Probe(RewardBackend):
    """Records how many calls overlap; each call holds for 50 ms."""

    def __init__(self, concurrent: bool):
        super().__init__()
        self.concurrent = concurrent
        self.active = self.peak = 0
        self.lock = threading.Lock()

    def _score(self, images, prompts, metadata):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.05)
        with self.lock:
            self.active -= 1
        return np.zeros(len(images))


@pytest.mark.parametrize("concurrent, workers, peak", [(True, 3, 3), (False, 3, 1), (True, 1, 1)])
def test_workers_run_concurrent_backends_in_parallel_and_models_one_at_a_time(concurrent, workers, peak):
    probe = Probe(concurrent)
    servicer = RewardServicer(RewardScorer({"probe": probe}), workers=workers)
    images = np.zeros((2, 4, 4, 1), np.uint8)

    async def burst():
        # more requests than workers, all at once: at most `workers` can overlap
        await asyncio.gather(*(servicer.compute(images, ["a", "b"], [], [("probe", 1.0)]) for _ in range(6)))

    try:
        asyncio.run(burst())
    finally:
        servicer.close()
    assert probe.peak == peak


def test_jpeg_rewards_are_marked_concurrent_and_model_rewards_are_not():
    from epgrpo.services.reward.backends.base import backend_class

    assert backend_class("jpeg_compressibility").concurrent and backend_class("jpeg_incompressibility").concurrent
    assert not backend_class("digit").concurrent and not backend_class("clipscore").concurrent
