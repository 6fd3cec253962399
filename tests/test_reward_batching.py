"""Dynamic batching: merged calls, each caller gets exactly its own scores (in-process batcher and
over real gRPC with many concurrent clients), shapes never mix, failures stay with their request."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from epgrpo.protos import codec
from epgrpo.protos.v1 import reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.services.common.errors import InvalidArgument
from epgrpo.services.reward.backends import digit_data, digits
from epgrpo.services.reward.backends.base import create_backend
from epgrpo.services.reward.batching import DynamicBatcher
from epgrpo.services.reward.config import BatchingConfig
from epgrpo.services.reward import main as reward_main
from epgrpo.services.reward.main import build_registrar


class Recorder:
    """score = mean pixel + 1000 * prompt number; records every call's batch size."""

    def __init__(self):
        self.sizes: list[int] = []

    def __call__(self, images, prompts, metadata):
        self.sizes.append(len(images))
        if len({im.shape for im in images}) != 1:
            raise AssertionError("mixed shapes in one call")
        for i, p in enumerate(prompts):
            if not p.isdigit():
                raise InvalidArgument(f"prompts[{i}]: expected a number, got {p!r}")
        time.sleep(0.005)  # a model call: others arrive meanwhile
        return images.reshape(len(images), -1).mean(1).astype(np.float32) + 1000 * np.array([int(p) for p in prompts])


def request(k: int, rng, shape=(6, 5, 3)) -> tuple[np.ndarray, list[str]]:
    n = 1 + k % 3
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), [str(k * 10 + j) for j in range(n)]


def run_concurrently(batcher, requests):
    async def main():
        return await asyncio.gather(*(batcher.submit(im, pr, []) for im, pr in requests), return_exceptions=True)

    return asyncio.run(main())


def test_each_caller_gets_exactly_its_own_scores():
    fn, rng = Recorder(), np.random.default_rng(0)
    batcher = DynamicBatcher(fn, max_size=8, max_delay_s=0.05)
    requests = [request(k, rng) for k in range(40)]
    results = run_concurrently(batcher, requests)
    for (images, prompts), got in zip(requests, results):
        np.testing.assert_array_equal(got, Recorder()(images, prompts, []))
    assert max(fn.sizes) <= 8 and sum(fn.sizes) == sum(len(im) for im, _ in requests)
    assert len(fn.sizes) <= 40 // 3, f"expected merged calls, got sizes {fn.sizes}"
    assert batcher.stats.requests == 40 and batcher.stats.largest > 1


def test_shapes_never_mix_and_each_still_gets_its_own():
    fn, rng = Recorder(), np.random.default_rng(1)
    batcher = DynamicBatcher(fn, max_size=64, max_delay_s=0.05)
    requests = [request(k, rng, shape=(6, 5, 3) if k % 2 else (4, 4, 1)) for k in range(20)]
    results = run_concurrently(batcher, requests)
    for (images, prompts), got in zip(requests, results):
        np.testing.assert_array_equal(got, Recorder()(images, prompts, []))
    assert len(fn.sizes) < 20


def test_a_failing_request_gets_its_own_error_and_the_others_their_scores():
    fn, rng = Recorder(), np.random.default_rng(2)
    batcher = DynamicBatcher(fn, max_size=64, max_delay_s=0.05)
    requests = [request(k, rng) for k in range(6)]
    assert len(requests[4][0]) == 2
    requests[4] = (requests[4][0], ["44", "not a number"])  # index 1 in its request, not in the merged batch
    results = run_concurrently(batcher, requests)
    assert isinstance(results[4], InvalidArgument) and str(results[4]).startswith("prompts[1]:")
    for k in (0, 1, 2, 3, 5):
        np.testing.assert_array_equal(results[k], Recorder()(*requests[k], []))
    assert batcher.stats.fallbacks == 1


def test_full_batches_do_not_wait_and_a_lone_request_waits_at_most_the_delay():
    async def main():
        full = DynamicBatcher(Recorder(), max_size=4, max_delay_s=30.0)
        start = time.monotonic()
        await asyncio.gather(*(full.submit(np.zeros((1, 2, 2, 1), np.uint8), ["1"], []) for _ in range(4)))
        full_s = time.monotonic() - start
        lone = DynamicBatcher(Recorder(), max_size=4, max_delay_s=0.3)
        start = time.monotonic()
        await lone.submit(np.zeros((1, 2, 2, 1), np.uint8), ["1"], [])
        return full_s, time.monotonic() - start

    full_s, lone_s = asyncio.run(main())
    assert full_s < 10, "a full batch must not wait for the 30 s delay"
    assert 0.25 <= lone_s < 10


