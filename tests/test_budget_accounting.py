"""The in-flight memory budget: pure accounting, sizing and flags, clients' classification of
rejections, and admission over the wire (in process). The floods against real service processes
are in tests/test_memory_flood.py."""

from __future__ import annotations

import asyncio
import sys
import time

import grpc
import numpy as np
import pytest
from epgrpo.protos import codec
from epgrpo.protos.channel import RETRYABLE_BUDGET, RETRYABLE_METADATA_KEY, is_budget_rejection
from epgrpo.protos.v1 import oip_pb2, oip_pb2_grpc, pruner_pb2, pruner_pb2_grpc, reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.services.common import budget as budget_mod
from epgrpo.services.common.budget import BudgetExceeded, MemoryBudget, budget_bytes, default_budget_bytes
from epgrpo.services.common.server import ServerConfig
from grpc_health.v1 import health_pb2, health_pb2_grpc

MiB = 2**20
JPEG = [tensor_pb2.RewardSpec(name="jpeg_compressibility", weight=1.0)]


def run(coro):
    return asyncio.run(coro)


# -- sizing --------------------------------------------------------------------------------------
def test_budget_comes_from_the_flag_then_the_environment_then_the_machine():
    assert budget_bytes(300, environ={"EPGRPO_MAX_INFLIGHT_MB": "100"}) == 300 * MiB
    assert budget_bytes(None, environ={"EPGRPO_MAX_INFLIGHT_MB": "100"}) == 100 * MiB
    assert budget_bytes(None, environ={}) == default_budget_bytes()
    assert default_budget_bytes(24 * 2**30) == 2 * 2**30  # a quarter, at most 2 GiB
    assert default_budget_bytes(2 * 2**30) == 512 * MiB
    assert budget_mod.machine_memory_bytes() > 0


@pytest.mark.parametrize("flag, env, message", [
    (0, "", "--max-inflight-mb: expected a positive number"),
    (float("nan"), "", "--max-inflight-mb: expected a positive number"),
    (None, "lots", r"\$EPGRPO_MAX_INFLIGHT_MB: expected a number of MiB, got 'lots'"),
    (None, "-5", r"\$EPGRPO_MAX_INFLIGHT_MB: expected a positive number"),
])
def test_bad_budget_values_name_the_flag_or_variable(flag, env, message):
    with pytest.raises(ValueError, match=message):
        budget_bytes(flag, environ={"EPGRPO_MAX_INFLIGHT_MB": env})


def test_services_take_the_flag_and_refuse_a_bad_value(monkeypatch, capsys):
    from epgrpo.services.common.server import server_config_from_args
    from epgrpo.services.reward.main import parse_args

    assert server_config_from_args(parse_args(["--max-inflight-mb", "64"])).max_inflight_bytes == 64 * MiB
    monkeypatch.setenv("EPGRPO_MAX_INFLIGHT_MB", "32")
    assert server_config_from_args(parse_args([])).max_inflight_bytes == 32 * MiB
    monkeypatch.setenv("EPGRPO_MAX_INFLIGHT_MB", "a lot")
    with pytest.raises(SystemExit) as stop:
        server_config_from_args(parse_args([]))
    assert stop.value.code == 2 and "EPGRPO_MAX_INFLIGHT_MB" in capsys.readouterr().err


# -- accounting ----------------------------------------------------------------------------------
def test_reservations_never_exceed_the_capacity_and_waiters_are_served_in_order():
    async def main():
        budget = MemoryBudget(100, wait_s=1.0)
        first, second, third = budget.reservation(), budget.reservation(), budget.reservation()
        await first.resize(60)
        order = []

        async def take(reservation, n, name):
            await reservation.resize(n)
            order.append(name)

        waiting = [asyncio.ensure_future(take(second, 50, "second")), asyncio.ensure_future(take(third, 10, "third"))]
        await asyncio.sleep(0.01)
        assert budget.held == 60 and budget.waiting == 2 and order == []  # "third" fits, but queues behind
        await first.resize(40)  # a shrink: room for "second" (40 + 50) and then "third" (+ 10)
        await asyncio.gather(*waiting)
        assert order == ["second", "third"] and budget.held == 100 == budget.peak
        for r in (first, second, third):
            r.release()
        assert budget.held == 0

    run(main())


