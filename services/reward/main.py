"""Reward service entry point: ``python -m epgrpo.services.reward.main`` or ``epgrpo-reward``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

import grpc

from epgrpo.protos.v1 import reward_pb2_grpc
from epgrpo.services.common.errors import ServiceError
from epgrpo.services.common.server import (
    add_server_arguments,
    configure_logging,
    run,
    serve_until_signal,
    server_config_from_args,
)
from epgrpo.services.reward.backends.base import available_backends, create_backend
from epgrpo.services.reward.scorer import RewardScorer
from epgrpo.services.reward.servicer import SERVICE_NAME, RewardServicer

log = logging.getLogger("epgrpo.reward")

DEFAULT_REWARDS = "digit,digit_judge,jpeg_compressibility"


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; an explicit 'cuda' must be available."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda[:index], got {device!r}")
    return device


def build_registrar(
    reward_names: Sequence[str], device: str = "cpu", max_batch: int = 1024
) -> Callable[[grpc.aio.Server], list[str]]:
    """Constructs the backends now (an unknown name fails here, before any port is bound) and
    returns ``register(server)`` adding the RewardService, for ``start_server``."""
    names = list(dict.fromkeys(n.strip() for n in reward_names if n.strip()))
    if not names:
        raise ValueError(f"rewards: expected at least one reward name; known: {', '.join(available_backends())}")
    device = resolve_device(device)
    backends = {name: create_backend(name, device=device) for name in names}
    scorer = RewardScorer(backends, max_batch=max_batch)

    def register(server: grpc.aio.Server) -> list[str]:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(scorer), server)
        return [SERVICE_NAME]

    return register


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="epgrpo-reward", description="Serves reward backends over gRPC.")
    add_server_arguments(parser, default_port=50051)
    parser.add_argument(
        "--rewards",
        default=os.environ.get("EPGRPO_REWARDS", DEFAULT_REWARDS),
        help="comma-separated reward backends to serve (default: $EPGRPO_REWARDS, else "
        f"{DEFAULT_REWARDS}); `--list-rewards` shows the known ones",
    )
    parser.add_argument("--max-batch", type=int, default=1024,
                        help="most images per Score request; larger ones get RESOURCE_EXHAUSTED (default %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="where models run: auto (cuda when available), cpu, or cuda[:index] (default %(default)s)")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="intra-op CPU threads for torch models (default 0: torch's choice); 1 avoids "
                        "slowdowns when other processes share few cores")
    parser.add_argument("--list-rewards", action="store_true", help="print the known reward backends and exit")
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error(f"--max-batch: expected >= 1, got {args.max_batch}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    if args.list_rewards:
        print("\n".join(available_backends()))
        return 0
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
    try:
        register = build_registrar(args.rewards.split(","), device=args.device, max_batch=args.max_batch)
    except (ServiceError, ValueError) as exc:
        print(f"epgrpo-reward: error: {exc}", file=sys.stderr)
        return 2
    run(serve_until_signal(register, server_config_from_args(args), name="reward service"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
