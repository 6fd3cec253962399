"""Typed training configuration: dataclasses, loaded from YAML, overridden by ``key=value``.

Every field carries its help text (``epgrpo train --help`` prints them all). ``validate`` checks
everything before any work starts and names the bad field and value.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from epgrpo.protos.reward_names import split_top_level
from epgrpo.trainer.algorithms.options import AlgorithmConfig

# Modes are enumerations: a value outside them stops the run naming the field and the choices.
KlForm = Literal["exact", "flow_grpo"]
PruneMode = Literal["grpo", "full_ovf", "expand_prune", "random_prune"]
PreviewFrames = Literal["all", "first"]
EvalSampler = Literal["auto", "deterministic", "stochastic"]
OnUnavailable = Literal["retry", "no_prune"]
LrSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine"]
ComputeDtype = Literal["auto", "fp32", "bf16", "fp16"]
WandbMode = Literal["", "online", "offline"]


def opt(default, help: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = opt("toy_digits", "policy adapter: toy_digits (flow) | toy_digits_ddpm (diffusion, DDIM) | sd3 | "
                    "sd (SD 1.x/2.x, DDIM) | flux | qwen_image | flux2_klein | z_image | wan (Wan 2.x "
                    "text-to-video) | toy_video (docs/models.md) | package.module:name (a plugin module that registers its adapter "
                    "with epgrpo.trainer.policy.base.register_policy). Each family takes only the options below "
                    "marked for it (the toys: path, pretrain_steps, lora_*; every family: device, dtype, "
                    "preview_decoder); setting another family's option stops the run before any model loads")
    path: str = opt("", "model directory or hub id (sd3: a StableDiffusion3Pipeline, e.g. "
                    "stabilityai/stable-diffusion-3.5-medium; sd: a StableDiffusionPipeline, e.g. "
                    "CompVis/stable-diffusion-v1-4; flux: a FluxPipeline, e.g. black-forest-labs/FLUX.1-dev); "
                    "toys: empty = the cached base model (pretrained on first use)")
    pretrain_steps: int = opt(0, "toy models: pretraining steps of the base model (cached by recipe); 0 = the "
                              "model's default (toy_digits 120, toy_digits_ddpm 200)")
    lora_rank: int = opt(0, "LoRA rank (peft); 0 = full fine-tuning against a frozen reference copy")
    lora_alpha: float = opt(0.0, "LoRA alpha; 0 = 2 x rank")
    lora_targets: str = opt("", "comma-separated module-name suffixes LoRA adapts; empty = every attention projection "
                            "(sd3, flux, toys: attn.to_q/k/v, attn.to_out.0, attn.add_q/k/v_proj, attn.to_add_out, as "
                            "Flow-GRPO; sd: to_q, to_k, to_v, to_out.0 of the UNet, as DDPO)")
    device: str = opt("auto", "auto (cuda when present, else cpu), cpu or cuda[:i]; under accelerate launch each "
                      "rank uses its own GPU")
    dtype: ComputeDtype = opt("auto", "compute dtype: auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16 | fp16; trainable "
                     "weights stay fp32 and SDE log-probs are computed in fp32")
    resolution: int = opt(0, "sd3, sd, flux: image side in pixels; 0 = the model's default (1024 for SD3.5-M and "
                          "FLUX.1, 512 for SD 1.4; Flow-GRPO trains at 512); wan: video side (default 480)")
    num_frames: int = opt(0, "wan: video frames, 1 + 4k; 0 = the pipeline's default (81)")
    max_sequence_length: int = opt(0, "sd3, flux: T5 tokens per prompt; qwen_image, flux2_klein, z_image: Qwen text "
                                   "tokens; wan: UMT5 tokens; 0 = the stock pipeline's (sd3 256, flux 512, qwen_image "
                                   "512, flux2_klein 512, z_image 512, wan 512), so exported weights meet the "
                                   "conditioning they were trained with; the count is also written next to the "
                                   "exported weights (sampling.json)")
    true_cfg_scale: float = opt(1.0, "flux: true classifier-free guidance with an empty negative prompt (> 1 runs both "
                                "branches: 2 NFE per sample); sampling.guidance_scale is FLUX's distilled guidance "
                                "embedding (guidance-distilled checkpoints such as FLUX.1-dev)")
    negative_prompt: str = opt("", "qwen_image, z_image: the negative prompt of classifier-free guidance "
                               "(sampling.guidance_scale > 1)")
    text_encoder_3: bool = opt(True, "sd3: load the T5 text encoder (false: zeros in its place, saves ~9 GiB)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass (less memory, slower)")
    preview_decoder: str = opt("", "name of the pruner's decoder for x0-previews; empty = the adapter's default "
                               "(toys: pixel; sd3, sd, flux: vae, i.e. a pruner started with --vae DIR)")
    preview_vae: str = opt("", "with launch_services: the VAE directory the launched pruner decodes previews with; "
                           "empty = the model's own VAE (model.path's vae/)")


@dataclass
class SamplingConfig:
    num_steps: int = opt(10, "denoising steps per rollout")
    shift: float = opt(0.0, "time shift of the sigma grid; 0 = the model's own (sd3: its scheduler config's, 3.0 "
                       "for SD3.5, on the pipeline's set_timesteps grid; the toys: 1.0, no shift); flux: unused")
    noise_level: float = opt(0.7, "flow models: SDE noise level a (Flow-GRPO default 0.7)")
    eta: float = opt(1.0, "diffusion models (sd, toy_digits_ddpm): DDIM eta of the stochastic rollout steps "
                     "(DDPO: 1.0); evaluation: see eval.sampler")
    sde_last_step: bool = opt(False, "stochastic last step; default deterministic (ODE) and excluded from the loss")
    waves: int = opt(1, "split a rank's groups into this many waves: while one wave's pruning decision or final "
                     "scoring is in flight, the others denoise (same samples and result as 1; helps when the "
                     "services are remote)")
    batch_size: int = opt(0, "trajectories per transformer call when sampling (rollouts and evaluation; x2 with "
                          "guidance); 0 = all of a rank's live trajectories at once")
    guidance_scale: float = opt(1.0, "classifier-free guidance scale (sd3, sd; > 1 runs both branches: 2 NFE per "
                                "sample; Flow-GRPO uses 4.5, DDPO 5.0); flux: the distilled guidance embedding "
                                "(FLUX.1-dev: 3.5; 1 NFE, see model.true_cfg_scale); qwen_image, flux2_klein, z_image: their "
                                "pipeline's CFG (docs/models.md); the toy models have no guidance")
    sde_window_size: int = opt(0, "Flow-GRPO-Fast: only this many consecutive steps are stochastic (and trained), at a "
                               "random position per iteration; 0 = every step but the last")
    sde_window_range: list[int] = opt([], "[lo, hi]: the SDE window lies within steps lo..hi-1; empty = [0, num_steps // 2]")


@dataclass
class PruneConfig:
    mode: PruneMode = opt("expand_prune", "grpo: group_size samples per prompt, all trained; full_ovf: sample "
                          "group_size, keep keeps[-1] by optimal-variance filtering of the final rewards; "
                          "expand_prune: prune at prune.steps on x0-preview scores; random_prune: the same schedule, "
                          "survivors drawn at random (the ablation)")
    group_size: int = opt(16, "trajectories per prompt at the start (G for grpo, G_max otherwise)")
    steps: list[int] = opt([5, 7], "pruning steps: at step s the pruner decides on the x0-previews of x_s (from the "
                      "model call step s makes anyway) and only the survivors take step s and later ones; a pruned "
                      "trajectory costs s + 1 calls (the toy default prunes late: its previews rank trajectories "
                      "well from x_5 on; see docs/benchmarks.md)")
    keeps: list[int] = opt([8, 4], "survivors per group after each checkpoint (strictly decreasing)")
    proxy_rewards: str = opt("", "rewards scoring the x0-previews, 'name:weight,...'; empty = the training rewards")
    preview_frames: PreviewFrames = opt("all", "video models: the x0-previews the pruner decodes and scores: all = every "
                                        "latent frame; first = only the first latent frame (x0[:, :, :1]: a causal "
                                        "video VAE decodes it to the first video frame alone; the proxy rewards then "
                                        "see one-frame videos)")
    seed: int = opt(0, "seed of the random strategy")


@dataclass
class TrainConfig:
    algorithm: str = opt("grpo", "the objective that consumes the kept trajectories: grpo (Flow-GRPO / DDPO) | "
                         "grpo_guard | mixgrpo | nft (DiffusionNFT) | awm (Advantage Weighted Matching); each takes "
                         "only its own algo.* options (docs/algorithm.md); prune.mode works with every one")
    iterations: int = opt(30, "GRPO iterations")
    prompts_per_iteration: int = opt(10, "groups (prompts) per iteration")
    lr: float = opt(2e-4, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    beta: float = opt(0.04, "KL coefficient to the reference policy (0 disables the reference pass)")
    kl_form: KlForm = opt("exact", "the KL regulariser: exact = the KL of the step's Gaussians, (mean - mean_ref)^2 / "
                          "(2 std_t^2 |dt|); flow_grpo = Flow-GRPO's train_sd3.py form, / (2 std_t^2) without dt "
                          "(1/|dt| times weaker at the same beta; flow models only)")
    clip_range: float = opt(1e-4, "PPO clip range on the per-step importance ratio")
    adv_clip: float = opt(5.0, "advantages are clipped to +-adv_clip")
    global_std: bool = opt(False, "normalise advantages by the std over all groups")
    inner_epochs: int = opt(1, "optimisation passes over each iteration's samples")
    max_grad_norm: float = opt(1.0, "gradient-norm clipping")
    train_batch_size: int = opt(64, "trajectories per forward pass when computing the loss (per rank)")
    gradient_accumulation: int = opt(0, "micro-batches of train_batch_size per optimizer step; 0 = one optimizer "
                                     "step per inner epoch over all of the iteration's samples")
    optimizer_steps: int = opt(0, "optimizer steps per inner epoch, each over an equal share of the iteration's "
                               "micro-batches (Flow-GRPO: 2, so the clipped ratio acts on the second); 0 = as "
                               "gradient_accumulation says")
    timestep_fraction: float = opt(1.0, "fraction of the SDE steps trained on, drawn per iteration (Flow-GRPO)")
    stat_buffer: int = opt(0, "per-prompt advantage statistics: 0 = this iteration's survivors of each prompt "
                           "(Flow-GRPO); N = the prompt's last N rewards across iterations (DDPO)")
    stat_min_count: int = opt(0, "with stat_buffer: prompts with fewer rewards use the whole batch's mean/std")
    lr_schedule: LrSchedule = opt("constant", "constant | constant_with_warmup | linear | cosine (over train.iterations)")
    lr_warmup_iterations: int = opt(0, "iterations of linear LR warm-up")
    ema: bool = opt(False, "keep an EMA of the trainable weights; evaluation and the exported weights use it")
    ema_decay: float = opt(0.9, "EMA decay (warmed up as min(decay, (1 + n) / (10 + n)), as Flow-GRPO)")
    ema_every: int = opt(1, "optimizer steps between EMA updates")
    fsdp: bool = opt(False, "full fine-tuning (model.lora_rank=0) with torch FSDP2 over all ranks: weights, gradients, "
                     "AdamW and EMA states and the reference copy sharded, 1/N per rank; checkpoints sharded "
                     "(needs an out_dir every rank shares); with one process it changes nothing")
    checkpoint_every: int = opt(0, "save a checkpoint every N iterations (plus one after the last); 0 = only the last")
    checkpoint_keep: int = opt(2, "iteration checkpoints kept in out_dir/checkpoints; 0 = all")
    resume_from: str = opt("", "checkpoint directory to resume from, or 'latest' (the newest in out_dir/checkpoints; "
                           "a fresh start if there is none); give the same config")
    prompt_file: str = opt("", "training prompts, one per line; empty = the ten digit prompts of the toy task")
    seed: int = opt(0, "run seed (prompts, per-sample noise)")


@dataclass
class ChannelOptions:
    """TLS and bearer-token options of the connection to one of our services; each service section
    (reward, pruner, and every reward.services entry) has them. ``token_env`` names the section's
    token variable (tokens are never part of the config: it is saved with the run)."""

    token_env: typing.ClassVar[str] = ""
    tls_ca: str = opt("", "PEM CA that signed the {service} server's certificate (turns TLS on); 'system' = system roots")
    tls_cert: str = opt("", "PEM client certificate, for servers that require mutual TLS")
    tls_key: str = opt("", "PEM private key of tls_cert")
    tls_server_name: str = opt("", "name to check in the server certificate when it differs from the address host")
    token_file: str = opt("", "file holding the bearer token; empty = ${token_env}, else $EPGRPO_TOKEN, else none")


@dataclass
class RewardConfig(ChannelOptions):
    token_env: typing.ClassVar[str] = "EPGRPO_REWARD_TOKEN"
    address: str = opt("127.0.0.1:50051", "reward service host:port; several replicas as host:port,host:port (IPs) "
                       "or one DNS name resolving to all of them, dns:///name:port (round robin either way)")
    services: dict = opt({}, "a reward service per reward: name -> address (reward.services.ocr=ocr:50051), or name "
                         "-> mapping of this section's connection options (address, tls_*, token_file, deadline_s, "
                         "retry_budget_s); rewards not named here go to reward.address")
    rewards: str = opt("digit:1.0", "training rewards, 'name:weight,...' (combined by the reward service)")
    judge: str = opt("digit_judge", "held-out evaluation reward, never trained against; empty to skip")
    deadline_s: float = opt(60.0, "deadline of each reward call, seconds")
    retry_budget_s: float = opt(120.0, "retry a failing reward call (UNAVAILABLE, DEADLINE_EXCEEDED) with backoff "
                                "for up to this many seconds, then save a checkpoint and stop")


@dataclass
class PrunerConfig(ChannelOptions):
    token_env: typing.ClassVar[str] = "EPGRPO_PRUNER_TOKEN"
    address: str = opt("127.0.0.1:50052", "pruner service host:port (same forms as reward.address)")
    deadline_s: float = opt(600.0, "deadline of each pruning decision (a checkpoint's answer on the rollout's "
                            "stream, which itself lives as long as the rollout) and of each Prune call, seconds")
    on_unavailable: OnUnavailable = opt("retry", "when the pruner is unreachable: retry (re-run the iteration within "
                              "retry_budget_s, then checkpoint and stop) | no_prune (the affected groups go on "
                              "unpruned, counted in metrics as pruner_fallback_groups, and logged)")
    retry_budget_s: float = opt(120.0, "re-run an iteration whose pruning stream broke (pruner or its reward service "
                                "unavailable) with backoff for up to this many seconds, then save a checkpoint and stop")


@dataclass
class EvalConfig:
    every: int = opt(5, "evaluate every N iterations (and before the first and after the last)")
    samples_per_prompt: int = opt(8, "samples per evaluation prompt, fixed seeds")
    seed: int = opt(1234, "seed of the evaluation noise")
    prompt_file: str = opt("", "evaluation prompts, one per line; empty = the training prompts")
    max_prompts: int = opt(10, "evaluate on the first N evaluation prompts")
    num_steps: int = opt(0, "steps of evaluation sampling; 0 = sampling.num_steps")
    sampler: EvalSampler = opt("auto", "deterministic = the probability-flow ODE / DDIM "
                       "with eta = 0; stochastic = the trained policy's own sampler (flow SDE / DDIM with "
                       "sampling.eta) with per-sample seeded noise, as DDPO reports; auto = deterministic for flow "
                       "models, stochastic for diffusion models (a DDIM policy trained at eta = 1 is not the "
                       "eta = 0 sampler)")


@dataclass
class LogConfig:
    wandb: bool = opt(False, "also log to Weights & Biases, from rank 0: the scalars TensorBoard gets (same names), "
                      "each evaluation's sample grid and reward curve, and the config; a resumed run continues "
                      "the same W&B run (its id is kept in out_dir/wandb_run_id); W&B's files go to $WANDB_DIR, "
                      "else out_dir/wandb; needs pip install epgrpo[wandb]")
    wandb_project: str = opt("", "W&B project; empty = wandb's default ($WANDB_PROJECT, else 'uncategorized')")
    wandb_entity: str = opt("", "W&B entity (user or team); empty = wandb's default ($WANDB_ENTITY, else the "
                            "API key's default entity)")
    wandb_mode: WandbMode = opt("", "online | offline (kept on disk, uploaded later with `wandb sync DIR`); empty = "
                          "wandb's own setting ($WANDB_MODE, else online)")
    wandb_run_name: str = opt("", "W&B run name; empty = the name of out_dir")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algo: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    out_dir: str = opt("runs/latest", "output directory (metrics, summary.json, plots, checkpoints)")
    launch_services: bool = opt(True, "start the reward and pruner services as local processes on free ports")
    progress: bool = opt(True, "show progress bars")


def _is_dataclass_type(t) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def iter_fields(cls=Config, prefix: str = ""):
    """(dotted key, type, default, help) of every leaf option; a section's own options come before
    the ones it shares with other sections (ChannelOptions)."""
    hints = typing.get_type_hints(cls)
    own = cls.__dict__.get("__annotations__", {})
    fields = sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)
    service = prefix.rstrip(".").split(".")[-1]
    for f in fields:
        t = hints[f.name]
        if _is_dataclass_type(t):
            yield from iter_fields(t, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f.metadata.get("help", "").replace("{service}", service)
            yield f"{prefix}{f.name}", t, default, help_text.replace("{token_env}", getattr(cls, "token_env", ""))


def type_name(t) -> str:
    """'int', 'list[int]', or the choices of an enumeration: 'grpo | full_ovf | ...'."""
    if typing.get_origin(t) is Literal:
        return " | ".join(v if v else "''" for v in typing.get_args(t))
    if typing.get_origin(t) is list:
        return f"list[{typing.get_args(t)[0].__name__}]"
    return t.__name__


def _coerce(key: str, t, value: Any):
    if typing.get_origin(t) is Literal:
        if value not in typing.get_args(t):
            raise ValueError(f"{key}: expected {type_name(t)}, got {value!r}")
        return value
    if typing.get_origin(t) is list:  # list[int] etc.: each element by the element type, named by index
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
            except yaml.YAMLError:
                pass
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected {type_name(t)}, got {value!r}")
        item = typing.get_args(t)[0]
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    try:
        if t is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if t in (int, float) and isinstance(value, bool):
            raise ValueError
        if t is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return t(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected {t.__name__}, got {value!r}") from None


def _apply(config, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(config))
    names = {f.name for f in dataclasses.fields(config)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ValueError(f"{key}: unknown option; known: {', '.join(sorted(names))}")
        t = hints[name]
        if _is_dataclass_type(t):
            if not isinstance(value, dict):
                raise ValueError(f"{key}: expected a section (mapping), got {value!r}")
            _apply(getattr(config, name), value, f"{key}.")
        elif t is dict:  # a mapping option: entries are added (several key=value overrides accumulate)
            if not isinstance(value, dict):
                raise ValueError(f"{key}: expected a mapping (e.g. {key}.NAME=VALUE), got {value!r}")
            current = getattr(config, name)
            for entry, update in value.items():  # reward.services.X.address=..., then ...X.deadline_s=...
                before = current.get(entry)
                if isinstance(update, dict) and isinstance(before, (dict, str)):
                    update = {**({"address": before} if isinstance(before, str) else before), **update}
                current[entry] = update
        else:
            setattr(config, name, _coerce(key, t, value))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- the model's own defaults (``model_defaults``) <- YAML file <- ``key=value``
    overrides, then validated."""
    from epgrpo.trainer.model_defaults import model_defaults

    config = _layered(Config(), path, overrides)
    family = model_defaults(config.model.name)
    if family:  # the user's settings go on top of the model's defaults
        base = Config()
        _apply(base, family, "")
        config = _layered(base, path, overrides)
    from epgrpo.trainer.config_checks import validate  # it reads this module's types

    validate(config)
    return config


