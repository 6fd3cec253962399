"""``epgrpo-pruner``: serves PrunerService, scoring previews through a RewardService.

    epgrpo-pruner --port 50052 --reward-address 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Iterable

import grpc

from epgrpo.protos.channel import PRUNER_SERVICE, REWARD_SERVICE, ChannelSecurity, create_channel, read_token, target_for
from epgrpo.protos.v1 import pruner_pb2_grpc
from epgrpo.services.common.server import (add_server_arguments, configure_logging, run, serve_until_signal,
                                           server_config_from_args)
from epgrpo.services.pruner.decode import parse_vae_spec, register_vae_decoder
from epgrpo.services.pruner.proxy import DEFAULT_DEADLINE_S, ProxyScorer
from epgrpo.services.pruner.servicer import PrunerServicer

DEFAULT_PORT = 50052
DEFAULT_REWARD_ADDRESS = "127.0.0.1:50051"


def build_registrar(
    reward_address: str, reward_deadline_s: float = DEFAULT_DEADLINE_S,
    reward_security: ChannelSecurity = ChannelSecurity(),
) -> Callable[[grpc.aio.Server], Iterable[str]]:
    """A ``register(server)`` for ``start_server``; ``register.servicer`` / ``.scorer`` expose the parts.

    The reward channel is created by the scorer on its first call, inside the serving loop.
    """
    target_for(reward_address)  # a malformed address fails here, at startup, not on the first preview
    reward_security.credentials()  # and so do unreadable certificate files
    scorer = ProxyScorer(lambda: create_channel(reward_address, [REWARD_SERVICE], aio=True, security=reward_security),
                         deadline_s=reward_deadline_s, address=reward_address)
    servicer = PrunerServicer(scorer)

    def register(server: grpc.aio.Server) -> list[str]:
        pruner_pb2_grpc.add_PrunerServiceServicer_to_server(servicer, server)
        return [PRUNER_SERVICE]

    register.servicer = servicer
    register.scorer = scorer
    return register


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="epgrpo-pruner", description="Serves PrunerService (Expand-and-Prune "
                                     "decisions), scoring x0-previews through a RewardService.")
    add_server_arguments(parser, default_port=DEFAULT_PORT)
    default_reward = os.environ.get("EPGRPO_REWARD_ADDRESS", DEFAULT_REWARD_ADDRESS)
    parser.add_argument("--reward-address", default=default_reward,
                        help="reward service host:port, or several comma-separated replicas (round robin); "
                             "default: env EPGRPO_REWARD_ADDRESS, else %(default)s")
    parser.add_argument("--reward-deadline", type=float, default=DEFAULT_DEADLINE_S,
                        help="seconds allowed per reward-service call before the pruner answers UNAVAILABLE (default %(default)s)")
    env = os.environ.get
    decoders = parser.add_argument_group("x0-preview decoders (latent models)")
    decoders.add_argument("--vae", action="append", default=[x for x in env("EPGRPO_PRUNER_VAE", "").split(",") if x],
                          metavar="[NAME=]DIR",
                          help="serve decoder NAME (default 'vae', what the trainer's sd3 adapter asks for) with the "
                               "diffusers AutoencoderKL in DIR (a VAE directory or a pipeline directory with vae/, "
                               "e.g. /models/stable-diffusion-3.5-medium); loaded on first use; repeatable "
                               "(default: comma-separated $EPGRPO_PRUNER_VAE)")
    decoders.add_argument("--device", default=env("EPGRPO_PRUNER_DEVICE", "auto"),
                          help="device of the VAE decoders: auto (cuda when present), cpu, cuda[:i] (default %(default)s)")
    decoders.add_argument("--vae-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                          help="VAE dtype; auto = bf16 on cuda, fp32 on cpu")
    decoders.add_argument("--torch-threads", type=int, default=0,
                          help="intra-op CPU threads for the VAE decoders (default 0: torch's choice); 1 avoids "
                               "slowdowns when other processes share few cores")
    client = parser.add_argument_group("connection to the reward service")
    client.add_argument("--reward-tls-ca", default=env("EPGRPO_REWARD_TLS_CA", ""),
                        help="PEM CA of the reward server's certificate; turns TLS on ('system' = system roots; "
                             "default: $EPGRPO_REWARD_TLS_CA)")
    client.add_argument("--reward-tls-cert", default=env("EPGRPO_REWARD_TLS_CERT", ""),
                        help="PEM client certificate for a reward service requiring mutual TLS")
    client.add_argument("--reward-tls-key", default=env("EPGRPO_REWARD_TLS_KEY", ""), help="its private key")
    client.add_argument("--reward-tls-server-name", default="",
                        help="name to check in the reward server's certificate when it differs from the address host")
    client.add_argument("--reward-token-file", default=env("EPGRPO_REWARD_TOKEN_FILE", ""),
                        help="file with the reward service's bearer token (default: $EPGRPO_REWARD_TOKEN_FILE, "
                             "else $EPGRPO_REWARD_TOKEN, else $EPGRPO_TOKEN)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    config = server_config_from_args(args)  # security problems stop here, before any work
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
    try:
        security = ChannelSecurity(args.reward_tls_ca, args.reward_tls_cert, args.reward_tls_key,
                                   args.reward_tls_server_name,
                                   read_token(args.reward_token_file, ("EPGRPO_REWARD_TOKEN", "EPGRPO_TOKEN")))
        register = build_registrar(args.reward_address, args.reward_deadline, security)
        for spec in args.vae:
            register_vae_decoder(*parse_vae_spec(spec), device=args.device, dtype=args.vae_dtype)
    except ValueError as e:
        print(f"epgrpo-pruner: error: {e}", file=sys.stderr)
        return 2
    run(serve_until_signal(register, config, on_stop=register.scorer.close, name="pruner"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
