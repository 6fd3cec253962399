"""Analysis tools users run on their own model and reward: is pruning worth it, and where?

From one unpruned rollout of large groups (every step's x0-preview recorded) this measures:

- reward clustering: each group's final rewards, the max-variance subset OVF(k) vs a uniform
  random k-subset, and the std ratio OVF/uniform;
- proxy fidelity: Spearman rho, within a group, between the preview reward at each step and the
  final reward; for a video model also of first-frame previews (x0[:, :, :1], what
  ``prune.preview_frames=first`` sends), scored by their own proxy rewards;
- what-if pruning: for any schedule, which trajectories would survive and the spread of their
  final rewards. This is exact, not a simulation: every trajectory draws its own noise, so a
  survivor's path is the same whether or not the others were pruned. Ablations: the pruning step
  (early vs late) and G_max at the same k.

Selections go through the pruner service (its unary ``Prune``), rewards through the reward
service, so the numbers are the system's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy.stats import spearmanr

from epgrpo.trainer.policy.base import PolicyAdapter
from epgrpo.trainer.rollout import rollout, sample_seeds
from epgrpo.trainer.samplers import Sampler

Select = Callable[[np.ndarray, int], list[int]]  # (scores, k) -> kept indices


@dataclass
class GroupRecord:
    prompt: str
    final: np.ndarray  # [G] final rewards
    previews: np.ndarray  # [S, G] reward of the x0-preview computed at each step
    first_frame: np.ndarray | None = None  # [S, G] video models: reward of each preview's first frame


Score = Callable[[np.ndarray, list[str]], np.ndarray]


def collect(policy: PolicyAdapter, score: Score, prompts: Sequence[str], group_size: int, sampler: Sampler,
            seed: int = 0, proxy: Score | None = None, first_frame: Score | None = None) -> list[GroupRecord]:
    """One unpruned rollout with previews recorded; rewards of the finals (``score``) and of every
    preview (``proxy``, default ``score``). Video models (latents [C, F, H, W]) with ``first_frame``:
    also the reward of every preview's first latent frame, decoded alone."""
    proxy = proxy or score
    batch = rollout(policy, prompts, group_size, sampler,
                    seeds=sample_seeds(seed, 10_000, len(prompts) * group_size), record_previews=True)
    final = score(policy.decode(batch.final), batch.prompts)
    steps = range(batch.previews.shape[1])
    previews = np.stack([proxy(policy.decode(batch.previews[:, i]), batch.prompts) for i in steps])
    first = None
    if first_frame is not None and batch.previews.ndim == 6:  # [K, S, C, F, H, W]
        first = np.stack([first_frame(policy.decode(batch.previews[:, i, :, :1]), batch.prompts) for i in steps])
    groups = batch.group_index.cpu().numpy()
    return [GroupRecord(prompts[g], final[groups == g], previews[:, groups == g],
                        None if first is None else first[:, groups == g]) for g in range(len(prompts))]


def uniform_std(values: np.ndarray, k: int, rng: np.random.Generator, draws: int = 500) -> float:
    """Expected population std of a uniformly random k-subset (Monte Carlo)."""
    return float(np.mean([values[rng.choice(len(values), k, replace=False)].std() for _ in range(draws)]))


