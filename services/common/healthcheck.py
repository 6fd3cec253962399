"""``python -m epgrpo.services.common.healthcheck HOST:PORT [SERVICE] [--tls-ca PEM ...]``: exit 0 iff SERVING.

Used by container healthchecks (compose) so they go through the real gRPC health service.
The health service needs no token; a TLS server needs ``--tls-ca`` (and, under mutual TLS,
a client certificate). Defaults come from $EPGRPO_HEALTHCHECK_TLS_CA / _CERT / _KEY / _SERVER_NAME.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epgrpo.protos.channel import ChannelSecurity
from epgrpo.services.common.options import env_option


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
    parser = argparse.ArgumentParser(prog="python -m epgrpo.services.common.healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", help="HOST:PORT of the service")
    parser.add_argument("service", nargs="?", default="", help="service name to check (default: the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default %(default)s)")
    env_option(parser, "--tls-ca", env="EPGRPO_HEALTHCHECK_TLS_CA", default="", help="PEM CA of the server certificate")
    env_option(parser, "--tls-cert", env="EPGRPO_HEALTHCHECK_TLS_CERT", default="", help="PEM client certificate (mTLS)")
    env_option(parser, "--tls-key", env="EPGRPO_HEALTHCHECK_TLS_KEY", default="", help="its private key")
    env_option(parser, "--server-name", env="EPGRPO_HEALTHCHECK_SERVER_NAME", default="",
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
