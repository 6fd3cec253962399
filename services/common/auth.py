"""Who may talk to a service: TLS / mutual TLS, bearer tokens, and where a service may listen.

- TLS from PEM files; with a client CA the server requires client certificates (mutual TLS):
  a client without one fails the handshake and no RPC reaches a servicer.
- Bearer tokens (``authorization: Bearer <token>``) checked by a server interceptor with a
  constant-time comparison; the gRPC health service is exempt so orchestrators can probe.
- Without TLS or a token a service only listens on loopback, unless the user says otherwise
  explicitly (``--allow-insecure-remote``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from epgrpo.services.common.handlers import with_behavior

log = logging.getLogger("epgrpo.auth")

TOKEN_ENV = "EPGRPO_TOKEN"
# Probes (compose/k8s healthchecks, load balancers) must work without credentials.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


class InsecureBind(ValueError):
    """Refused: listening beyond loopback with neither TLS nor a token, and no explicit opt-in."""


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    return host.startswith("127.") or host in ("localhost", "::1")


def token_lines(text: str) -> tuple[str, ...]:
    """The tokens of a token file's text: its lines, stripped, but blank ones and ``#`` comments."""
    return tuple(line for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#"))


def load_tokens(token_file: str | os.PathLike | None, env: str = TOKEN_ENV) -> tuple[str, ...]:
    """Accepted tokens: every line of ``token_file`` but blank ones and ``#`` comments (several
    allow rotation without downtime), else the value of the ``env`` variable; none = no token check.
    Logs how many were loaded, never which."""
    if token_file:
        tokens = token_lines(Path(token_file).read_text())
        if not tokens:
            raise ValueError(f"--token-file: {token_file} contains no token (only blank lines and # comments)")
        log.info("loaded %d bearer token%s from %s", len(tokens), "" if len(tokens) == 1 else "s", token_file)
        return tokens
    value = os.environ.get(env, "").strip()
    return (value,) if value else ()


@dataclass(frozen=True)
class ServerSecurity:
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # set = mutual TLS: clients must present a certificate signed by it
    tokens: tuple[str, ...] = ()
    allow_insecure_remote: bool = False

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def describe(self) -> str:
        parts = ["mutual TLS" if self.tls_client_ca else "TLS" if self.tls else "plaintext"]
        parts.append("bearer token" if self.tokens else "no token")
        return ", ".join(parts)

    def credentials(self) -> grpc.ServerCredentials | None:
        if not (self.tls_cert or self.tls_key or self.tls_client_ca):
            return None
        if not (self.tls_cert and self.tls_key):
            raise ValueError("--tls-cert and --tls-key: TLS needs both (and --tls-client-ca needs them too)")
        ca = _read(self.tls_client_ca, "--tls-client-ca") if self.tls_client_ca else None
        return grpc.ssl_server_credentials([(_read(self.tls_key, "--tls-key"), _read(self.tls_cert, "--tls-cert"))],
                                           root_certificates=ca, require_client_auth=ca is not None)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenAuthInterceptor(self.tokens)] if self.tokens else []

    def check_bind(self, host: str, warn: bool = True) -> None:
        """Raises :class:`InsecureBind` for a non-loopback host without TLS/token/opt-in; logs
        what remains weak about an allowed one."""
        if is_loopback_host(host):
            return
        if not (self.tls or self.tokens or self.allow_insecure_remote):
            raise InsecureBind(
                f"--host {host}: refusing to listen beyond this machine without TLS or a token (anyone who "
                "can reach the port could use the service). Use --tls-cert/--tls-key (+ --tls-client-ca for "
                f"client certificates) and/or a token ({TOKEN_ENV} or --token-file), bind 127.0.0.1, or pass "
                "--allow-insecure-remote on a network you trust (e.g. a private container network)."
            )
        if not warn:
            return
        if self.tokens and not self.tls:
            log.warning("listening on %s with a token but without TLS: tokens travel in the clear", host)
        elif self.tls and not (self.tokens or self.tls_client_ca):
            log.warning("listening on %s with TLS but no client authentication (no token, no client CA)", host)
        elif self.allow_insecure_remote and not self.tls and not self.tokens:
            log.warning("listening on %s without TLS or token (--allow-insecure-remote)", host)


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path!r}: {e.strerror}") from None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED unless the call carries one of the accepted bearer tokens."""

    def __init__(self, tokens: tuple[str, ...], exempt_prefixes: tuple[str, ...] = EXEMPT_PREFIXES):
        if not tokens:
            raise ValueError("TokenAuthInterceptor needs at least one token")
        # Digests: equal lengths for compare_digest, so not even a token's length shows in timing.
        self._digests = [hashlib.sha256(t.encode()).digest() for t in tokens]
        self._exempt = exempt_prefixes

    def problem(self, metadata) -> str | None:
        """None when authorised, else what is wrong (never echoing what was sent)."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return "missing bearer token: send metadata 'authorization: Bearer <token>'"
        scheme, _, given = (values[0] if isinstance(values[0], str) else values[0].decode()).partition(" ")
        if scheme.lower() != "bearer" or not given:
            return "malformed authorization metadata: expected 'Bearer <token>'"
        # Constant time, and every accepted token is compared: timing reveals neither which nor how much.
        digest, ok = hashlib.sha256(given.strip().encode()).digest(), False
        for expected in self._digests:
            ok |= hmac.compare_digest(digest, expected)
        return None if ok else "invalid bearer token"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._exempt):
            return handler
        problem = self.problem(details.invocation_metadata)
        if problem is None:
            return handler
        log.warning("rejected %s: %s", details.method, problem)

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        return with_behavior(handler, deny)
