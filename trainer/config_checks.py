"""Validation of a loaded ``Config``: every check names the bad field and what was expected, and
runs before any work (``load_config`` calls ``validate``; ``check_paths`` runs before models load)."""

from __future__ import annotations

import math
from pathlib import Path

import dataclasses
import typing

from epgrpo.trainer.config import (ChannelOptions, Config, _coerce, iter_fields, parse_rewards,
                                   sde_window_range)

# what a reward.services entry may set: the address, the deadlines and the shared channel options
ROUTE_OPTIONS = ("address", *(f.name for f in dataclasses.fields(ChannelOptions)), "deadline_s", "retry_budget_s")


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
        check_channel(dataclasses.replace(c.reward, **entry), key)
        c.reward.services[name] = entry if set(entry) != {"address"} else entry["address"]


def check_channel(section: ChannelOptions, key: str) -> None:
    """The TLS options of one connection (a service section or a reward.services entry)."""
    if bool(section.tls_cert) != bool(section.tls_key):
        raise ValueError(f"{key}.tls_cert: expected tls_cert and tls_key together, got "
                         f"{(section.tls_cert, section.tls_key)!r}")


def check_types(c: Config) -> None:
    """Every enumeration and typed list holds what its type declares, also in a Config built in code
    (``load_config`` converts and checks each value as it is set)."""
    for key, t, _, _ in iter_fields():
        if typing.get_origin(t) in (typing.Literal, list):
            section, _, name = key.rpartition(".")
            holder = c
            for part in filter(None, section.split(".")):
                holder = getattr(holder, part)
            value = getattr(holder, name)
            _coerce(key, t, value)
            if typing.get_origin(t) is list:  # set in code: no conversion happened, so the type must match
                item = typing.get_args(t)[0]
                for i, v in enumerate(value):
                    if type(v) is not item:
                        raise ValueError(f"{key}[{i}]: expected {item.__name__}, got {v!r}")


def validate(c: Config) -> None:
    def need(ok: bool, key: str, expectation: str, value) -> None:
        if not ok:
            raise ValueError(f"{key}: expected {expectation}, got {value!r}")

    check_types(c)
    need(c.sampling.num_steps >= 2, "sampling.num_steps", ">= 2", c.sampling.num_steps)
    need(c.sampling.shift >= 0, "sampling.shift", ">= 0 (0 = the model's own)", c.sampling.shift)
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
    check_channel(c.reward, "reward")
    check_channel(c.pruner, "pruner")
    need(bool(parse_rewards(c.reward.rewards, "reward.rewards")), "reward.rewards", "at least one reward", c.reward.rewards)
    parse_rewards(c.prune.proxy_rewards, "prune.proxy_rewards")
    need(c.model.lora_rank >= 0, "model.lora_rank", ">= 0", c.model.lora_rank)
    need(c.model.device == "auto" or c.model.device.split(":")[0] in ("cpu", "cuda"), "model.device",
         "auto, cpu or cuda[:i]", c.model.device)
    validate_policy_options(c, need)
    from epgrpo.trainer.algorithms.base import check_algorithm_options

    check_algorithm_options(c)


def validate_policy_options(c: Config, need) -> None:
    """Model, SDE-window, optimisation and checkpoint options."""
    need(c.model.resolution >= 0, "model.resolution", ">= 0", c.model.resolution)
    need(c.model.max_sequence_length >= 0, "model.max_sequence_length", ">= 0 (0 = the stock pipeline's)",
         c.model.max_sequence_length)
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
    need(not (t.lr_warmup_iterations and t.lr_schedule == "constant"), "train.lr_schedule",
         "a schedule with warm-up (constant_with_warmup, linear, cosine) when lr_warmup_iterations > 0", t.lr_schedule)
    need(0 <= t.ema_decay < 1, "train.ema_decay", "in [0, 1)", t.ema_decay)
    need(t.ema_every >= 1, "train.ema_every", ">= 1", t.ema_every)
    if t.fsdp:  # FSDP shards full fine-tuning's states; LoRA's are small and stay replicated
        need(c.model.lora_rank == 0, "model.lora_rank", "0 (full fine-tuning) with train.fsdp=true", c.model.lora_rank)
        # a rank whose pruner fails keeps all its trajectories and, in batches, makes more transformer calls
        # than the others; FSDP's collectives in every call need the same number on every rank
        need(c.pruner.on_unavailable != "no_prune" or c.sampling.batch_size == 0, "sampling.batch_size",
             "0 with train.fsdp=true and pruner.on_unavailable=no_prune", c.sampling.batch_size)
    need(c.eval.max_prompts >= 1, "eval.max_prompts", ">= 1", c.eval.max_prompts)
    validate_ignored_options(c, need)


def validate_ignored_options(c: Config, need) -> None:
    """Options that would be accepted and then have no effect: refused, saying why."""
    s = c.sampling
    need(not (s.sde_window_range and not s.sde_window_size), "sampling.sde_window_range",
         "[] without sampling.sde_window_size (it places the SDE window; without one every step but the last is "
         "stochastic)", s.sde_window_range)
    need(not (s.sde_window_size and s.sde_last_step), "sampling.sde_last_step",
         "false with sampling.sde_window_size (the window alone decides which steps are stochastic)", s.sde_last_step)
    need(not (c.model.preview_vae and not c.launch_services), "model.preview_vae",
         "empty with launch_services=false (it tells the pruner the trainer launches which VAE to decode with; "
         "start your own pruner with --vae instead)", c.model.preview_vae)
    need(c.model.dtype != "fp16", "model.dtype", "auto, fp32 or bf16: fp16 trains without loss scaling here, so small "
         "gradients underflow to zero; use bf16 (same memory, fp32's range)", c.model.dtype)


def check_sampler_options(c: Config, sampler) -> None:
    """sampling.shift / noise_level (flow) and eta (DDIM) set away from their defaults for a sampler that
    does not read them: refused, naming the option (``sampler.reads``: the SamplerOptions it uses)."""
    from epgrpo.trainer.config import SamplingConfig

    default = SamplingConfig()
    for name in ("shift", "noise_level", "eta"):
        value = getattr(c.sampling, name)
        if name not in sampler.reads and value != getattr(default, name):
            raise ValueError(f"sampling.{name}: model.name={c.model.name} samples with {type(sampler).__name__}, "
                             f"which does not use it (it reads sampling.{', sampling.'.join(sampler.reads)}); got "
                             f"{value}, leave it at {getattr(default, name)}")


def check_paths(c: Config) -> None:
    """Files the run will read; checked before any model is loaded (kept out of ``validate`` so
    that a config written for another machine still loads and prints)."""
    for key, path in [("train.prompt_file", c.train.prompt_file), ("eval.prompt_file", c.eval.prompt_file),
                      ("train.resume_from", "" if c.train.resume_from in ("", "latest") else c.train.resume_from),
                      ("model.preview_vae", c.model.preview_vae)]:
        if path and not Path(path).exists():
            raise ValueError(f"{key}: expected an existing {'directory' if key in ('train.resume_from', 'model.preview_vae') else 'file'}, got {path!r}")


