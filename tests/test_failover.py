"""Reward replicas dying mid-run: retries with backoff inside a budget, failover, a clean stop.

The replicas are real reward-service processes; SIGKILL gives them no chance to drain.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

from epgrpo.protos.channel import REWARD_SERVICE
from epgrpo.services.pruner.main import build_registrar as pruner_registrar
from epgrpo.trainer.clients import PrunerClient, RetryBudget, ServiceCallError, ServicesUnavailable
from epgrpo.trainer.reward_client import RewardClient
from epgrpo.trainer.config import load_config
from epgrpo.trainer.launch import LocalService
from epgrpo.trainer.loop import Trainer


class FakeError(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "injected"


class FakeTime:
    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s


def failing(codes, result="ok"):
    """fn(limit) failing with ``codes`` in turn, then returning ``result``; records the limits."""
    calls = []

    def fn(limit):
        calls.append(limit)
        if len(calls) <= len(codes):
            raise ServiceCallError("reward", "Score", FakeError(codes[len(calls) - 1]))
        return result

    return fn, calls


def test_budget_retries_unavailable_with_growing_bounded_backoff_then_succeeds():
    t = FakeTime()
    budget = RetryBudget(60, initial_backoff_s=0.5, max_backoff_s=2.0, sleep=t.sleep, clock=lambda: t.now)
    fn, calls = failing([grpc.StatusCode.UNAVAILABLE] * 3 + [grpc.StatusCode.DEADLINE_EXCEEDED])
    assert budget.call(fn, "score") == "ok"
    assert t.sleeps == [0.5, 1.0, 2.0, 2.0] and budget.retries == 4
    assert calls[0] is None and all(0 < limit <= 60 for limit in calls[1:])  # retries' deadlines are clamped


def test_budget_gives_up_after_its_total_time_with_a_clear_error():
    t = FakeTime()
    budget = RetryBudget(10, initial_backoff_s=1, max_backoff_s=4, sleep=t.sleep, clock=lambda: t.now)
    fn, calls = failing([grpc.StatusCode.UNAVAILABLE] * 100)
    with pytest.raises(ServicesUnavailable, match=r"iteration 3: gave up after \d+ attempts over the 10 s retry "
                                                  r"budget; last error: reward.Score failed: UNAVAILABLE: injected"):
        budget.call(fn, "iteration 3")
    assert sum(t.sleeps) == pytest.approx(10) and t.now == pytest.approx(10)


def test_budget_does_not_retry_errors_that_would_repeat():
    t = FakeTime()
    budget = RetryBudget(10, sleep=t.sleep, clock=lambda: t.now)
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        fn, calls = failing([code])
        with pytest.raises(ServiceCallError):
            budget.call(fn, "x")
        assert len(calls) == 1 and t.sleeps == []


# -- real replicas --------------------------------------------------------------------------------
def start_replica(name: str, log_dir: Path) -> LocalService:
    metrics_port = free_port()
    service = LocalService(name, "epgrpo.services.reward.main",
                           ["--rewards", "digit,digit_judge", "--device", "cpu", "--torch-threads", "1",
                            "--metrics-port", str(metrics_port)], log_dir)
    service.metrics_port = metrics_port
    return service


def scored(replica: LocalService) -> float:
    """Score calls a replica has answered OK, from its /metrics endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{replica.metrics_port}/metrics", timeout=5).read().decode()
    key = f'epgrpo_grpc_requests_total{{code="OK",method="Score",service="{REWARD_SERVICE}"}}'
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(key)), 0.0)


def kill_after_first_iteration(out: Path, victim: LocalService, before_kill=lambda: None) -> dict:
    """Starts a thread that SIGKILLs ``victim`` as soon as iteration 1 is in metrics.jsonl."""
    seen: dict = {}

    def watch():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip():
                before_kill()
                victim.kill()
                seen["killed_at"] = time.monotonic()
                return
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return seen


def tiny_config(out: Path, *overrides: str):
    return load_config(None, [
        "prune.group_size=8", "prune.steps=[2,4]", "prune.keeps=[4,2]", "sampling.num_steps=6",
        "train.prompts_per_iteration=3", "eval.samples_per_prompt=1", "eval.every=0",
        f"out_dir={out}", "launch_services=false", "progress=false", *overrides,
    ])


