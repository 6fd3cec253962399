"""``epgrpo``: the trainer's command line.

    epgrpo train                                 # the embedded default: toy digits, local services
    epgrpo train --config my.yaml train.lr=1e-4  # YAML config, then key=value overrides
    epgrpo config                                # print the full default config as YAML
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import textwrap

import yaml

from epgrpo.protos.cpu_threads import apply_threads
from epgrpo.protos.cpu_threads import describe as describe_threads
from epgrpo.protos.reward_names import served_name
from epgrpo.trainer import config as cfg


def _options_help() -> str:
    lines = ["options (set in the YAML file or as key=value overrides):"]
    for key, t, default, help_text in cfg.iter_fields():
        lines.append(f"  {key} ({cfg.type_name(t)}, default {default!r})")
        lines += textwrap.wrap(help_text, 90, initial_indent="      ", subsequent_indent="      ")
    from epgrpo.trainer.model_defaults import described_models

    lines.append("models with their own defaults (in place of the ones above; the YAML file and overrides still win):")
    lines += [f"  {name}: {values}" for name, values in described_models()]
    return "\n".join(lines)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, key=value overrides and --log-level: every command that builds a run takes them."""
    parser.add_argument("--config", help="YAML file with any of the options below")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, e.g. train.iterations=5")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default %(default)s)")


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
    _add_config_arguments(train)
    analyze = sub.add_parser(
        "analyze", help="reward clustering, proxy fidelity and pruning ablations on your model and reward",
        description="Samples large unpruned groups with every step's x0-preview, scores them through the "
                    "reward service and writes analysis.json, clustering.png, fidelity.png, "
                    "ablation_steps.png and ablation_gmax.png to out_dir. Takes the same options as train.",
        epilog=_options_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(analyze)
    analyze.add_argument("--groups", type=int, default=10, help="prompts (groups) to sample (default %(default)s)")
    analyze.add_argument("--group-size", type=int, default=48, help="trajectories per group, G_max (default %(default)s)")
    analyze.add_argument("--keep", type=int, default=12, help="k, the subset size kept by pruning (default %(default)s)")
    analyze.add_argument("--first-frame-rewards", default="", metavar="REWARDS",
                         help="video models: the rewards ('name:weight,...') scoring each preview's first frame alone "
                              "(what prune.preview_frames=first sends the pruner), for fidelity_first_frame in "
                              "analysis.json; rewards of motion need two frames (default: prune.proxy_rewards, else "
                              "reward.rewards)")
    show = sub.add_parser("config", help="print the resolved config as YAML (same arguments as train)")
    show.add_argument("--config", help="YAML file")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


@contextlib.contextmanager
def connected(config: cfg.Config):
    """(policy, reward client, pruner client), with local services started when configured."""
    from pathlib import Path

    from epgrpo.trainer.clients import PrunerClient

    from epgrpo.trainer.reward_client import reward_client_from_config
    from epgrpo.trainer.distributed import Distributed
    from epgrpo.trainer.launch import LocalStack
    from epgrpo.trainer.loop import resolve_device
    from epgrpo.trainer.policy import toy  # noqa: F401 - registers the toy adapter
    from epgrpo.trainer.policy.base import check_policy_options, create_policy

    # the model options the user set (model.preview_vae is the launcher's), and what the trainer always gives
    default = cfg.ModelConfig()
    options = {k: v for k, v in vars(config.model).items()
               if k not in ("name", "device", "dtype", "preview_vae") and v != getattr(default, k)}
    options.update(dtype=config.model.dtype, device=config.model.device,
                   guidance_scale=config.sampling.guidance_scale, progress=config.progress)
    check_policy_options(config.model.name, options)  # an option of another family stops the run here
    cfg.check_paths(config)  # before minutes of model loading
    if not config.progress:  # the libraries' own loading bars too
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    dist = Distributed(config.model.device)  # under `accelerate launch`: this rank and its device
    device = str(dist.device) if dist.world_size > 1 else resolve_device(config.model.device)
    options.update(device=device, progress=config.progress and dist.is_main)
    policy = create_policy(config.model.name, **options)
    with contextlib.ExitStack() as stack:
        if config.launch_services:
            addresses = ""
            if dist.is_main:  # one local stack shared by all ranks
                names = {served_name(n) for spec in (config.reward.rewards, config.prune.proxy_rewards,
                                                     config.reward.judge)
                         for n, _ in cfg.parse_rewards(spec, "reward")}  # frames(digit) is served by digit
                # rewards with their own service (reward.services) are scored there, also by the pruner
                routes = {n: e if isinstance(e, str) else e["address"] for n, e in config.reward.services.items()}
                names = (names - set(routes)) or {"jpeg_compressibility"}  # a cheap one keeps the stack whole
                # the pruner decodes this model's previews with the model's own VAE, under the name the trainer sends
                vae = config.model.preview_vae or policy.preview_decoder_source(Path(config.out_dir) / "services")
                decoder = config.model.preview_decoder or policy.preview_decoder
                print("starting local reward and pruner services ...", file=sys.stderr)
                services = stack.enter_context(LocalStack(sorted(names), Path(config.out_dir) / "services", device="cpu",
                                                          decoders={decoder: vae} if vae else None,
                                                          decoder_device=device, reward_routes=routes))
                addresses = f"{services.reward.address}|{services.pruner.address}"
            config.reward.address, config.pruner.address = dist.broadcast_text(addresses).split("|")
        if config.reward.address.startswith("oip://"):  # any Open Inference Protocol server
            from epgrpo.trainer.oip_reward import OipRewardClient  # imported only when used

            reward = OipRewardClient.from_config(config.reward)
        else:  # replicas, TLS, token, retry budget; a router when rewards have their own services
            reward = reward_client_from_config(config.reward)
        stack.callback(reward.close)
        pruner = PrunerClient.from_config(config.pruner)
        stack.callback(pruner.close)
        yield policy, reward, pruner


def run_training(config: cfg.Config):
    from epgrpo.trainer.clients import ServicesUnavailable
    from epgrpo.trainer.loop import Trainer

    with connected(config) as (policy, reward, pruner):
        trainer = Trainer(config, policy, reward, pruner)
        try:
            return trainer.run()
        except ServicesUnavailable as e:  # keep what the run has (resumable), then stop with a clear message
            if trainer.fsdp is None:
                e.checkpoint = trainer.checkpoint()
            else:  # saving takes every rank, and the others are mid-iteration: the last checkpoint stands
                e.hint = ("; with train.fsdp an iteration is not re-run on one rank and nothing is saved at the "
                          "failure: continue from the last checkpoint (train.checkpoint_every) with "
                          "train.resume_from=latest")
            raise


def run_analysis(config: cfg.Config, groups: int, group_size: int, keep: int, first_frame_rewards: str = ""):
    """Collects an unpruned rollout with previews and writes analysis.json + plots to out_dir.
    Finals are scored by reward.rewards, previews by prune.proxy_rewards (default: the same), and
    for a video model also the first frame of every preview, by ``first_frame_rewards`` (default:
    the proxy rewards)."""
    from pathlib import Path

    from epgrpo.trainer.analysis import analyze, collect
    from epgrpo.trainer.prompts import DIGIT_PROMPTS, load_prompts

    rewards = cfg.parse_rewards(config.reward.rewards, "reward.rewards")
    # the prompts the run trains on (train.prompt_file), else the evaluation prompts, else the digits
    source = config.train.prompt_file or config.eval.prompt_file
    pool = load_prompts(source, "train.prompt_file" if config.train.prompt_file else "eval.prompt_file") \
        if source else None
    with connected(config) as (policy, reward, pruner):
        pool = pool or getattr(policy, "default_prompts", None) or DIGIT_PROMPTS
        prompts = [pool[i % len(pool)] for i in range(groups)]
        reward.require([n for n, _ in rewards], "reward.rewards")
        sampler = policy.make_sampler(config.sampling.num_steps, cfg.sampler_options(config))

        def scorer(specs):
            return lambda images, prompts_: reward.score(images, prompts_, specs, request_id="analysis")[0]

        proxy = cfg.parse_rewards(config.prune.proxy_rewards, "prune.proxy_rewards") or rewards
        reward.require([n for n, _ in proxy], "prune.proxy_rewards")
        first = cfg.parse_rewards(first_frame_rewards, "--first-frame-rewards") or proxy
        video = len(policy.latent_shape) == 4
        if video:
            reward.require([n for n, _ in first], "--first-frame-rewards")

        def select(scores, k):
            ids = list(range(len(scores)))
            return sorted(pruner.select_by_scores("analysis", ids, scores, k))

        records = collect(policy, scorer(rewards), prompts, group_size, sampler, config.train.seed, proxy=scorer(proxy),
                          first_frame=scorer(first) if video else None)
        analyze(records, select, keep, config.sampling.num_steps, Path(config.out_dir))
    return Path(config.out_dir) / "analysis.json"


@contextlib.contextmanager
def stop_on_sigterm():
    """While the run lasts, SIGTERM (a scheduler, Kubernetes, ``kill``) unwinds like Ctrl-C: the
    services this run launched are stopped on the way out instead of outliving it. Only in the main
    thread; the previous handler comes back afterwards (in-process callers keep theirs)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    if args.command == "train" and config.log.wandb:  # before services start and models load
        from epgrpo.trainer.wandb_log import import_wandb

        try:
            import_wandb()
        except ImportError as e:
            print(f"epgrpo: error: {e}", file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the trainer's intra-op threads: the cores this process may use, unless OMP_NUM_THREADS says otherwise
    logging.getLogger("epgrpo.trainer").info(describe_threads(apply_threads()))
    try:
        if args.command == "analyze":
            if not 2 <= args.keep < args.group_size or args.groups < 1:
                print(f"epgrpo: error: --keep: expected 2 <= keep < group_size={args.group_size} and --groups >= 1, "
                      f"got keep={args.keep}, groups={args.groups}", file=sys.stderr)
                return 2
            with stop_on_sigterm():
                summary = run_analysis(config, args.groups, args.group_size, args.keep, args.first_frame_rewards)
        else:
            with stop_on_sigterm():
                summary = run_training(config)
    except ValueError as e:  # config problems found when talking to the services (e.g. missing reward)
        print(f"epgrpo: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from epgrpo.trainer.clients import ServiceCallError, ServicesUnavailable

        if isinstance(e, ServiceCallError) and not e.retryable:  # a service rejected what the config asked for
            print(f"epgrpo: error: {e}", file=sys.stderr)
            return 2
        if not isinstance(e, ServicesUnavailable):
            raise
        saved = (f"; saved a checkpoint of the completed iterations to {e.checkpoint} (continue with "
                 "train.resume_from=latest)" if e.checkpoint else e.hint)
        print(f"epgrpo: error: a service stayed unreachable, stopping: {e}{saved}", file=sys.stderr)
        return 3
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
