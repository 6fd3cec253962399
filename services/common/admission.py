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
budget however many calls arrive. Health checks and reflection are exempt (small, and health
must answer while the server sheds load).

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

log = logging.getLogger("epgrpo.admission")

RETRYABLE_KEY = RETRYABLE_METADATA_KEY  # on a budget rejection that may succeed later (channel.is_budget_rejection)
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# The wire size of the message the current call read last (set by the deserializer, which runs in
# the call's task; ``message.ByteSize()`` would cost a full serialization: 90 ms at 60 MiB).
_MESSAGE_BYTES: contextvars.ContextVar[int | None] = contextvars.ContextVar("epgrpo_message_bytes", default=None)


def _sized(deserializer):
    def deserialize(raw: bytes):
        _MESSAGE_BYTES.set(len(raw))
        return deserializer(raw) if deserializer is not None else raw

    return deserialize


class _Gate:
    """One call's reservation: what receiving the largest message may cost before a read, the
    working set of the message received after it."""

    def __init__(self, interceptor: BudgetInterceptor, factor: float, context, method: str):
        self.interceptor = interceptor
        self.method = method
        self.budget = interceptor.budget
        self.receive = interceptor.receive_worst_case()
        self.factor = factor
        self.context = context
        self.reservation = self.budget.reservation()
        self.last_size = 0  # the previous message of a stream, which the handler may still hold

    def _wait_s(self) -> float:
        remaining = getattr(self.context, "time_remaining", lambda: None)()  # None: no deadline
        return self.budget.wait_s if remaining is None else max(0.0, min(self.budget.wait_s, remaining))

    async def _reject(self, exc: BudgetExceeded) -> None:
        self.interceptor.warn(self.method, exc)
        if self.interceptor.on_reject is not None:
            self.interceptor.on_reject(self.method)
        metadata = ((RETRYABLE_KEY, RETRYABLE_BUDGET),) if exc.retryable else ()
        await self.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), trailing_metadata=metadata)

    async def before_read(self) -> None:
        try:
            await self.reservation.resize(min(self.receive + self.last_size, self.budget.capacity), self._wait_s())
        except BudgetExceeded as exc:
            await self._reject(exc)

    async def after_read(self, message=None) -> None:
        size = _MESSAGE_BYTES.get()
        if size is None:  # pragma: no cover - read through something other than our deserializer
            return  # keep the worst case
        self.last_size = size
        factor = self.factor(message) if callable(self.factor) else self.factor
        try:  # a shrink when the working set is no larger than the receive reservation, else a (waiting) growth
            await self.reservation.resize(math.ceil(factor * size), self._wait_s())
        except BudgetExceeded as exc:
            await self._reject(exc)

    async def read(self) -> object:
        """The next request message, read only once its worst case is reserved; ``grpc.aio.EOF`` at the end.

        Through ``context.read()``, not grpc's request iterator: that async generator keeps the
        last message it yielded alive until it is exhausted or collected (measured: 17 of 32
        60 MiB Score requests still alive after a flood ended), outside any budget."""
        await self.before_read()
        _MESSAGE_BYTES.set(None)
        message = await self.context.read()
        if message is grpc.aio.EOF:
            self.reservation.release()
            return message
        await self.after_read(message)
        return message

    def release(self) -> None:
        amount = self.reservation.amount
        self.reservation.release()
        self.interceptor.trimmer.released(amount)


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
                 on_reject: Callable[[str], None] | None = None, receive_factor: float = RECEIVE_FACTOR):
        self.budget = budget
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
        gate_for = lambda context: _Gate(self, factor, context, details.method)

        if handler.request_streaming:
            if handler.response_streaming:
                async def stream_stream(request_iterator, context):
                    gate = gate_for(context)
                    try:
                        async for item in iterate_responses(behavior, _Metered(gate), context):
                            yield item
                    finally:
                        gate.release()

                return _handler(handler, stream_stream, request_streaming=True)

            async def stream_unary(request_iterator, context):
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
                # core ended the call already (it answered RESOURCE_EXHAUSTED to a message over the
                # limit), or the peer sent none; this status only names it for the access log
                await gate.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                         f"request: no message received (larger than the {mib(self.max_message_bytes)} "
                                         "message limit, --max-message-mb, or none sent)")
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
    return factory(behavior, request_deserializer=_sized(handler.request_deserializer),
                   response_serializer=handler.response_serializer)