@pytest.mark.slow
def test_sigkilled_replica_mid_run_loses_and_repeats_no_iteration(tmp_path, background_server, tiny_policy_factory):
    a, b = start_replica("reward-a", tmp_path / "logs"), start_replica("reward-b", tmp_path / "logs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trainer shares two cores with two replicas: no competing thread pools
    try:
        replicas = f"{a.address},{b.address}"
        pruner = background_server(pruner_registrar(replicas))
        out = tmp_path / "run"
        config = tiny_config(out, "train.iterations=4")
        reward_client = RewardClient(replicas, retry_budget_s=30)
        pruner_client = PrunerClient(pruner.address, retry_budget_s=30)
        traffic = {}
        seen = kill_after_first_iteration(out, b, lambda: traffic.update(a=scored(a), b=scored(b)))
        start = time.monotonic()
        summary = json.loads(Trainer(config, tiny_policy_factory(), reward_client, pruner_client).run().read_text())
        end = time.monotonic()
        reward_client.close()
        pruner_client.close()
        after_a = scored(a)
    finally:
        torch.set_num_threads(threads)
        a.stop()
        b.stop()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert traffic["a"] > 0 and traffic["b"] > 0, traffic  # round robin: both replicas served before the kill
    assert start < seen["killed_at"] < end and b.process.returncode == -9
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]  # each exactly once
    per_iteration = 3 * (8 * 3 + 4 * 2 + 2 * 1)
    assert all(m["nfe"] == per_iteration for m in metrics)
    assert summary["iterations"] == 4 and summary["nfe_used"] == 4 * per_iteration  # nothing counted twice
    assert after_a > traffic["a"]  # the survivor took over
    print(f"\nScore calls before the kill: a={traffic['a']:.0f} b={traffic['b']:.0f}; after: a={after_a:.0f}; "
          f"iteration seconds {[round(m['iteration_s'], 2) for m in metrics]}; "
          f"retries {[m.get('service_retries', 0) for m in metrics]}")


@pytest.mark.slow
def test_all_replicas_dead_beyond_the_budget_saves_and_exits_nonzero(tmp_path, background_server):
    replica = start_replica("reward", tmp_path / "logs")
    try:
        pruner = background_server(pruner_registrar(replica.address))
        out = tmp_path / "run"
        command = [sys.executable, "-m", "epgrpo.trainer.cli", "train", "launch_services=false",
                   f"reward.address={replica.address}", f"pruner.address={pruner.address}",
                   "reward.retry_budget_s=3", "pruner.retry_budget_s=3", "train.iterations=50",
                   "model.pretrain_steps=3", "prune.group_size=4", "prune.steps=[2]", "prune.keeps=[2]",
                   "sampling.num_steps=4", "train.prompts_per_iteration=2", "eval.samples_per_prompt=1",
                   "eval.every=0", f"out_dir={out}", "progress=false"]
        seen = kill_after_first_iteration(out, replica)
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # shares 2 cores with the replica
        exited = time.monotonic()
    finally:
        replica.stop()
    assert proc.returncode == 3, proc.stderr[-3000:]
    stop_s = exited - seen["killed_at"]
    assert stop_s < 3 + 15, stop_s  # the budget, plus the attempt in flight and saving; never a hang
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("epgrpo: error: a service stayed unreachable, stopping: ")
    assert "3 s retry budget" in message and "UNAVAILABLE" in message and "train.resume_from=latest" in message
    completed = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert completed == list(range(1, len(completed) + 1)) and len(completed) >= 1
    saved = out / "checkpoints" / f"iter_{len(completed):06d}"  # a resumable checkpoint of what was completed
    assert str(saved) in message
    state = json.loads((saved / "state.json").read_text())
    assert state["iteration"] == len(completed)
    assert [json.loads(line)["iteration"] for line in (saved / "metrics.jsonl").read_text().splitlines()] == completed
    assert len(load_file(saved / "weights.safetensors")) > 0 and len(load_file(saved / "optimizer.safetensors")) > 0
    assert not (out / "summary.json").exists()
    print(f"\nstopped {stop_s:.1f} s after the last replica died, {len(completed)} iterations saved")
