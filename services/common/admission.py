"""Admission by memory: a server interceptor that keeps every call inside the in-flight budget.

grpc's C core receives a whole request message before Python sees it, so the only point where a
server can refuse a large message before holding it is *before asking core for it*. This
interceptor therefore:

- serves every unary-request method as a streaming-request one (the wire is the same: one
  message, then half-close), so the message is not read when the call starts, and reads every
  message itself through ``context.read()``;
- before each read, reserves what receiving a message of the largest allowed size may hold:
  ``budget.RECEIVE_FACTOR x max message size`` (plus, on a stream, the previous message, which
  the handler may still hold). When that does not fit within a short wait
  (``budget.DEFAULT_WAIT_S``, or the call's remaining deadline when nearer), the call ends with
  RESOURCE_EXHAUSTED naming the budget and its flag, with trailing metadata
  ``epgrpo-retryable: budget`` (clients retry those with backoff);
- once a message is read, resizes the reservation to the working set of serving it:
  ``factor x its size``, ``factor`` being ``budget.WORKING_SET_FACTOR`` unless the service
  declares its own per method (``register.budget_factors``; the pruner's previews take 5.5x), or
  per message (a ``budget.WorkingSetFactor``: the reward service's videos take 3x). A
  growth waits like the first reservation; a message whose working set exceeds the whole budget
  is refused without the retryable mark (it can never succeed);
- releases it when the call ends (and hands freed heap pages back to the OS, see ``_Trimmer``).

A call whose message was not asked for holds no more than HTTP/2 flow control lets the peer
send: ``start_server`` turns off BDP probing (``grpc.http2.bdp_probe``), so that is the 64 KiB
initial stream window, not the up to 16 MiB window BDP probing grows (measured: 16 unread
40 MiB calls held 260 MiB with it, 2 MiB without). So the bytes requests hold stay within the
budget however many calls arrive. Health checks and reflection are exempt (health must answer
while the server sheds load); ``probes.ProbeGuard`` bounds them instead.

A message is field-counted before it is parsed (``wire_scan``): parsing turns every field into an
object, so a request with more fields than any valid one is refused before it expands. A handler
that builds or keeps more than its message (a pruning stream's held parts, text broadcast into
upstream requests) adds it to its call's reservation with :func:`reserve` / :func:`unreserve`.

A pruning stream waiting for its next checkpoint keeps a receive reservation: a pruner admits
about ``budget / (3 x --max-message-mb)`` open rollouts at once, and refuses further streams with
RESOURCE_EXHAUSTED rather than letting memory grow. Size ``--max-message-mb`` to the largest
checkpoint the trainers send, or raise ``--max-inflight-mb``, to admit more.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import logging
import math
import time
from collections.abc import Callable, Mapping

import grpc
from epgrpo.protos.channel import RETRYABLE_BUDGET, RETRYABLE_METADATA_KEY
from epgrpo.services.common.budget import RECEIVE_FACTOR, WORKING_SET_FACTOR, BudgetExceeded, MemoryBudget, mib
from epgrpo.services.common.handlers import behavior_of, iterate_responses, run_unary
from epgrpo.services.common.wire_scan import MalformedMessage, TooManyFields, count_fields
from google.protobuf.message import DecodeError

log = logging.getLogger("epgrpo.admission")

RETRYABLE_KEY = RETRYABLE_METADATA_KEY  # on a budget rejection that may succeed later (channel.is_budget_rejection)
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Messages larger than this are scanned off the event loop (wire_scan is pure Python, ~2 us a field).
SCAN_IN_THREAD_BYTES = 256 << 10
# The gate of the call being served, for :func:`reserve` (contextvars follow the call's task).
_CURRENT_GATE: contextvars.ContextVar[_Gate | None] = contextvars.ContextVar("epgrpo_gate", default=None)


async def reserve(n: int, what: str = "") -> None:
    """Grows the current call's reservation by ``n`` bytes for what its handler builds beyond its
    message (state a stream keeps, requests it sends upstream), until the call ends or
    :func:`unreserve` gives them back. Waits like a first reservation; a refusal ends the call with
    RESOURCE_EXHAUSTED (retryable unless the call alone would exceed the budget). Outside an
    admitted call (in-process use, tests of the servicers) it does nothing."""
    gate = _CURRENT_GATE.get()
    if gate is not None and n > 0:
        await gate.grow(int(n), what)


def unreserve(n: int) -> None:
    """Gives back ``n`` bytes of what :func:`reserve` added to the current call."""
    gate = _CURRENT_GATE.get()
    if gate is not None and n > 0:
        gate.shrink(int(n))


def _message_descriptor(deserializer):
    """The protobuf descriptor of a ``Message.FromString`` deserializer, None for anything else."""
    owner = getattr(deserializer, "__self__", None)
    return getattr(owner, "DESCRIPTOR", None)


class _Gate:
    """One call's reservation: what receiving the largest message may cost before a read, the
    working set of the message received after it, plus what the handler reserved beyond it."""

    def __init__(self, interceptor: BudgetInterceptor, factor: float, context, method: str, deserializer=None):
        self.interceptor = interceptor
        self.method = method
        self.budget = interceptor.budget
        self.receive = interceptor.receive_worst_case()
        self.factor = factor
        self.context = context
        self.deserializer = deserializer
        self.descriptor = _message_descriptor(deserializer)
        self.reservation = self.budget.reservation()
        self.last_size = 0  # the previous message of a stream, which the handler may still hold
        self.extra = 0  # reserved by the handler (``reserve``)
        _CURRENT_GATE.set(self)

    def _wait_s(self) -> float:
        remaining = getattr(self.context, "time_remaining", lambda: None)()  # None: no deadline
        return self.budget.wait_s if remaining is None else max(0.0, min(self.budget.wait_s, remaining))

    async def _reject(self, exc: BudgetExceeded) -> None:
        self.interceptor.warn(self.method, exc)
        if self.interceptor.on_reject is not None:
            self.interceptor.on_reject(self.method)
        metadata = ((RETRYABLE_KEY, RETRYABLE_BUDGET),) if exc.retryable else ()
        await self.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), trailing_metadata=metadata)

    async def _resize(self, n: int) -> None:
        try:
            await self.reservation.resize(n, self._wait_s())
        except BudgetExceeded as exc:
            await self._reject(exc)

    async def before_read(self) -> None:
        await self._resize(min(self.receive + self.last_size + self.extra, self.budget.capacity))

    async def after_read(self, size: int, message=None) -> None:
        """Resizes to the working set of a ``size``-byte message. A per-message factor is known only
        once the message is parsed (``message``): until then the parse's own working set counts (the
        raw bytes and the parsed copy, ``WORKING_SET_FACTOR``)."""
        self.last_size = size
        if callable(self.factor):
            factor = self.factor(message) if message is not None else min(WORKING_SET_FACTOR, self.factor.max_factor)
        else:
            factor = self.factor
        # a shrink when the working set is no larger than the receive reservation, else a (waiting) growth
        await self._resize(math.ceil(factor * size) + self.extra)

    async def grow(self, n: int, what: str) -> None:
        self.extra += n
        try:
            await self.reservation.resize(self.reservation.amount + n, self._wait_s())
        except BudgetExceeded as exc:
            self.extra -= n
            if what:
                exc = BudgetExceeded(f"{what}: {exc}", exc.retryable)
            await self._reject(exc)

    def shrink(self, n: int) -> None:
        n = min(n, self.extra, self.reservation.amount)
        self.extra -= n
        self.budget.release(n)
        self.reservation.amount -= n

    async def _parse(self, raw: bytes):
        if self.descriptor is not None:
            try:
                if len(raw) > SCAN_IN_THREAD_BYTES:
                    await asyncio.to_thread(count_fields, raw, self.descriptor)
                else:
                    count_fields(raw, self.descriptor)
            except TooManyFields as exc:  # can never succeed as it is: not marked retryable
                await self.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except MalformedMessage as exc:
                await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.deserializer is None:
            return raw
        try:
            return self.deserializer(raw)
        except DecodeError:
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"request: not a valid {self.descriptor.full_name if self.descriptor else ''} "
                                     "message")

    async def read(self) -> object:
        """The next request message, read only once its worst case is reserved, and parsed only
        when its field count is plausible; ``grpc.aio.EOF`` at the end.

        Through ``context.read()``, not grpc's request iterator: that async generator keeps the
        last message it yielded alive until it is exhausted or collected (measured: 17 of 32
        60 MiB Score requests still alive after a flood ended), outside any budget."""
        await self.before_read()
        raw = await self.context.read()
        if raw is grpc.aio.EOF:
            self.reservation.release()
            return raw
        size = len(raw)
        await self.after_read(size)
        message = await self._parse(raw)
        del raw
        if callable(self.factor):  # a per-message factor: the parsed message's own working set
            await self.after_read(size, message)
        observe = getattr(self.context, "observe_received", None)  # the metrics interceptor's count
        if observe is not None:
            observe(message)
        return message

    def release(self) -> None:
        amount = self.reservation.amount
        self.reservation.release()
        self.extra = 0
        self.interceptor.trimmer.released(amount)


class _IdleBounded:
    """A stream's context whose reads and writes end the call (DEADLINE_EXCEEDED) after ``idle_s``
    without progress: a peer that stops sending, or stops reading our messages (its flow-control
    window stays full), no longer holds its reservation and session for hours."""

    def __init__(self, context, idle_s: float):
        self._context, self._idle_s = context, float(idle_s)

    async def _bounded(self, operation, what: str):
        try:
            return await asyncio.wait_for(operation, self._idle_s)
        except asyncio.TimeoutError:
            await self._context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                      f"stream idle: no {what} for {self._idle_s:g} s (--stream-idle-timeout); "
                                      "closed, open a new one")

    async def read(self):
        return await self._bounded(self._context.read(), "request message received")

    async def write(self, message):
        return await self._bounded(self._context.write(message), "response read by the client")

    def __getattr__(self, name):
        return getattr(self._context, name)


class _Trimmer:
    """Hands the heap memory large requests freed back to the OS (glibc ``malloc_trim``), in a
    thread, once ``threshold`` bytes of reservations ended since the last time. Without it
    freed pages stay in glibc's arenas (measured: ~400 MiB kept after 16 x 40 MiB requests
    through a plain grpc.aio server), and RSS drifts far above what requests hold."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.pending = 0
        self.running = False
        self.trims = 0
        name = ctypes.util.find_library("c")
        try:
            self._trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
        except OSError:  # pragma: no cover - no libc to load
            self._trim = None

    def released(self, n: int) -> None:
        if self._trim is None or n <= 0:
            return
        self.pending += n
        if self.pending >= self.threshold and not self.running:
            self.pending, self.running = 0, True
            # a moment later: the call's frames (and the message they hold) are gone by then
            asyncio.get_running_loop().call_later(0.01, lambda: asyncio.ensure_future(self._run()))

    async def _run(self) -> None:
        try:
            await asyncio.to_thread(self._trim, 0)
            self.trims += 1
        finally:
            self.running = False


