"""Service limits that need no flood, on real in-process servers (port 0): failures keep their real
status and the trainer stops at once, the pruner's decoders load off the event loop and a failed
load is remembered without leaking paths, token files with comments, bounded log lines, a stream's
state freed at once. Streams and slow rewards: tests/test_stream_limits.py; the floods and bombs
against service processes: tests/test_hostile_clients.py."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from epgrpo.protos import codec
from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc, reward_pb2_grpc, tensor_pb2
from epgrpo.services.common.server import ServerConfig
from epgrpo.services.reward.backends.base import RewardBackend
from grpc_health.v1 import health_pb2, health_pb2_grpc


class WinRate(RewardBackend):
    """Group-aware: each image's rank within its group over (n - 1); a group's scores sum to n / 2."""

    group_aware = True

    def _score(self, images, prompts, metadata):
        means = images.reshape(len(images), -1).mean(axis=1)
        n = len(images)
        return np.argsort(np.argsort(means)) / max(1, n - 1) if n > 1 else np.full(1, 0.5)


class Brightness(RewardBackend):
    def _score(self, images, prompts, metadata):
        return images.reshape(len(images), -1).mean(axis=1) / 255.0


class NotANumber(RewardBackend):
    def _score(self, images, prompts, metadata):
        return np.full(len(images), np.nan)


def reward_registrar(backends: dict, workers: int = 1):
    from epgrpo.protos.v1 import reward_pb2_grpc as stubs
    from epgrpo.services.reward.scorer import RewardScorer
    from epgrpo.services.reward.servicer import SERVICE_NAME, RewardServicer

    def register(server):
        register.servicer = RewardServicer(RewardScorer(backends), workers=workers)
        stubs.add_RewardServiceServicer_to_server(register.servicer, server)
        return [SERVICE_NAME]

    return register


def prune_request(n: int, reward: str, decoder: str = "", side: int = 2) -> pruner_pb2.PruneRequest:
    previews = np.random.default_rng(n).random((n, 1, side, side), dtype=np.float32) * 2 - 1
    return pruner_pb2.PruneRequest(
        checkpoint=pruner_pb2.GroupCheckpoint(group_id="g", step=1, trajectory_ids=list(range(n)),
                                              previews=codec.encode(previews), prompts=["x"]),
        keep=2, proxy_rewards=[tensor_pb2.RewardSpec(name=reward, weight=1.0)], decoder=decoder)


# -- 9: failures that would fail again keep their status; the trainer stops at once --------------------
def test_non_retryable_upstream_failures_keep_their_status_and_the_trainer_stops_at_once(background_server):
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar
    from epgrpo.trainer.clients import RetryBudget, ServiceCallError

    reward = background_server(reward_registrar({"win": WinRate(), "nan": NotANumber()}))
    pruner = background_server(pruner_registrar(reward.address, reward_deadline_s=10))
    retry = RetryBudget(total_s=30)
    with grpc.insecure_channel(pruner.address) as channel:
        stub = pruner_pb2_grpc.PrunerServiceStub(channel)
        assert len(stub.Prune(prune_request(6, "win"), timeout=30).survivor_ids) == 2

        def prune(request):
            def attempt(limit):
                try:
                    return stub.Prune(request, timeout=30)
                except grpc.RpcError as e:
                    raise ServiceCallError("pruner", "Prune", e) from e
            return attempt

        outcomes = {}
        for name, request in (("1,100 trajectories, group-aware", prune_request(1100, "win")),
                              ("NaN scores", prune_request(6, "nan"))):
            start = time.monotonic()
            with pytest.raises(ServiceCallError) as info:
                retry.call(prune(request), "prune")
            outcomes[name] = (info.value.code.name, str(info.value), time.monotonic() - start)
    big, nan = outcomes["1,100 trajectories, group-aware"], outcomes["NaN scores"]
    assert big[0] == "RESOURCE_EXHAUSTED" and "batch of 1100 images exceeds" in big[1] and "1024" in big[1], big
    assert nan[0] == "FAILED_PRECONDITION" and "non-finite" in nan[1], nan
    assert retry.retries == 0 and big[2] < 10 and nan[2] < 10  # not a single retry: the real reason, at once


# -- 11: decoders load off the loop; a failed load is remembered, without the server's paths ------------
def test_a_slow_decoder_loads_off_the_loop_and_a_failed_one_is_remembered_without_paths(background_server):
    from epgrpo.services.pruner.decode import pixel_decode, register_decoder
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar

    loads = {"slow": 0, "broken": 0}

    def slow():
        loads["slow"] += 1
        time.sleep(1.5)  # a model being read from disk
        return pixel_decode

    def broken():
        loads["broken"] += 1
        raise OSError("Error no file named diffusion_pytorch_model.safetensors found in directory /srv/models/vae")

    register_decoder("test-slow", slow)
    register_decoder("test-broken", broken)
    pruner = background_server(pruner_registrar("127.0.0.1:1"))
    scores = pruner_pb2.GroupCheckpoint(group_id="g", step=1, trajectory_ids=[0, 1, 2],
                                        scores=pruner_pb2.ScoreList(values=[0.1, 0.5, 0.9]))
    with grpc.insecure_channel(pruner.address) as channel:
        stub = pruner_pb2_grpc.PrunerServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        pending = stub.Prune.future(pruner_pb2.PruneRequest(checkpoint=scores, keep=1, decoder="test-slow"), timeout=30)
        time.sleep(0.2)
        probes = []
        while not pending.done():
            start = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            probes.append(time.perf_counter() - start)
            time.sleep(0.05)
        assert list(pending.result().survivor_ids) == [2]
        assert len(probes) >= 5 and max(probes) < 0.5, probes  # the loop answered while the model loaded
        errors = []
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                stub.Prune(pruner_pb2.PruneRequest(checkpoint=scores, keep=1, decoder="test-broken"), timeout=30)
            errors.append(info.value)
    assert {e.code() for e in errors} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert all("decoder 'test-broken' failed to load" in e.details() and "/srv" not in e.details() for e in errors)
    assert loads == {"slow": 1, "broken": 1}  # loaded once; a failure is not retried per request


@pytest.mark.slow
def test_the_pruner_cli_loads_its_vae_before_listening_and_refuses_a_corrupt_one(tmp_path, capsys):
    import json

    from epgrpo.services.pruner.main import main

    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [8],
                                                 "norm_num_groups": 8, "latent_channels": 4}))
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    assert main(["--port", "0", "--vae", f"test-corrupt={vae}", "--device", "cpu"]) == 2  # never listens
    assert "--vae test-corrupt: failed to load" in capsys.readouterr().err


# -- 13: token files with comments -----------------------------------------------------------------------
def test_token_files_skip_comments_and_blank_lines_and_say_how_many_were_loaded(tmp_path, caplog, background_server):
    import logging

    from epgrpo.services.common.auth import ServerSecurity, load_tokens
    from epgrpo.services.common.token_file import ensure_token_file
    from epgrpo.services.reward.main import build_registrar

    path = tmp_path / "tokens"
    path.write_text("# tokens of the reward service, rotated monthly\n\n  tok-new \n   # tok-old (retired)\ntok-old2\n")
    with caplog.at_level(logging.INFO, logger="epgrpo.auth"):
        tokens = load_tokens(path)
    assert tokens == ("tok-new", "tok-old2")
    assert "loaded 2 bearer tokens" in caplog.text and "tok-new" not in caplog.text
    assert ensure_token_file(path) == "kept"  # compose's token service reads past the comment too
    (tmp_path / "only-comments").write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="contains no token"):
        load_tokens(tmp_path / "only-comments")
    server = background_server(build_registrar(["jpeg_compressibility"]), ServerConfig(
        security=ServerSecurity(tokens=tokens)))
    from epgrpo.protos.v1 import reward_pb2

    with grpc.insecure_channel(server.address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        codes = {}
        for token in ("tok-new", "# tokens of the reward service, rotated monthly", "# tok-old (retired)"):
            try:
                stub.ListRewards(reward_pb2.ListRewardsRequest(), timeout=10,
                                 metadata=(("authorization", f"Bearer {token}"),))
                codes[token] = "OK"
            except grpc.RpcError as e:
                codes[token] = e.code().name
    assert list(codes.values()) == ["OK", "UNAUTHENTICATED", "UNAUTHENTICATED"], codes


# -- 12: one bounded line per event --------------------------------------------------------------------------
def test_oversize_messages_and_long_ids_log_one_bounded_line_each(background_server, caplog):
    import logging

    from epgrpo.protos.v1 import reward_pb2
    from epgrpo.services.pruner.main import build_registrar as pruner_registrar
    from epgrpo.services.reward.main import build_registrar

    reward = background_server(build_registrar(["jpeg_compressibility"]), ServerConfig(max_message_bytes=2**20))
    pruner = background_server(pruner_registrar(reward.address))
    long_id = "r" * 100_000
    with caplog.at_level(logging.DEBUG):
        with grpc.insecure_channel(reward.address, options=[("grpc.max_send_message_length", 2**25)]) as channel:
            score = channel.unary_unary("/epgrpo.v1.RewardService/Score")
            for _ in range(3):  # over the 1 MiB limit: core answers RESOURCE_EXHAUSTED
                with pytest.raises(grpc.RpcError):
                    score(b"\x0a" + bytes(2 * 2**20), timeout=10)
            images = codec.encode(np.zeros((2, 8, 8, 3), np.uint8))
            with pytest.raises(grpc.RpcError):  # an id of 100 k characters
                reward_pb2_grpc.RewardServiceStub(channel).Score(reward_pb2.ScoreRequest(
                    images=images, prompts=["", ""], request_id=long_id, rewards=[
                        tensor_pb2.RewardSpec(name="jpeg_compressibility", weight=1.0)]), timeout=10)
        with grpc.insecure_channel(pruner.address) as channel:
            stub = pruner_pb2_grpc.PrunerServiceStub(channel)

            def opening(rollout_id):
                return pruner_pb2.PruneStreamRequest(open=pruner_pb2.OpenRollout(
                    rollout_id=rollout_id, schedule=[pruner_pb2.Checkpoint(step=1, keep=1)], num_steps=2))

            with pytest.raises(grpc.RpcError) as info:
                list(stub.PruneRollout(iter([opening("rollout-" + "x" * 50_000)]), timeout=30))
            assert "open.rollout_id: expected at most 256 characters" in info.value.details()
            groups = [pruner_pb2.PruneStreamRequest(checkpoint=pruner_pb2.GroupCheckpoint(
                group_id=f"group-{i}-" + "g" * 240, step=1, trajectory_ids=[0, 1],
                scores=pruner_pb2.ScoreList(values=[0.0, 1.0]))) for i in range(40)]
            assert len(list(stub.PruneRollout(iter([opening("r1"), *groups]), timeout=30))) == 40
        time.sleep(0.3)
    records = [r for r in caplog.records if r.name.startswith(("epgrpo", "grpc"))]
    assert not [r for r in records if r.levelno >= logging.ERROR], [r.getMessage()[:200] for r in records]
    assert not [r for r in records if r.exc_info], "tracebacks logged"
    longest = max(records, key=lambda r: len(r.getMessage()))
    assert len(longest.getMessage()) < 2000, longest.getMessage()[:300]
    access = [r for r in records if r.name == "epgrpo.access" and "PruneRollout" in r.getMessage()]
    fields = access[-1].fields
    assert fields["groups"] == 40 and len(fields["group_ids"]) == 8 and all(len(g) < 100 for g in fields["group_ids"])


# -- 6: a failed or cancelled stream's state is freed when it ends, not by the cyclic GC -------------------
def test_a_failed_or_cancelled_streams_state_is_freed_at_once(background_server):
    import gc
    import weakref

    from epgrpo.services.common.errors import InvalidArgument
    from epgrpo.services.common.server import map_errors

    class State:  # what a stream holds: its messages, decoded previews, session
        def __init__(self):
            self.data = bytearray(2**20)

    alive: list[weakref.ref] = []

    class Service:
        @map_errors
        async def Fail(self, requests, context):
            state = State()
            alive.append(weakref.ref(state))
            async for message in requests:
                if message == b"bad":
                    raise InvalidArgument("message: bad")
                yield message

    service = Service()

    def register(server):
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.Streams", {
            "Fail": grpc.stream_stream_rpc_method_handler(service.Fail)})])
        return ["t.Streams"]

    server = background_server(register)
    gc.collect()
    gc.disable()  # what is freed now is freed by reference counting alone
    try:
        with grpc.insecure_channel(server.address) as channel:
            call = channel.stream_stream("/t.Streams/Fail")
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as info:
                    list(call(iter([b"ok", b"bad"]), timeout=10))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            gate = threading.Event()
            for _ in range(3):  # the client goes away mid-stream
                responses = call(iter(gate.wait, True), timeout=10)
                time.sleep(0.2)
                responses.cancel()
            time.sleep(0.5)
            held = [ref for ref in alive if ref() is not None]
            assert len(alive) == 6 and not held, f"{len(held)} of {len(alive)} streams' state still alive"
    finally:
        gate.set()
        gc.enable()
