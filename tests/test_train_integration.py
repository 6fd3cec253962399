"""End to end: real reward and pruner servers on free ports, real clients, short training runs."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from epgrpo.trainer.clients import PrunerClient

from epgrpo.trainer.reward_client import RewardClient
from epgrpo.trainer.config import load_config
from epgrpo.trainer.loop import Trainer


def small_config(tmp_path, *overrides):
    return load_config(None, [
        "prune.group_size=8", "prune.steps=[2,4]", "prune.keeps=[4,2]", "sampling.num_steps=6",
        "train.iterations=2", "train.prompts_per_iteration=3", "eval.samples_per_prompt=2", "eval.every=1",
        f"out_dir={tmp_path}", "launch_services=false", "progress=false", *overrides,
    ])


def run(config, policy, reward, pruner):
    reward_client, pruner_client = RewardClient(reward.address), PrunerClient(pruner.address)
    try:
        path = Trainer(config, policy, reward_client, pruner_client).run()
    finally:
        reward_client.close()
        pruner_client.close()
    return json.loads(path.read_text()), [json.loads(line) for line in (path.parent / "metrics.jsonl").open()]


def test_expand_and_prune_training_through_grpc(services, tiny_policy_factory, tmp_path):
    reward, pruner = services
    summary, metrics = run(small_config(tmp_path), tiny_policy_factory(), reward, pruner)
    per_group = 8 * 3 + 4 * 2 + 2 * 1  # steps 0-2 with 8, 3-4 with 4, 5 with 2
    assert summary["iterations"] == 2 and len(metrics) == 2
    assert summary["nfe_used"] == 2 * 3 * per_group
    assert summary["nfe_full_group"] == 2 * 3 * 8 * 6
    for m in metrics:
        assert m["survivors_per_step"] == [24, 24, 24, 12, 12, 6] and m["kept"] == 6
        assert m["ratio_mean"] == 1.0 and "skipped" not in m
    for key in ("reward_first", "reward_last", "judge_first", "judge_last"):  # digit probabilities
        assert 0 <= summary[key] <= 1, (key, summary[key])
    assert summary["wall_seconds"] > 0
    for name in ("summary.json", "eval.jsonl", "reward_curve.png", "samples_first.png", "samples_last.png",
                 "policy.safetensors", "config.json"):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tensorboard").iterdir())
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 3  # before, after 1, after 2


@pytest.mark.parametrize("mode, kept, nfe", [("grpo", 3 * 8, 3 * 8 * 6), ("full_ovf", 3 * 2, 3 * 8 * 6),
                                             ("random_prune", 3 * 2, 3 * (8 * 3 + 4 * 2 + 2))])
def test_ablation_modes(services, tiny_policy_factory, tmp_path, mode, kept, nfe):
    reward, pruner = services
    summary, metrics = run(small_config(tmp_path, f"prune.mode={mode}", "train.iterations=1", "eval.every=0"),
                           tiny_policy_factory(), reward, pruner)
    assert metrics[0]["kept"] == kept and metrics[0]["nfe"] == nfe
    assert summary["nfe_used"] == nfe


def test_missing_reward_fails_before_any_work(services, tiny_policy_factory, tmp_path):
    reward, pruner = services
    config = small_config(tmp_path, "reward.rewards=pickscore:1")
    with pytest.raises(ValueError, match="reward.rewards: reward service does not serve pickscore"):
        run(config, tiny_policy_factory(), reward, pruner)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_main_job_starts_services_trains_and_prints_summary_path(tmp_path):
    """`epgrpo train` as users run it: services as local processes on free ports."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "epgrpo.trainer.cli", "train", "model.pretrain_steps=3", "train.iterations=1",
         "train.prompts_per_iteration=2", "prune.group_size=4", "prune.steps=[1]", "prune.keeps=[2]",
         "sampling.num_steps=4", "eval.samples_per_prompt=1", f"out_dir={out}", "progress=false"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line == str(out / "summary.json")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nfe_used"] == 2 * (4 * 2 + 2 * 2) and summary["nfe_full_group"] == 2 * 4 * 4
    logs = {p.name: p.read_text() for p in (out / "services").iterdir()}
    assert set(logs) == {"reward.log", "pruner.log"}


def _alive(pid: int) -> bool:
    try:  # a zombie (state Z) has exited; only its exit status is left
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux /proc)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(c) for c in text)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find child processes")
def test_sigterm_to_the_trainer_stops_the_services_it_launched(tmp_path):
    """A trainer stopped with SIGTERM (a scheduler, Kubernetes) takes its launched services with it."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "epgrpo.trainer.cli", "train", "model.pretrain_steps=3", "train.iterations=1000",
         "train.prompts_per_iteration=2", "prune.group_size=4", "prune.steps=[1]", "prune.keeps=[2]",
         "sampling.num_steps=4", "eval.samples_per_prompt=1", f"out_dir={out}", "progress=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists():  # both services serve once an iteration is written
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:] if proc.poll() else ""
            time.sleep(0.2)
        services = _children(proc.pid)
        assert len(services) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(map(_alive, services)):
            assert time.monotonic() < deadline, f"services {services} outlived the trainer"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
