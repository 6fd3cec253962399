"""Training comparison on a toy task: plain GRPO vs full group + OVF vs Expand-and-Prune vs Flash.

The flow toy (``--model toy_digits``, default) compares pruning at steps {3, 5} and, later, {5, 7}
(deciding on the previews of x_3, x_5 / x_5, x_7); the diffusion toy (``--model toy_digits_ddpm``,
stochastic DDIM) compares its default late schedule {7, 8} with {5, 7} and random pruning.

Every configuration trains the same cached base model with the same prompts, for several seeds,
against one reward + pruner service pair (local processes). Evaluation reward (fixed seeds; the
ODE for the flow toy, the seeded eta = 1 sampler for the diffusion toy) is reported against
training wall time (sum of iteration times, evaluation excluded) and against cumulative
transformer calls. Runs are interleaved (seed-major) so machine noise spreads evenly. Every run
starts from the model's own defaults (``epgrpo config model.name=...``), then the configuration's
overrides, then the extra ``key=value`` overrides.

    python bench/compare_training.py --out runs/compare          # 3 seeds x 5 configs, ~15 min
    python bench/compare_training.py --model toy_digits_ddpm --out runs/compare-ddpm
    python bench/compare_training.py --quick --out /tmp/cmp      # seconds; used by the tests
    python bench/compare_training.py --algorithm grpo_guard nft   # each alone (G=8) and with E&P, vs grpo G=8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from epgrpo.trainer.clients import PrunerClient

from epgrpo.trainer.reward_client import RewardClient
from epgrpo.trainer.config import load_config
from epgrpo.trainer.launch import LocalStack
from epgrpo.trainer.loop import Trainer
from epgrpo.trainer.policy.toy import ToyDigitPolicy, ToyRecipe
from epgrpo.trainer.policy.toy_ddpm import ToyDdpmPolicy, ToyDdpmRecipe

FLOW_CONFIGS = {
    "grpo G=8": ["prune.mode=grpo", "prune.group_size=8"],
    "full16+ovf→4": ["prune.mode=full_ovf", "prune.group_size=16", "prune.keeps=[4]"],
    "E&P 16→8→4": ["prune.mode=expand_prune", "prune.group_size=16", "prune.steps=[3,5]", "prune.keeps=[8,4]"],
    "E&P 16→8→4 late": ["prune.mode=expand_prune", "prune.group_size=16", "prune.steps=[5,7]", "prune.keeps=[8,4]"],
    "Flash 8→6→4": ["prune.mode=expand_prune", "prune.group_size=8", "prune.steps=[3,5]", "prune.keeps=[6,4]"],
}
# stochastic DDIM (eta = 1): the previews rank trajectories well only late (docs/benchmarks.md)
DDPM_CONFIGS = {
    "grpo G=8": ["prune.mode=grpo", "prune.group_size=8"],
    "full16+ovf→4": ["prune.mode=full_ovf", "prune.group_size=16", "prune.keeps=[4]"],
    "E&P 16→8→4 {5,7}": ["prune.mode=expand_prune", "prune.group_size=16", "prune.steps=[5,7]", "prune.keeps=[8,4]"],
    "E&P 16→8→4 {7,8}": ["prune.mode=expand_prune", "prune.group_size=16", "prune.steps=[7,8]", "prune.keeps=[8,4]"],
    "random 16→8→4 {7,8}": ["prune.mode=random_prune", "prune.group_size=16", "prune.steps=[7,8]",
                            "prune.keeps=[8,4]"],
}


@dataclass(frozen=True)
class ToyModel:
    """A toy model family the comparison can train: its policy, base-model recipe and configurations."""

    name: str
    policy_class: type
    recipe_class: type
    configs: dict[str, list[str]]


MODELS = {m.name: m for m in (ToyModel("toy_digits", ToyDigitPolicy, ToyRecipe, FLOW_CONFIGS),
                              ToyModel("toy_digits_ddpm", ToyDdpmPolicy, ToyDdpmRecipe, DDPM_CONFIGS))}


def run_dir(name: str) -> str:
    return "".join(c for c in name.replace(" ", "_").replace("→", "-").replace("+", "_") if c.isalnum() or c in "_-.")


def algorithm_configs(model: ToyModel, algorithms: list[str]) -> dict[str, list[str]]:
    """Plain GRPO G=8, then each algorithm alone (G=8) and under the model's default Expand-and-Prune."""
    schedule = model.configs["E&P 16→8→4 late" if model.name == "toy_digits" else "E&P 16→8→4 {7,8}"]
    configs = {"grpo G=8": model.configs["grpo G=8"]}
    for name in algorithms:
        configs[f"{name} G=8"] = [f"train.algorithm={name}", *model.configs["grpo G=8"]]
        configs[f"{name} E&P 16→8→4"] = [f"train.algorithm={name}", *schedule]
    return configs


def run_one(name, overrides, seed, args, reward_address, pruner_address, recipe):
    model = MODELS[args.model]
    out = args.out / run_dir(name) / f"seed{seed}"
    config = load_config(None, [
        f"model.name={model.name}", *overrides, f"train.seed={seed}", f"train.iterations={args.iterations}",
        f"eval.every={args.eval_every}",
        f"eval.samples_per_prompt={args.eval_samples}", f"out_dir={out}", "launch_services=false", "progress=false",
        *args.extra,
    ])
    policy = model.policy_class(recipe=recipe, progress=False)
    reward, pruner = RewardClient(reward_address), PrunerClient(pruner_address)
    try:
        Trainer(config, policy, reward, pruner).run()
    finally:
        reward.close()
        pruner.close()
    evals = [json.loads(line) for line in (out / "eval.jsonl").open()]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    wall = np.cumsum([0.0] + [m["iteration_s"] for m in metrics])
    nfe = np.cumsum([0] + [m["nfe"] for m in metrics])
    return [{"iteration": e["iteration"], "reward": e["reward"], "judge": e.get("judge"),
             "wall_s": float(wall[e["iteration"]]), "nfe": int(nfe[e["iteration"]])} for e in evals]


