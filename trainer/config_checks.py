"""Validation of a loaded ``Config``: every check names the bad field and what was expected, and
runs before any work (``load_config`` calls ``validate``; ``check_paths`` runs before models load)."""

from __future__ import annotations

import math
from pathlib import Path

from epgrpo.trainer.config import EVAL_SAMPLERS, MODES, Config, _coerce, parse_rewards, sde_window_range

ROUTE_OPTIONS = ("address", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "token_file", "deadline_s",
                 "retry_budget_s")


def validate_reward_services(c: Config) -> None:
    for name, entry in c.reward.services.items():
        key = f"reward.services.{name}"
        if isinstance(entry, str):
            entry = {"address": entry}
        if not isinstance(entry, dict):
            raise ValueError(f"{key}: expected an address or a mapping of {', '.join(ROUTE_OPTIONS)}, got {entry!r}")
        unknown = sorted(set(entry) - set(ROUTE_OPTIONS))
        if unknown:
            raise ValueError(f"{key}.{unknown[0]}: unknown option; known: {', '.join(ROUTE_OPTIONS)}")
        if not str(entry.get("address", "")).strip():
            raise ValueError(f"{key}.address: expected host:port of the service scoring {name!r}, got ''")
        for option in ("deadline_s", "retry_budget_s"):
            if option in entry:
                entry[option] = _coerce(f"{key}.{option}", float, entry[option])
        c.reward.services[name] = entry if set(entry) != {"address"} else entry["address"]


def validate(c: Config) -> None:
    def need(ok: bool, key: str, expectation: str, value) -> None:
        if not ok:
            raise ValueError(f"{key}: expected {expectation}, got {value!r}")

    need(c.prune.mode in MODES, "prune.mode", " | ".join(MODES), c.prune.mode)
    need(c.eval.sampler in EVAL_SAMPLERS, "eval.sampler", " | ".join(EVAL_SAMPLERS), c.eval.sampler)
    need(c.pruner.on_unavailable in ("retry", "no_prune"), "pruner.on_unavailable", "retry | no_prune",
         c.pruner.on_unavailable)
    need(c.sampling.num_steps >= 2, "sampling.num_steps", ">= 2", c.sampling.num_steps)
    need(c.sampling.shift > 0, "sampling.shift", "> 0", c.sampling.shift)
    need(c.sampling.waves >= 1, "sampling.waves", ">= 1", c.sampling.waves)
    validate_reward_services(c)
    need(0 < c.sampling.noise_level <= 2, "sampling.noise_level", "in (0, 2]", c.sampling.noise_level)
    need(0 < c.sampling.eta <= 2, "sampling.eta", "in (0, 2] (the rollout steps must be stochastic)", c.sampling.eta)
    need(c.prune.group_size >= 2, "prune.group_size", ">= 2", c.prune.group_size)
    if c.prune.mode != "grpo":
        need(len(c.prune.keeps) >= 1, "prune.keeps", "at least one value", c.prune.keeps)
        keeps = [c.prune.group_size, *c.prune.keeps]
        need(all(a > b for a, b in zip(keeps, keeps[1:])), "prune.keeps",
             f"strictly decreasing values below group_size={c.prune.group_size}", c.prune.keeps)
        need(c.prune.keeps[-1] >= 2, "prune.keeps", "a last value >= 2 (advantages need a spread)", c.prune.keeps)
    if c.prune.mode in ("expand_prune", "random_prune"):
        need(len(c.prune.steps) == len(c.prune.keeps), "prune.steps", f"{len(c.prune.keeps)} steps (one per keep)", c.prune.steps)
        steps = c.prune.steps
        need(all(1 <= s < c.sampling.num_steps for s in steps), "prune.steps",
             f"steps in [1, {c.sampling.num_steps - 1}]", steps)
        need(all(a < b for a, b in zip(steps, steps[1:])), "prune.steps", "strictly increasing steps", steps)
    for key, value in [("train.lr", c.train.lr), ("train.clip_range", c.train.clip_range),
                       ("train.adv_clip", c.train.adv_clip), ("train.max_grad_norm", c.train.max_grad_norm)]:
        need(math.isfinite(value) and value > 0, key, "a finite number > 0", value)
    need(math.isfinite(c.train.beta) and c.train.beta >= 0, "train.beta", "a finite number >= 0", c.train.beta)
    for key, value in [("train.iterations", c.train.iterations), ("train.prompts_per_iteration", c.train.prompts_per_iteration),
                       ("train.inner_epochs", c.train.inner_epochs), ("train.train_batch_size", c.train.train_batch_size),
                       ("eval.samples_per_prompt", c.eval.samples_per_prompt)]:
        need(value >= 1, key, ">= 1", value)
    need(c.eval.every >= 0, "eval.every", ">= 0", c.eval.every)
    for key, value in [("reward.deadline_s", c.reward.deadline_s), ("pruner.deadline_s", c.pruner.deadline_s)]:
        need(math.isfinite(value) and value > 0, key, "a finite number of seconds > 0", value)
    for key, value in [("reward.retry_budget_s", c.reward.retry_budget_s),
                       ("pruner.retry_budget_s", c.pruner.retry_budget_s)]:
        need(math.isfinite(value) and value >= 0, key, "a finite number of seconds >= 0 (0 = no retries)", value)
    for name in ("reward", "pruner"):
        section = getattr(c, name)
        need(bool(section.tls_cert) == bool(section.tls_key), f"{name}.tls_cert", "tls_cert and tls_key together",
             (section.tls_cert, section.tls_key))
    need(bool(parse_rewards(c.reward.rewards, "reward.rewards")), "reward.rewards", "at least one reward", c.reward.rewards)
    parse_rewards(c.prune.proxy_rewards, "prune.proxy_rewards")
    need(c.model.lora_rank >= 0, "model.lora_rank", ">= 0", c.model.lora_rank)
    need(c.model.device == "auto" or c.model.device.split(":")[0] in ("cpu", "cuda"), "model.device",
         "auto, cpu or cuda[:i]", c.model.device)
    validate_policy_options(c, need)


LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def validate_policy_options(c: Config, need) -> None:
    """Model, SDE-window, optimisation and checkpoint options."""
    need(c.model.dtype in ("auto", "fp32", "bf16", "fp16"), "model.dtype", "auto | fp32 | bf16 | fp16", c.model.dtype)
    need(c.model.resolution >= 0, "model.resolution", ">= 0", c.model.resolution)
    need(c.model.max_sequence_length >= 1, "model.max_sequence_length", ">= 1", c.model.max_sequence_length)
    need(c.model.lora_alpha >= 0, "model.lora_alpha", ">= 0", c.model.lora_alpha)
    g = c.sampling.guidance_scale
    need(math.isfinite(g) and g >= 1.0, "sampling.guidance_scale", "a finite number >= 1 (1 = no guidance)", g)
    size, window = c.sampling.sde_window_size, c.sampling.sde_window_range
    need(size >= 0, "sampling.sde_window_size", ">= 0", size)
    need(len(window) in (0, 2), "sampling.sde_window_range", "[] or [lo, hi]", window)
    if size:
        lo, hi = sde_window_range(c)
        need(0 <= lo and hi <= c.sampling.num_steps and hi - lo >= size, "sampling.sde_window_range",
             f"0 <= lo, hi <= num_steps={c.sampling.num_steps}, hi - lo >= sde_window_size={size}", [lo, hi])
    t = c.train
    need(0 < t.timestep_fraction <= 1, "train.timestep_fraction", "in (0, 1]", t.timestep_fraction)
    for key, value in [("train.gradient_accumulation", t.gradient_accumulation),
                       ("train.optimizer_steps", t.optimizer_steps), ("train.stat_buffer", t.stat_buffer),
                       ("train.stat_min_count", t.stat_min_count), ("train.lr_warmup_iterations", t.lr_warmup_iterations),
                       ("train.checkpoint_every", t.checkpoint_every), ("train.checkpoint_keep", t.checkpoint_keep),
                       ("eval.num_steps", c.eval.num_steps), ("sampling.batch_size", c.sampling.batch_size)]:
        need(value >= 0, key, ">= 0", value)
    need(not (t.optimizer_steps and t.gradient_accumulation), "train.optimizer_steps",
         "0 when train.gradient_accumulation is set (both choose the accumulation)", t.optimizer_steps)
    need(t.lr_schedule in LR_SCHEDULES, "train.lr_schedule", " | ".join(LR_SCHEDULES), t.lr_schedule)
    need(not (t.lr_warmup_iterations and t.lr_schedule == "constant"), "train.lr_schedule",
         "a schedule with warm-up (constant_with_warmup, linear, cosine) when lr_warmup_iterations > 0", t.lr_schedule)
    need(0 <= t.ema_decay < 1, "train.ema_decay", "in [0, 1)", t.ema_decay)
    need(t.ema_every >= 1, "train.ema_every", ">= 1", t.ema_every)
    need(c.eval.max_prompts >= 1, "eval.max_prompts", ">= 1", c.eval.max_prompts)


def check_paths(c: Config) -> None:
    """Files the run will read; checked before any model is loaded (kept out of ``validate`` so
    that a config written for another machine still loads and prints)."""
    for key, path in [("train.prompt_file", c.train.prompt_file), ("eval.prompt_file", c.eval.prompt_file),
                      ("train.resume_from", "" if c.train.resume_from in ("", "latest") else c.train.resume_from),
                      ("model.preview_vae", c.model.preview_vae)]:
        if path and not Path(path).exists():
            raise ValueError(f"{key}: expected an existing {'directory' if key in ('train.resume_from', 'model.preview_vae') else 'file'}, got {path!r}")


