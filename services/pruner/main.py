"""``epgrpo-pruner``: serves PrunerService, scoring previews through a RewardService.

    epgrpo-pruner --port 50052 --reward-address 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Iterable

import grpc

from epgrpo.protos.channel import PRUNER_SERVICE, REWARD_SERVICE, create_channel, target_for
from epgrpo.protos.v1 import pruner_pb2_grpc
from epgrpo.services.common.server import (add_server_arguments, configure_logging, run, serve_until_signal,
                                           server_config_from_args)
from epgrpo.services.pruner.proxy import DEFAULT_DEADLINE_S, ProxyScorer
from epgrpo.services.pruner.servicer import PrunerServicer

DEFAULT_PORT = 50052
DEFAULT_REWARD_ADDRESS = "127.0.0.1:50051"


def build_registrar(
    reward_address: str, reward_deadline_s: float = DEFAULT_DEADLINE_S
) -> Callable[[grpc.aio.Server], Iterable[str]]:
    """A ``register(server)`` for ``start_server``; ``register.servicer`` / ``.scorer`` expose the parts.

    The reward channel is created by the scorer on its first call, inside the serving loop.
    """
    target_for(reward_address)  # a malformed address fails here, at startup, not on the first preview
    scorer = ProxyScorer(lambda: create_channel(reward_address, [REWARD_SERVICE], aio=True),
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
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    register = build_registrar(args.reward_address, args.reward_deadline)
    run(serve_until_signal(register, server_config_from_args(args), on_stop=register.scorer.close, name="pruner"))


if __name__ == "__main__":
    main()
