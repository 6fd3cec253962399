"""grpc.aio server bootstrap shared by every service.

Explicit message-size limits, ``maximum_concurrent_rpcs``, ``so_reuseport`` off (so a second
server cannot silently share the port), grpc health v1 and reflection, graceful shutdown on
SIGTERM/SIGINT (health goes NOT_SERVING first, then ``stop(grace)``), uvloop when available.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from epgrpo.protos.channel import DEFAULT_MAX_MESSAGE_BYTES
from epgrpo.services.common.errors import status_for

log = logging.getLogger("epgrpo.server")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_rpcs: int = 256
    grace_s: float = 5.0
    port_file: Path | None = None  # the bound port is written here once serving (for launchers)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace_s)


def map_errors(method):
    """Wraps a servicer method (unary or stream) so expected errors become precise statuses."""

    async def _abort(context, exc: BaseException):
        mapped = status_for(exc)
        if mapped is None:
            log.exception("unexpected error in %s", method.__qualname__)
            mapped = (grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        await context.abort(*mapped)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status, never UNKNOWN
                await _abort(context, exc)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort(context, exc)

    return unary_wrapper


async def start_server(
    register: Callable[[grpc.aio.Server], Iterable[str]],
    config: ServerConfig,
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """Creates, binds and starts a server. ``register`` adds servicers, returns full service names."""
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    await server.start()
    running = RunningServer(server, port, health_servicer, names)
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
    log.info("%s listening on %s:%d", name, config.host, running.port)
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
                        help="RPCs in flight before new ones get RESOURCE_EXHAUSTED (default %(default)s)")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds to finish in-flight RPCs on SIGTERM")
    parser.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")


def server_config_from_args(args) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        max_message_bytes=int(args.max_message_mb * 2**20),
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        grace_s=args.grace,
        port_file=args.port_file,
    )


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
