"""Exceptions the algorithm and backend modules raise, and their gRPC status codes.

Servicers never build status codes by hand: they let these propagate and
:func:`epgrpo.services.common.server.map_errors` turns them into statuses. Anything else that
escapes is a bug; it is logged with its traceback and answered INTERNAL (never UNKNOWN).

Error details stay short: a client value echoed in a message goes through :func:`show` (a short
prefix and its length), and every status message is capped at :data:`MAX_DETAILS_BYTES` by
:func:`bounded` (in :func:`status_for` and ``map_errors``). Clients read details from a
metadata header limited to 8 KiB by default; a longer one reaches them as RESOURCE_EXHAUSTED
"Stream removed" instead of the error.
"""

from __future__ import annotations

import grpc

from epgrpo.protos.codec import WireError

MAX_DETAILS_BYTES = 1024  # the longest status message (UTF-8 bytes) a service sends
SHOW_CHARS = 40  # the prefix of a long client value that :func:`show` keeps


def show(value, limit: int = SHOW_CHARS) -> str:
    """A client value for an error message: its repr, or when long a prefix of it with its length,
    e.g. ``'aaaa…' (100000 chars)``."""
    if isinstance(value, (str, bytes)):
        if len(value) <= limit:
            return repr(value)
        unit = "chars" if isinstance(value, str) else "bytes"
        cut = repr(value[:limit] + ("…" if isinstance(value, str) else b"..."))
        return f"{cut} ({len(value)} {unit})"
    text = repr(value)
    if len(text) <= 2 * limit:
        return text
    try:
        size = f" ({len(value)} items)"
    except TypeError:
        size = f" ({len(text)} chars)"
    return f"{text[:2 * limit]}…{size}"


def bounded(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """``message`` cut to at most ``limit`` UTF-8 bytes (saying so at its end)."""
    data = message.encode("utf-8", "replace")
    if len(data) <= limit:
        return message
    tail = f"… (cut, {len(data)} bytes in all)"
    return data[:limit - len(tail.encode())].decode("utf-8", "ignore") + tail


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError, ValueError):
    """A request field is malformed. Message: '<field>: expected ..., got ...'."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ServiceError):
    """The request is well-formed but not valid in the current state (e.g. steps out of order)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """A dependency (e.g. the reward service behind the pruner) cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status for an expected error (its message at most MAX_DETAILS_BYTES), or None for a bug."""
    mapped = _status_for(exc)
    return None if mapped is None else (mapped[0], bounded(mapped[1]))


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, WireError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        # A call this service made to another one failed; pass its code on.
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return grpc.StatusCode.UNAVAILABLE, f"upstream call failed: {code.name}: {exc.details()}"
        return code, f"upstream: {exc.details()}"
    return None
