"""The trainer SIGKILLed mid-iteration, resumed from its last checkpoint, ends exactly where an
uninterrupted run ends: same parameters (bit for bit) and the same per-iteration metrics."""

import json
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

TIMING = {"iteration_s", "rollout_s", "train_s", "wall_seconds", "step_s"}


def train(out, services, *extra):
    reward, pruner = services
    return [sys.executable, "-m", "epgrpo.trainer.cli", "train", "model.pretrain_steps=3", "train.iterations=4",
            "train.checkpoint_every=1", "train.prompts_per_iteration=2", "prune.group_size=6", "prune.steps=[2,3]",
            "prune.keeps=[4,2]", "sampling.num_steps=5", "eval.every=0", "eval.samples_per_prompt=1", "reward.judge=",
            "launch_services=false", f"reward.address={reward.address}", f"pruner.address={pruner.address}", f"out_dir={out}",
            "progress=false", *extra]


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow
def test_sigkill_mid_iteration_then_resume_equals_uninterrupted(tmp_path, services):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(train(whole, services), check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(train(killed, services), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoints" / "iter_000002" / "state.json").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # during iteration 3: no chance to clean up
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists()

    done = subprocess.run(train(killed, services, "train.resume_from=latest"), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(whole / "policy.safetensors"), load_file(killed / "policy.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert metrics(killed) == metrics(whole) and len(metrics(whole)) == 4
