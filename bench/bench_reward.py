"""Reward service benchmark: the same backend called in-process, over gRPC, and over gRPC with
dynamic batching, and over gRPC with ``--workers N`` (CPU rewards scoring requests in parallel), at
1, 4 and 8 concurrent clients, side by side in one run.

    python bench/bench_reward.py            # full: 4 s per cell, about 1.5 minutes
    python bench/bench_reward.py --quick    # a smoke run (tests/test_bench_reward.py)

Backends: ``clip`` (CLIPScore on a small random CLIP saved to a temp dir: a model-based reward
whose per-call overhead dominates, like any model at small batch) and ``jpeg`` (JPEG
compressibility: cheap, per-image PIL work). Both servers are child processes started with the
real CLI (``epgrpo-reward``), one without and one with ``--batch-max-size``; clients are grpc.aio
calls from this process, each with its own channel and its own images. In-process clients are
threads sharing one backend object, calls serialised by a lock (the service never runs two model
calls at once either), so "gRPC / in-process" is the transport's cost. Ratios come from one run;
absolute numbers depend on the machine (printed in the header).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from epgrpo.protos import codec
from epgrpo.protos.v1 import reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.services.reward.backends.tiny_clip import save_tiny_clip
from epgrpo.services.reward.batching import DynamicBatcher
from epgrpo.services.reward.config import build_backend, parse_spec



@dataclass
class Cell:
    backend: str
    clients: int
    mode: str
    requests: int
    images: int
    seconds: float
    latencies_ms: np.ndarray

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


def client_inputs(clients: int, per_request: int, size: int, seed: int) -> list[tuple[np.ndarray, list[str]]]:
    """Distinct smooth images and a prompt per client; a request is a group sharing its prompt
    (smooth images: JPEG sizes like real images')."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(clients):
        coarse = rng.integers(0, 256, (per_request, 8, 8, 3)).astype(np.uint8)
        images = np.repeat(np.repeat(coarse, size // 8, axis=1), size // 8, axis=2)
        noise = rng.integers(-8, 9, images.shape)
        images = np.clip(images.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        out.append((images, [f"a photo of object {c}"] * per_request))  # a GRPO group: one prompt
    return out


class ServerProcess:
    """``python -m epgrpo.services.reward.main`` on a free port, logs to a file."""

    def __init__(self, workdir: Path, name: str, rewards: str, extra: list[str]):
        self.port_file, self.log_path = workdir / f"{name}.port", workdir / f"{name}.log"
        command = [sys.executable, "-m", "epgrpo.services.reward.main", "--port", "0", "--port-file", str(self.port_file),
                   "--rewards", rewards, "--device", "cpu", "--torch-threads", "1", "--log-level", "WARNING", *extra]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def wait_address(self, timeout_s: float = 120.0) -> str:
        deadline = time.monotonic() + timeout_s
        while not self.port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"reward server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        return f"127.0.0.1:{int(self.port_file.read_text())}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_in_process(backend, inputs, seconds: float, warmup: int) -> tuple[int, int, float, list[float]]:
    """Client threads submit to one worker thread (FIFO, like the service's executor) and wait."""
    worker = ThreadPoolExecutor(max_workers=1)
    latencies: list[list[float]] = [[] for _ in inputs]
    for images, prompts in inputs[:1] * warmup:
        backend.score(images, prompts)
    start_barrier = threading.Barrier(len(inputs) + 1)
    stop_at = time.perf_counter() + seconds + 3600  # set for real once every thread is ready

    def client(k: int) -> None:
        images, prompts = inputs[k]
        start_barrier.wait()
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            worker.submit(backend.score, images, prompts).result()
            latencies[k].append(1000 * (time.perf_counter() - t0))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    stop_at = time.perf_counter() + seconds
    t_start = time.perf_counter()
    start_barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    worker.shutdown()
    requests = sum(len(x) for x in latencies)
    return requests, sum(len(x) * len(inputs[k][0]) for k, x in enumerate(latencies)), elapsed, [v for x in latencies for v in x]


async def run_in_process_batched(backend, inputs, seconds: float, warmup: int, max_size: int,
                                 delay_ms: float) -> tuple[int, int, float, list[float]]:
    """Coroutine clients submit to the service's DynamicBatcher directly: batching without transport."""
    worker = ThreadPoolExecutor(max_workers=1)
    batcher = DynamicBatcher(lambda im, pr, md: backend.score(im, pr, md), max_size, delay_ms / 1000, worker)
    for images, prompts in inputs[:1] * warmup:
        await batcher.submit(images, prompts, [])
    latencies: list[float] = []
    images_done = [0]
    stop_at = time.perf_counter() + seconds

    async def client(images, prompts) -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await batcher.submit(images, prompts, [])
            latencies.append(1000 * (time.perf_counter() - t0))
            images_done[0] += len(images)

    t_start = time.perf_counter()
    await asyncio.gather(*(client(im, pr) for im, pr in inputs))
    elapsed = time.perf_counter() - t_start
    await batcher.close()
    worker.shutdown()
    return len(latencies), images_done[0], elapsed, latencies


async def run_grpc(address: str, reward: str, inputs, seconds: float, warmup: int) -> tuple[int, int, float, list[float]]:
    channels = [grpc.aio.insecure_channel(address) for _ in inputs]
    stubs = [reward_pb2_grpc.RewardServiceStub(c) for c in channels]
    spec = [tensor_pb2.RewardSpec(name=reward, weight=1.0)]
    requests = [reward_pb2.ScoreRequest(images=codec.encode(im), prompts=pr, rewards=spec) for im, pr in inputs]
    for stub, request in zip(stubs, requests):
        for _ in range(warmup):
            await stub.Score(request, timeout=60)
    latencies: list[float] = []
    images = [0]
    stop_at = time.perf_counter() + seconds

    async def client(stub, request, n: int) -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await stub.Score(request, timeout=60)
            latencies.append(1000 * (time.perf_counter() - t0))
            images[0] += n

    t_start = time.perf_counter()
    await asyncio.gather(*(client(s, r, len(im)) for s, r, (im, _) in zip(stubs, requests, inputs)))
    elapsed = time.perf_counter() - t_start
    for c in channels:
        await c.close()
    return len(latencies), images[0], elapsed, latencies


def format_table(cells: list[Cell]) -> str:
    index = {(c.backend, c.clients, c.mode): c for c in cells}
    header = (f"{'backend':8} {'clients':>7} {'mode':22} {'req/s':>8} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'x in-proc':>9} {'x grpc':>7}")
    lines = [header, "-" * len(header)]
    for c in cells:
        base, unbatched = index[(c.backend, c.clients, "in-process")], index[(c.backend, c.clients, "grpc")]
        lines.append(f"{c.backend:8} {c.clients:>7} {c.mode:22} {c.rps:>8.1f} {c.images / c.seconds:>8.1f} "
                     f"{c.pct(50):>8.2f} {c.pct(99):>8.2f} {c.rps / base.rps:>9.2f} {c.rps / unbatched.rps:>7.2f}")
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, Python {platform.python_version()}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works (numbers meaningless)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell (default %(default)s)")
    parser.add_argument("--clients", default="1,4,8", help="concurrent clients, comma-separated (default %(default)s)")
    parser.add_argument("--images-per-request", type=int, default=4, help="images in each request (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=64, help="square image side in pixels (default %(default)s)")
    parser.add_argument("--batch-max-size", type=int, default=64, help="the batching server's --batch-max-size")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="a server with --workers N next to the 1-worker one (default: the CPU count)")
    parser.add_argument("--batch-max-delay-ms", default="0,2",
                        help="one batching server per value of its --batch-max-delay-ms, comma-separated (default "
                        "%(default)s; 0 merges only what queued while the model was busy)")
    args = parser.parse_args(argv)
    args.delays = [float(d) for d in args.batch_max_delay_ms.split(",")]
    if args.quick:
        args.seconds, args.delays = min(args.seconds, 0.3), args.delays[:1]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as the servers (--torch-threads 1): same compute budget per model call
    clients = [int(c) for c in args.clients.split(",")]
    warmup = 1 if args.quick else 3
    with tempfile.TemporaryDirectory(prefix="bench-reward-") as tmp:
        workdir = Path(tmp)
        clip_dir = save_tiny_clip(workdir / "clip")  # the tests' tiny CLIP: 32 px, 2+2 layers of width 32
        rewards = f"clip=clipscore:path={clip_dir},jpeg=jpeg_compressibility"
        servers = {"grpc": ServerProcess(workdir, "plain", rewards, [])}
        if args.workers > 1:
            servers[f"grpc, {args.workers} workers"] = ServerProcess(workdir, "workers", rewards,
                                                                    ["--workers", str(args.workers)])
        for delay in args.delays:
            servers[f"grpc+batch {delay:g}ms"] = ServerProcess(workdir, f"batching-{delay:g}", rewards, [
                "--batch-max-size", str(args.batch_max_size), "--batch-max-delay-ms", str(delay)])
        try:
            addresses = {mode: server.wait_address() for mode, server in servers.items()}
            backends = {entry.name: build_backend(entry, "cpu") for entry in parse_spec(rewards)}
            print(f"# reward benchmark: {machine()}; torch threads 1 per model; {args.images_per_request} images "
                  f"of {args.image_size}x{args.image_size} (one prompt) per request; {args.seconds:g} s per cell; "
                  f"batching servers: --batch-max-size {args.batch_max_size}, --batch-max-delay-ms as in the mode")
            cells = []
            for reward in ("clip", "jpeg"):
                for n in clients:
                    inputs = client_inputs(n, args.images_per_request, args.image_size, seed=n)
                    batch_local = f"in-process+batch {args.delays[0]:g}ms"
                    for mode in ["in-process", batch_local, *servers]:
                        if mode == "in-process":
                            result = run_in_process(backends[reward], inputs, args.seconds, warmup)
                        elif mode == batch_local:
                            result = asyncio.run(run_in_process_batched(backends[reward], inputs, args.seconds, warmup,
                                                                        args.batch_max_size, args.delays[0]))
                        else:
                            result = asyncio.run(run_grpc(addresses[mode], reward, inputs, args.seconds, warmup))
                        requests, images, elapsed, latencies = result
                        cells.append(Cell(reward, n, mode, requests, images, elapsed, np.asarray(latencies)))
            print(format_table(cells))
        finally:
            for server in servers.values():
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
