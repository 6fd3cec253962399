"""``epgrpo-pruner``: serves PrunerService, scoring previews through a RewardService.

    epgrpo-pruner --port 50052 --reward-address 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Iterable, Mapping

import grpc

from epgrpo.protos.channel import PRUNER_SERVICE, REWARD_SERVICE, ChannelSecurity, create_channel, read_token, target_for
from epgrpo.protos.cpu_threads import apply_threads
from epgrpo.protos.cpu_threads import describe as describe_threads
from epgrpo.protos.v1 import pruner_pb2_grpc
from epgrpo.services.common.options import env_option
from epgrpo.services.common.server import (add_server_arguments, configure_logging, run, serve_until_signal,
                                           server_config_from_args)
from epgrpo.services.pruner.decode import load_decoders, parse_vae_spec, register_vae_decoder
from epgrpo.services.pruner.proxy import DEFAULT_DEADLINE_S, ProxyScorer, RoutedScorer
from epgrpo.services.pruner.servicer import PrunerServicer

log = logging.getLogger("epgrpo.pruner")

DEFAULT_PORT = 50052
DEFAULT_REWARD_ADDRESS = "127.0.0.1:50051"
PREVIEW_WORKING_SET_FACTOR = 5.5


def build_registrar(
    reward_address: str, reward_deadline_s: float = DEFAULT_DEADLINE_S,
    reward_security: ChannelSecurity = ChannelSecurity(), reward_routes: Mapping[str, str] | None = None,
) -> Callable[[grpc.aio.Server], Iterable[str]]:
    """A ``register(server)`` for ``start_server``; ``register.servicer`` / ``.scorer`` expose the parts.

    ``reward_routes``: reward name -> address of the service that scores it (default: reward_address).
    Reward channels are created by the scorers on their first call, inside the serving loop.
    """
    reward_security.credentials()  # unreadable certificate files fail here, at startup

    def scorer_for(address: str) -> ProxyScorer:
        target_for(address)  # a malformed address fails here, at startup, not on the first preview
        return ProxyScorer(lambda: create_channel(address, [REWARD_SERVICE], aio=True, security=reward_security),
                           deadline_s=reward_deadline_s, address=address)

    scorers = {address: scorer_for(address) for address in {reward_address, *(reward_routes or {}).values()}}
    scorer = RoutedScorer(scorers[reward_address], {name: scorers[a] for name, a in (reward_routes or {}).items()})
    servicer = PrunerServicer(scorer)

    def register(server: grpc.aio.Server) -> list[str]:
        pruner_pb2_grpc.add_PrunerServiceServicer_to_server(servicer, server)
        return [PRUNER_SERVICE]

    register.servicer = servicer
    register.scorer = scorer
    # Bytes held per request byte while a checkpoint is served (services/common/admission.py): the
    # message, its previews as an array, the pixel decoder's float temporaries, the uint8 images
    # and their Score requests upstream; measured 5.2x for float32 previews (tests/test_memory_flood.py).
    register.budget_factors = {f"/{PRUNER_SERVICE}/PruneRollout": PREVIEW_WORKING_SET_FACTOR,
                               f"/{PRUNER_SERVICE}/Prune": PREVIEW_WORKING_SET_FACTOR}
    return register


def parse_route(spec: str) -> tuple[str, str]:
    """'NAME=ADDRESS' -> (name, address)."""
    name, sep, address = spec.partition("=")
    if not (sep and name.strip() and address.strip()):
        raise ValueError(f"--reward-route: expected NAME=ADDRESS, got {spec!r}")
    return name.strip(), address.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epgrpo-pruner", description="Serves PrunerService (Expand-and-Prune "
                                     "decisions), scoring x0-previews through a RewardService.")
    add_server_arguments(parser, default_port=DEFAULT_PORT)
    env_option(parser, "--reward-address", env="EPGRPO_REWARD_ADDRESS", default=DEFAULT_REWARD_ADDRESS,
               help="reward service host:port, or several comma-separated replicas (round robin) (default %(default)s)")
    env_option(parser, "--reward-route", env="EPGRPO_REWARD_ROUTES", action="append", metavar="NAME=ADDRESS",
               help="score reward NAME with the reward service at ADDRESS instead of --reward-address (a reward in "
                    "its own service, e.g. one whose packages conflict with ours); repeatable, the variable "
                    "comma-separated; the same TLS and token options apply")
    parser.add_argument("--reward-deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help="seconds allowed per reward-service call before the pruner answers UNAVAILABLE (default %(default)s)")
    decoders = parser.add_argument_group("x0-preview decoders (latent models)")
    env_option(decoders, "--vae", env="EPGRPO_PRUNER_VAE", action="append", metavar="[NAME=]DIR",
               help="serve decoder NAME (default 'vae', what the trainer's latent adapters ask for) with the "
                    "diffusers VAE in DIR (a VAE directory or a pipeline directory with vae/, e.g. "
                    "/models/stable-diffusion-3.5-medium); its class picks the latent normalisation "
                    "(AutoencoderKL, AutoencoderKLQwenImage, AutoencoderKLFlux2, AutoencoderKLWan: Wan's video decoder); loaded at "
                    "start, before the port opens; repeatable, "
                    "the variable comma-separated")
    env_option(decoders, "--device", env="EPGRPO_PRUNER_DEVICE", default="auto",
               help="device of the VAE decoders: auto (cuda when present), cpu, cuda[:i] (default %(default)s)")
    decoders.add_argument("--vae-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                          help="VAE dtype; auto = bf16 on cuda, fp32 on cpu (Wan's VAE: fp32)")
    decoders.add_argument("--torch-threads", type=int, default=0,
                          help="intra-op CPU threads for the VAE decoders (default 0: $OMP_NUM_THREADS when set, "
                               "else the cores this process may use: its CPU affinity and container CPU quota); idle "
                               "threads sleep (OMP_WAIT_POLICY=PASSIVE unless set)")
    client = parser.add_argument_group("connection to the reward service")
    env_option(client, "--reward-tls-ca", env="EPGRPO_REWARD_TLS_CA", default="",
               help="PEM CA of the reward server's certificate; turns TLS on ('system' = system roots)")
    env_option(client, "--reward-tls-cert", env="EPGRPO_REWARD_TLS_CERT", default="",
               help="PEM client certificate for a reward service requiring mutual TLS")
    env_option(client, "--reward-tls-key", env="EPGRPO_REWARD_TLS_KEY", default="", help="its private key")
    env_option(client, "--reward-tls-server-name", env="EPGRPO_REWARD_TLS_SERVER_NAME", default="",
               help="name to check in the reward server's certificate when it differs from the address host")
    env_option(client, "--reward-token-file", env="EPGRPO_REWARD_TOKEN_FILE", default="",
               help="file with the reward service's bearer token (else the token in $EPGRPO_REWARD_TOKEN, else "
                    "$EPGRPO_TOKEN)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    config = server_config_from_args(args)  # security problems stop here, before any work
    if args.torch_threads < 0:
        print(f"epgrpo-pruner: error: --torch-threads: expected >= 0, got {args.torch_threads}", file=sys.stderr)
        return 2
    if args.vae:  # torch is imported only to decode previews
        log.info(describe_threads(apply_threads(args.torch_threads)))
    try:
        security = ChannelSecurity(args.reward_tls_ca, args.reward_tls_cert, args.reward_tls_key,
                                   args.reward_tls_server_name,
                                   read_token(args.reward_token_file, ("EPGRPO_REWARD_TOKEN", "EPGRPO_TOKEN")))
        register = build_registrar(args.reward_address, args.reward_deadline, security,
                                   dict(parse_route(spec) for spec in args.reward_route))
        for spec in args.vae:
            register_vae_decoder(*parse_vae_spec(spec), device=args.device, dtype=args.vae_dtype)
        load_decoders()  # before listening: no probe says ready, no request waits on a load
    except ValueError as e:
        print(f"epgrpo-pruner: error: {e}", file=sys.stderr)
        return 2
    run(serve_until_signal(register, config, on_stop=register.scorer.close, name="pruner"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