def test_a_full_budget_refuses_after_the_bounded_wait_and_marks_it_retryable():
    async def main():
        budget = MemoryBudget(100, wait_s=0.05, source="--max-inflight-mb")
        held = budget.reservation()
        await held.resize(90)
        start = time.perf_counter()
        with pytest.raises(BudgetExceeded, match=r"server busy.*--max-inflight-mb.*retry with backoff") as info:
            await budget.reservation().resize(20)
        assert info.value.retryable and 0.04 < time.perf_counter() - start < 1.0
        with pytest.raises(BudgetExceeded, match="more than this server's whole budget") as info:
            await budget.reservation().resize(101, wait_s=5)  # never fits: refused at once
        assert not info.value.retryable
        small = budget.reservation()
        await small.resize(5)
        with pytest.raises(BudgetExceeded, match="needs 101 MiB|needs 0.0 MiB|whole budget") as info:
            await small.resize(101)  # a growth judged by what it would hold, not by the step
        assert not info.value.retryable and small.amount == 5
        small.release()
        assert budget.held == 90 and budget.waiting == 0 and budget.rejected == 3

    run(main())


def test_a_waiter_that_goes_away_leaves_nothing_behind():
    async def main():
        budget = MemoryBudget(100, wait_s=5)
        held = budget.reservation()
        await held.resize(100)
        waiter = asyncio.ensure_future(budget.reservation().resize(50))
        behind = budget.reservation()
        behind_task = asyncio.ensure_future(behind.resize(30))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        held.release()
        await behind_task  # the queue moved on past the cancelled waiter
        assert budget.held == 30 and budget.waiting == 0

    run(main())


# -- clients' classification ---------------------------------------------------------------------
class FakeError(grpc.RpcError):
    def __init__(self, code, metadata=()):
        self._code, self._metadata = code, metadata

    def code(self):
        return self._code

    def details(self):
        return "injected"

    def trailing_metadata(self):
        return self._metadata


def test_only_budget_rejections_are_retryable():
    from epgrpo.trainer.clients import RetryBudget, ServiceCallError, ServicesUnavailable

    budget_md = ((RETRYABLE_METADATA_KEY, RETRYABLE_BUDGET),)
    assert is_budget_rejection(FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, budget_md))
    assert not is_budget_rejection(FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED))  # e.g. a message over the limit
    assert not is_budget_rejection(FakeError(grpc.StatusCode.INVALID_ARGUMENT, budget_md))
    assert ServiceCallError("reward", "Score", FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, budget_md)).retryable
    assert not ServiceCallError("reward", "Score", FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED)).retryable

    now, sleeps = [0.0], []
    retry = RetryBudget(10, initial_backoff_s=0.5, sleep=lambda s: (sleeps.append(s), now.__setitem__(0, now[0] + s)),
                        clock=lambda: now[0])
    attempts = []

    def busy_twice(limit):
        attempts.append(limit)
        if len(attempts) <= 2:
            raise ServiceCallError("reward", "Score", FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, budget_md))
        return "scored"

    assert retry.call(busy_twice, "score") == "scored" and sleeps == [0.5, 1.0]

    def too_large(limit):
        raise ServiceCallError("reward", "Score", FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED))

    with pytest.raises(ServiceCallError):  # not ServicesUnavailable: given up at once, no retries
        retry.call(too_large, "score")
    with pytest.raises(ServicesUnavailable):
        retry.call(lambda limit: (_ for _ in ()).throw(ServiceCallError(
            "reward", "Score", FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, budget_md))), "score")


# -- admission over the wire (in process) --------------------------------------------------------
def _hold(server, n: int):
    """Reserves ``n`` bytes of a background server's budget, as if calls held them."""
    held = server.running.budget.reservation()
    server.call(held.resize(n))
    return held


