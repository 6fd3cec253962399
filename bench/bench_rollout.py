"""Rollout benchmark: what Expand-and-Prune saves, measured side by side in one run.

Same prompts and seeds for every configuration (toy digit model, CPU):
  grpo24     plain GRPO, G = 24, trains on 24 per prompt
  full48+ovf the full expanded group of 48, OVF on final rewards -> 12 trained
  ep48       Expand-and-Prune 48 -> 24 -> 12 at steps {5, 7} of 10 (the paper's: deciding on the
             previews of x_5 and x_7)
  flash24    "Flash" 24 -> 16 -> 12 at steps {5, 7} of 10
The pruner runs in-process (same classes as the service) and over gRPC (real reward + pruner
services as local processes), so the transport's share is visible. Configurations are
interleaved across repeats and the median is reported (shared machines are noisy).

    python bench/bench_rollout.py              # ~3-5 min on 2 CPU cores
    python bench/bench_rollout.py --quick      # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from epgrpo.services.pruner.decode import pixel_decode
from epgrpo.services.pruner.ovf import ovf_select
from epgrpo.services.pruner.session import RolloutSession
from epgrpo.services.reward.backends.base import create_backend
from epgrpo.trainer.clients import PrunerClient
from epgrpo.trainer.grpo import group_advantages
from epgrpo.trainer.launch import LocalStack
from epgrpo.trainer.optimize import policy_update
from epgrpo.trainer.policy.toy import ToyDigitPolicy, ToyRecipe
from epgrpo.trainer.rollout import rollout, sample_seeds
from epgrpo.trainer.samplers import FlowSampler

CONFIGS = {  # name: (group size, schedule, trained per group, post-sampling OVF)
    "grpo24": (24, [], 24, False),
    "full48+ovf": (48, [], 12, True),
    "ep48": (48, [(5, 24), (7, 12)], 12, False),
    "flash24": (24, [(5, 16), (7, 12)], 12, False),
}


class InProcessPruner:
    """The pruner's own session/decoder/reward classes, called directly (no transport)."""

    def __init__(self, schedule, num_steps, reward):
        self.session = RolloutSession.create(schedule, num_steps, strategy=1)
        self.reward = reward

    def decide(self, step, sigma, groups):
        out = {}
        for g in groups:
            images = pixel_decode(g.previews.numpy())
            scores = self.reward.score(images, [g.prompt] * len(images))
            out[g.group_id], _ = self.session.decide(g.group_id, step, g.trajectory_ids, scores)
        return out


def scale(configs: dict, factor: float) -> dict:
    """Shrinks group sizes for --quick runs while keeping the schedules valid."""
    if factor == 1:
        return configs
    small = {}
    for name, (g, sched, keep, post) in configs.items():
        f = lambda n: max(2, int(n * factor))  # noqa: E731
        small[name] = (f(g), [(s, f(k)) for s, k in sched], f(keep), post)
    return small


def measure(policy, reward, configs, prompts, num_steps, repeats, pruner_client):
    sampler = FlowSampler.uniform(num_steps)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)  # same compute, unchanged weights
    results = {name: {"rollout_s": [], "rollout_grpc_s": [], "train_s": []} for name in configs}
    for rep in range(repeats):
        for name, (group, schedule, keep, post_ovf) in configs.items():
            seeds = sample_seeds(0, rep, len(prompts) * group)
            kwargs = dict(seeds=seeds, schedule=schedule)
            transports = [("rollout_s", None)] + ([("rollout_grpc_s", pruner_client)] if schedule else [])
            for key, client in transports:
                start = time.perf_counter()
                if client is None:
                    pruner = InProcessPruner(schedule, num_steps, reward) if schedule else None
                    batch = rollout(policy, prompts, group, sampler, pruner=pruner, **kwargs)
                else:
                    with client.open(schedule, num_steps, [("digit", 1.0)]) as stream:
                        batch = rollout(policy, prompts, group, sampler, pruner=stream, **kwargs)
                results[name][key].append(time.perf_counter() - start)
            rewards = reward.score(policy.decode(batch.final), batch.prompts)
            if post_ovf:
                rows = []
                for g in range(len(prompts)):
                    members = (batch.group_index == g).nonzero().flatten().numpy()
                    rows += members[ovf_select(rewards[members], keep)].tolist()
                batch, rewards = batch.keep(torch.tensor(sorted(rows))), rewards[sorted(rows)]
            assert len(batch.prompts) == keep * len(prompts)
            advantages = group_advantages(torch.from_numpy(rewards), batch.group_index)
            start = time.perf_counter()
            policy_update(policy, optimizer, batch, advantages, sampler, clip_range=1e-4,
                          beta=0.04, inner_epochs=1, max_grad_norm=1.0, train_batch_size=64)
            results[name]["train_s"].append(time.perf_counter() - start)
            results[name]["nfe"] = batch.nfe
            results[name]["nfe_full"] = batch.nfe_full
            results[name]["trained"] = len(batch.prompts)
    return {n: {k: (statistics.median(v) if isinstance(v, list) and v else v) for k, v in r.items()}
            for n, r in results.items()}


def expected_nfe(group, schedule, num_steps, prompts):
    """Sum over steps of the trajectories that call the model; pruning at s follows step s's call,
    whose output is also the preview: nothing is computed twice."""
    live, total = group, 0
    keeps = dict(schedule)
    for step in range(num_steps):
        total += live
        live = keeps.get(step, live)
    return total * prompts


def table(results, baseline="full48+ovf", plain="grpo24") -> str:
    base, ref = results[baseline], results[plain]
    lines = ["| config | NFE | NFE / full48 | rollout s (in-proc) | / full48 | / grpo24 | rollout s (gRPC) | "
             "train s | / full48 | / grpo24 |", "|" + "---|" * 10]
    for name, r in results.items():
        grpc_s = f"{r['rollout_grpc_s']:.3f}" if r["rollout_grpc_s"] else "n/a (no pruning)"
        lines.append(
            f"| {name} | {r['nfe']} | {r['nfe'] / base['nfe']:.3f} | {r['rollout_s']:.3f} | "
            f"{r['rollout_s'] / base['rollout_s']:.2f} | {r['rollout_s'] / ref['rollout_s']:.2f} | {grpc_s} | "
            f"{r['train_s']:.3f} | {r['train_s'] / base['train_s']:.2f} | {r['train_s'] / ref['train_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="prompts (groups) per rollout (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (groups / 4, 1 repeat) to check it runs")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    configs = scale(CONFIGS, 1 / 4 if args.quick else 1)
    repeats = 1 if args.quick else args.repeats
    torch.manual_seed(0)
    recipe = ToyRecipe(pretrain_steps=3, batch_size=16) if args.quick else ToyRecipe()
    policy = ToyDigitPolicy(recipe=recipe, progress=False)
    reward = create_backend("digit")
    prompts = [f"a handwritten digit {d % 10}" for d in range(args.prompts)]
    with tempfile.TemporaryDirectory() as tmp, LocalStack(["digit"], Path(tmp)) as stack:
        client = PrunerClient(stack.pruner.address)
        results = measure(policy, reward, configs, prompts, args.steps, repeats, client)
        client.close()
    for name, (group, schedule, _, _) in configs.items():
        assert results[name]["nfe"] == expected_nfe(group, schedule, args.steps, len(prompts)), name
    print(f"rollout benchmark: toy digit model, {len(prompts)} prompts, {args.steps} steps, median of {repeats}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(table(results))
    print("x0-previews: no model call is made for a preview (pruning at step s decides on the preview of x_s "
          "from step s's own call; NFE equals the sum over steps of the trajectories calling the model)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