def clustering(records: list[GroupRecord], k: int, select: Select, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    for r in records:
        kept = r.final[select(r.final, k)]
        rows.append({"prompt": r.prompt, "std_full": float(r.final.std()), "std_ovf": float(kept.std()),
                     "std_uniform": uniform_std(r.final, k, rng)})
    ratio = [row["std_ovf"] / row["std_uniform"] for row in rows if row["std_uniform"] > 0]
    return {"k": k, "groups": rows, "std_ratio_ovf_over_uniform": float(np.mean(ratio)) if ratio else float("nan")}


def fidelity(records: list[GroupRecord], first_frame: bool = False) -> dict:
    """Mean (over groups) Spearman rho between each step's preview reward (``first_frame``: the first
    frame's) and the final reward."""
    steps = records[0].previews.shape[0]
    per_step = []
    for i in range(steps):
        rhos = [spearmanr((r.first_frame if first_frame else r.previews)[i], r.final).statistic for r in records]
        rhos = [x for x in rhos if np.isfinite(x)]  # constant rewards have no rank correlation
        per_step.append({"step": i, "rho_mean": float(np.mean(rhos)) if rhos else float("nan"),
                         "rho_std": float(np.std(rhos)) if rhos else float("nan"), "groups": len(rhos)})
    return {"per_step": per_step}


def what_if(record: GroupRecord, schedule: Sequence[tuple[int, int]], select: Select, group_size: int | None = None) -> np.ndarray:
    """Indices of the survivors of ``schedule`` (pruning at step s decides on the previews of x_s)."""
    live = np.arange(group_size or len(record.final))
    for step, keep in schedule:
        live = live[select(record.previews[step, live], keep)]
    return live


def nfe(group_size: int, schedule: Sequence[tuple[int, int]], num_steps: int) -> int:
    """Model calls per group: every live trajectory calls at each step; pruning at s follows s's call."""
    keeps, live, total = dict(schedule), group_size, 0
    for i in range(num_steps):
        total += live
        live = keeps.get(i, live)
    return total


def schedule_ablation(records: list[GroupRecord], schedules: dict[str, list[tuple[int, int]]], select: Select,
                      k: int, seed: int = 0, group_sizes: dict[str, int] | None = None) -> dict:
    """Kept final-reward std per schedule, next to uniform-random and oracle (OVF on final) subsets."""
    rng = np.random.default_rng(seed)
    num_steps = records[0].previews.shape[0]
    out = {}
    for name, schedule in schedules.items():
        g = (group_sizes or {}).get(name, len(records[0].final))
        kept_std, oracle_std, uniform = [], [], []
        for r in records:
            final = r.final[:g]
            kept_std.append(final[what_if(r, schedule, select, g)].std())
            oracle_std.append(final[select(final, k)].std())
            uniform.append(uniform_std(final, k, rng, draws=200))
        out[name] = {"schedule": schedule, "group_size": g, "nfe_per_group": nfe(g, schedule, num_steps),
                     "kept_std": float(np.mean(kept_std)), "oracle_std": float(np.mean(oracle_std)),
                     "uniform_std": float(np.mean(uniform))}
    return out


def plot(result: dict, records: list[GroupRecord], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    k = result["clustering"]["k"]
    example = sorted(records, key=lambda r: r.final.std())[len(records) // 2]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = np.linspace(min(example.final.min(), 0), max(example.final.max(), 1), 21)
    ax[0].hist(example.final, bins=bins, alpha=0.5, label=f"full group ({len(example.final)})")
    ovf_idx = result["_select"](example.final, k)
    ax[0].hist(example.final[ovf_idx], bins=bins, alpha=0.7, label=f"OVF({k})")
    rand_idx = np.random.default_rng(0).choice(len(example.final), k, replace=False)
    ax[0].hist(example.final[rand_idx], bins=bins, alpha=0.7, histtype="step", lw=2, label=f"uniform({k})")
    ax[0].set_title(f"final rewards, {example.prompt!r}")
    ax[0].legend()
    rows = result["clustering"]["groups"]
    x = np.arange(len(rows))
    ax[1].bar(x - 0.2, [r["std_ovf"] for r in rows], 0.4, label=f"OVF({k})")
    ax[1].bar(x + 0.2, [r["std_uniform"] for r in rows], 0.4, label=f"uniform({k})")
    ax[1].set_title(f"kept reward std per group (OVF/uniform = {result['clustering']['std_ratio_ovf_over_uniform']:.2f})")
    ax[1].set_xlabel("group")
    ax[1].legend()
    fig.tight_layout()
    paths.append(out_dir / "clustering.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for key, label in (("fidelity", "whole preview"), ("fidelity_first_frame", "first frame only")):
        if key in result:
            steps = result[key]["per_step"]
            ax.errorbar([s["step"] for s in steps], [s["rho_mean"] for s in steps], yerr=[s["rho_std"] for s in steps],
                        marker="o", capsize=2, label=label)
    if "fidelity_first_frame" in result:
        ax.legend()
    ax.set_xlabel("step of the x0-preview")
    ax.set_ylabel("Spearman rho with final reward")
    ax.set_ylim(-0.2, 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "fidelity.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    for key, xlabel in (("ablation_steps", "pruning step"), ("ablation_gmax", "G_max")):
        rows = result[key]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        names = list(rows)
        ax.plot(names, [rows[n]["kept_std"] for n in names], "o-", label="kept (preview OVF)")
        ax.plot(names, [rows[n]["oracle_std"] for n in names], "s--", label="oracle (OVF on final)")
        ax.plot(names, [rows[n]["uniform_std"] for n in names], "^:", label="uniform random")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"std of the {k} kept final rewards")
        twin = ax.twinx()
        twin.bar(names, [rows[n]["nfe_per_group"] for n in names], alpha=0.15, color="gray")
        twin.set_ylabel("NFE per group")
        ax.legend(loc="lower right")
        fig.tight_layout()
        paths.append(out_dir / f"{key}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def analyze(records: list[GroupRecord], select: Select, k: int, num_steps: int, out_dir: Path) -> dict:
    """All analyses, written as analysis.json and PNG plots into ``out_dir``."""
    g = len(records[0].final)
    steps = sorted({max(1, round(num_steps * f)) for f in (0.2, 0.4, 0.5, 0.6, 0.8)})
    result = {
        "group_size": g, "num_steps": num_steps, "groups": len(records),
        "clustering": clustering(records, k, select),
        "fidelity": fidelity(records),
        **({"fidelity_first_frame": fidelity(records, first_frame=True)} if records[0].first_frame is not None else {}),
        "ablation_steps": schedule_ablation(records, {f"{s}": [(s, k)] for s in steps}, select, k),
        "ablation_gmax": schedule_ablation(
            records, {f"{n}": [(num_steps // 2, k)] for n in (g // 3, 2 * g // 3, g) if n > k}, select, k,
            group_sizes={f"{n}": n for n in (g // 3, 2 * g // 3, g)}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    result["_select"] = select
    paths = plot(result, records, out_dir)
    del result["_select"]
    result["plots"] = [str(p) for p in paths]
    (out_dir / "analysis.json").write_text(json.dumps(result, indent=2))
    return result
