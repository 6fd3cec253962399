"""The embedded default: a tiny digit-prompted flow-matching transformer in pixel space.

A diffusers ``SD3Transformer2DModel`` (3 layers, 436k parameters) generates 16x16 gray digits
conditioned on learned per-digit embeddings (4 tokens + a pooled vector, 3.2k parameters) standing
in for a text encoder. It is pretrained with rectified flow on scikit-learn's bundled 8x8 digits (upsampled),
saved with ``save_pretrained`` and loaded back with ``from_pretrained(local_files_only=True)`` -
the same loading path a real checkpoint takes. The pretrained base is cached, keyed by its recipe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from epgrpo.trainer.policy.base import Conditioning, register_policy
from epgrpo.trainer.policy.finetune import FineTunedPolicy, resolve_dtype

log = logging.getLogger("epgrpo.policy.toy")

_DIGIT = re.compile(r"\b([0-9])\b")
RECIPE_VERSION = 2  # 2: pretraining with deterministic kernels (bit-identical base models)


def cache_root() -> Path:
    return Path(os.environ.get("EPGRPO_CACHE_DIR", Path.home() / ".cache" / "epgrpo"))


def digit_images(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as [N, 1, size, size] in [-1, 1] (bilinear upsampling), labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images * 2 - 1, torch.tensor(data.target)


def parse_digit(prompt: str, field: str = "prompt") -> int:
    match = _DIGIT.search(prompt)
    if match is None:
        raise ValueError(f"{field}: expected a prompt naming a digit 0-9 (e.g. 'a handwritten digit 7'), got {prompt!r}")
    return int(match.group(1))


def digit_prompt(d: int) -> str:
    return f"a handwritten digit {d}"


@dataclass(frozen=True)
class ToyRecipe:
    """Everything that determines the pretrained base model (and so its cache key)."""

    image_size: int = 16
    num_layers: int = 3
    heads: int = 2
    head_dim: int = 32
    tokens: int = 4
    pretrain_steps: int = 120
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0

    def key(self) -> str:
        payload = json.dumps({**asdict(self), "version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


class DigitConditioner(torch.nn.Module):
    """Learned prompt embeddings: 4 tokens and a pooled vector per digit."""

    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.tokens = torch.nn.Parameter(torch.randn(10, tokens, dim) * 0.5)
        self.pooled = torch.nn.Parameter(torch.randn(10, dim) * 0.5)

    def forward(self, digits: torch.Tensor) -> Conditioning:
        return {"encoder_hidden_states": self.tokens[digits], "pooled_projections": self.pooled[digits]}


def build_transformer(r: ToyRecipe) -> SD3Transformer2DModel:
    dim = r.heads * r.head_dim
    return SD3Transformer2DModel(
        sample_size=r.image_size,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        num_layers=r.num_layers,
        attention_head_dim=r.head_dim,
        num_attention_heads=r.heads,
        joint_attention_dim=dim,
        caption_projection_dim=dim,  # must equal heads * head_dim
        pooled_projection_dim=dim,
        pos_embed_max_size=r.image_size // 2,
    )


def _predict(transformer, conditioner, x, timestep, digits):
    cond = conditioner(digits)
    return transformer(
        hidden_states=x,
        encoder_hidden_states=cond["encoder_hidden_states"],
        pooled_projections=cond["pooled_projections"],
        timestep=timestep,
        return_dict=False,
    )[0]


def flow_loss(transformer, conditioner, x0, digits, generator) -> torch.Tensor:
    """Rectified flow: velocity eps - x0 at a logit-normal sigma."""
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(len(x0), generator=generator))
    s = sigma.view(-1, 1, 1, 1)
    v = _predict(transformer, conditioner, (1 - s) * x0 + s * noise, sigma * 1000.0, digits)
    return F.mse_loss(v, noise - x0)


def pretrain(recipe: ToyRecipe, out_dir: Path, progress: bool = True, loss_fn=flow_loss,
             what: str = "toy flow model") -> dict:
    """Pretraining on the bundled digits with ``loss_fn`` (default rectified flow); saves to ``out_dir``.
    Deterministic kernels: with several CPU threads some backward kernels otherwise sum in a
    run-dependent order, and every run from an empty cache would start from another base model."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _pretrain(recipe, out_dir, progress, loss_fn, what)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _pretrain(recipe: ToyRecipe, out_dir: Path, progress: bool, loss_fn, what: str) -> dict:
    torch.manual_seed(recipe.seed)
    images, labels = digit_images(recipe.image_size)
    transformer = build_transformer(recipe)
    conditioner = DigitConditioner(recipe.tokens, recipe.heads * recipe.head_dim)
    params = [*transformer.parameters(), *conditioner.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(recipe.seed)
    start = time.perf_counter()
    losses = []
    for _ in tqdm(range(recipe.pretrain_steps), desc=f"pretraining {what}", disable=not progress, leave=False):
        idx = torch.randint(0, len(images), (recipe.batch_size,), generator=generator)
        loss = loss_fn(transformer, conditioner, images[idx], labels[idx], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return save_base_model(out_dir, transformer, conditioner, recipe, RECIPE_VERSION, time.perf_counter() - start, losses)


def save_base_model(out_dir: Path, transformer, conditioner, recipe, version: int, seconds: float,
                    losses: list[float]) -> dict:
    """Writes a pretrained toy (transformer, conditioner, meta.json) where the cache looks for it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(out_dir / "transformer")
    save_file({k: v.detach().contiguous() for k, v in conditioner.state_dict().items()}, out_dir / "conditioner.safetensors")
    meta = {"recipe": asdict(recipe), "version": version, "seconds": seconds, "final_loss": float(np.mean(losses[-10:]))}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def ensure_pretrained(recipe: ToyRecipe, cache_dir: Path | None = None, progress: bool = True,
                      pretrain_fn=pretrain, family: str = "toy_digits") -> Path:
    """The cached base model's directory, pretraining it first if it is not cached yet."""
    target = (cache_dir or cache_root()) / family / recipe.key()
    if (target / "meta.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        meta = pretrain_fn(recipe, tmp, progress)
        try:
            tmp.rename(target)  # atomic; a concurrent run that finished first wins
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("pretrained %s base model in %.1fs (loss %.4f) -> %s", family, meta["seconds"], meta["final_loss"], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class ToyDigitPolicy(FineTunedPolicy):
    """The default policy; full fine-tuning against a frozen copy, or LoRA (peft) with the
    adapter disabled as the reference."""

    preview_decoder = "pixel"
    recipe_class = ToyRecipe

    def __init__(self, path: str | os.PathLike | None = None, recipe: ToyRecipe | None = None,
                 lora_rank: int = 0, lora_alpha: float = 0.0, device: str = "cpu", progress: bool = True,
                 lora_targets=None, dtype: str = "fp32"):
        recipe = recipe or self.recipe_class()
        model_dir = Path(path) if path else self.ensure_pretrained(recipe, progress)
        self.model_dir = model_dir
        transformer = SD3Transformer2DModel.from_pretrained(model_dir / "transformer", local_files_only=True)
        meta = json.loads((model_dir / "meta.json").read_text())
        r = self.recipe_class(**meta["recipe"])
        self.setup_finetuning(transformer, device=torch.device(device), dtype=resolve_dtype(dtype, device),
                              lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets)
        self.conditioner = self.build_conditioner(r)
        self.conditioner.load_state_dict(load_file(model_dir / "conditioner.safetensors"))
        self.conditioner.to(self.device).requires_grad_(False)
        self.latent_shape = self.sample_shape(r)

    @staticmethod
    def build_conditioner(r: ToyRecipe) -> torch.nn.Module:
        return DigitConditioner(r.tokens, r.heads * r.head_dim)

    @staticmethod
    def sample_shape(r: ToyRecipe) -> tuple[int, ...]:
        return (1, r.image_size, r.image_size)

    @staticmethod
    def ensure_pretrained(recipe: ToyRecipe, progress: bool) -> Path:
        return ensure_pretrained(recipe, progress=progress)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        digits = torch.tensor([parse_digit(p, f"prompts[{i}]") for i, p in enumerate(prompts)], device=self.device)
        return {"digits": digits}

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.device).expand(x.shape[0])
        prompt = self.conditioner(cond["digits"])
        return self.run_transformer(hidden_states=x, encoder_hidden_states=prompt["encoder_hidden_states"],
                                    pooled_projections=prompt["pooled_projections"], timestep=sigma * 1000.0)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        pixels = ((latents.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()


def toy_factory(policy_class: type["ToyDigitPolicy"]):
    """The factory of a toy digit model (its options are what ``model.*`` may set for it)."""

    def factory(path: str = "", pretrain_steps: int = 0, lora_rank: int = 0, lora_alpha: float = 0.0,
                device: str = "cpu", progress: bool = True, seed: int = 0, lora_targets: str = "",
                dtype: str = "fp32", guidance_scale: float = 1.0):
        if guidance_scale != 1.0:
            raise ValueError(f"sampling.guidance_scale: the toy digit model has no unconditional branch; expected "
                             f"1.0, got {guidance_scale}")
        recipe_class = policy_class.recipe_class
        recipe = recipe_class(pretrain_steps=pretrain_steps or recipe_class.pretrain_steps, seed=seed)
        return policy_class(path or None, recipe, lora_rank, lora_alpha, device, progress, lora_targets, dtype)

    return factory


register_policy("toy_digits")(toy_factory(ToyDigitPolicy))
