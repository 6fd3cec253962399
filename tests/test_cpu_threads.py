"""CPU threads of the trainer and the services (protos/cpu_threads.py): idle OpenMP threads sleep
(OMP_WAIT_POLICY=PASSIVE) and thread counts follow the cores a process may use, unless the user
chose; read back from real child processes (libgomp's own OMP_DISPLAY_ENV report, the child's
environment, torch.get_num_threads in the child)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from epgrpo.protos import cpu_threads
from epgrpo.trainer.launch import LocalStack

OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "EPGRPO_SERVICE_TORCH_THREADS",
                 "LOCAL_WORLD_SIZE")


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def libgomp_spin_count(text: str) -> int:
    """The spin count libgomp settled on when it loaded (OMP_DISPLAY_ENV=VERBOSE): 0 = passive."""
    counts = re.findall(r"GOMP_SPINCOUNT = '(\d+)'", text)
    assert counts, f"no OMP_DISPLAY_ENV report in: {text[-2000:]}"
    return int(counts[0])


def logged_threads(text: str) -> int:
    found = re.findall(r"torch intra-op threads: (\d+)", text)
    assert found, f"no thread report in: {text[-2000:]}"
    return int(found[-1])


@pytest.fixture
def clean_env(monkeypatch):
    """No OpenMP choices of the user (the developer's shell may export some)."""
    for name in OMP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_DISPLAY_ENV", "VERBOSE")  # libgomp reports its settings on stderr when it loads
    return monkeypatch


# ---- the policy, pure ----

def test_wait_policy_defaults_to_passive_unless_the_user_chose():
    env = {}
    cpu_threads.default_wait_policy(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        env = dict(chosen)
        cpu_threads.default_wait_policy(env)
        assert env == chosen


def test_cgroup_quota_caps_the_usable_cores(tmp_path):
    assert cpu_threads.cgroup_cpu_limit(tmp_path) is None  # no cgroup files: no limit
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_threads.cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_threads.cgroup_cpu_limit(tmp_path) == 1.5
    assert cpu_threads.usable_cores({}, tmp_path) == min(affinity(), 2)  # 1.5 cores: 2 threads
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert cpu_threads.usable_cores({}, tmp_path) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_threads.cgroup_cpu_limit(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert cpu_threads.cgroup_cpu_limit(v1) == 3.0


def test_thread_counts_follow_affinity_ranks_and_the_user(tmp_path):
    no_cgroup = tmp_path  # an empty directory: no quota
    assert cpu_threads.usable_cores({}, no_cgroup) == affinity()
    assert cpu_threads.usable_cores({"LOCAL_WORLD_SIZE": str(2 * affinity())}, no_cgroup) == 1  # never 0
    if not (Path("/sys/fs/cgroup/cpu.max").exists() or Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists()):
        assert cpu_threads.process_threads(0, {}) == affinity()
        assert cpu_threads.service_threads({}) == max(1, affinity() // 2)
    assert cpu_threads.process_threads(3, {"OMP_NUM_THREADS": "5"}) == 3  # a flag given by the user
    assert cpu_threads.process_threads(0, {"OMP_NUM_THREADS": "5"}) == 5  # even beyond the cores
    assert cpu_threads.process_threads(0, {"OMP_NUM_THREADS": "4,2"}) == 4  # nested levels: the first
    assert cpu_threads.service_threads({"OMP_NUM_THREADS": "5"}) is None  # the services inherit it
    assert cpu_threads.service_threads({"OMP_NUM_THREADS": "5", "EPGRPO_SERVICE_TORCH_THREADS": "2"}) == 2
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match=f"EPGRPO_SERVICE_TORCH_THREADS: .*{bad!r}"):
            cpu_threads.service_threads({"EPGRPO_SERVICE_TORCH_THREADS": bad})


# ---- real processes ----

def test_importing_an_entry_point_package_makes_libgomp_passive(clean_env):
    """The package __init__ runs before the entry point imports torch: libgomp loads passive."""
    probe = "import epgrpo.{}.{}, torch; torch.ones(64, 64) @ torch.ones(64, 64)"
    for package, module in (("trainer", "cli"), ("services", "reward.main")):
        proc = subprocess.run([sys.executable, "-c", probe.format(package, module)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert libgomp_spin_count(proc.stderr) == 0, package
    clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice wins
    proc = subprocess.run([sys.executable, "-c", probe.format("trainer", "cli")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert libgomp_spin_count(proc.stderr) > 0
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in proc.stderr


@pytest.mark.slow
def test_cli_process_gets_the_policy_and_its_threads(clean_env, tmp_path):
    """`epgrpo train` itself: libgomp loads passive and the intra-op threads are the usable cores;
    the user's OMP_WAIT_POLICY and OMP_NUM_THREADS win. (The run stops at its missing model, after
    the threads are set.)"""
    def train_stderr() -> str:
        proc = subprocess.run([sys.executable, "-m", "epgrpo.trainer.cli", "train", "--log-level", "INFO",
                               "model.name=sd3", f"model.path={tmp_path / 'missing'}", f"out_dir={tmp_path / 'run'}"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        return proc.stderr

    text = train_stderr()
    assert libgomp_spin_count(text) == 0
    assert logged_threads(text) == cpu_threads.process_threads(0, {})
    clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    user_threads = cpu_threads.process_threads(0, {}) + 1  # not the default
    clean_env.setenv("OMP_NUM_THREADS", str(user_threads))
    text = train_stderr()
    assert libgomp_spin_count(text) > 0
    assert logged_threads(text) == user_threads


@pytest.mark.slow
def test_launched_services_get_the_policy_and_their_threads(clean_env, tmp_path, tiny_sd3_dir):
    """LocalStack as `epgrpo train` starts it: both services sleep when idle and run their share of
    the trainer's cores; the user's OMP_WAIT_POLICY and OMP_NUM_THREADS win over both."""
    def launch(log_dir: Path) -> dict[str, str]:
        with LocalStack(["jpeg_compressibility"], log_dir, decoders={"vae": str(tiny_sd3_dir)}) as stack:
            environs = {s.name: Path(f"/proc/{s.process.pid}/environ").read_bytes().decode() for s in stack.services}
        logs = {name: (log_dir / f"{name}.log").read_text() for name in ("reward", "pruner")}
        for name, environ in environs.items():
            logs[name] += "\n" + environ.replace("\0", "\n")
        return logs

    logs = launch(tmp_path / "default")
    for name, text in logs.items():
        assert libgomp_spin_count(text) == 0, name
        assert "\nOMP_WAIT_POLICY=PASSIVE\n" in text, name
        assert logged_threads(text) == cpu_threads.service_threads({}), name
    clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    user_threads = cpu_threads.service_threads({}) + 2  # neither default
    clean_env.setenv("OMP_NUM_THREADS", str(user_threads))
    logs = launch(tmp_path / "user")
    for name, text in logs.items():
        assert libgomp_spin_count(text) > 0, name
        assert logged_threads(text) == user_threads, name