class _Metered:
    """The request iterator handed to a streaming-request method: every message admitted by a gate."""

    def __init__(self, gate: _Gate):
        self._gate = gate

    def __aiter__(self):
        return self

    async def __anext__(self):
        message = await self._gate.read()
        if message is grpc.aio.EOF:
            raise StopAsyncIteration
        return message


class BudgetInterceptor(grpc.aio.ServerInterceptor):
    """Admits request messages into ``budget``; ``factors``: bytes held per request byte, by full
    method name (``/pkg.Service/Method``), ``default_factor`` for the others."""

    def __init__(self, budget: MemoryBudget, max_message_bytes: int, factors: Mapping[str, float] | None = None,
                 default_factor: float = WORKING_SET_FACTOR, exempt_prefixes: tuple[str, ...] = EXEMPT_PREFIXES,
                 on_reject: Callable[[str], None] | None = None, receive_factor: float = RECEIVE_FACTOR,
                 stream_idle_s: float | None = None):
        self.budget = budget
        # A stream that neither sends its next message nor reads ours for this long is ended, and
        # its reservation released (None: no limit). Vanished hosts are found by keepalive pings.
        self.stream_idle_s = stream_idle_s
        self.max_message_bytes = int(max_message_bytes)
        self.receive_factor = float(receive_factor)
        self.factors = dict(factors or {})
        self.default_factor = float(default_factor)
        self.exempt = tuple(exempt_prefixes)
        self.on_reject = on_reject  # called with the method of each rejected call (metrics)
        self.trimmer = _Trimmer(min(64 << 20, budget.capacity // 4))
        self._warned_at, self._unwarned = -math.inf, 0
        factor = max([self.receive_factor, self.default_factor,
                      *(getattr(f, "max_factor", f) for f in self.factors.values())])
        if self.worst_case(factor, clamp=False) > budget.capacity:
            log.warning("the memory budget (%s) is below what one largest request may hold (%s = %g x the %s "
                        "message limit): such requests get RESOURCE_EXHAUSTED; raise --max-inflight-mb or lower "
                        "--max-message-mb", mib(budget.capacity), mib(self.worst_case(factor, clamp=False)), factor,
                        mib(self.max_message_bytes))

    def warn(self, method: str, exc: BudgetExceeded, every_s: float = 10.0) -> None:
        """Logs a rejection, at most one line per ``every_s`` under a flood (the access log has each call)."""
        now = time.monotonic()
        if now - self._warned_at < every_s:
            self._unwarned += 1
            return
        more = f" (and {self._unwarned} more rejections in the last {now - self._warned_at:.0f} s)" if self._unwarned else ""
        log.warning("%s: %s%s", method, exc, more)
        self._warned_at, self._unwarned = now, 0

    def worst_case(self, factor: float, clamp: bool = True) -> int:
        worst = math.ceil(factor * self.max_message_bytes)
        return min(worst, self.budget.capacity) if clamp else worst

    def receive_worst_case(self) -> int:
        """Reserved before each read: what receiving a message of the largest size may hold."""
        return self.worst_case(self.receive_factor)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.exempt):
            return handler
        factor = self.factors.get(details.method, self.default_factor)
        behavior = behavior_of(handler)
        gate_for = lambda context: _Gate(self, factor, context, details.method, handler.request_deserializer)

        if handler.request_streaming:
            if handler.response_streaming:
                async def stream_stream(request_iterator, context):
                    context = _IdleBounded(context, self.stream_idle_s) if self.stream_idle_s else context
                    gate = gate_for(context)
                    try:
                        async for item in iterate_responses(behavior, _Metered(gate), context):
                            yield item
                    finally:
                        gate.release()

                return _handler(handler, stream_stream, request_streaming=True)

            async def stream_unary(request_iterator, context):
                context = _IdleBounded(context, self.stream_idle_s) if self.stream_idle_s else context
                gate = gate_for(context)
                try:
                    return await run_unary(behavior, _Metered(gate), context)
                finally:
                    gate.release()

            return _handler(handler, stream_unary, request_streaming=True)

        # A unary request: served as a request stream of one message, read after admission.
        async def single(request_iterator, gate: _Gate):
            message = await gate.read()
            if message is grpc.aio.EOF:
                details = (f"request: no message received (larger than the {mib(self.max_message_bytes)} message "
                           "limit, --max-message-mb, or none sent)")
                # Core ended the call already (it answered RESOURCE_EXHAUSTED to a message over the
                # limit; context.done() does not say so yet), or the peer half-closed without a message
                # (no grpc client does): an abort would fail inside grpc with a 20-line ERROR traceback.
                # Name the status for the access log and end quietly (such a peer sees CANCELLED).
                gate.context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                gate.context.set_details(details)
                raise asyncio.CancelledError()
            return message

        if handler.response_streaming:
            async def unary_stream(request_iterator, context):
                gate = gate_for(context)
                try:
                    request = await single(request_iterator, gate)
                    async for item in iterate_responses(behavior, request, context):
                        yield item
                finally:
                    gate.release()

            return _handler(handler, unary_stream, request_streaming=True)

        async def unary_unary(request_iterator, context):
            gate = gate_for(context)
            try:
                request = await single(request_iterator, gate)
                return await run_unary(behavior, request, context)
            finally:
                gate.release()

        return _handler(handler, unary_unary, request_streaming=True)


def _handler(handler: grpc.RpcMethodHandler, behavior, request_streaming: bool) -> grpc.RpcMethodHandler:
    factory = {(True, False): grpc.stream_unary_rpc_method_handler,
               (True, True): grpc.stream_stream_rpc_method_handler}[(request_streaming, handler.response_streaming)]
    # raw bytes: the gate reads them, checks their size and field count, then parses
    return factory(behavior, request_deserializer=None, response_serializer=handler.response_serializer)