def _release(server, held) -> None:
    async def release():
        held.release()

    server.call(release())


@pytest.fixture(scope="module")
def reward_registrar():
    from epgrpo.services.reward.main import build_registrar

    return build_registrar(["jpeg_compressibility"])


def score_request(n=4, side=32) -> reward_pb2.ScoreRequest:
    images = np.random.default_rng(n).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    return reward_pb2.ScoreRequest(images=codec.encode(images), prompts=[""] * n, rewards=JPEG)


def test_a_full_budget_answers_retryable_resource_exhausted_and_health_still_serves(background_server,
                                                                                   reward_registrar):
    server = background_server(reward_registrar, ServerConfig(max_inflight_bytes=64 * MiB, max_message_bytes=16 * MiB,
                                                              budget_wait_s=0.05))
    budget = server.running.budget
    with grpc.insecure_channel(server.address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        assert len(stub.Score(score_request(), timeout=10).scores) == 4
        held = _hold(server, 40 * MiB)  # less than the 48 MiB a read may take (3 x 16 MiB) is left
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(score_request(), timeout=10)
        error = info.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and is_budget_rejection(error)
        assert "--max-inflight-mb" in error.details() and "64 MiB" in error.details(), error.details()
        oip = oip_pb2_grpc.GRPCInferenceServiceStub(channel)  # the OIP endpoint shares the budget
        request = oip_pb2.ModelInferRequest(model_name="jpeg_compressibility", raw_input_contents=[bytes(3 * 8 * 8 * 3)])
        request.inputs.append(oip_pb2.ModelInferRequest.InferInputTensor(name="IMAGES", datatype="UINT8",
                                                                         shape=[3, 8, 8, 3]))
        with pytest.raises(grpc.RpcError) as info:
            oip.ModelInfer(request, timeout=10)
        assert is_budget_rejection(info.value)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # exempt

        # A request that waits is admitted as soon as room frees within its wait.
        server.running.budget.wait_s = 2.0
        call = stub.Score.future(score_request(), timeout=10)
        time.sleep(0.2)
        assert budget.waiting == 1
        _release(server, held)
        assert len(call.result().scores) == 4
        assert len(oip.ModelInfer(request, timeout=10).outputs) == 1
    deadline = time.monotonic() + 5
    while budget.held and time.monotonic() < deadline:  # released as the calls' tasks end
        time.sleep(0.01)
    assert budget.held == 0 and budget.peak <= budget.capacity and budget.rejected == 2
    registry = server.running.metrics.registry
    assert registry.get_sample_value("epgrpo_inflight_budget_bytes") == 64 * MiB
    assert registry.get_sample_value("epgrpo_inflight_bytes") == 0
    for method in ("epgrpo.v1.RewardService/Score", "inference.GRPCInferenceService/ModelInfer"):
        service, name = method.split("/")
        assert registry.get_sample_value("epgrpo_budget_rejections_total", {"service": service, "method": name}) == 1


def test_every_kind_of_method_is_admitted_and_released(background_server):
    """Unary and streaming requests, unary and streaming responses, async generators and the
    writer API: all served as before through the admission wrapper, and the budget ends empty."""
    seen = []

    async def unary_unary(request, context):
        return request[::-1]

    async def unary_stream(request, context):
        for byte in request:
            yield bytes([byte])

    async def stream_unary(requests, context):
        return b"".join([m async for m in requests])

    async def stream_stream(requests, context):  # the writer API
        async for m in requests:
            seen.append(len(m))
            await context.write(m.upper())

    def register(server):
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {
            "UU": grpc.unary_unary_rpc_method_handler(unary_unary),
            "US": grpc.unary_stream_rpc_method_handler(unary_stream),
            "SU": grpc.stream_unary_rpc_method_handler(stream_unary),
            "SS": grpc.stream_stream_rpc_method_handler(stream_stream)})])
        return ["t.T"]

    register.budget_factors = {"/t.T/SS": 4.0}
    server = background_server(register, ServerConfig(max_inflight_bytes=64 * MiB, max_message_bytes=MiB))
    with grpc.insecure_channel(server.address) as channel:
        assert channel.unary_unary("/t.T/UU")(b"abc", timeout=5) == b"cba"
        assert list(channel.unary_stream("/t.T/US")(b"xy", timeout=5)) == [b"x", b"y"]
        assert channel.stream_unary("/t.T/SU")(iter([b"a", b"b", b"c"]), timeout=5) == b"abc"
        assert list(channel.stream_stream("/t.T/SS")(iter([b"a", b"bb"]), timeout=5)) == [b"A", b"BB"]
        with pytest.raises(grpc.RpcError) as info:  # over the 1 MiB limit: core's refusal, not retryable
            channel.unary_unary("/t.T/UU")(bytes(2 * MiB), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not is_budget_rejection(info.value)
    assert seen == [1, 2]
    budget = server.running.budget
    deadline = time.monotonic() + 5
    while budget.held and time.monotonic() < deadline:
        time.sleep(0.01)
    # a read reserves 3 x the 1 MiB limit; a stream's next read that plus the message before (its last: 2 bytes)
    assert budget.held == 0 and budget.peak == 3 * MiB + 2 and budget.rejected == 0


def test_what_can_never_fit_is_refused_without_the_retry_mark(background_server, reward_registrar):
    from epgrpo.trainer.clients import ServiceCallError
    from epgrpo.trainer.reward_client import RewardClient

    # 32 MiB budget, 24 MiB messages: a 20 MiB request would hold 40 MiB while served.
    server = background_server(reward_registrar, ServerConfig(max_inflight_bytes=32 * MiB, max_message_bytes=24 * MiB))
    client = RewardClient(server.address, retry_budget_s=30, max_request_bytes=64 * MiB)
    try:
        images = np.zeros((20, 1024, 1024, 1), np.uint8)
        start = time.monotonic()
        with pytest.raises(ServiceCallError, match="more than this server's whole budget of 32 MiB") as info:
            client.score(images, [""] * 20, [("jpeg_compressibility", 1.0)])
        assert not info.value.retryable and client.retry.retries == 0 and time.monotonic() - start < 10
        with pytest.raises(ServiceCallError, match="RESOURCE_EXHAUSTED") as info:  # over the 24 MiB message limit
            client.score(np.zeros((30, 1024, 1024, 1), np.uint8), [""] * 30, [("jpeg_compressibility", 1.0)])
        assert not info.value.retryable and client.retry.retries == 0
        assert len(client.score(np.zeros((2, 64, 64, 3), np.uint8), ["", ""], [("jpeg_compressibility", 1.0)])[0]) == 2
    finally:
        client.close()
    assert server.running.budget.held == 0


def test_the_pruner_backs_off_while_the_reward_service_is_full(background_server, reward_registrar):
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar

    reward = background_server(reward_registrar, ServerConfig(max_inflight_bytes=64 * MiB, max_message_bytes=16 * MiB,
                                                              budget_wait_s=0.02))
    held = _hold(reward, 60 * MiB)
    pruner = background_server(pruner_registrar(reward.address, reward_deadline_s=20))
    previews = np.random.default_rng(0).random((6, 3, 16, 16), dtype=np.float32) * 2 - 1
    request = pruner_pb2.PruneRequest(
        checkpoint=pruner_pb2.GroupCheckpoint(group_id="g", step=3, trajectory_ids=list(range(6)),
                                              previews=codec.encode(previews), prompts=["x"]),
        keep=2, proxy_rewards=JPEG)
    reward._loop.call_soon_threadsafe(reward._loop.call_later, 0.8, held.release)  # room comes back later
    with grpc.insecure_channel(pruner.address) as channel:
        start = time.monotonic()
        decision = pruner_pb2_grpc.PrunerServiceStub(channel).Prune(request, timeout=30)
    assert len(decision.survivor_ids) == 2 and time.monotonic() - start >= 0.7
    assert reward.running.budget.rejected >= 2  # turned away, retried, then served


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-s"]))
