"""Bounded soak: concurrent clients against the reward and pruner services (loopback only).

Both services run as real processes (the same CLIs users run). For each service, ``--clients``
threads call it back to back for ``--seconds``; reported: calls, errors (any non-OK status),
p50/p99 latency, and the service's resident memory (VmRSS) at start and end. The process exits
non-zero if any call failed.

    python bench/soak.py --seconds 60 --clients 8     # the documented full soak
    python bench/soak.py --seconds 3 --clients 4      # what the test suite runs

``--flood``: instead, a flood of near-limit ``Score`` requests against one reward service
(``jpeg_compressibility``) with its memory budget (``--max-inflight-mb``, default: the service's
own, min(2 GiB, a quarter of RAM)): ``--clients`` threads (default 48) each send 80 images of
512x512 RGB (60 MiB) back to back for ``--seconds``, without backing off. Reported: the service's
RSS before and at its peak against the budget, the statuses, and that the health check answered
SERVING throughout. Then the hostile cases of ``bench/hostile.py`` (skip them with ``--no-hostile``):
unauthenticated Health.Watch floods and 16 MiB names, gzip bombs, requests that expand far past their
wire size (15 M prompts, 5 M metadata entries, 12 M OIP elements, typed OIP contents), and the
pruner's broadcast and id bombs, against a reward service with a token and a 512 MiB budget
(``--hostile-budget-mb``) and a pruner with 256 MiB. Exits non-zero if the peak went past budget +
``--overhead-mb``, health failed, or a hostile case took a service past its budget + overhead.

    python bench/soak.py --flood --seconds 20         # 48 x 60 MiB against the default budget, then the bombs
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from epgrpo.protos import codec
from epgrpo.protos.channel import PRUNER_SERVICE, REWARD_SERVICE, create_channel
from epgrpo.protos.v1 import pruner_pb2, pruner_pb2_grpc, reward_pb2, reward_pb2_grpc, tensor_pb2
from epgrpo.services.common.budget import budget_bytes
from epgrpo.trainer.launch import LocalService, LocalStack


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def hammer(call, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(index: int) -> None:
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                call(index)
                with lock:
                    latencies.append(time.perf_counter() - start)
            except grpc.RpcError as e:
                with lock:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.array(latencies) * 1e3
    return {"calls": len(latencies), "errors": errors, "calls_per_s": len(latencies) / seconds,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None}


def flood(clients: int, seconds: float, max_inflight_mb: float | None, images: int, size: int, log_dir: Path,
          max_message_mb: float | None = None) -> dict:
    """``clients`` threads sending ``images`` x size x size x 3 Score requests back to back for
    ``seconds`` to a fresh reward service; its RSS sampled every 20 ms, its health every 100 ms."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    args = ["--rewards", "jpeg_compressibility", "--device", "cpu", "--torch-threads", "1", "--log-level", "ERROR"]
    if max_inflight_mb is not None:
        args += ["--max-inflight-mb", str(max_inflight_mb)]
    if max_message_mb is not None:
        args += ["--max-message-mb", str(max_message_mb)]
    service = LocalService("reward", "epgrpo.services.reward.main", args, log_dir)
    try:
        pid = service.process.pid
        budget_mib = budget_bytes(max_inflight_mb) / 2**20  # what the service computed (same machine, same env)
        rng = np.random.default_rng(0)
        request = reward_pb2.ScoreRequest(
            images=codec.encode(rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8)),
            prompts=[""] * images, rewards=[tensor_pb2.RewardSpec(name="jpeg_compressibility", weight=1.0)],
        ).SerializeToString()  # once: every call sends these bytes (the client side stays small)
        channels = [grpc.insecure_channel(service.address, options=[("grpc.max_send_message_length", 256 << 20)])
                    for _ in range(4)]  # four connections, like several trainers
        calls = [c.unary_unary("/epgrpo.v1.RewardService/Score") for c in channels]
        probe = grpc.insecure_channel(service.address)  # its own connection, like an orchestrator's probe
        health = health_pb2_grpc.HealthStub(probe)
        small = reward_pb2.ScoreRequest(images=codec.encode(np.zeros((2, 32, 32, 3), np.uint8)), prompts=["", ""],
                                        rewards=[tensor_pb2.RewardSpec(name="jpeg_compressibility", weight=1.0)])
        reward_pb2_grpc.RewardServiceStub(probe).Score(small, timeout=30)  # warm: first-call allocations
        time.sleep(0.2)
        base_rss = rss_mib(pid)
        codes: dict[str, int] = {}
        details: dict[str, str] = {}
        samples: list[float] = []
        health_bad: list[str] = []
        health_ms: list[float] = []
        lock = threading.Lock()
        stop_at = time.monotonic() + seconds
        done = threading.Event()

        def worker(i: int) -> None:
            while time.monotonic() < stop_at:
                try:
                    calls[i % len(calls)](request, timeout=60)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                    details.setdefault(code, e.details())
                with lock:
                    codes[code] = codes.get(code, 0) + 1

        def watch() -> None:
            next_health = 0.0
            while not done.is_set():
                samples.append(rss_mib(pid))
                if time.monotonic() >= next_health:
                    next_health = time.monotonic() + 0.1
                    start = time.perf_counter()
                    try:  # the probe timeout of the repo's healthcheck (compose): 3 s
                        status = health.Check(health_pb2.HealthCheckRequest(), timeout=3).status
                        if status != health_pb2.HealthCheckResponse.SERVING:
                            health_bad.append(str(status))
                    except grpc.RpcError as e:
                        health_bad.append(e.code().name)
                    health_ms.append(1000 * (time.perf_counter() - start))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        watcher.join()
        for c in [*channels, probe]:
            c.close()
        return {"clients": clients, "seconds": seconds, "request_mib": len(request) / 2**20, "budget_mib": budget_mib,
                "rss_start_mib": base_rss, "rss_peak_mib": max(samples), "rss_end_mib": rss_mib(pid),
                "codes": codes, "details": details, "health_failures": health_bad,
                "health_checks": len(health_ms), "health_p50_ms": float(np.percentile(health_ms, 50)),
                "health_max_ms": max(health_ms)}
    finally:
        service.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="duration per service (default %(default)s)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent client threads (default 8; --flood: 48)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    flood_args = parser.add_argument_group("flood mode")
    flood_args.add_argument("--flood", action="store_true", help="flood one reward service with near-limit requests")
    flood_args.add_argument("--max-inflight-mb", type=float, default=None,
                            help="the service's memory budget (default: its own default)")
    flood_args.add_argument("--max-message-mb", type=float, default=None,
                            help="the service's message limit (default: its own default, 64)")
    flood_args.add_argument("--images", type=int, default=80, help="images per request (default %(default)s)")
    flood_args.add_argument("--size", type=int, default=512, help="image side, RGB (default %(default)s)")
    flood_args.add_argument("--no-hostile", action="store_true", help="skip the hostile cases (bench/hostile.py)")
    flood_args.add_argument("--hostile-budget-mb", type=float, default=512.0,
                            help="the reward service's budget in the hostile cases (default %(default)s)")
    flood_args.add_argument("--overhead-mb", type=float, default=256.0,
                            help="RSS allowed above start + budget before the flood counts as failed (default %(default)s)")
    args = parser.parse_args(argv)
    if args.flood:
        with tempfile.TemporaryDirectory() as tmp:
            r = flood(args.clients or 48, args.seconds, args.max_inflight_mb, args.images, args.size, Path(tmp),
                      args.max_message_mb)
        limit = r["rss_start_mib"] + r["budget_mib"] + args.overhead_mb
        print(f"flood: {r['clients']} clients x {r['seconds']:.0f} s of {r['request_mib']:.1f} MiB Score requests, "
              f"loopback, reward service (jpeg_compressibility)")
        print("| budget MiB | RSS start MiB | RSS peak MiB | peak - start MiB | RSS end MiB | statuses | "
              "health (p50 / max ms) |")
        print("|---|---|---|---|---|---|---|")
        print(f"| {r['budget_mib']:.0f} | {r['rss_start_mib']:.0f} | {r['rss_peak_mib']:.0f} | "
              f"{r['rss_peak_mib'] - r['rss_start_mib']:.0f} | {r['rss_end_mib']:.0f} | "
              f"{', '.join(f'{k} {v}' for k, v in sorted(r['codes'].items()))} | "
              f"{'SERVING ' + str(r['health_checks']) + '/' + str(r['health_checks']) if not r['health_failures'] else r['health_failures'][:5]} "
              f"({r['health_p50_ms']:.0f} / {r['health_max_ms']:.0f}) |")
        for code, text in r["details"].items():
            print(f"{code}: {text}")
        failed = r["rss_peak_mib"] > limit or bool(r["health_failures"])
        if not args.no_hostile:
            sys.path.insert(0, str(Path(__file__).parent))
            import hostile

            print("hostile clients (reward: token, --max-inflight-mb "
                  f"{args.hostile_budget_mb:.0f}; pruner: 256 MiB), loopback:")
            with tempfile.TemporaryDirectory() as tmp:
                rows = hostile.run(Path(tmp), args.hostile_budget_mb)
            print(hostile.table(rows))
            r["hostile"] = rows
            failed |= any(row["rss_peak_mib"] > row["rss_start_mib"] + row["budget_mib"] + args.overhead_mb
                          or "failed" in row["health"] for row in rows)
        if args.json:
            args.json.write_text(json.dumps(r, indent=2))
        return 1 if failed else 0
    args.clients = args.clients or 8
    rng = np.random.default_rng(0)
    images = codec.encode(rng.integers(0, 256, (16, 16, 16, 1), dtype=np.uint8))
    previews = codec.encode((rng.random((12, 1, 16, 16), dtype=np.float32) * 2 - 1))
    results = {}
    with tempfile.TemporaryDirectory() as tmp, LocalStack(["digit"], Path(tmp)) as stack:
        reward = reward_pb2_grpc.RewardServiceStub(create_channel(stack.reward.address, [REWARD_SERVICE]))
        pruner = pruner_pb2_grpc.PrunerServiceStub(create_channel(stack.pruner.address, [PRUNER_SERVICE]))
        score_request = reward_pb2.ScoreRequest(images=images, prompts=["a handwritten digit 4"] * 16,
                                                rewards=[tensor_pb2.RewardSpec(name="digit", weight=1.0)])

        def score(i):
            response = reward.Score(score_request, timeout=30)
            assert len(response.scores) == 16

        def rollout(i):
            # one rollout: two groups, previews (decode + reward hop) at step 3, scores at step 6
            messages = [pruner_pb2.PruneStreamRequest(open=pruner_pb2.OpenRollout(
                schedule=[pruner_pb2.Checkpoint(step=3, keep=6), pruner_pb2.Checkpoint(step=6, keep=3)],
                num_steps=10, proxy_rewards=[tensor_pb2.RewardSpec(name="digit", weight=1.0)]))]
            for g in ("a", "b"):
                messages.append(pruner_pb2.PruneStreamRequest(checkpoint=pruner_pb2.GroupCheckpoint(
                    group_id=g, step=3, trajectory_ids=list(range(12)), previews=previews,
                    prompts=["a handwritten digit 4"])))
            decisions = []
            requests = iter(messages)
            responses = pruner.PruneRollout(requests, timeout=30)
            for _ in range(2):
                decisions.append(next(responses))
            responses.cancel()  # a client that goes away mid-rollout: the session must be dropped
            assert all(len(d.survivor_ids) == 6 for d in decisions)

        for name, call, pid in (("reward.Score (16 images)", score, stack.reward.process.pid),
                                ("pruner.PruneRollout (2 groups x 12 previews, then vanishes)", rollout,
                                 stack.pruner.process.pid)):
            hammer(call, args.clients, min(2.0, args.seconds))  # warm-up: caches, first allocations
            start_rss = rss_mib(pid)
            result = hammer(call, args.clients, args.seconds)
            result.update(rss_start_mib=start_rss, rss_end_mib=rss_mib(pid))
            results[name] = result
    print(f"soak: {args.clients} concurrent clients x {args.seconds:.0f} s per service, loopback")
    print("| service | calls | calls/s | errors | p50 ms | p99 ms | RSS start MiB | RSS end MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['calls']} | {r['calls_per_s']:.0f} | {sum(r['errors'].values())} {r['errors'] or ''} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rss_start_mib']:.0f} | {r['rss_end_mib']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if any(r["errors"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
