"""Bounded soak: concurrent clients against the reward and pruner services (loopback only).

Both services run as real processes (the same CLIs users run). For each service, ``--clients``
threads call it back to back for ``--seconds``; reported: calls, errors (any non-OK status),
p50/p99 latency, and the service's resident memory (VmRSS) at start and end. The process exits
non-zero if any call failed.

    python bench/soak.py --seconds 60 --clients 8     # the documented full soak
    python bench/soak.py --seconds 3 --clients 4      # what the test suite runs
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
from epgrpo.trainer.launch import LocalStack


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="duration per service (default %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
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
