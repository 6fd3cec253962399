"""Exceptions the algorithm and backend modules raise, and their gRPC status codes.

Servicers never build status codes by hand: they let these propagate and
:func:`epgrpo.services.common.server.map_errors` turns them into statuses. Anything else that
escapes is a bug; it is logged with its traceback and answered INTERNAL (never UNKNOWN).
"""

from __future__ import annotations

import grpc

from epgrpo.protos.codec import WireError


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
    """The status for an expected error, or None for a bug."""
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