def _layered(config: Config, path: str | Path | None, overrides: list[str]) -> Config:
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        _apply(config, data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value (e.g. train.lr=1e-4)")
        nested: dict = {}
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
        if isinstance(node[parts[-1]], (dict, list)) or node[parts[-1]] is None:
            node[parts[-1]] = value
        _apply(config, nested)
    return config


def parse_rewards(spec: str, field_name: str) -> list[tuple[str, float]]:
    """'digit:1.0,jpeg_compressibility:0.1' -> [(name, weight)]; a bare name has weight 1. Video
    wrappers keep their options: 'frames(digit, k=4):0.5' -> ('frames(digit, k=4)', 0.5)."""
    out = []
    for part in [p.strip() for p in split_top_level(spec) if p.strip()]:
        close = part.rfind(")") + 1  # the weight's ':' comes after a wrapper's options
        head, _, weight = part[close:].partition(":")
        name = (part[:close] + head).strip()
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"{field_name}: weight of {name!r} must be a number, got {weight!r}") from None
        if not math.isfinite(w):
            raise ValueError(f"{field_name}: weight of {name!r} must be finite, got {weight!r}")
        out.append((name, w))
    return out


def sampler_options(config: Config):
    """The sampling options every sampler reads what it needs from."""
    from epgrpo.trainer.samplers import SamplerOptions

    s = config.sampling
    return SamplerOptions(shift=s.shift, noise_level=s.noise_level, eta=s.eta)


def schedule(config: Config) -> list[tuple[int, int]]:
    """The pruning checkpoints [(step, keep)] the mode uses (empty without in-rollout pruning)."""
    if config.prune.mode in ("expand_prune", "random_prune"):
        return list(zip(config.prune.steps, config.prune.keeps))
    return []


def final_keep(config: Config) -> int:
    """Trajectories per group that are trained on."""
    p = config.prune
    return p.group_size if p.mode == "grpo" else p.keeps[-1]


def sde_window_range(c: Config) -> tuple[int, int]:
    lo, hi = c.sampling.sde_window_range or [0, c.sampling.num_steps // 2]
    return lo, hi


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def check_paths(c: Config) -> None:
    """Files the run will read (``config_checks.check_paths``)."""
    from epgrpo.trainer.config_checks import check_paths as check

    check(c)
