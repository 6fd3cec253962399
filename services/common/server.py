"""grpc.aio server bootstrap shared by every service.

Explicit message-size limits, ``maximum_concurrent_rpcs``, ``so_reuseport`` off (so a second
server cannot silently share the port), grpc health v1 and reflection, graceful shutdown on
SIGTERM/SIGINT (health goes NOT_SERVING first, then ``stop(grace)``), uvloop when available.
Security (TLS, mutual TLS, bearer token, loopback-only without them) comes from ``auth``;
Prometheus metrics and the per-RPC access log from ``metrics``; JSON logs from ``logs``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from epgrpo.protos.channel import DEFAULT_MAX_MESSAGE_BYTES
from epgrpo.services.common.admission import BudgetInterceptor
from epgrpo.services.common.auth import ServerSecurity, load_tokens
from epgrpo.services.common.budget import DEFAULT_WAIT_S, MemoryBudget, budget_bytes
from epgrpo.services.common.errors import bounded, status_for
from epgrpo.services.common.logs import FORMATS, configure_logging  # noqa: F401 - re-exported for mains
from epgrpo.services.common.metrics import MetricsInterceptor, ServiceMetrics
from epgrpo.services.common.options import env_option
from epgrpo.services.common.probes import ProbeGuard

log = logging.getLogger("epgrpo.server")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_rpcs: int = 256
    grace_s: float = 5.0
    port_file: Path | None = None  # the bound port is written here once serving (for launchers)
    security: ServerSecurity = field(default_factory=ServerSecurity)
    metrics_port: int | None = None  # None: no /metrics endpoint (metrics are still collected)
    metrics_host: str | None = None  # default: the gRPC host
    metrics_registry: object | None = None  # default: a fresh registry per server
    # Bytes requests may hold in flight (services/common/budget.py); None: $EPGRPO_MAX_INFLIGHT_MB,
    # else min(2 GiB, a quarter of the memory this process may use).
    max_inflight_bytes: int | None = None
    budget_wait_s: float = DEFAULT_WAIT_S
    # A client host that vanishes without closing TCP: pinged every keepalive_s, its connection (and
    # its calls' reservations) dropped when a ping goes unanswered for keepalive_timeout_s.
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # A stream that neither sends nor reads for this long is ended (None: never).
    stream_idle_s: float | None = 900.0


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str] = field(default_factory=list)
    metrics: ServiceMetrics | None = None
    metrics_http: object | None = None  # the /metrics HTTP server, when one was asked for
    budget: MemoryBudget | None = None  # the in-flight memory budget (admission.py)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_http.server_port if self.metrics_http is not None else None

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()


def map_errors(method):
    """Wraps a servicer method (unary or stream) so expected errors become precise statuses.

    The status is sent after the ``except`` block: grpc keeps the abort's exception (in the call's
    state, beyond the call), and raised inside the block it would chain the original error, whose
    traceback holds the servicer's frames and everything they hold (messages, decoded previews,
    session state) until the cyclic GC ran."""

    def _status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
        mapped = status_for(exc)
        if mapped is None:
            log.exception("unexpected error in %s", method.__qualname__)
            mapped = (grpc.StatusCode.INTERNAL, bounded(f"internal error: {type(exc).__name__}: {exc}"))
        return mapped

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            mapped = None
            try:
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never UNKNOWN
                mapped = _status(exc)
            if mapped is not None:
                await context.abort(*mapped)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        mapped = None
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001
            mapped = _status(exc)
        await context.abort(*mapped)

    return unary_wrapper


def _budget_metrics(metrics: ServiceMetrics, budget: MemoryBudget) -> Callable[[str], None]:
    """Exports the budget (``epgrpo_inflight_budget_bytes``, ``epgrpo_inflight_bytes``: held now,
    ``epgrpo_budget_rejections_total{service,method}``); returns the rejection counter's callback."""
    from prometheus_client import Counter, Gauge

    r = metrics.registry
    Gauge("epgrpo_inflight_budget_bytes", "Bytes requests may hold in flight (--max-inflight-mb)",
          registry=r).set(budget.capacity)
    Gauge("epgrpo_inflight_bytes", "Bytes reserved by requests in flight now", registry=r).set_function(
        lambda: budget.held)
    rejections = Counter("epgrpo_budget_rejections", "Calls answered RESOURCE_EXHAUSTED by the memory budget",
                         ["service", "method"], registry=r)

    def on_reject(method: str) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        rejections.labels(service, name).inc()

    return on_reject


