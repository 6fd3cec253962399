"""The in-flight memory budget of a service: bytes that requests being served may hold at once.

Pure accounting (no gRPC here; ``admission`` wires it into the server). A call reserves bytes
before it may read a request message and gives them back when it ends; a reservation that does
not fit waits briefly, first come first served, then fails with :class:`BudgetExceeded` (the
server answers RESOURCE_EXHAUSTED, marked retryable). The sum of reservations never exceeds the
capacity, so the memory requests hold never takes the process past its budget.

Sizing (``--max-inflight-mb``, else ``$EPGRPO_MAX_INFLIGHT_MB``, else :func:`default_budget_bytes`):
a quarter of the memory this process may use (the cgroup limit of its container when there is
one, else the machine's RAM), at most 2 GiB. The quarter leaves room for the process itself
(models, the Python heap, grpc) and for other processes on the machine; 2 GiB admits 16
worst-case (64 MiB) requests at once, far more than a replica needs to keep its model busy.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import deque
from pathlib import Path

from epgrpo.services.common.errors import ResourceExhausted

MiB = 2**20
GiB = 2**30
FLAG = "--max-inflight-mb"
ENV = "EPGRPO_MAX_INFLIGHT_MB"
DEFAULT_CAP_BYTES = 2 * GiB
DEFAULT_MEMORY_FRACTION = 0.25
# Bytes held per byte of a request message while it is received and parsed: core's copy, grpc's
# bytearray and bytes copies of it, then the parsed message beside the bytes. Measured with
# VmHWM around one 60 MiB read in a fresh grpc.aio server: +148 MiB at the end of the receive,
# +208 MiB at the parse's peak (3.5x); 2.4x once the heap is warm. 3x is reserved before a read.
RECEIVE_FACTOR = 3.0
# Bytes a call holds per byte of its request message while it is served, unless the service
# declares its own (``register.budget_factors``): the parsed message (1x) and the tensors decoded
# from it (1x: ``codec.to_numpy`` copies the bytes field). Measured on the reward service
# (Score; ModelInfer likewise): RSS rises by ~2x the bytes of the requests being served
# (bench/soak.py --flood). The pruner declares 5.5x for previews (services/pruner/main.py).
WORKING_SET_FACTOR = 2.0
# The same for a reward request carrying videos [N, T, H, W, C]: the message and its array as above,
# plus the frames a video reward gathers from them (``frames(...)`` copies the k frames it scores,
# at most the whole array: +1x). Per-video float temporaries (temporal_consistency) are one video's,
# not the batch's. Counted from the copies the code makes, not measured like the 2x above.
VIDEO_WORKING_SET_FACTOR = 3.0


class WorkingSetFactor:
    """A per-message factor for ``register.budget_factors``: ``of(message)`` bytes held per request
    byte, at most ``max_factor`` (what the admission's worst case assumes)."""

    def __init__(self, of, max_factor: float):
        self.of, self.max_factor = of, float(max_factor)

    def __call__(self, message) -> float:
        return min(self.max_factor, float(self.of(message)))
# The longest a call waits for room before RESOURCE_EXHAUSTED (less when its deadline is nearer):
# long enough for calls holding small messages to finish, short enough that a flood is shed at
# once instead of queueing (clients back off and retry).
DEFAULT_WAIT_S = 0.25


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 "max" = no limit


def machine_memory_bytes() -> int | None:
    """Memory this process may use: the smallest of its cgroup's limit (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``) and the machine's RAM (``MemTotal``); None when unknown."""
    limits = [_read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                limits.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    known = [n for n in limits if n is not None and 0 < n < 2**62]  # v1 reports "no limit" as ~2^63
    return min(known) if known else None


def default_budget_bytes(memory_bytes: int | None = None) -> int:
    """min(2 GiB, a quarter of ``memory_bytes``), ``memory_bytes`` defaulting to :func:`machine_memory_bytes`."""
    memory = machine_memory_bytes() if memory_bytes is None else memory_bytes
    if not memory:
        return DEFAULT_CAP_BYTES
    return int(min(DEFAULT_CAP_BYTES, memory * DEFAULT_MEMORY_FRACTION))


def budget_bytes(flag_mb: float | None = None, environ=os.environ) -> int:
    """The budget in bytes: ``flag_mb`` (MiB) when given, else ``$EPGRPO_MAX_INFLIGHT_MB``, else the default.
    Raises ValueError naming the flag or variable for a value that is not a positive number."""
    source, value = FLAG, flag_mb
    if value is None and environ.get(ENV, "").strip():
        source, value = f"${ENV}", environ[ENV].strip()
    if value is None:
        return default_budget_bytes()
    try:
        mb = float(value)
    except ValueError:
        raise ValueError(f"{source}: expected a number of MiB, got {value!r}") from None
    if not (math.isfinite(mb) and mb > 0):
        raise ValueError(f"{source}: expected a positive number of MiB, got {value!r}")
    return max(1, int(mb * MiB))


def mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB" if n >= 10 * MiB else f"{n / MiB:.1f} MiB"


class BudgetExceeded(ResourceExhausted):
    """No room in the budget. ``retryable``: room may come back (other calls hold it); False when
    the request alone needs more than the whole budget (it can never succeed as it is)."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


class MemoryBudget:
    """``capacity`` bytes shared by the calls of one server (one event loop)."""

    def __init__(self, capacity: int, wait_s: float = DEFAULT_WAIT_S, source: str = f"{FLAG} / ${ENV}"):
        if capacity <= 0:
            raise ValueError(f"memory budget: expected > 0 bytes, got {capacity}")
        self.capacity = int(capacity)
        self.wait_s = float(wait_s)
        self.source = source  # how an operator changes it, for messages
        self.held = 0
        self.peak = 0  # the most ever held (tests, soak)
        self.rejected = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def free(self) -> int:
        return self.capacity - self.held

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def reservation(self) -> Reservation:
        return Reservation(self)

    def _take(self, n: int) -> None:
        self.held += n
        self.peak = max(self.peak, self.held)

    def _fits_now(self, n: int) -> bool:
        return not self._waiters and self.held + n <= self.capacity

    async def acquire(self, n: int, wait_s: float | None = None, total: int | None = None) -> None:
        """Takes ``n`` bytes, waiting up to ``wait_s`` (default: the budget's) behind earlier
        waiters; raises :class:`BudgetExceeded` when they do not come free in time, or at once
        when the caller's ``total`` (default ``n``: what it would hold with them) exceeds the whole
        capacity."""
        n = int(n)
        total = n if total is None else int(total)
        if n <= 0:
            return
        if total > self.capacity:
            self.rejected += 1
            raise BudgetExceeded(
                f"memory budget: this request needs {mib(total)} in flight, more than this server's whole budget of "
                f"{mib(self.capacity)} ({self.source}); send smaller requests or raise the budget", retryable=False)
        if self._fits_now(n):
            self._take(n)
            return
        wait = self.wait_s if wait_s is None else max(0.0, min(wait_s, self.wait_s))
        future = asyncio.get_running_loop().create_future()
        entry = (n, future)
        self._waiters.append(entry)
        try:
            if wait > 0:
                await asyncio.wait_for(asyncio.shield(future), wait)
        except asyncio.TimeoutError:
            pass
        except asyncio.CancelledError:  # our caller went away while waiting
            if future.done():
                self.release(n)  # granted just before: give it back
            else:
                self._leave(entry)
            raise
        if future.done():
            return  # granted: ``held`` counts it already
        self._leave(entry)
        self.rejected += 1
        raise BudgetExceeded(
            f"memory budget: server busy, this request needs up to {mib(total)} in flight and {mib(self.held)} of "
            f"its {mib(self.capacity)} budget ({self.source}) are held by calls in flight; retry with backoff",
            retryable=True)

    def _leave(self, entry) -> None:
        entry[1].cancel()
        self._waiters.remove(entry)
        self._grant()  # when the head left, those behind it may fit now

    def release(self, n: int) -> None:
        n = int(n)
        if n <= 0:
            return
        if n > self.held:
            raise RuntimeError(f"memory budget: releasing {n} bytes, only {self.held} held")
        self.held -= n
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.held + self._waiters[0][0] <= self.capacity:
            n, future = self._waiters.popleft()
            if not future.done():
                self._take(n)
                future.set_result(None)


class Reservation:
    """One call's share of a budget; resized as the call learns what it holds, released at its end."""

    def __init__(self, budget: MemoryBudget):
        self.budget = budget
        self.amount = 0

    async def resize(self, n: int, wait_s: float | None = None) -> None:
        """Grows (waiting like :meth:`MemoryBudget.acquire`) or shrinks (at once) to ``n`` bytes.
        A failed growth leaves the reservation as it was."""
        n = max(0, int(n))
        if n > self.amount:
            await self.budget.acquire(n - self.amount, wait_s, total=n)
            self.amount = n
        elif n < self.amount:
            self.budget.release(self.amount - n)
            self.amount = n

    def release(self) -> None:
        if self.amount:
            self.budget.release(self.amount)
            self.amount = 0
