"""CPU threads of every epgrpo process (trainer and services): robust beside a busy neighbour.

torch's OpenMP threads (libgomp) spin-wait at every barrier by default. When another process
runs on the same cores, a spinning thread holds a core the others need and an iteration can take
6-12x its quiet time; with ``OMP_WAIT_POLICY=PASSIVE`` idle threads sleep instead (alone it costs
~0-8%). libgomp reads the policy once, when it loads (``import torch``), so
:func:`default_wait_policy` runs in ``epgrpo.trainer`` and ``epgrpo.services`` (their
``__init__``, imported before any entry point imports torch) and launched processes inherit it.

Intra-op thread counts follow the cores the process may actually use (its CPU affinity, a
container's CPU quota, shared between the ranks of a distributed run on one machine), not the
machine's core count. The user's explicit ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` and
``OMP_NUM_THREADS`` always win. Imports nothing but the standard library (it runs before torch).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import MutableMapping

WAIT_POLICY = "PASSIVE"
# the variables by which a user chooses libgomp's waiting themselves
USER_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SERVICE_THREADS_ENV = "EPGRPO_SERVICE_TORCH_THREADS"


def default_wait_policy(environ: MutableMapping[str, str] = os.environ) -> None:
    """Sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a wait policy or spin count."""
    if not any(environ.get(name) for name in USER_WAIT_VARIABLES):
        environ["OMP_WAIT_POLICY"] = WAIT_POLICY


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup (cores), when one is set (containers: ``--cpus``,
    Kubernetes ``limits.cpu``); cgroup v2's ``cpu.max``, else v1's cfs quota/period."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores(environ: MutableMapping[str, str] = os.environ, cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its affinity (``taskset``, cpusets), capped by the cgroup CPU
    quota, divided between the processes of one distributed run on this machine
    (``LOCAL_WORLD_SIZE``, set by torchrun and accelerate)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    try:
        local_ranks = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        local_ranks = 1
    return max(1, cores // max(1, local_ranks))


def omp_num_threads(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """The user's ``OMP_NUM_THREADS`` (its first level), None when unset or not a count."""
    try:
        threads = int(environ.get("OMP_NUM_THREADS", "").split(",")[0])
    except ValueError:
        return None
    return threads if threads > 0 else None


def process_threads(requested: int = 0, environ: MutableMapping[str, str] = os.environ) -> int:
    """The intra-op thread count for this process: ``requested`` when > 0 (a flag the user gave),
    else ``OMP_NUM_THREADS`` (torch on its own caps it at the machine's cores), else :func:`usable_cores`."""
    if requested > 0:
        return requested
    return omp_num_threads(environ) or usable_cores(environ)


def service_threads(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """``--torch-threads`` for the services the trainer launches beside itself, None to give no flag.

    ``$EPGRPO_SERVICE_TORCH_THREADS`` when set; None when ``OMP_NUM_THREADS`` is set (the services
    inherit it); else half the trainer's cores (at least 1): the services mostly work while the
    trainer waits for them, but pruning calls and final scoring overlap its denoising (waves), and
    two full thread teams on the same cores straggle at every barrier."""
    value = environ.get(SERVICE_THREADS_ENV)
    if value:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"{SERVICE_THREADS_ENV}: expected an integer >= 1, got {value!r}")
        return threads
    if omp_num_threads(environ):
        return None
    return max(1, usable_cores(environ) // 2)


def apply_threads(requested: int = 0, environ: MutableMapping[str, str] = os.environ) -> int:
    """Sets torch's intra-op threads per :func:`process_threads`; returns the count in effect."""
    import torch

    threads = process_threads(requested, environ)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def describe(threads: int, environ: MutableMapping[str, str] = os.environ) -> str:
    """One log line: the intra-op threads in effect and the wait policy libgomp was given."""
    policy = environ.get("OMP_WAIT_POLICY") or "unset (libgomp spins)"
    spin = f", GOMP_SPINCOUNT={environ['GOMP_SPINCOUNT']}" if environ.get("GOMP_SPINCOUNT") else ""
    return f"torch intra-op threads: {threads} (usable cores: {usable_cores(environ)}); OMP_WAIT_POLICY={policy}{spin}"
