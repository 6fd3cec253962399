"""Client channels shared by the trainer and by the pruner (a client of the reward service).

Every channel gets explicit message-size limits, a retry policy for UNAVAILABLE through the
gRPC service config (bounded exponential backoff, throttled so an outage cannot turn into a
retry storm) and ``round_robin`` over every address the target resolves to: a list of
replicas, or one DNS name resolving to all of them (``dns:///reward:50051`` in compose).
Optional TLS / mutual TLS and a bearer token (:class:`ChannelSecurity`). Deadlines are per call.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc

log = logging.getLogger("epgrpo.channel")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_DEADLINE_S = 60.0
# Targets gRPC resolves itself; anything else must be host:port (or a comma-separated list).
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")
TOKEN_ENV = "EPGRPO_TOKEN"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE",)


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client proves itself and checks the server. Empty fields = off.

    ``tls_ca``: PEM file of the CA that signed the server certificate, or ``system`` for the
    system roots; setting it (or a client certificate) turns TLS on. ``tls_cert``/``tls_key``:
    the client certificate for mutual TLS. ``server_name``: the name checked against the
    server certificate when it differs from the host in the address. ``token``: sent as
    ``authorization: Bearer <token>`` on every call.
    """

    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    server_name: str = ""
    token: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert / tls_key: a client certificate needs both files")
        ca = None if self.tls_ca in ("", "system") else _read(self.tls_ca, "tls_ca")
        cert = _read(self.tls_cert, "tls_cert") if self.tls_cert else None
        key = _read(self.tls_key, "tls_key") if self.tls_key else None
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{field}: cannot read {path!r}: {e.strerror}") from None


def read_token(token_file: str = "", env: Sequence[str] = (TOKEN_ENV,)) -> str:
    """The bearer token: first line of ``token_file``, else the first non-empty env variable."""
    if token_file:
        lines = _read(token_file, "token_file").decode().strip().splitlines()
        if not lines or not lines[0].strip():
            raise ValueError(f"token_file: {token_file!r} is empty")
        return lines[0].strip()
    return next((os.environ[name].strip() for name in env if os.environ.get(name, "").strip()), "")


def service_config(services: Sequence[str], retry: RetryPolicy | None, round_robin: bool = True) -> str:
    """The JSON service config: retries for the given fully qualified services, LB policy."""
    config: dict = {}
    if round_robin:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
    if retry is not None and retry.max_attempts > 1:
        config["methodConfig"] = [
            {
                "name": [{"service": s} for s in services],
                "retryPolicy": {
                    "maxAttempts": min(retry.max_attempts, 5),  # gRPC caps attempts at 5
                    "initialBackoff": f"{retry.initial_backoff_s:.3f}s",
                    "maxBackoff": f"{retry.max_backoff_s:.3f}s",
                    "backoffMultiplier": retry.backoff_multiplier,
                    "retryableStatusCodes": list(retry.retryable_codes),
                },
            }
        ]
        # Retries stop while more than half of recent calls failed: no storm against a dead server.
        config["retryThrottling"] = {"maxTokens": 10, "tokenRatio": 0.1}
    return json.dumps(config)


def target_for(addresses: str | Sequence[str]) -> tuple[str, bool]:
    """'host:port', several of them, or a gRPC target URI -> (target, several replicas possible).

    ``dns:///name:port`` resolves to every address of ``name`` (all replicas behind one DNS
    name); IP literals are joined into an ``ipv4:``/``ipv6:`` list.
    """
    if isinstance(addresses, str):
        if addresses.strip().startswith(_SCHEMES):
            return addresses.strip(), not addresses.strip().startswith("unix")
        addresses = [a.strip() for a in addresses.split(",") if a.strip()]
    addresses = list(addresses)
    if not addresses:
        raise ValueError("address: expected at least one host:port")
    for a in addresses:
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address: expected host:port, dns:///name:port or ipv4:ip:port,..., got {a!r}")
    if len(addresses) == 1:
        return addresses[0], True  # a plain name may resolve to several replicas too
    hosts = [a.rpartition(":")[0].strip("[]") for a in addresses]
    if all(_is_ipv4(h) for h in hosts):
        return "ipv4:" + ",".join(addresses), True
    if all(":" in h for h in hosts):
        return "ipv6:" + ",".join(addresses), True
    raise ValueError(
        "address: several replicas must be IP literals, or one DNS name resolving to all of them "
        f"(dns:///name:port), got {addresses}"
    )


def _is_ipv4(host: str) -> bool:
    parts = host.split(".")
    return len(parts) == 4 and all(p.isdigit() and 0 <= int(p) <= 255 for p in parts)