def test_a_caller_that_gives_up_does_not_stall_the_others():
    async def main():
        batcher = DynamicBatcher(Recorder(), max_size=8, max_delay_s=0.2)
        image = np.zeros((1, 2, 2, 1), np.uint8)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit(image, ["1"], []), 0.05)
        later = await batcher.submit(image + 3, ["2"], [])
        await batcher.close()
        return later

    np.testing.assert_array_equal(asyncio.run(main()), [2003.0])


def digit_requests(count: int):
    images, labels = digits.real_digits()
    _, test_idx = digits.digit_split()
    rng = np.random.default_rng(3)
    out = []
    for k in range(count):
        idx = rng.choice(test_idx, size=1 + k % 4, replace=False)
        out.append((digit_data.to_uint8(images[idx]), [f"a handwritten digit {d}" for d in labels[idx]]))
    return out


def test_over_grpc_many_concurrent_clients_get_their_own_scores(background_server, monkeypatch):
    servicers = []

    class Recording(reward_main.RewardServicer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            servicers.append(self)

    monkeypatch.setattr(reward_main, "RewardServicer", Recording)
    requests = digit_requests(24)
    total = sum(len(im) for im, _ in requests)
    # A batch as large as all requests together: the backends are called as soon as all 24 are waiting,
    # with no timing window to miss; the delay (far longer than the 24 need to arrive) only bounds how
    # long a broken batcher keeps the test waiting.
    batching = BatchingConfig(max_size=total, max_delay_ms=5_000)
    server = background_server(build_registrar(["digit", "jpeg_compressibility"], batching=batching))
    specs = [tensor_pb2.RewardSpec(name="digit", weight=1.0), tensor_pb2.RewardSpec(name="jpeg_compressibility", weight=0.5)]

    async def clients():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            calls = [stub.Score(reward_pb2.ScoreRequest(images=codec.encode(im), prompts=pr, rewards=specs), timeout=60)
                     for im, pr in requests]
            return await asyncio.gather(*calls)

    responses = asyncio.run(clients())
    digit, jpeg = create_backend("digit"), create_backend("jpeg_compressibility")
    for (images, prompts), response in zip(requests, responses):
        expected_digit, expected_jpeg = digit.score(images, prompts), jpeg.score(images, prompts)
        np.testing.assert_allclose(response.per_reward[0].scores, expected_digit, atol=1e-6)
        np.testing.assert_array_equal(np.float32(response.per_reward[1].scores), expected_jpeg)
        np.testing.assert_allclose(response.scores, expected_digit + 0.5 * expected_jpeg.astype(np.float64), atol=1e-5)
    (servicer,) = servicers
    for name, batcher in servicer.batchers.items():
        stats = batcher.stats
        assert (stats.requests, stats.images) == (24, total), name
        assert stats.largest > 1 and stats.calls < 24, f"{name}: no backend call merged several requests: {stats}"


def test_over_grpc_a_bad_request_is_invalid_argument_and_does_not_hurt_its_neighbours(background_server):
    server = background_server(build_registrar(["digit"], batching=BatchingConfig(max_size=32, max_delay_ms=50)))
    requests = digit_requests(6)
    requests[2] = (requests[2][0], ["a cat"] + requests[2][1][1:])
    spec = [tensor_pb2.RewardSpec(name="digit", weight=1.0)]

    async def clients():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            calls = [stub.Score(reward_pb2.ScoreRequest(images=codec.encode(im), prompts=pr, rewards=spec), timeout=60)
                     for im, pr in requests]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(clients())
    assert isinstance(results[2], grpc.aio.AioRpcError)
    assert results[2].code() == grpc.StatusCode.INVALID_ARGUMENT and results[2].details().startswith("prompts[0]:")
    digit = create_backend("digit")
    for k in (0, 1, 3, 4, 5):
        np.testing.assert_allclose(results[k].scores, digit.score(*requests[k]), atol=1e-6)
