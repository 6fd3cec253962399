"""Helpers for server interceptors: read and replace the behaviour of a gRPC method handler."""

from __future__ import annotations

import inspect
from typing import Any, AsyncIterator, Callable

import grpc

_FACTORIES = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def behavior_of(handler: grpc.RpcMethodHandler) -> Callable:
    attr, _ = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return getattr(handler, attr)


def with_behavior(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers that runs ``behavior`` instead."""
    _, factory = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(behavior, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


async def run_unary(behavior: Callable, request: Any, context) -> Any:
    """Calls a unary-response behaviour, async or not."""
    result = behavior(request, context)
    return await result if inspect.isawaitable(result) else result


async def iterate_responses(behavior: Callable, request: Any, context) -> AsyncIterator[Any]:
    """Yields what a streaming-response behaviour produces: an async generator, a sync iterator,
    or nothing when it writes through ``context.write`` (the writer API) and returns None."""
    result = behavior(request, context)
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result
    elif result is not None:
        for item in result:
            yield item
