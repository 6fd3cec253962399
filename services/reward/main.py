"""Reward service entry point: ``python -m epgrpo.services.reward.main`` or ``epgrpo-reward``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import grpc

from epgrpo.protos.v1 import oip_pb2_grpc, reward_pb2_grpc
from epgrpo.services.common.budget import VIDEO_WORKING_SET_FACTOR, WORKING_SET_FACTOR, WorkingSetFactor
from epgrpo.services.common.errors import ServiceError
from epgrpo.services.common.options import env_option
from epgrpo.services.common.server import (
    add_server_arguments,
    configure_logging,
    run,
    serve_until_signal,
    server_config_from_args,
)
from epgrpo.services.reward.backends.base import available_backends, backend_class
from epgrpo.services.reward.config import (
    BatchingConfig,
    RewardEntry,
    build_backend,
    load_config_file,
    merge_entries,
    parse_spec,
)
from epgrpo.services.reward.oip import OIP_SERVICE_NAME, OipServicer
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
    reward_names: Sequence[str | RewardEntry],
    device: str = "cpu",
    max_batch: int = 1024,
    batching: BatchingConfig | None = None,
    workers: int = 1,
) -> Callable[[grpc.aio.Server], list[str]]:
    """Constructs the backends now (an unknown name or a bad option fails here, before any port is
    bound) and returns ``register(server)`` adding the RewardService, for ``start_server``.
    ``reward_names``: RewardEntry objects or ``--rewards`` spec strings ('digit',
    'pickscore:path=/models/pickscore;dtype=float16', ...; see services/reward/config.py)."""
    entries = merge_entries(*([item] if isinstance(item, RewardEntry) else parse_spec(item) for item in reward_names))
    if not entries:
        raise ValueError(f"rewards: expected at least one reward name; known: {', '.join(available_backends())}")
    device = resolve_device(device)
    backends = {entry.name: build_backend(entry, device) for entry in entries}
    scorer = RewardScorer(backends, max_batch=max_batch)
    if batching is not None and batching.enabled:
        log.info("dynamic batching: up to %d images per call, %.1f ms max delay", batching.max_size, batching.max_delay_ms)

    def register(server: grpc.aio.Server) -> list[str]:
        servicer = RewardServicer(scorer, batching, workers)
        reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)
        # The Open Inference Protocol on the same port: stock clients (tritonclient, KServe) call it.
        oip_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(servicer), server)
        return [SERVICE_NAME, OIP_SERVICE_NAME]

    # Videos hold more per request byte than images while served (services/common/budget.py).
    register.budget_factors = {f"/{SERVICE_NAME}/Score": WorkingSetFactor(_score_factor, VIDEO_WORKING_SET_FACTOR),
                               f"/{OIP_SERVICE_NAME}/ModelInfer": WorkingSetFactor(_infer_factor, VIDEO_WORKING_SET_FACTOR)}
    return register


def _score_factor(request) -> float:
    return VIDEO_WORKING_SET_FACTOR if len(request.images.shape) == 5 else WORKING_SET_FACTOR


def _infer_factor(request) -> float:
    video = any(t.name == "IMAGES" and len(t.shape) == 5 for t in request.inputs)
    return VIDEO_WORKING_SET_FACTOR if video else WORKING_SET_FACTOR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epgrpo-reward", description="Serves reward backends over gRPC.")
    add_server_arguments(parser, default_port=50051)
    env_option(parser, "--rewards", env="EPGRPO_REWARDS", default=None,
               help="rewards to serve, comma-separated '[name=]backend[:key=value;key=value]', e.g. "
                    f"'digit,pickscore:path=/models/pickscore;dtype=float16' (default: {DEFAULT_REWARDS} unless "
                    "--rewards-config gives some); `--list-rewards` shows the backends")
    env_option(parser, "--rewards-config", env="EPGRPO_REWARDS_CONFIG", type=Path, default=None,
               help="YAML file with 'rewards: {name: {backend: ..., option: value}}' and optional "
                    "'batching: {max_size, max_delay_ms}'; combined with --rewards")
    env_option(parser, "--batch-max-size", env="EPGRPO_BATCH_MAX_SIZE", type=int, default=None,
               help="dynamic batching: merge concurrent requests into backend calls of up to this many images; "
                    "1 turns it off (default: the config file's, else 1)")
    env_option(parser, "--batch-max-delay-ms", env="EPGRPO_BATCH_MAX_DELAY_MS", type=float, default=None,
               help="dynamic batching: the longest a request waits for others to join its call, ms (default: the "
                    "config file's, else 0: merge only what queued while the model was busy)")
    parser.add_argument("--max-batch", type=int, default=1024,
                        help="most images per Score request; larger ones get RESOURCE_EXHAUSTED (default %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="where models run: auto (cuda when available), cpu, or cuda[:index] (default %(default)s)")
    env_option(parser, "--workers", env="EPGRPO_REWARD_WORKERS", type=int, default=1,
               help="threads scoring requests in parallel (default %(default)s); CPU rewards that release the GIL "
                    "(jpeg_*) use one core each; model rewards still run one call at a time")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="intra-op CPU threads for torch models (default 0: torch's choice); 1 avoids "
                        "slowdowns when other processes share few cores")
    parser.add_argument("--list-rewards", action="store_true", help="print the known reward backends with what they compute and need, and exit")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error(f"--max-batch: expected >= 1, got {args.max_batch}")
    if args.batch_max_size is not None and args.batch_max_size < 1:
        parser.error(f"--batch-max-size: expected >= 1, got {args.batch_max_size}")
    if args.batch_max_delay_ms is not None and not args.batch_max_delay_ms >= 0:
        parser.error(f"--batch-max-delay-ms: expected >= 0, got {args.batch_max_delay_ms}")
    return args


def resolve_rewards(args: argparse.Namespace) -> tuple[list[RewardEntry], BatchingConfig]:
    """Rewards from --rewards / $EPGRPO_REWARDS and --rewards-config; batching from the flags,
    falling back to the config file, then to off."""
    file_entries, file_batching = load_config_file(args.rewards_config) if args.rewards_config else ([], None)
    spec = args.rewards
    if spec is None and not file_entries:
        spec = DEFAULT_REWARDS
    entries = merge_entries(file_entries, parse_spec(spec or ""))
    base = file_batching or BatchingConfig()
    batching = BatchingConfig(
        max_size=args.batch_max_size if args.batch_max_size is not None else base.max_size,
        max_delay_ms=args.batch_max_delay_ms if args.batch_max_delay_ms is not None else base.max_delay_ms,
    )
    return entries, batching


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    if args.list_rewards:
        for name in available_backends():
            cls = backend_class(name)
            print(f"{name}: {cls.description}\n    inputs: {cls.inputs}; range: {cls.range}; scores: {cls.modality}s"
                  .replace("boths", "images and videos")
                  + ("; group-aware (scores each image against its group)" if cls.group_aware else ""))
        print("  and video rewards made from any served image reward by name: frames(<image reward>[, k=N|all]"
              "[, at=uniform|start|end])\n    (averaged over k frames, default 4 evenly spaced), first_frame(<image reward>)")
        return 0
    if args.workers < 1:
        print(f"epgrpo-reward: error: --workers: expected >= 1, got {args.workers}", file=sys.stderr)
        return 2
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)
    config = server_config_from_args(args)  # security problems (e.g. 0.0.0.0 without TLS/token) stop here
    try:
        entries, batching = resolve_rewards(args)
        register = build_registrar(entries, device=args.device, max_batch=args.max_batch, batching=batching,
                                   workers=args.workers)
    except (ServiceError, ValueError) as exc:
        print(f"epgrpo-reward: error: {exc}", file=sys.stderr)
        return 2
    run(serve_until_signal(register, config, name="reward service"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
