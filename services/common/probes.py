"""Bounds on the methods anyone may call: health checks (no token needed) and reflection.

These methods sit outside the memory budget (a probe must answer while the server sheds load),
so they get bounds of their own, small enough that no client can use them to take memory or
every concurrency slot:

- their request messages are tiny in real use (a service name, a symbol): one larger than
  :data:`PROBE_MESSAGE_BYTES` is refused with RESOURCE_EXHAUSTED naming the limit, and dropped
  before it is parsed;
- at most :data:`PROBE_READS` of their messages are read at once (each read may briefly hold up
  to the server's message limit, since grpc receives a whole message before Python sees its
  size), and a read may take at most :data:`PROBE_READ_S`;
- at most :data:`PROBE_STREAMS` of their streams (``Health.Watch``, reflection) are open at once;
  further ones are refused at once, so idle watchers never take the concurrency slots
  (``--max-concurrent-rpcs``) that authenticated calls need. A stream's slot comes back when it
  ends, cancelled or not.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from epgrpo.services.common.handlers import behavior_of, iterate_responses, run_unary

log = logging.getLogger("epgrpo.probes")

PROBE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
PROBE_MESSAGE_BYTES = 4096
PROBE_READS = 2
PROBE_READ_S = 2.0
PROBE_STREAMS = 16


class ProbeGuard(grpc.aio.ServerInterceptor):
    """Applies the bounds above to the methods under ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...] = PROBE_PREFIXES, max_message_bytes: int = PROBE_MESSAGE_BYTES,
                 max_reads: int = PROBE_READS, max_streams: int = PROBE_STREAMS, read_s: float = PROBE_READ_S):
        self.prefixes = tuple(prefixes)
        self.max_message_bytes = int(max_message_bytes)
        self.max_streams = int(max_streams)
        self.read_s = float(read_s)
        self._max_reads = int(max_reads)
        self._reads: asyncio.Semaphore | None = None  # created in the serving loop
        self.open_streams = 0
        self.refused = 0

    def _semaphore(self) -> asyncio.Semaphore:
        if self._reads is None:
            self._reads = asyncio.Semaphore(self._max_reads)
        return self._reads

    async def _refuse(self, context, message: str) -> None:
        self.refused += 1
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    async def _read(self, context, method: str, deserializer):
        """The next request message, parsed only when small; ``grpc.aio.EOF`` at the end."""
        reads = self._semaphore()
        try:
            await asyncio.wait_for(reads.acquire(), self.read_s)
        except asyncio.TimeoutError:
            await self._refuse(context, f"{method}: too many unauthenticated requests being read at once; retry")
        try:
            raw = await asyncio.wait_for(context.read(), self.read_s)
        except asyncio.TimeoutError:
            raw = None
        finally:
            reads.release()
        if raw is None:
            await self._refuse(context, f"{method}: request not received within {self.read_s:g} s")
        if raw is grpc.aio.EOF:
            return raw
        if len(raw) > self.max_message_bytes:
            size = len(raw)
            del raw  # never parsed
            await self._refuse(context, f"{method}: request of {size} bytes; health checks and reflection accept at "
                                        f"most {self.max_message_bytes} bytes (a service or symbol name)")
        message = deserializer(raw) if deserializer is not None else raw
        observe = getattr(context, "observe_received", None)  # the metrics interceptor's count
        if observe is not None:
            observe(message)
        return message

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefixes):
            return handler
        behavior = behavior_of(handler)
        method = details.method
        deserializer = handler.request_deserializer
        streaming = handler.request_streaming or handler.response_streaming
        guard = self

        async def requests(context):
            while True:
                message = await guard._read(context, method, deserializer)
                if message is grpc.aio.EOF:
                    return
                yield message

        async def single(context):
            message = await guard._read(context, method, deserializer)
            if message is grpc.aio.EOF:  # core refused it already (over the size limit), or none was sent
                context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)  # for the access log; an abort would fail
                context.set_details(f"{method}: no request message received")
                raise asyncio.CancelledError()
            return message

        async def enter(context) -> None:
            if streaming:
                if guard.open_streams >= guard.max_streams:
                    await guard._refuse(context, f"{method}: {guard.max_streams} health/reflection streams are open "
                                                 "already (the most this server keeps); use Health.Check to poll")
                guard.open_streams += 1

        def leave() -> None:
            if streaming:
                guard.open_streams -= 1

        if handler.response_streaming:
            async def stream_out(request_iterator, context):
                await enter(context)
                try:
                    request = requests(context) if handler.request_streaming else await single(context)
                    async for item in iterate_responses(behavior, request, context):
                        yield item
                finally:
                    leave()

            return grpc.stream_stream_rpc_method_handler(stream_out, request_deserializer=None,
                                                         response_serializer=handler.response_serializer)

        async def unary_out(request_iterator, context):
            await enter(context)
            try:
                request = requests(context) if handler.request_streaming else await single(context)
                return await run_unary(behavior, request, context)
            finally:
                leave()

        return grpc.stream_unary_rpc_method_handler(unary_out, request_deserializer=None,
                                                    response_serializer=handler.response_serializer)
