"""``python -m epgrpo.services.common.healthcheck HOST:PORT [SERVICE] [--tls-ca PEM ...]``: exit 0 iff SERVING.

Used by container healthchecks (compose) so they go through the real gRPC health service.
The health service needs no token; a TLS server needs ``--tls-ca`` (and, under mutual TLS,
a client certificate). Defaults come from $EPGRPO_HEALTHCHECK_TLS_CA / _CERT / _KEY / _SERVER_NAME.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epgrpo.protos.channel import ChannelSecurity


def check(address: str, service: str = "", timeout_s: float = 3.0, security: ChannelSecurity = ChannelSecurity()) -> bool:
    credentials = security.credentials()
    options = [("grpc.ssl_target_name_override", security.server_name)] if security.server_name else []
    channel = (grpc.secure_channel(address, credentials, options=options) if credentials
               else grpc.insecure_channel(address))
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as e:
            print(f"{address}: {e.code().name}: {e.details()}", file=sys.stderr)
            return False
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}")
    return serving


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m epgrpo.services.common.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", help="HOST:PORT of the service")
    parser.add_argument("service", nargs="?", default="", help="service name to check (default: the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default %(default)s)")
    parser.add_argument("--tls-ca", default=env("EPGRPO_HEALTHCHECK_TLS_CA", ""), help="PEM CA of the server certificate")
    parser.add_argument("--tls-cert", default=env("EPGRPO_HEALTHCHECK_TLS_CERT", ""), help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", default=env("EPGRPO_HEALTHCHECK_TLS_KEY", ""), help="its private key")
    parser.add_argument("--server-name", default=env("EPGRPO_HEALTHCHECK_SERVER_NAME", ""),
                        help="name to check in the server certificate (default: the address host)")
    args = parser.parse_args(argv)
    security = ChannelSecurity(args.tls_ca, args.tls_cert, args.tls_key, args.server_name)
    try:
        return 0 if check(args.address, args.service, args.timeout, security) else 1
    except ValueError as e:
        print(f"healthcheck: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
