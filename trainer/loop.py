"""The one training loop: rollout (expand & prune) -> rewards -> advantages -> GRPO update."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from epgrpo.trainer import config as cfg
from epgrpo.trainer.algorithms import create_algorithm
from epgrpo.trainer.clients import PrunerClient, ServiceCallError, ServicesUnavailable
from epgrpo.trainer.config_checks import check_sampler_options
from epgrpo.trainer.distributed import Distributed
from epgrpo.trainer.ema import EMA
from epgrpo.trainer.grpo import PromptStatTracker
from epgrpo.trainer.monitors import reward_judge_gap, zero_std_ratio
from epgrpo.trainer.policy.base import PolicyAdapter
from epgrpo.trainer.prompts import DIGIT_PROMPTS, load_prompts
from epgrpo.trainer.pruning import FallbackPruneSession, select_after_sampling
from epgrpo.trainer.report import MetricsWriter, plot_curves, save_grid
from epgrpo.trainer.retries import IterationRetries
from epgrpo.trainer.reward_client import RewardClient
from epgrpo.trainer.rollout import RolloutResult, micro_batch_order, rollout_steps, sample_eval, sample_seeds
from epgrpo.trainer.trainer_state import TrainerState
from epgrpo.trainer.wandb_log import WandbLogger
from epgrpo.trainer.waves import concat_results, run_waves, split_waves

log = logging.getLogger("epgrpo.trainer")

def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class Trainer(TrainerState, IterationRetries):
    def __init__(self, config: cfg.Config, policy: PolicyAdapter, reward: RewardClient, pruner: PrunerClient,
                 dist: Distributed | None = None):
        self.c = config
        self.policy = policy
        self.reward = reward
        self.pruner = pruner
        self.dist = dist or Distributed(device=str(policy.device))
        self.rewards = cfg.parse_rewards(config.reward.rewards, "reward.rewards")
        self.proxy_rewards = cfg.parse_rewards(config.prune.proxy_rewards, "prune.proxy_rewards") or self.rewards
        self.judge = cfg.parse_rewards(config.reward.judge, "reward.judge")
        self.schedule = cfg.schedule(config)
        if config.prune.preview_frames == "first" and len(policy.latent_shape) != 4:
            raise ValueError(f"prune.preview_frames: 'first' needs a video model (latents [C, F, H, W]); model "
                             f"{config.model.name!r} has latents {list(policy.latent_shape)}")
        self.keep = cfg.final_keep(config)
        self.sampler = policy.make_sampler(config.sampling.num_steps,
                                           cfg.sampler_options(config)).with_kl_form(config.train.kl_form)
        check_sampler_options(config, self.sampler)  # an option this model's sampler would ignore stops here
        self.algorithm = create_algorithm(config)  # what is stochastic, what is trained, the loss
        self.algorithm.check_sampler(self.sampler)
        self.out = Path(config.out_dir)
        self.eval_sampler = policy.make_sampler(config.eval.num_steps or config.sampling.num_steps,
                                                cfg.sampler_options(config))
        self.stochastic_eval = {"auto": self.eval_sampler.stochastic_eval, "deterministic": False,
                                "stochastic": True}[config.eval.sampler]
        t = config.train
        self.fsdp = None  # with train.fsdp over several ranks: weights, gradients, optimizer and EMA sharded
        if t.fsdp and self.dist.world_size > 1:
            from epgrpo.trainer.fsdp import FSDP

            self.fsdp = FSDP(policy, self.dist.world_size, self.dist.device)  # before the optimizer sees the weights
        self.optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.lr_scheduler = get_scheduler(t.lr_schedule, self.optimizer, num_warmup_steps=t.lr_warmup_iterations,
                                          num_training_steps=t.iterations)  # stepped once per iteration
        self.ema = EMA(policy.trainable_parameters(), t.ema_decay, t.ema_every) if t.ema else None
        self.tracker = PromptStatTracker(t.stat_buffer, t.stat_min_count, t.global_std, clip=t.adv_clip)
        # the embedded task's digit prompts unless a prompt file is given
        self.prompts = load_prompts(t.prompt_file, "train.prompt_file") if t.prompt_file else \
            getattr(policy, "default_prompts", None) or DIGIT_PROMPTS  # a toy's own task (toy_video: moving digits)
        eval_prompts = load_prompts(config.eval.prompt_file, "eval.prompt_file") if config.eval.prompt_file else self.prompts
        self.eval_prompts = eval_prompts[:config.eval.max_prompts]
        self.prompts_per_iteration = min(t.prompts_per_iteration, len(self.prompts))
        if self.prompts_per_iteration % self.dist.world_size:
            raise ValueError(f"train.prompts_per_iteration: expected a multiple of the {self.dist.world_size} ranks "
                             f"(whole groups per rank), got {self.prompts_per_iteration}")
        self.rng = random.Random(t.seed)  # prompt sampler; identical on every rank
        self.nfe_cumulative = 0
        self.nfe_full_cumulative = 0
        self.completed_iteration = 0

    def config_dict(self) -> dict:
        return cfg.to_dict(self.c)

    def check_services(self) -> None:
        """Fails fast, before any work, if a reward we need is not served."""
        self.reward.require([n for n, _ in self.rewards], "reward.rewards")
        self.reward.require([n for n, _ in self.proxy_rewards], "prune.proxy_rewards")
        if self.judge:
            self.reward.require([n for n, _ in self.judge], "reward.judge")
        if self.schedule:
            self.pruner.require_decoder(self.preview_decoder)

    @property
    def preview_decoder(self) -> str:
        return self.c.model.preview_decoder or self.policy.preview_decoder

    # -- evaluation ---------------------------------------------------------------------------
    @property
    def evaluates(self) -> bool:
        """Whether this rank runs evaluations: rank 0, and with FSDP every rank (the sharded
        transformer runs only when every rank calls it; only rank 0 scores)."""
        return self.dist.is_main or self.fsdp is not None

    def evaluate(self, iteration: int) -> tuple[dict, np.ndarray]:
        """Samples of the evaluation prompts with fixed seeds (with the EMA weights, if kept);
        scored on rank 0 (other ranks get an empty record)."""
        n = self.c.eval.samples_per_prompt
        prompts = [p for p in self.eval_prompts for _ in range(n)]
        seeds = [self.c.eval.seed * 100_003 + k for k in range(len(prompts))]  # fixed across evaluations
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            images = self.policy.decode(sample_eval(self.policy, prompts, seeds, self.eval_sampler,
                                                    self.stochastic_eval, self.c.sampling.batch_size))
        if not self.dist.is_main:
            return {}, images
        reward, _ = self.reward.score(images, prompts, self.rewards, request_id=f"eval-{iteration}")
        record = {"iteration": iteration, "reward": float(reward.mean())}
        if self.judge:
            judge, _ = self.reward.score(images, prompts, self.judge, request_id=f"eval-judge-{iteration}")
            record["judge"] = float(judge.mean())
            record.update(reward_judge_gap(record, getattr(self, "first_evaluation", None)))
        return record, images

    def is_evaluation(self, iteration: int) -> bool:
        """Whether the run evaluates after ``iteration`` (every eval.every, and after the last)."""
        every = self.c.eval.every
        return bool(every and iteration % every == 0) or iteration == self.c.train.iterations

    # -- one iteration ------------------------------------------------------------------------
    def sde_steps(self, iteration: int) -> list[int] | None:
        """The stochastic steps of this iteration's rollouts (None = every step but the last), as the
        algorithm says."""
        return self.algorithm.sde_steps(iteration)

    def sample_and_score(self, iteration: int, prompts: list[str], first_group: int = 0):
        """This rank's groups, sampled in ``sampling.waves`` waves and scored as each wave ends.

        Group ``g`` of the list is global group ``first_group + g``, and its trajectories take the
        seeds of their global index (ranks never share noise, and the samples depend neither on the
        number of ranks nor on the number of waves). Returns (batch, rewards, raw rewards per name,
        rollout seconds).
        """
        c = self.c
        size = c.prune.group_size
        seeds = sample_seeds(c.train.seed, iteration, self.prompts_per_iteration * size)
        strategy = "random" if c.prune.mode == "random_prune" else "ovf"
        waves = split_waves(len(prompts), c.sampling.waves)
        sde_steps = self.sde_steps(iteration)
        start = time.perf_counter()
        scores: dict[int, Future] = {}
        with contextlib.ExitStack() as stack:
            executor = stack.enter_context(ThreadPoolExecutor(max_workers=2 * len(waves), thread_name_prefix="wave"))
            rollouts, sessions = [], []
            for k, wave in enumerate(waves):
                groups = range(first_group + wave.start, first_group + wave.stop)  # global group indices
                session = None
                if self.schedule:
                    rollout_id = f"it{iteration}-r{self.dist.rank}" + (f"-w{k}" if len(waves) > 1 else "")
                    session = stack.enter_context(self.pruner.open(
                        self.schedule, c.sampling.num_steps, self.proxy_rewards, strategy,
                        seed=c.prune.seed * 1_000_003 + iteration, decoder=self.preview_decoder, rollout_id=rollout_id,
                        preview_frames=c.prune.preview_frames))
                    if c.pruner.on_unavailable == "no_prune":
                        session = FallbackPruneSession(session, rollout_id)
                sessions.append(session)
                rollouts.append(rollout_steps(
                    self.policy, prompts[wave.start:wave.stop], size, self.sampler, schedule=self.schedule,
                    seeds=seeds[groups.start * size:groups.stop * size], sde_last_step=c.sampling.sde_last_step,
                    group_ids=[f"it{iteration}-g{g}" for g in groups], sde_steps=sde_steps,
                    batch_size=c.sampling.batch_size, first_trajectory=wave.start * size))

            def score(k: int, result: RolloutResult) -> None:  # decoded here, scored off this thread
                images = self.policy.decode(result.final)
                request_id = f"it{iteration}-r{self.dist.rank}" + (f"-w{k}" if len(waves) > 1 else "")
                # each image's group travels with it: group-aware rewards score a group jointly
                scores[k] = executor.submit(self.reward.score, images, result.prompts, self.rewards,
                                            request_id=request_id, groups=result.group_index.tolist())

            results = run_waves(rollouts, sessions, executor, on_finish=score)
            rollout_s = time.perf_counter() - start
            scored = [scores[k].result() for k in range(len(waves))]
        self.fallback_groups = sum(len(getattr(s, "fallback_groups", ())) for s in sessions)
        batch = concat_results(results, [w.start for w in waves])
        rewards = np.concatenate([r for r, _ in scored])
        raw = {name: np.concatenate([named[name] for _, named in scored]) for name in scored[0][1]}
        return batch, rewards, raw, rollout_s

    def iteration(self, iteration: int) -> dict:
        c, dist = self.c, self.dist
        start = time.perf_counter()
        self.fallback_groups = 0  # groups that went on unpruned because the pruner was unreachable
        # every rank draws the same prompts and takes its own contiguous share of whole groups
        prompts = self.rng.sample(self.prompts, self.prompts_per_iteration)
        per_rank = len(prompts) // dist.world_size
        first_group = dist.rank * per_rank
        self.policy.train(False)
        failure = None
        try:  # every service call of the iteration, before its first collective
            batch, rewards, raw, rollout_s = self.sample_and_score(iteration, prompts[first_group:first_group + per_rank],
                                                                   first_group)
            final_rewards = rewards
            if c.prune.mode == "full_ovf":
                rows, fell_back = select_after_sampling(self.pruner, batch, rewards, iteration, self.keep,
                                                        fallback=c.pruner.on_unavailable == "no_prune")
                self.fallback_groups += fell_back
                batch, rewards = batch.keep(rows), rewards[rows.cpu().numpy()]
        except (ServiceCallError, ServicesUnavailable) as e:
            if not self.ranks_retry_together:
                raise
            failure = e
        if self.ranks_retry_together:  # before the first collective: every rank learns how the others fared
            self.agree_on_failures(failure)
        all_rewards = dist.gather(torch.from_numpy(final_rewards).double()).numpy()
        # all ranks see all kept rewards: identical advantages and stat tracker everywhere
        kept_rewards = dist.gather(torch.from_numpy(rewards).double())
        kept_groups = dist.gather(batch.group_index.cpu() + first_group)
        nfe, nfe_full = (int(v) for v in dist.sum([batch.nfe, batch.nfe_full]))
        record = {
            "iteration": iteration, "reward_mean": float(kept_rewards.mean()),
            "reward_std": float(kept_rewards.std(unbiased=False)),
            "reward_mean_all_final": float(all_rewards.mean()), "kept": len(kept_rewards),
            "nfe": nfe, "nfe_full": nfe_full,
            "survivors_per_step": [int(v) for v in dist.sum(batch.survivors_per_step)],
            "zero_std_ratio": zero_std_ratio(kept_rewards, kept_groups),
        }
        self.nfe_cumulative += nfe
        self.nfe_full_cumulative += nfe_full
        record["nfe_cumulative"] = self.nfe_cumulative
        fallback_groups = int(dist.sum([self.fallback_groups])[0])  # over all ranks
        if fallback_groups:
            record["pruner_fallback_groups"] = fallback_groups
        if not torch.isfinite(kept_rewards).all():
            record["skipped"] = f"{int((~torch.isfinite(kept_rewards)).sum())} non-finite rewards; weights untouched"
            log.warning("iteration %d skipped: %s", iteration, record["skipped"])
        else:
            advantages = self.tracker.advantages([prompts[g] for g in kept_groups.tolist()], kept_rewards)
            offset = sum(dist.counts(len(rewards))[:dist.rank])  # ranks may keep different numbers
            mine = slice(offset, offset + len(rewards))
            train_steps = self.algorithm.train_steps(batch, iteration)
            train_start = time.perf_counter()
            # Ranks that kept fewer trajectories (pruner.on_unavailable=no_prune elsewhere) pad with
            # zero-weight micro-batches: every rank then takes the same optimizer steps (their gradient
            # all-reduces line up) and, under FSDP, makes the same forward/backward calls.
            micro_batches = max(dist.counts(math.ceil(len(rewards) / c.train.train_batch_size)))
            stats = self.update_policy(batch, advantages[mine], iteration, train_steps, micro_batches,
                                       first_group * c.prune.group_size)
            last = asdict(stats[-1])
            keys = [k for k, v in last.items() if isinstance(v, float)]
            record.update(zip(keys, dist.mean([last[k] for k in keys])))  # mean over ranks
            record["optimizer_steps"] = sum(s.optimizer_steps for s in stats)
            record["trained_steps"] = train_steps
            if any(s.skipped for s in stats):
                record["skipped"] = next(s.skipped for s in stats if s.skipped)
                log.warning("iteration %d: optimizer step skipped: %s", iteration, record["skipped"])
            record["train_s"] = time.perf_counter() - train_start
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():  # stepped every iteration, also when the update was skipped
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.lr_scheduler.step()
        for name, values in raw.items():
            record[f"reward/{name}"] = dist.mean([float(values.mean())])[0]
        record["rollout_s"] = rollout_s
        record["iteration_s"] = time.perf_counter() - start
        return record

    def update_policy(self, batch: RolloutResult, advantages: torch.Tensor, iteration: int, train_steps: list[int],
                      micro_batches: int, trajectory_offset: int = 0):
        """The algorithm's update of this rank's kept trajectories (``optimize.policy_update``'s options);
        ``trajectory_offset``: the iteration-wide id of this rank's first trajectory."""
        c, dist = self.c, self.dist
        return self.algorithm.update(self.policy, self.optimizer, batch, advantages, self.sampler, iteration=iteration,
                                     clip_range=c.train.clip_range, beta=c.train.beta,
                                     inner_epochs=c.train.inner_epochs, max_grad_norm=c.train.max_grad_norm,
                                     train_batch_size=c.train.train_batch_size,
                                     gradient_accumulation=c.train.gradient_accumulation,
                                     optimizer_steps=c.train.optimizer_steps, train_steps=train_steps,
                                     sync_gradients=dist.all_reduce_mean_ if self.fsdp is None else None,  # FSDP: in backward
                                     after_step=self.ema.step if self.ema is not None else None,
                                     micro_batches=micro_batches, trajectory_offset=trajectory_offset,
                                     order=micro_batch_order(len(advantages), c.train.seed, iteration, dist.rank))

    # -- the run ------------------------------------------------------------------------------
    @staticmethod
    def _read_jsonl(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def run(self) -> Path:
        """Trains to train.iterations, writes the outputs and returns summary.json's path. The W&B
        run (log.wandb, rank 0) is finished on the way out, marked failed when training raised."""
        self.wandb = WandbLogger(self.c, self.out) if self.c.log.wandb and self.dist.is_main else None
        with self.wandb or contextlib.nullcontext():
            return self._run()

    def _run(self) -> Path:
        c, main = self.c, self.dist.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_services()
        done = self.resume()
        if main:
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(c), indent=2))
            if done == 0:  # a fresh run never appends to an earlier run's metrics
                for name in ("metrics.jsonl", "eval.jsonl"):
                    (self.out / name).unlink(missing_ok=True)
        if self.wandb is not None:  # after the restore: a resumed run continues its W&B run
            self.wandb.start(resumed=done > 0)
        writer = MetricsWriter(self.out, purge_step=done + 1, wandb=self.wandb) if main else None
        start = time.perf_counter()
        evals, iterations = self._read_jsonl(self.out / "eval.jsonl"), self._read_jsonl(self.out / "metrics.jsonl")
        self.first_evaluation = evals[0] if evals else None  # the reward-hacking monitor's baseline
        last_images, evaluated = None, False  # evaluated: the same on every rank (each joins the agreement)
        if done == 0:
            first, last_images = self.evaluate_in_step(0)
            evaluated = True
        elif self.is_evaluation(done) and self.dist.counts(int(main and not any(e.get("iteration") == done
                                                                           for e in evals)))[0]:
            # the run stopped while evaluating that iteration (a service failed): evaluate it now (rank 0's
            # eval.jsonl decides: a node-local out_dir elsewhere need not hold it)
            e, last_images = self.evaluate_in_step(done)
            evaluated = True
            if main:
                evals.append(e)
                writer.write("eval", e, done)
        if done == 0 and main:
            evals = [first]
            self.first_evaluation = first
            writer.write("eval", first, 0)
            writer.add_samples("eval/samples", last_images, 0, c.eval.samples_per_prompt)  # videos: TensorBoard video
            if self.wandb is not None:
                self.wandb.log_evaluation(0, last_images, evals, iterations)
            save_grid(last_images, self.out / "samples_first.png", columns=c.eval.samples_per_prompt)
        bar = tqdm(range(done + 1, c.train.iterations + 1), desc=f"GRPO ({c.prune.mode})",
                   disable=not c.progress or not main)
        for it in bar:
            record = self.iteration_with_retries(it)
            self.completed_iteration = it
            iterations.append(record)
            if main:  # before evaluating: a checkpoint saved at a failed evaluation holds the iteration's record
                writer.write("metrics", record, it)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", nfe=f"{record['nfe']}/{record['nfe_full']}")
            evaluation = self.is_evaluation(it)
            if evaluation:
                e, last_images = self.evaluate_in_step(it)
                evaluated = True
            if main:
                if evaluation:
                    evals.append(e)
                    writer.write("eval", e, it)
                    writer.add_samples("eval/samples", last_images, it, c.eval.samples_per_prompt)
                    if self.wandb is not None:
                        self.wandb.log_evaluation(it, last_images, evals, iterations)
                    bar.write(f"eval @ {it}: reward {e['reward']:.3f}" + (f", judge {e['judge']:.3f}" if "judge" in e else ""))
            if (c.train.checkpoint_every and it % c.train.checkpoint_every == 0) or it == c.train.iterations:
                if main:
                    writer.flush()
                self.checkpoint()
        wall = time.perf_counter() - start
        if not evaluated:  # resumed after the last iteration: nothing sampled here
            e, last_images = self.evaluate_in_step(self.completed_iteration)
        if self.fsdp is not None:  # every rank gathers the sharded weights, rank 0 writes them
            with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                exported = self.fsdp.export(self.out, main)
        if not main:
            return self.out / "summary.json"
        writer.close()
        save_grid(last_images, self.out / "samples_last.png", columns=c.eval.samples_per_prompt)
        plot_curves(evals, iterations, self.out / "reward_curve.png", f"{c.prune.mode}, {c.model.name}")
        if self.fsdp is None:
            with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                exported = self.policy.export(self.out)
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
            "ranks": self.dist.world_size,
            "trained_weights": [str(p) for p in exported],
        }
        path = self.out / "summary.json"
        path.write_text(json.dumps(summary, indent=2))
        return path
