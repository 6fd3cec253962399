"""Transport benchmark: our RPCs against a bare grpc.aio echo of the same payload bytes.

Servers (uvloop, one background loop) and a sync client in one process tree, side by side:
  echo            a generic unary/stream handler that receives the bytes and answers 8 bytes
  reward.Score    uint8 images -> JPEG-compressibility scores (compute measured in-process too)
  pruner          precomputed scores (unary Prune vs PruneRollout stream), and toy previews
                  (decode + digit reward upstream + OVF)
  codec           encode/decode of SD3.5-sized latents (48 x 16 x 64 x 64 bf16) in-process

Overhead ratio = RPC time / (echo time for the same bytes + in-process compute of the handler):
what the contract, codec, validation and servicer add over moving the bytes and doing the work.

    python bench/bench_transport.py            # ~1 min on 2 CPU cores
    python bench/bench_transport.py --quick    # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time

import grpc
import numpy as np
import torch

from epgrpo.protos import codec
from epgrpo.protos.channel import PRUNER_SERVICE, REWARD_SERVICE, create_channel
from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc, reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.services.common.server import ServerConfig, start_server
from epgrpo.services.pruner.decode import pixel_decode
from epgrpo.services.pruner.main import build_registrar as pruner_registrar
from epgrpo.services.pruner.ovf import ovf_select
from epgrpo.services.reward.backends.base import create_backend
from epgrpo.services.reward.main import build_registrar as reward_registrar

ECHO = "/bench.Echo/"


def _echo_registrar(server: grpc.aio.Server) -> list[str]:
    async def unary(request: bytes, context) -> bytes:
        return len(request).to_bytes(8, "little")

    async def stream(requests, context):
        async for request in requests:
            yield len(request).to_bytes(8, "little")

    identity = lambda b: b  # noqa: E731 - raw bytes, no proto
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, identity, identity),
        "Stream": grpc.stream_stream_rpc_method_handler(stream, identity, identity),
    })
    server.add_generic_rpc_handlers((handler,))
    return []


class Servers:
    def __init__(self):
        import uvloop

        self.loop = uvloop.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.echo = self._start(_echo_registrar)
        self.reward = self._start(reward_registrar(["jpeg_compressibility", "digit"]))
        self.pruner = self._start(pruner_registrar(f"127.0.0.1:{self.reward.port}"))

    def _start(self, register):
        return asyncio.run_coroutine_threadsafe(start_server(register, ServerConfig()), self.loop).result(120)

    def stop(self):
        for s in (self.pruner, self.reward, self.echo):
            asyncio.run_coroutine_threadsafe(s.stop(0.1), self.loop).result(30)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="calls per measurement; the median is reported")
    parser.add_argument("--quick", action="store_true", help="3 repeats, small payloads only")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    # Servers and client share this process: one torch thread, as the services run next to a
    # trainer (`--torch-threads 1`); two spinning thread pools on a loaded 2-core box cost ~30x.
    torch.set_num_threads(1)
    servers = Servers()
    echo_channel = grpc.insecure_channel(f"127.0.0.1:{servers.echo.port}", options=[
        ("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)])
    echo_unary = echo_channel.unary_unary(ECHO + "Unary")
    echo_stream = echo_channel.stream_stream(ECHO + "Stream")
    reward = reward_pb2_grpc.RewardServiceStub(create_channel(f"127.0.0.1:{servers.reward.port}", [REWARD_SERVICE]))
    pruner = pruner_pb2_grpc.PrunerServiceStub(create_channel(f"127.0.0.1:{servers.pruner.port}", [PRUNER_SERVICE]))
    jpeg, digit = create_backend("jpeg_compressibility"), create_backend("digit")
    rng = np.random.default_rng(0)
    rows = []

    def add(name, payload_bytes, rpc_s, echo_s, compute_s=0.0):
        rows.append((name, payload_bytes, rpc_s, echo_s, compute_s))

    # Reward.Score on images: toy group (48 x 16 x 16 x 1) and 48 x 256 x 256 x 3.
    image_sizes = [(48, 16, 16, 1)] + ([] if args.quick else [(48, 256, 256, 3)])
    for shape in image_sizes:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        prompts = ["a handwritten digit 1"] * shape[0]
        request = reward_pb2.ScoreRequest(images=codec.encode(images), prompts=prompts,
                                          rewards=[tensor_pb2.RewardSpec(name="jpeg_compressibility", weight=1.0)])
        wire = request.SerializeToString()
        add(f"reward.Score jpeg {'x'.join(map(str, shape))} uint8", len(wire),
            timed(lambda: reward.Score(request, timeout=60), repeats), timed(lambda: echo_unary(wire, timeout=60), repeats),
            timed(lambda: jpeg.score(images, prompts), repeats))

    # Pruner with precomputed scores (48 ids): unary Prune vs one PruneRollout stream.
    scores = rng.random(48).astype(np.float32)
    checkpoint = pruner_pb2.GroupCheckpoint(group_id="g", step=5, trajectory_ids=list(range(48)),
                                            scores=pruner_pb2.ScoreList(values=scores.tolist()))
    unary = pruner_pb2.PruneRequest(checkpoint=checkpoint, keep=24, strategy=pruner_pb2.STRATEGY_OVF)
    wire = unary.SerializeToString()
    add("pruner.Prune scores x48 (unary)", len(wire), timed(lambda: pruner.Prune(unary, timeout=60), repeats),
        timed(lambda: echo_unary(wire, timeout=60), repeats), timed(lambda: ovf_select(scores, 24), repeats))

    def stream_rollout(groups: int, make_checkpoint) -> None:
        opening = pruner_pb2.PruneStreamRequest(open=pruner_pb2.OpenRollout(
            schedule=[pruner_pb2.Checkpoint(step=5, keep=24)], num_steps=10, decoder="pixel",
            proxy_rewards=[tensor_pb2.RewardSpec(name="digit", weight=1.0)]))
        requests = [opening] + [pruner_pb2.PruneStreamRequest(checkpoint=make_checkpoint(g)) for g in range(groups)]
        assert len(list(pruner.PruneRollout(iter(requests), timeout=120))) == groups

    groups = 10

    def scores_checkpoint(g):
        c = pruner_pb2.GroupCheckpoint()
        c.CopyFrom(checkpoint)
        c.group_id = f"g{g}"
        return c

    stream_bytes = [checkpoint.SerializeToString()] * groups
    add(f"pruner.PruneRollout scores x48, {groups} groups/stream", sum(map(len, stream_bytes)),
        timed(lambda: stream_rollout(groups, scores_checkpoint), repeats),
        timed(lambda: list(echo_stream(iter(stream_bytes), timeout=60)), repeats),
        groups * timed(lambda: ovf_select(scores, 24), repeats))

    # Pruner with toy previews (48 x 1 x 16 x 16 float32): decode + digit reward (one more hop) + OVF.
    previews = torch.rand(48, 1, 16, 16) * 2 - 1
    preview_msg = codec.encode(previews)

    def preview_checkpoint(g):
        return pruner_pb2.GroupCheckpoint(group_id=f"g{g}", step=5, trajectory_ids=list(range(48)),
                                          previews=preview_msg, prompts=["a handwritten digit 3"])

    def inprocess_preview_work():
        s = digit.score(pixel_decode(codec.to_numpy(preview_msg)), ["a handwritten digit 3"] * 48)
        ovf_select(s, 24)

    stream_bytes = [preview_checkpoint(g).SerializeToString() for g in range(groups)]
    add(f"pruner.PruneRollout previews 48x1x16x16 f32, {groups} groups", sum(map(len, stream_bytes)),
        timed(lambda: stream_rollout(groups, preview_checkpoint), repeats),
        timed(lambda: list(echo_stream(iter(stream_bytes), timeout=60)), repeats),
        groups * timed(inprocess_preview_work, repeats))

    # SD3.5-sized latents: codec cost and raw transport of the bytes.
    latents = torch.randn(48, 16, 64, 64).bfloat16() if not args.quick else torch.randn(4, 16, 64, 64).bfloat16()
    encode_s = timed(lambda: codec.encode(latents), repeats)
    msg = codec.encode(latents)
    wire = msg.SerializeToString()
    decode_s = timed(lambda: codec.to_torch(tensor_pb2.Tensor.FromString(wire)), repeats)
    echo_s = timed(lambda: echo_unary(wire, timeout=60), repeats)
    mb = len(wire) / 1e6

    print(f"transport benchmark: median of {repeats} calls, sync client, grpc.aio + uvloop servers, "
          f"grpcio {grpc.__version__}")
    print("| RPC | request bytes | RPC ms | echo ms | in-process compute ms | overhead ratio | MB/s |")
    print("|---|---|---|---|---|---|---|")
    for name, size, rpc_s, echo_s_, compute_s in rows:
        ratio = rpc_s / (echo_s_ + compute_s)
        print(f"| {name} | {size:,} | {rpc_s * 1e3:.2f} | {echo_s_ * 1e3:.2f} | {compute_s * 1e3:.2f} | "
              f"{ratio:.2f} | {size / rpc_s / 1e6:.1f} |")
    print(f"\nSD3.5 latents {tuple(latents.shape)} bf16 = {mb:.1f} MB: encode {encode_s * 1e3:.2f} ms, "
          f"parse+decode {decode_s * 1e3:.2f} ms, bare echo {echo_s * 1e3:.2f} ms ({mb / echo_s:.0f} MB/s); "
          f"codec share of an echo: {(encode_s + decode_s) / echo_s:.2f}")
    echo_channel.close()
    servers.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
