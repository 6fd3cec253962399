"""Seed sweep of a toy model: does it learn on every seed, not just the one the tests use?

For each seed s, the base model is pretrained with seed s (cached by recipe) and trained with
``train.seed=s`` through ``epgrpo train`` (the model's own defaults plus any ``key=value`` given),
so both the base model and the run's noise change. Prints a table (reward and judge before/after,
gain) and writes sweep.json and sweep.png (training reward of each iteration, one line per seed).
A seed whose run directory already holds summary.json is read back, not re-run (--reuse).

    python bench/seed_sweep.py --model toy_digits_ddpm --seeds 5 --iterations 20 --out runs/sweep
    python bench/seed_sweep.py --quick --out /tmp/sweep       # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from epgrpo.trainer.cli import main as epgrpo
from epgrpo.trainer.policy.toy import ToyDigitPolicy
from epgrpo.trainer.policy.toy_ddpm import ToyDdpmPolicy

POLICIES = {"toy_digits": ToyDigitPolicy, "toy_digits_ddpm": ToyDdpmPolicy}


def run_seed(model: str, seed: int, args) -> dict:
    out = args.out / f"seed{seed}"
    if not (args.reuse and (out / "summary.json").exists()):
        policy_class = POLICIES[model]
        recipe = policy_class.recipe_class(seed=seed, **({"pretrain_steps": 3, "batch_size": 16} if args.quick else {}))
        base = policy_class.ensure_pretrained(recipe, progress=False)
        code = epgrpo(["train", f"model.name={model}", f"model.path={base}", f"train.seed={seed}",
                       f"train.iterations={args.iterations}", "eval.every=0", f"out_dir={out}", "progress=false",
                       *args.extra])
        if code != 0:
            raise SystemExit(f"seed {seed}: epgrpo train exited with {code}")
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    return {"seed": seed, "reward_first": summary["reward_first"], "reward_last": summary["reward_last"],
            "gain": summary["reward_last"] - summary["reward_first"], "judge_first": summary.get("judge_first"),
            "judge_last": summary.get("judge_last"), "train_reward": [m["reward_mean_all_final"] for m in metrics]}


def table(rows: list[dict]) -> str:
    lines = ["| seed | reward before | after | gain | judge before | after |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['reward_first']:.3f} | {r['reward_last']:.3f} | {r['gain']:+.3f} | "
                     f"{r['judge_first']:.3f} | {r['judge_last']:.3f} |")
    gains = np.array([r["gain"] for r in rows])
    lines.append(f"| all | | | {gains.mean():+.3f} ± {gains.std():.3f} (min {gains.min():+.3f}) | | |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ax.plot(range(1, len(r["train_reward"]) + 1), r["train_reward"], label=f"seed {r['seed']}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("training reward (mean over all final samples)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(POLICIES), default="toy_digits_ddpm", help="toy model (default "
                        "%(default)s)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default %(default)s)")
    parser.add_argument("--iterations", type=int, default=20, help="GRPO iterations per seed (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"), help="output directory")
    parser.add_argument("--reuse", action="store_true", help="read back seeds whose run already finished")
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 iterations, a tiny base model: checks it runs")
    parser.add_argument("extra", nargs="*", metavar="key=value", help="extra trainer overrides for every seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.iterations = 1, 2
        args.extra = [*args.extra, "train.prompts_per_iteration=2", "eval.samples_per_prompt=1"]
    rows = [run_seed(args.model, seed, args) for seed in range(args.seeds)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=2))
    plot(rows, args.out / "sweep.png", f"{args.model}: {args.seeds} seeds x {args.iterations} iterations")
    print(f"seed sweep: {args.model}, {args.seeds} seeds x {args.iterations} iterations, overrides {args.extra}")
    print(table(rows))
    print(f"curves: {args.out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