def summarize(curves: dict[str, list[list[dict]]], baseline: str) -> dict:
    """Mean over seeds at each evaluation point; time/NFE to reach the baseline's final reward."""
    out = {}
    for name, runs in curves.items():
        points = [{k: float(np.mean([r[i][k] for r in runs])) for k in ("iteration", "reward", "judge", "wall_s", "nfe")}
                  for i in range(len(runs[0]))]
        out[name] = {"points": points, "final_reward": points[-1]["reward"],
                     "final_reward_std": float(np.std([r[-1]["reward"] for r in runs])),
                     "final_judge": points[-1]["judge"], "wall_s": points[-1]["wall_s"], "nfe": points[-1]["nfe"]}
    target = out[baseline]["final_reward"]
    for name, s in out.items():
        reach = next((p for p in s["points"] if p["reward"] >= target), None)
        s["wall_to_baseline_final_s"] = reach["wall_s"] if reach else None
        s["nfe_to_baseline_final"] = reach["nfe"] if reach else None
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in summary.items():
        ax[0].plot([p["wall_s"] for p in s["points"]], [p["reward"] for p in s["points"]], "o-", label=name)
        ax[1].plot([p["nfe"] for p in s["points"]], [p["reward"] for p in s["points"]], "o-", label=name)
    ax[0].set_xlabel("training wall time, s (evaluation excluded)")
    ax[1].set_xlabel("cumulative transformer calls (NFE)")
    for a in ax:
        a.set_ylabel("eval reward (mean over seeds)")
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summary: dict, baseline: str) -> str:
    base = summary[baseline]
    lines = ["| config | final reward (± std over seeds) | judge | train wall s | NFE | wall to reach "
             f"{baseline} final | ratio to {baseline} wall | NFE to reach it |", "|---|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        reach = s["wall_to_baseline_final_s"]
        ratio = "—" if reach is None else f"{reach / base['wall_s']:.2f}"
        nfe_reach = "—" if reach is None else f"{s['nfe_to_baseline_final']:.0f}"
        lines.append(f"| {name} | {s['final_reward']:.3f} ± {s['final_reward_std']:.3f} | {s['final_judge']:.3f} | "
                     f"{s['wall_s']:.0f} | {s['nfe']:.0f} | {'not reached' if reach is None else f'{reach:.0f} s'} | "
                     f"{ratio} | {nfe_reach} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output directory")
    parser.add_argument("--model", choices=sorted(MODELS), default="toy_digits",
                        help="toy model to train: toy_digits (flow, default) or toy_digits_ddpm (diffusion, DDIM)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this configuration (repeatable; default: all of the model's; the baseline "
                        "'grpo G=8' always runs)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run are first-seed .. first-seed + seeds - 1")
    parser.add_argument("--iterations", type=int, default=30, help="GRPO iterations per run (default 30)")
    parser.add_argument("--eval-every", type=int, default=5, help="evaluate every N iterations (default 5)")
    parser.add_argument("--eval-samples", type=int, default=8, help="samples per digit at evaluation (default 8)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 iterations, tiny model: checks it runs")
    parser.add_argument("--algorithm", nargs="+", default=[], metavar="NAME",
                        help="compare these train.algorithm values, each alone (grpo G=8's group) and with "
                             "Expand-and-Prune 16→8→4 at steps {5, 7}, against plain grpo G=8")
    parser.add_argument("extra", nargs="*", metavar="key=value", help="extra trainer overrides for every run")
    args = parser.parse_args(argv)
    model = MODELS[args.model]
    baseline = "grpo G=8"
    configs = algorithm_configs(model, args.algorithm) if args.algorithm else model.configs
    if args.only:
        chosen = {baseline, *args.only}
        unknown = sorted(chosen - set(configs))
        if unknown:
            parser.error(f"--only: unknown configuration(s) {', '.join(map(repr, unknown))} for --model {args.model}; "
                         f"known: {', '.join(map(repr, configs))}")
        configs = {name: o for name, o in configs.items() if name in chosen}
    recipe = model.recipe_class()
    if args.quick:
        args.seeds, args.iterations, args.eval_every, args.eval_samples = 1, 2, 1, 1
        recipe = model.recipe_class(pretrain_steps=3, batch_size=16)
        args.extra = [*args.extra, "train.prompts_per_iteration=2"]
    curves: dict[str, list] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp, LocalStack(["digit", "digit_judge"], Path(tmp)) as stack:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for name, overrides in configs.items():
                print(f"seed {seed}: {name} ...", file=sys.stderr, flush=True)
                curves[name].append(run_one(name, overrides, seed, args, stack.reward.address, stack.pruner.address, recipe))
    summary = summarize(curves, baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps(summary, indent=2))
    plot(summary, args.out / "comparison.png")
    print(f"training comparison: {args.model}, {args.seeds} seeds x {args.iterations} iterations, "
          f"overrides {args.extra}")
    print(table(summary, baseline))
    print(f"curves: {args.out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