async def start_server(
    register: Callable[[grpc.aio.Server], Iterable[str]],
    config: ServerConfig,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """Creates, binds and starts a server. ``register`` adds servicers, returns full service names.

    Refuses (``auth.InsecureBind``) a non-loopback host without TLS, token or explicit opt-in."""
    config.security.check_bind(config.host, warn=False)  # server_config_from_args warned already
    credentials = config.security.credentials()  # unreadable cert files fail here, before binding
    metrics = ServiceMetrics(config.metrics_registry)
    budget = MemoryBudget(config.max_inflight_bytes if config.max_inflight_bytes is not None else budget_bytes(),
                          wait_s=config.budget_wait_s)
    admission = BudgetInterceptor(budget, config.max_message_bytes, getattr(register, "budget_factors", None),
                                  on_reject=_budget_metrics(metrics, budget), stream_idle_s=config.stream_idle_s)
    server = grpc.aio.server(
        # Metrics outermost so calls the token check rejects are counted and logged too; the budget
        # (and the probes' own bounds) innermost, so a call the token check rejects never reads its message.
        interceptors=[MetricsInterceptor(metrics), *config.security.interceptors(), *interceptors, admission,
                      ProbeGuard()],
        options=[
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # Identity only: grpc inflates a compressed message whole before checking it against the
            # size limit (a 1 MB gzip body inflates to 1 GiB, outside any budget), so compressed
            # requests are refused (UNIMPLEMENTED "Compression algorithm 'gzip' is disabled").
            ("grpc.compression_enabled_algorithms_bitset", 1),
            # Clients ping every 30 s during calls (protos/channel.py) to notice dead peers; the
            # default server policy (one ping per 5 min) would answer GOAWAY "too_many_pings" and
            # kill long pruning streams.
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
            ("grpc.http2.ping_timeout_ms", int(config.keepalive_timeout_s * 1000)),  # the ack wait of any ping
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging a stream that sends nothing
            ("grpc.http2.min_time_between_pings_ms", int(config.keepalive_s * 1000)),
            # A message nobody asked for yet stays at the peer beyond the 64 KiB stream window; BDP
            # probing would grow that window to 16 MiB per call, outside the memory budget (measured;
            # no slower on loopback: the window opens to the message's size once it is read).
            ("grpc.http2.bdp_probe", 0),
        ],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    await server.start()
    running = RunningServer(server, port, health_servicer, names, metrics, budget=budget)
    if config.metrics_port is not None:
        running.metrics_http = metrics.serve_http(config.metrics_port, config.metrics_host or config.host)
    await running.set_serving(True)
    if config.port_file is not None:
        tmp = Path(str(config.port_file) + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(config.port_file)  # atomic: a launcher never reads a half-written file
    return running


async def serve_until_signal(
    register: Callable[[grpc.aio.Server], Iterable[str]],
    config: ServerConfig,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    name: str = "service",
) -> None:
    """Serves until SIGTERM/SIGINT, then NOT_SERVING, graceful stop, and ``on_stop``."""
    running = await start_server(register, config)
    log.info("%s listening on %s:%d (%s)%s; in-flight memory budget %.0f MiB", name, config.host, running.port,
             config.security.describe(),
             f", metrics on :{running.metrics_port}/metrics" if running.metrics_port else "",
             running.budget.capacity / 2**20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("%s shutting down (grace %.1fs)", name, config.grace_s)
    await running.stop(config.grace_s)
    if on_stop is not None:
        await on_stop()


def run(coro: Awaitable[None]) -> None:
    """Runs a service's main coroutine on uvloop when installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        asyncio.run(coro)
        return
    uvloop.run(coro)


def add_server_arguments(parser, default_port: int) -> None:
    """The flags every service takes."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; use 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port}; 0 picks a free one)")
    parser.add_argument("--port-file", type=Path, default=None,
                        help="write the bound port to this file once serving (for launchers using --port 0)")
    parser.add_argument("--max-message-mb", type=float, default=DEFAULT_MAX_MESSAGE_BYTES / 2**20,
                        help="largest request/response accepted, MiB (default %(default)s)")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=256,
                        help="RPCs handled at once (grpc's maximum_concurrent_rpcs); the memory they may hold is "
                             "bounded by --max-inflight-mb (default %(default)s)")
    env_option(parser, "--max-inflight-mb", env="EPGRPO_MAX_INFLIGHT_MB", type=float, default=None,
               help="memory budget: MiB that requests may hold in flight at once; a request that would exceed it "
                    "waits briefly, then gets RESOURCE_EXHAUSTED (retryable) (default: min(2048, a quarter of the "
                    "memory available))")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds to finish in-flight RPCs on SIGTERM")
    parser.add_argument("--keepalive", type=float, default=60.0,
                        help="ping each client connection every this many seconds; one that does not answer within "
                             "a third of it (at least 1 s) is dropped with its calls (default %(default)s)")
    parser.add_argument("--stream-idle-timeout", type=float, default=900.0,
                        help="end a stream (e.g. a pruning rollout) whose client neither sends nor reads for this many "
                             "seconds, 0 = never (default %(default)s)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    env_option(parser, "--log-format", env="EPGRPO_LOG_FORMAT", choices=FORMATS, default="text",
               help="text, or json: one object per line with rpc, code, ms, request/rollout/group ids "
                    "(default %(default)s)")
    security = parser.add_argument_group("security (without TLS or a token the service listens on loopback only)")
    env_option(security, "--tls-cert", env="EPGRPO_TLS_CERT", default="",
               help="PEM server certificate (chain); turns TLS on")
    env_option(security, "--tls-key", env="EPGRPO_TLS_KEY", default="", help="PEM private key of --tls-cert")
    env_option(security, "--tls-client-ca", env="EPGRPO_TLS_CLIENT_CA", default="",
               help="PEM CA for client certificates: mutual TLS, clients without a certificate it signed are "
                    "refused at the handshake")
    env_option(security, "--token-file", env="EPGRPO_TOKEN_FILE", default="",
               help="file of accepted bearer tokens, one per line; blank lines and # comments are skipped (else the token in $EPGRPO_TOKEN; none = no "
                    "token check). Health checks are exempt")
    env_option(security, "--allow-insecure-remote", env="EPGRPO_ALLOW_INSECURE_REMOTE", action="store_true",
               default=False, help="allow a non-loopback --host without TLS or token (only on a network you trust)")
    metrics = parser.add_argument_group("metrics")
    env_option(metrics, "--metrics-port", env="EPGRPO_METRICS_PORT", type=int, default=-1,
               help="serve Prometheus metrics on this port at /metrics (0 picks a free one; default: off)")
    metrics.add_argument("--metrics-host", default=None, help="interface of the metrics endpoint (default: --host)")


def server_config_from_args(args) -> ServerConfig:
    """The ServerConfig of parsed flags; a security problem (unreadable files, a non-loopback host
    without TLS/token/opt-in) ends the process with exit code 2 and one clear line, before any work."""
    try:
        security = ServerSecurity(args.tls_cert, args.tls_key, args.tls_client_ca, load_tokens(args.token_file),
                                  args.allow_insecure_remote)
        security.check_bind(args.host)
        security.credentials()
        max_inflight_bytes = budget_bytes(args.max_inflight_mb)
        if not args.keepalive > 0:
            raise ValueError(f"--keepalive: expected a positive number of seconds, got {args.keepalive}")
        if not args.stream_idle_timeout >= 0:
            raise ValueError(f"--stream-idle-timeout: expected seconds >= 0, got {args.stream_idle_timeout}")
    except (ValueError, OSError) as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from prometheus_client import REGISTRY

    return ServerConfig(
        host=args.host,
        port=args.port,
        max_message_bytes=int(args.max_message_mb * 2**20),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_inflight_bytes=max_inflight_bytes,
        keepalive_s=args.keepalive,
        keepalive_timeout_s=max(1.0, args.keepalive / 3),
        stream_idle_s=args.stream_idle_timeout or None,
        grace_s=args.grace,
        port_file=args.port_file,
        security=security,
        metrics_port=args.metrics_port if args.metrics_port >= 0 else None,
        metrics_host=args.metrics_host,
        metrics_registry=REGISTRY,  # one server per process: also exports process memory/CPU
    )
