"""Prometheus metrics and one structured access-log line per RPC, from a server interceptor.

Exported (``--metrics-port``, plain HTTP ``/metrics``):
- ``epgrpo_grpc_requests_total{service,method,code}``: finished RPCs by status code;
- ``epgrpo_grpc_request_duration_seconds{service,method}``: latency histogram;
- ``epgrpo_grpc_requests_in_flight{service,method}``;
- ``epgrpo_grpc_messages_total{service,method,direction}``: stream messages in and out;
- ``epgrpo_batch_size{service,method}``: images per Score request, trajectories per pruning checkpoint;
- ``epgrpo_pruner_trajectories_total{outcome=kept|pruned}``: the pruner's decisions.
The interceptor sits outside the auth interceptor, so rejected calls are counted too.

What a message counts for (items in a batch, ids for the access log, kept and pruned
trajectories) is declared by each service for its own message classes, with
:func:`request_items` and :func:`decision_counts` (see ``services/reward/metrics.py`` and
``services/pruner/metrics.py``): a renamed message class breaks at import, never silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from epgrpo.services.common.handlers import behavior_of, iterate_responses, run_unary, with_behavior

log = logging.getLogger("epgrpo.access")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# Ids clients choose (request_id, rollout_id, group ids) are logged cut to this, so one log line
# stays one line however long the ids a client sends.
LOGGED_ID_CHARS = 80
LOGGED_IDS = 8
_QUIET = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes: counted, logged at DEBUG only

ItemsFn = Callable[[Any, dict], "int | None"]
DecisionFn = Callable[[Any], "tuple[int, int]"]
# Extractors by exact message class, registered by the services that own the messages.
REQUEST_ITEMS: dict[type, ItemsFn] = {}
DECISION_COUNTS: dict[type, DecisionFn] = {}


def _message_class(message_type: type, what: str) -> type:
    if not (isinstance(message_type, type) and issubclass(message_type, Message)):
        raise TypeError(f"{what}: expected a protobuf message class, got {message_type!r}")
    return message_type


def _register(registry: dict, message_type: type, fn: Callable, what: str) -> None:
    existing = registry.get(message_type)
    name = f"{fn.__module__}.{fn.__qualname__}"
    if existing is not None and f"{existing.__module__}.{existing.__qualname__}" != name:  # (a reload is no conflict)
        raise ValueError(f"{what}: {message_type.DESCRIPTOR.full_name} is already counted by "
                         f"{existing.__module__}.{existing.__qualname__}, not {name}")
    registry[message_type] = fn


def request_items(message_type: type) -> Callable[[ItemsFn], ItemsFn]:
    """Decorator: ``fn(message, ids) -> int | None`` counts the items (images, trajectories) of a
    received ``message_type`` for ``epgrpo_batch_size`` (None: not a batch) and may note ids
    (request_id, rollout_id, group_ids) in ``ids`` for the access log."""
    _message_class(message_type, "request_items")

    def register(fn: ItemsFn) -> ItemsFn:
        _register(REQUEST_ITEMS, message_type, fn, "request_items")
        return fn

    return register


def decision_counts(message_type: type) -> Callable[[DecisionFn], DecisionFn]:
    """Decorator: ``fn(message) -> (kept, pruned)`` for ``epgrpo_pruner_trajectories`` from a sent
    ``message_type``."""
    _message_class(message_type, "decision_counts")

    def register(fn: DecisionFn) -> DecisionFn:
        _register(DECISION_COUNTS, message_type, fn, "decision_counts")
        return fn

    return register


class ServiceMetrics:
    """The collectors of one server, in its own registry (several servers may share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r, labels = self.registry, ["service", "method"]
        self.requests = Counter("epgrpo_grpc_requests", "Finished RPCs by status code", [*labels, "code"], registry=r)
        self.latency = Histogram("epgrpo_grpc_request_duration_seconds", "RPC latency (streams: open to close)",
                                 labels, buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("epgrpo_grpc_requests_in_flight", "RPCs being served now", labels, registry=r)
        self.messages = Counter("epgrpo_grpc_messages", "Messages received (in) and sent (out)",
                                [*labels, "direction"], registry=r)
        self.batch_size = Histogram("epgrpo_batch_size", "Images per Score request; trajectories per pruning "
                                    "checkpoint", labels, buckets=BATCH_BUCKETS, registry=r)
        self.trajectories = Counter("epgrpo_pruner_trajectories", "Trajectories the pruner kept or pruned",
                                    ["outcome"], registry=r)

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Starts the /metrics endpoint in a thread; returns the HTTP server (``.server_port``)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server


@dataclass
class _Call:
    """Bookkeeping of one RPC: counts, ids for the access log."""

    metrics: ServiceMetrics
    service: str
    method: str
    start: float = field(default_factory=time.perf_counter)
    items: int = 0
    messages_in: int = 0
    messages_out: int = 0
    ids: dict = field(default_factory=dict)

    def received(self, message) -> None:
        self.messages_in += 1
        self.metrics.messages.labels(self.service, self.method, "in").inc()
        extract = REQUEST_ITEMS.get(type(message))
        n = extract(message, self.ids) if extract is not None else None
        if n is not None:
            self.items += n
            self.metrics.batch_size.labels(self.service, self.method).observe(n)

    def sent(self, message) -> None:
        self.messages_out += 1
        self.metrics.messages.labels(self.service, self.method, "out").inc()
        count = DECISION_COUNTS.get(type(message))
        if count is not None:
            kept, pruned = count(message)
            self.metrics.trajectories.labels("kept").inc(kept)
            self.metrics.trajectories.labels("pruned").inc(pruned)


class _Context:
    """The servicer context, with ``write``/``read`` observed (writer/reader API streams)."""

    def __init__(self, context, call: _Call):
        self._context, self._call = context, call

    async def write(self, message):
        self._call.sent(message)
        await self._context.write(message)

    async def read(self):
        message = await self._context.read()
        if message is not grpc.aio.EOF and not isinstance(message, (bytes, bytearray)):
            self._call.received(message)
        return message

    def observe_received(self, message) -> None:
        """A message an inner interceptor read as bytes (through ``read``) and parsed itself."""
        self._call.received(message)

    def __getattr__(self, name):
        return getattr(self._context, name)


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        behavior = behavior_of(handler)
        service, _, method = details.method.lstrip("/").rpartition("/")
        metrics = self.metrics

        def begin(context) -> tuple[_Call, _Context]:
            call = _Call(metrics, service, method)
            metrics.in_flight.labels(service, method).inc()
            return call, _Context(context, call)

        async def observed_requests(iterator, call: _Call):
            async for message in iterator:
                call.received(message)
                yield message

        def wrap_request(request, call):
            if handler.request_streaming:
                return observed_requests(request, call)
            call.received(request)
            return request

        if handler.response_streaming:
            async def streaming(request, context):
                call, observed = begin(context)
                error = None
                try:
                    async for message in iterate_responses(behavior, wrap_request(request, call), observed):
                        call.sent(message)
                        yield message
                except BaseException as exc:
                    # its class only: the exception itself would tie its traceback's frames (and what
                    # they hold: the call's messages) into a cycle only the cyclic GC frees
                    error = type(exc)
                    raise
                finally:
                    self._finish(call, context, error)

            return with_behavior(handler, streaming)

        async def unary(request, context):
            call, observed = begin(context)
            error = None
            try:
                response = await run_unary(behavior, wrap_request(request, call), observed)
                call.sent(response)
                return response
            except BaseException as exc:
                error = type(exc)  # its class only (see above)
                raise
            finally:
                self._finish(call, context, error)

        return with_behavior(handler, unary)

    def _finish(self, call: _Call, context, error: type[BaseException] | None) -> None:
        code = _code(context, error)
        seconds = time.perf_counter() - call.start
        m = self.metrics
        m.in_flight.labels(call.service, call.method).dec()
        m.requests.labels(call.service, call.method, code).inc()
        m.latency.labels(call.service, call.method).observe(seconds)
        ids = {key: _bounded_id(value) for key, value in call.ids.items() if not key.startswith("_")}
        fields = {"rpc": f"{call.service}/{call.method}", "code": code, "ms": round(1000 * seconds, 2),
                  "peer": _peer(context), "items": call.items, **ids}
        if call.messages_in > 1 or call.messages_out > 1:
            fields.update(messages_in=call.messages_in, messages_out=call.messages_out)
        quiet = f"/{call.service}/".startswith(_QUIET) and code == "OK"
        level = logging.DEBUG if quiet else logging.INFO if code == "OK" else logging.WARNING
        if log.isEnabledFor(level):
            ids = " ".join(f"{k}={v}" for k, v in ids.items())
            log.log(level, "%s %s %.1f ms items=%d %s", call.method, code, 1000 * seconds, call.items, ids,
                    extra={"fields": fields})


def _bounded_id(value, chars: int = LOGGED_ID_CHARS, items: int = LOGGED_IDS):
    """A client-chosen id (or list of ids) as logged: at most ``chars`` characters each, ``items`` of a list."""
    if isinstance(value, str):
        return value if len(value) <= chars else f"{value[:chars]}…({len(value)} chars)"
    if isinstance(value, (list, tuple)):
        shown = [_bounded_id(v, chars) for v in value[:items]]
        return shown + [f"…(+{len(value) - items})"] if len(value) > items else shown
    return value


def _code(context, error: type[BaseException] | None) -> str:
    code = None
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - not every context exposes it
        pass
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return "OK"
    if issubclass(error, (asyncio.CancelledError, GeneratorExit)):  # the client went away
        return "CANCELLED"
    return "UNKNOWN"


def _peer(context) -> str:
    try:
        return context.peer()
    except Exception:  # noqa: BLE001
        return ""
