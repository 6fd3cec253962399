"""The one training loop: rollout (expand & prune) -> rewards -> advantages -> GRPO update."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from epgrpo.trainer import config as cfg
from epgrpo.trainer.clients import PrunerClient, RewardClient
from epgrpo.trainer.grpo import group_advantages
from epgrpo.trainer.optimize import policy_update
from epgrpo.trainer.policy.base import PolicyAdapter
from epgrpo.trainer.report import MetricsWriter, plot_curves, save_grid
from epgrpo.trainer.rollout import RolloutResult, rollout, sample_ode, sample_seeds
from epgrpo.trainer.sde import sigma_grid

log = logging.getLogger("epgrpo.trainer")

DIGIT_PROMPTS = [f"a handwritten digit {d}" for d in range(10)]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class Trainer:
    def __init__(self, config: cfg.Config, policy: PolicyAdapter, reward: RewardClient, pruner: PrunerClient):
        self.c = config
        self.policy = policy
        self.reward = reward
        self.pruner = pruner
        self.rewards = cfg.parse_rewards(config.reward.rewards, "reward.rewards")
        self.proxy_rewards = cfg.parse_rewards(config.prune.proxy_rewards, "prune.proxy_rewards") or self.rewards
        self.judge = cfg.parse_rewards(config.reward.judge, "reward.judge")
        self.schedule = cfg.schedule(config)
        self.keep = cfg.final_keep(config)
        self.sigmas = sigma_grid(config.sampling.num_steps, config.sampling.shift).to(policy.device)
        self.out = Path(config.out_dir)
        self.optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=config.train.lr,
                                           weight_decay=config.train.weight_decay)
        self.prompts = DIGIT_PROMPTS  # the embedded task's prompt set
        self.rng = random.Random(config.train.seed)
        self.nfe_cumulative = 0
        self.nfe_full_cumulative = 0

    def check_services(self) -> None:
        """Fails fast, before any work, if a reward we need is not served."""
        self.reward.require([n for n, _ in self.rewards], "reward.rewards")
        self.reward.require([n for n, _ in self.proxy_rewards], "prune.proxy_rewards")
        if self.judge:
            self.reward.require([n for n, _ in self.judge], "reward.judge")

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, iteration: int) -> tuple[dict, np.ndarray]:
        n = self.c.eval.samples_per_prompt
        prompts = [p for p in self.prompts for _ in range(n)]
        seeds = [self.c.eval.seed * 100_003 + k for k in range(len(prompts))]  # fixed across evaluations
        images = self.policy.decode(sample_ode(self.policy, prompts, seeds, self.sigmas))
        reward, _ = self.reward.score(images, prompts, self.rewards, request_id=f"eval-{iteration}")
        record = {"iteration": iteration, "reward": float(reward.mean())}
        if self.judge:
            judge, _ = self.reward.score(images, prompts, self.judge, request_id=f"eval-judge-{iteration}")
            record["judge"] = float(judge.mean())
        return record, images

    # -- one iteration ------------------------------------------------------------------------
    def sample(self, iteration: int, prompts: list[str]) -> RolloutResult:
        c = self.c
        group_ids = [f"it{iteration}-g{g}" for g in range(len(prompts))]
        seeds = sample_seeds(c.train.seed, iteration, len(prompts) * c.prune.group_size)
        kwargs = dict(noise_level=c.sampling.noise_level, seeds=seeds, sde_last_step=c.sampling.sde_last_step,
                      group_ids=group_ids)
        if not self.schedule:
            return rollout(self.policy, prompts, c.prune.group_size, self.sigmas, **kwargs)
        strategy = "random" if c.prune.mode == "random_prune" else "ovf"
        with self.pruner.open(self.schedule, c.sampling.num_steps, self.proxy_rewards, strategy,
                              seed=c.prune.seed * 1_000_003 + iteration, decoder=self.policy.preview_decoder,
                              rollout_id=f"it{iteration}") as stream:
            return rollout(self.policy, prompts, c.prune.group_size, self.sigmas, schedule=self.schedule,
                           pruner=stream, **kwargs)

    def select_after_sampling(self, batch: RolloutResult, rewards: np.ndarray, iteration: int) -> torch.Tensor:
        """full_ovf: the pruner picks each group's max-variance subset of the final rewards."""
        rows = []
        for g in torch.unique(batch.group_index).tolist():
            members = (batch.group_index == g).nonzero().flatten()
            ids = batch.trajectory_ids[members].tolist()
            kept = set(self.pruner.select_by_scores(f"it{iteration}-g{g}", ids, rewards[members.cpu().numpy()], self.keep))
            rows += [m for m, t in zip(members.tolist(), ids) if t in kept]
        return torch.tensor(sorted(rows), device=batch.group_index.device)

    def iteration(self, iteration: int) -> dict:
        c = self.c
        start = time.perf_counter()
        prompts = self.rng.sample(self.prompts, min(c.train.prompts_per_iteration, len(self.prompts)))
        self.policy.train(False)
        batch = self.sample(iteration, prompts)
        rollout_s = time.perf_counter() - start
        images = self.policy.decode(batch.final)
        rewards, raw = self.reward.score(images, batch.prompts, self.rewards, request_id=f"it{iteration}")
        all_rewards = rewards
        if c.prune.mode == "full_ovf":
            rows = self.select_after_sampling(batch, rewards, iteration)
            batch, rewards = batch.keep(rows), rewards[rows.cpu().numpy()]
        record = {
            "iteration": iteration, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "reward_mean_all_final": float(all_rewards.mean()), "kept": len(rewards),
            "nfe": batch.nfe, "nfe_full": batch.nfe_full,
            "survivors_per_step": batch.survivors_per_step,
        }
        self.nfe_cumulative += batch.nfe
        self.nfe_full_cumulative += batch.nfe_full
        record["nfe_cumulative"] = self.nfe_cumulative
        if not np.isfinite(rewards).all():
            record["skipped"] = f"{int((~np.isfinite(rewards)).sum())} non-finite rewards; weights untouched"
            log.warning("iteration %d skipped: %s", iteration, record["skipped"])
        else:
            advantages = group_advantages(torch.from_numpy(rewards), batch.group_index.cpu(), clip=c.train.adv_clip,
                                          global_std=c.train.global_std)
            train_start = time.perf_counter()
            stats = policy_update(self.policy, self.optimizer, batch, advantages, self.sigmas,
                                  noise_level=c.sampling.noise_level, clip_range=c.train.clip_range, beta=c.train.beta,
                                  inner_epochs=c.train.inner_epochs, max_grad_norm=c.train.max_grad_norm,
                                  train_batch_size=c.train.train_batch_size)
            record.update({k: v for k, v in asdict(stats[-1]).items() if k != "skipped"})
            if any(s.skipped for s in stats):
                record["skipped"] = next(s.skipped for s in stats if s.skipped)
                log.warning("iteration %d: optimizer step skipped: %s", iteration, record["skipped"])
            record["train_s"] = time.perf_counter() - train_start
        for name, values in raw.items():
            record[f"reward/{name}"] = float(values.mean())
        record["rollout_s"] = rollout_s
        record["iteration_s"] = time.perf_counter() - start
        return record

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> Path:
        c = self.c
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(c), indent=2))
        self.check_services()
        writer = MetricsWriter(self.out)
        start = time.perf_counter()
        evals, iterations = [], []
        first, first_images = self.evaluate(0)
        evals.append(first)
        writer.write("eval", first, 0)
        save_grid(first_images, self.out / "samples_first.png", columns=c.eval.samples_per_prompt)
        last_images = first_images
        bar = tqdm(range(1, c.train.iterations + 1), desc=f"GRPO ({c.prune.mode})", disable=not c.progress)
        for it in bar:
            record = self.iteration(it)
            iterations.append(record)
            writer.write("metrics", record, it)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}", nfe=f"{record['nfe']}/{record['nfe_full']}")
            if (c.eval.every and it % c.eval.every == 0) or it == c.train.iterations:
                e, last_images = self.evaluate(it)
                evals.append(e)
                writer.write("eval", e, it)
                bar.write(f"eval @ {it}: reward {e['reward']:.3f}" + (f", judge {e['judge']:.3f}" if "judge" in e else ""))
        wall = time.perf_counter() - start
        writer.close()
        save_grid(last_images, self.out / "samples_last.png", columns=c.eval.samples_per_prompt)
        plot_curves(evals, iterations, self.out / "reward_curve.png", f"{c.prune.mode}, {c.model.name}")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.policy.state_dict().items()},
                  self.out / "policy.safetensors")
        summary = {
            "mode": c.prune.mode,
            "iterations": c.train.iterations,
            "reward_first": evals[0]["reward"],
            "reward_last": evals[-1]["reward"],
            "judge_first": evals[0].get("judge", math.nan),
            "judge_last": evals[-1].get("judge", math.nan),
            "nfe_used": self.nfe_cumulative,
            "nfe_full_group": self.nfe_full_cumulative,
            "nfe_ratio": self.nfe_cumulative / max(1, self.nfe_full_cumulative),
            "wall_seconds": wall,
            "skipped_iterations": sum(1 for r in iterations if "skipped" in r),
            "rewards": c.reward.rewards,
            "judge": c.reward.judge,
        }
        path = self.out / "summary.json"
        path.write_text(json.dumps(summary, indent=2))
        return path
