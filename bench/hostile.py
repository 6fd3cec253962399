"""Hostile clients against a reward service (token, memory budget) and a pruner, as real processes on
loopback: the bombs and floods of ``soak.py --flood``. Each case reports the service's RSS before,
at its peak (sampled every 10 ms) and after, against its budget, the status the attacker got, and
whether an authenticated call and a health check were answered meanwhile.

Requests are written as wire bytes where building them as messages would cost the client more
than the server (15 M prompts: 75 MiB of bytes here, ~1 GiB of Python strings)."""

from __future__ import annotations

import gzip
import secrets
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from epgrpo.protos import codec
from epgrpo.protos.oip_codec import encode_bytes
from epgrpo.protos.v1 import oip_pb2, pruner_pb2, reward_pb2, tensor_pb2
from epgrpo.trainer.launch import LocalService

MiB = 2**20
SCORE = "/epgrpo.v1.RewardService/Score"
INFER = "/inference.GRPCInferenceService/ModelInfer"
CHECK, WATCH = "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"
PRUNE = "/epgrpo.v1.PrunerService/Prune"
JPEG = [tensor_pb2.RewardSpec(name="jpeg_compressibility", weight=1.0)]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _small_images(n: int = 4) -> bytes:
    images = reward_pb2.ScoreRequest(images=codec.encode(np.zeros((n, 8, 8, 3), np.uint8)), rewards=JPEG)
    return images.SerializeToString()


