"""``epgrpo``: the trainer's command line.

    epgrpo train                                 # the embedded default: toy digits, local services
    epgrpo train --config my.yaml train.lr=1e-4  # YAML config, then key=value overrides
    epgrpo config                                # print the full default config as YAML
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

import yaml

from epgrpo.trainer import config as cfg


def _options_help() -> str:
    lines = ["options (set in the YAML file or as key=value overrides):"]
    for key, t, default, help_text in cfg.iter_fields():
        lines.append(f"  {key} ({t.__name__}, default {default!r})")
        lines += textwrap.wrap(help_text, 90, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epgrpo", description="Expand-and-Prune GRPO for flow-matching image models.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="run GRPO training (default: the embedded toy task with local services)",
        description="Run (Expand-and-Prune) GRPO training. With launch_services=true (the default) the reward "
                    "and pruner services are started as local processes on free ports; otherwise "
                    "reward.address / pruner.address point at running services.",
        epilog=_options_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--config", help="YAML file with any of the options below")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, e.g. train.iterations=5")
    train.add_argument("--log-level", default="WARNING", help="logging level (default %(default)s)")
    show = sub.add_parser("config", help="print the resolved config as YAML (same arguments as train)")
    show.add_argument("--config", help="YAML file")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def run_training(config: cfg.Config):
    from epgrpo.trainer.clients import PrunerClient, RewardClient
    from epgrpo.trainer.launch import LocalStack
    from epgrpo.trainer.loop import Trainer, resolve_device
    from epgrpo.trainer.policy import toy  # noqa: F401 - registers the toy adapter
    from epgrpo.trainer.policy.base import create_policy
    from pathlib import Path

    device = resolve_device(config.model.device)
    stack = None
    if config.launch_services:
        names = {n for spec in (config.reward.rewards, config.prune.proxy_rewards, config.reward.judge)
                 for n, _ in cfg.parse_rewards(spec, "reward")}
        print("starting local reward and pruner services ...", file=sys.stderr)
        stack = LocalStack(sorted(names), Path(config.out_dir) / "services", device="cpu")
        config.reward.address, config.pruner.address = stack.reward.address, stack.pruner.address
    try:
        policy = create_policy(config.model.name, path=config.model.path, pretrain_steps=config.model.pretrain_steps,
                               lora_rank=config.model.lora_rank, lora_alpha=config.model.lora_alpha, device=device,
                               progress=config.progress)
        reward = RewardClient(config.reward.address, deadline_s=config.reward.deadline_s)
        pruner = PrunerClient(config.pruner.address, deadline_s=config.pruner.deadline_s)
        try:
            return Trainer(config, policy, reward, pruner).run()
        finally:
            reward.close()
            pruner.close()
    finally:
        if stack is not None:
            stack.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = cfg.load_config(args.config, args.overrides)
    except (ValueError, OSError, yaml.YAMLError) as e:
        print(f"epgrpo: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(yaml.safe_dump(cfg.to_dict(config), sort_keys=False), end="")
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run_training(config)
    except ValueError as e:  # config problems found when talking to the services (e.g. missing reward)
        print(f"epgrpo: error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