def is_loopback_target(target: str) -> bool:
    """True for host:port targets and ipv4/ipv6 lists that only name this machine."""
    if target.startswith(("ipv4:", "ipv6:")):
        target = target.split(":", 1)[1]
    elif target.startswith(_SCHEMES):
        return target.startswith("unix")
    hosts = [a.rpartition(":")[0].strip("[]") for a in target.split(",")]
    return all(h.startswith("127.") or h in ("localhost", "::1") for h in hosts)


def channel_options(
    services: Sequence[str],
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    retry: RetryPolicy | None = RetryPolicy(),
    round_robin: bool = True,
    server_name: str = "",
) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1 if retry is not None else 0),
        ("grpc.service_config", service_config(services, retry, round_robin)),
        # Ours is the only service config: no TXT lookups that a DNS server could answer with another.
        ("grpc.service_config_disable_resolution", 1),
        # A peer that vanished without closing the connection (host down, network cut) is noticed
        # within ~40 s, instead of a call waiting for its whole deadline.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def create_channel(
    addresses: str | Sequence[str],
    services: Sequence[str],
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    retry: RetryPolicy | None = RetryPolicy(),
    aio: bool = False,
    security: ChannelSecurity = ChannelSecurity(),
):
    """A sync (or ``aio``) channel to one or several replicas of ``services``."""
    target, several = target_for(addresses)
    options = channel_options(services, max_message_bytes=max_message_bytes, retry=retry, round_robin=several,
                              server_name=security.server_name)
    credentials = security.credentials()
    if security.token and credentials is None and not is_loopback_target(target):
        log.warning("sending the bearer token to %s without TLS: anyone on the network path can read it", target)
    interceptors = [_BearerToken(security.token, aio)] if security.token else []
    if aio:
        if credentials is not None:
            return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    channel = (grpc.secure_channel(target, credentials, options=options) if credentials is not None
               else grpc.insecure_channel(target, options=options))
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def _with_token(details, token: str):
    metadata = [*(details.metadata or ()), ("authorization", f"Bearer {token}")]
    return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)


class _Details:
    """Client call details with extra metadata (grpc's classes are read-only namedtuple-likes)."""

    def __init__(self, details, metadata):
        for name in ("method", "timeout", "credentials", "wait_for_ready", "compression"):
            setattr(self, name, getattr(details, name, None))
        self.metadata = metadata


def _BearerToken(token: str, aio: bool):
    """A client interceptor adding the token to every call (works with or without TLS)."""
    if aio:
        class AioToken(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor,
                       grpc.aio.StreamUnaryClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
            async def intercept_unary_unary(self, continuation, details, request):
                return await continuation(_with_token(details, token), request)

            async def intercept_unary_stream(self, continuation, details, request):
                return await continuation(_with_token(details, token), request)

            async def intercept_stream_unary(self, continuation, details, request_iterator):
                return await continuation(_with_token(details, token), request_iterator)

            async def intercept_stream_stream(self, continuation, details, request_iterator):
                return await continuation(_with_token(details, token), request_iterator)

        return AioToken()

    class SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            return continuation(_with_token(details, token), request)

        def intercept_unary_stream(self, continuation, details, request):
            return continuation(_with_token(details, token), request)

        def intercept_stream_unary(self, continuation, details, request_iterator):
            return continuation(_with_token(details, token), request_iterator)

        def intercept_stream_stream(self, continuation, details, request_iterator):
            return continuation(_with_token(details, token), request_iterator)

    return SyncToken()


REWARD_SERVICE = "epgrpo.v1.RewardService"
PRUNER_SERVICE = "epgrpo.v1.PrunerService"

# A server answering RESOURCE_EXHAUSTED because its in-flight memory budget is full (it may
# succeed later) marks the status with this trailing metadata; RESOURCE_EXHAUSTED without it
# (a message over the size limit, a batch over the server's limit) would fail the same way again.
RETRYABLE_METADATA_KEY = "epgrpo-retryable"
RETRYABLE_BUDGET = "budget"


def is_budget_rejection(error) -> bool:
    """True for a RESOURCE_EXHAUSTED a server's memory budget answered (retry with backoff)."""
    code = error.code() if hasattr(error, "code") else None
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or not hasattr(error, "trailing_metadata"):
        return False
    try:
        metadata = error.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a call that never reached a server has none
        return False
    return any(key == RETRYABLE_METADATA_KEY and (value.decode() if isinstance(value, bytes) else value)
               == RETRYABLE_BUDGET for key, value in metadata)