class Watcher:
    """Peak RSS of a process, and whether health checks answered meanwhile."""

    def __init__(self, pid: int, address: str):
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.pid, self.peak, self.bad, self.checks, self.stop = pid, rss_mib(pid), [], 0, threading.Event()
        channel = grpc.insecure_channel(address)
        stub = health_pb2_grpc.HealthStub(channel)

        def sample():
            next_check = 0.0
            while not self.stop.is_set():
                self.peak = max(self.peak, rss_mib(pid))
                if time.monotonic() > next_check:
                    next_check = time.monotonic() + 0.2
                    try:
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=3)
                        self.checks += 1
                    except grpc.RpcError as e:
                        self.bad.append(e.code().name)
                time.sleep(0.01)
            channel.close()

        self.thread = threading.Thread(target=sample)
        self.thread.start()

    def finish(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak


def _attempt(fn) -> str:
    try:
        fn()
        return "OK"
    except grpc.RpcError as e:
        return f"{e.code().name}: {(e.details() or '')[:90]}"


def reward_cases(channel: grpc.Channel, auth) -> dict:
    """name -> callable returning the attacker's outcome (run while RSS is sampled)."""
    unary = lambda method: channel.unary_unary(method)  # noqa: E731 - raw bytes in and out
    health_name = lambda n: _field(1, b"a" * n)  # noqa: E731 - HealthCheckRequest.service

    def watchers(count: int, name_bytes: int):
        def run():
            calls = [channel.unary_stream(WATCH)(health_name(name_bytes), timeout=60) for _ in range(count)]
            outcomes = [_attempt(lambda c=c: next(c)) for c in calls]
            time.sleep(0.5)
            for c in calls:
                c.cancel()
            refused = sum(o != "OK" for o in outcomes)
            if refused:
                raise_first = next(o for o in outcomes if o != "OK")
                return f"{count - refused} open, {refused} refused ({raise_first})"
            return f"{count} open"
        return run

    def gzip_check():
        return _attempt(lambda: unary(CHECK)(health_name(60 * MiB), timeout=30, compression=grpc.Compression.Gzip))

    def gzip_scores():
        request = reward_pb2.ScoreRequest(images=codec.encode(np.zeros((80, 512, 512, 3), np.uint8)), prompts=[""] * 80,
                                          rewards=JPEG).SerializeToString()
        print(f"  (gzip Score: {len(request) / MiB:.0f} MiB, {len(gzip.compress(request, 1)) / MiB:.2f} MiB gzipped)")
        futures = [unary(SCORE).future(request, timeout=60, metadata=auth, compression=grpc.Compression.Gzip)
                   for _ in range(2)]
        return "; ".join(_attempt(f.result) for f in futures)

    def prompts():  # 15 M two-character prompts: 57 MiB on the wire
        return _attempt(lambda: unary(SCORE)(_small_images() + _field(2, b"ab") * 15_000_000, timeout=60,
                                             metadata=auth))

    def metadata():  # 5 M one-field metadata entries: 48 MiB
        entry = _field(3, _field(1, _field(1, b"a") + _field(2, b"b")))
        return _attempt(lambda: unary(SCORE)(_small_images() + entry * 5_000_000, timeout=60, metadata=auth))

    def oip_bytes():  # 12 M BYTES elements for 2 images
        tensor = oip_pb2.ModelInferRequest.InferInputTensor
        request = oip_pb2.ModelInferRequest(model_name="jpeg_compressibility", inputs=[
            tensor(name="IMAGES", datatype="UINT8", shape=[2, 8, 8, 3]),
            tensor(name="PROMPTS", datatype="BYTES", shape=[12_000_000])],
            raw_input_contents=[bytes(2 * 8 * 8 * 3), encode_bytes([b""] * 12_000_000)])
        return _attempt(lambda: unary(INFER)(request.SerializeToString(), timeout=60, metadata=auth))

    def oip_typed():  # a valid request of typed uint_contents: 16 x 512 x 512 x 3 values, ~48 MiB
        images = np.random.default_rng(0).integers(1, 128, (16, 512, 512, 3), dtype=np.uint8)
        request = oip_pb2.ModelInferRequest(model_name="jpeg_compressibility")
        request.inputs.add(name="IMAGES", datatype="UINT8", shape=list(images.shape))
        request.inputs[0].contents.uint_contents.extend(images.reshape(-1).tolist())
        return _attempt(lambda: unary(INFER)(request.SerializeToString(), timeout=120, metadata=auth))

    return {"256 idle Health.Watch, no token": watchers(256, 8),
            "40 Health.Watch of 16 MiB names, no token": watchers(40, 16 * MiB),
            "gzip Health.Check inflating to 60 MiB, no token": gzip_check,
            "2 gzip Score of 60 MiB (0.26 MiB sent)": gzip_scores,
            "Score of 15 M two-character prompts (57 MiB)": prompts,
            "Score of 5 M metadata entries (48 MiB)": metadata,
            "OIP BYTES of 12 M elements": oip_bytes,
            "OIP typed uint_contents, 12.6 M values (valid)": oip_typed}


def pruner_cases(channel: grpc.Channel) -> dict:
    unary = channel.unary_unary(PRUNE)

    def request(n: int, prompt: str, ids=None) -> bytes:
        return pruner_pb2.PruneRequest(checkpoint=pruner_pb2.GroupCheckpoint(
            group_id="g", step=1, trajectory_ids=list(range(n)) if ids is None else ids,
            previews=codec.encode(np.zeros((n, 1, 2, 2), np.float32)), prompts=[prompt]),
            keep=2, proxy_rewards=JPEG).SerializeToString()

    return {"Prune: 256 trajectories, one 2 MiB prompt": lambda: _attempt(
                lambda: unary(request(256, "x" * (2 * MiB)), timeout=60)),
            "Prune: 1,024 trajectories, one 16 k-character prompt": lambda: _attempt(
                lambda: unary(request(1024, "y" * 16384), timeout=60)),
            "Prune: 5 M trajectory ids": lambda: _attempt(
                lambda: unary(request(2, "z", ids=list(range(5_000_000))), timeout=60))}


def run(log_dir: Path, budget_mib: float = 512, pruner_budget_mib: float = 256) -> list[dict]:
    """Every case against fresh services; one row per case."""
    token = secrets.token_hex(16)
    auth = (("authorization", f"Bearer {token}"),)
    reward = LocalService("reward", "epgrpo.services.reward.main",
                          ["--rewards", "jpeg_compressibility", "--device", "cpu", "--torch-threads", "1",
                           "--max-inflight-mb", str(budget_mib), "--log-level", "ERROR"], log_dir,
                          env={"EPGRPO_TOKEN": token})
    pruner = LocalService("pruner", "epgrpo.services.pruner.main",
                          ["--reward-address", reward.address, "--max-inflight-mb", str(pruner_budget_mib),
                           "--log-level", "ERROR"], log_dir, env={"EPGRPO_REWARD_TOKEN": token})
    rows = []
    options = [("grpc.max_send_message_length", 256 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
    try:
        with grpc.insecure_channel(reward.address, options=options) as rc, \
                grpc.insecure_channel(pruner.address, options=options) as pc:
            small = reward_pb2.ScoreRequest(images=codec.encode(np.zeros((2, 16, 16, 3), np.uint8)), prompts=["", ""],
                                            rewards=JPEG).SerializeToString()
            authenticated = lambda: rc.unary_unary(SCORE)(small, timeout=10, metadata=auth)  # noqa: E731
            for service, budget, cases in ((reward, budget_mib, reward_cases(rc, auth)),
                                           (pruner, pruner_budget_mib, pruner_cases(pc))):
                for name, case in cases.items():
                    time.sleep(0.3)
                    pid = service.process.pid
                    start = rss_mib(pid)
                    watcher = Watcher(pid, service.address)
                    began = time.perf_counter()
                    outcome = case()
                    seconds = time.perf_counter() - began
                    beside = _attempt(authenticated)
                    peak = watcher.finish()
                    time.sleep(0.5)
                    rows.append({"service": service.name, "case": name, "budget_mib": budget, "rss_start_mib": start,
                                 "rss_peak_mib": peak, "rss_after_mib": rss_mib(pid), "seconds": seconds,
                                 "outcome": outcome, "authenticated_score": beside.split(":")[0],
                                 "health": f"{watcher.checks} OK" + (f", {len(watcher.bad)} failed {set(watcher.bad)}"
                                                                     if watcher.bad else "")})
                    print(f"  {service.name}: {name}: peak +{peak - start:.0f} MiB, {outcome[:100]}", flush=True)
    finally:
        pruner.stop()
        reward.stop()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| service | case | budget MiB | RSS start → peak → after MiB | s | attacker got | authenticated Score "
             "after | health checks |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['service']} | {r['case']} | {r['budget_mib']:.0f} | {r['rss_start_mib']:.0f} → "
                     f"{r['rss_peak_mib']:.0f} → {r['rss_after_mib']:.0f} | {r['seconds']:.1f} | "
                     f"{r['outcome'][:140]} | {r['authenticated_score']} | {r['health']} |")
    return "\n".join(lines)
