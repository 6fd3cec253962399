"""Client channels shared by the trainer and by the pruner (a client of the reward service).

Every channel gets explicit message-size limits, a retry policy for UNAVAILABLE through the
gRPC service config (bounded exponential backoff), and ``round_robin`` load balancing when
several replicas are given. Deadlines are per call (see ``DEFAULT_DEADLINE_S``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_DEADLINE_S = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE",)


def service_config(services: Sequence[str], retry: RetryPolicy | None, round_robin: bool) -> str:
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
    return json.dumps(config)


def target_for(addresses: str | Sequence[str]) -> tuple[str, bool]:
    """Turns 'host:port' or several of them into a gRPC target; returns (target, several)."""
    if isinstance(addresses, str):
        addresses = [a.strip() for a in addresses.split(",") if a.strip()]
    addresses = list(addresses)
    if not addresses:
        raise ValueError("address: expected at least one host:port")
    for a in addresses:
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address: expected host:port, got {a!r}")
    if len(addresses) == 1:
        return addresses[0], False
    hosts = [a.rpartition(":")[0].strip("[]") for a in addresses]
    if all(_is_ipv4(h) for h in hosts):
        return "ipv4:" + ",".join(addresses), True
    if all(":" in h for h in hosts):
        return "ipv6:" + ",".join(addresses), True
    raise ValueError(
        "address: several replicas must be IP literals (or one DNS name resolving to all of them), "
        f"got {addresses}"
    )


def _is_ipv4(host: str) -> bool:
    parts = host.split(".")
    return len(parts) == 4 and all(p.isdigit() and 0 <= int(p) <= 255 for p in parts)


def channel_options(
    services: Sequence[str],
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    retry: RetryPolicy | None = RetryPolicy(),
    round_robin: bool = False,
) -> list[tuple[str, object]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1 if retry is not None else 0),
        ("grpc.service_config", service_config(services, retry, round_robin)),
        ("grpc.keepalive_time_ms", 30_000),
    ]


def create_channel(
    addresses: str | Sequence[str],
    services: Sequence[str],
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    retry: RetryPolicy | None = RetryPolicy(),
    aio: bool = False,
    credentials: grpc.ChannelCredentials | None = None,
):
    """A sync (or ``aio``) channel to one or several replicas of ``services``."""
    target, several = target_for(addresses)
    options = channel_options(services, max_message_bytes=max_message_bytes, retry=retry, round_robin=several)
    module = grpc.aio if aio else grpc
    if credentials is not None:
        return module.secure_channel(target, credentials, options=options)
    return module.insecure_channel(target, options=options)


REWARD_SERVICE = "epgrpo.v1.RewardService"
PRUNER_SERVICE = "epgrpo.v1.PrunerService"
