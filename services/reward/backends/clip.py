"""CLIP-based rewards loaded from a local directory: CLIPScore, PickScore (and its group-aware
pairwise win rate) and a LAION-style aesthetic predictor.

The directory is what ``CLIPModel.save_pretrained`` + ``CLIPProcessor.save_pretrained`` write (the
layout of a hub snapshot such as openai/clip-vit-large-patch14 or yuvalkirstain/PickScore_v1 with
the laion/CLIP-ViT-H-14 processor files copied in): ``config.json``, ``model.safetensors`` (or
``pytorch_model.bin``), tokenizer files, and ``preprocessor_config.json`` /
``processor_config.json``. It is loaded with ``local_files_only=True``: nothing is downloaded.

Images are preprocessed in torch on the model's device (resize the shorter side, bicubic with
antialiasing; centre crop; normalise with the processor's mean/std), as one batched operation:
CLIPProcessor's per-image PIL path would cost more than the model on a GPU.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from epgrpo.services.common.errors import InvalidArgument
from epgrpo.services.reward.backends.base import RewardBackend, register_backend, win_rates

log = logging.getLogger("epgrpo.reward.clip")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
AESTHETIC_HEAD_FILE = "aesthetic_head.safetensors"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> float16 on CUDA, float32 elsewhere (fp16 matmuls on CPU are slow or missing)."""
    if dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype: expected auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _require_dir(path: str | None, option: str, reward: str) -> Path:
    if not path:
        raise InvalidArgument(f"reward {reward!r}: option '{option}' is required: a local directory holding a CLIP "
                              "model and its processor files (see docs/rewards.md)")
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise InvalidArgument(f"reward {reward!r}: {option}={path}: expected a directory with config.json "
                              "(CLIPModel.save_pretrained layout)")
    return directory


class ClipEncoder:
    """A CLIPModel with its tokenizer and preprocessing settings; returns unit-norm embeddings."""

    def __init__(self, path: Path, processor_path: Path, device: str, dtype: torch.dtype, batch_size: int,
                 with_text: bool = True):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(device=device, dtype=dtype).eval()
        processor = CLIPImageProcessor.from_pretrained(str(processor_path), local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(str(processor_path), local_files_only=True) if with_text else None
        self.max_tokens = self.model.config.text_config.max_position_embeddings
        self.resize = _shortest_edge(processor) if getattr(processor, "do_resize", True) else None
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", True) else None
        self.crop = (crop["height"], crop["width"]) if crop else None
        self.rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
        normalise = getattr(processor, "do_normalize", True)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(processor.image_mean if normalise else [0.0] * 3, device=device).view(shape)
        self.std = torch.tensor(processor.image_std if normalise else [1.0] * 3, device=device).view(shape)
        log.info("loaded CLIP from %s on %s (%s): projection %d, image %s", path, device, dtype,
                 self.model.config.projection_dim, self.crop)

    def pixel_values(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, C] -> normalised float32 [N, 3, h, w] on the device, like CLIPProcessor."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize is not None:
            h, w = x.shape[-2:]
            short, long = (h, w) if h <= w else (w, h)
            new_long = int(self.resize * long / short)  # the processor's rounding
            size = (self.resize, new_long) if h <= w else (new_long, self.resize)
            if size != (h, w):
                # The processor resizes uint8 PIL images: round and clamp like it does.
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).round().clamp(0, 255)
        if self.crop is not None:
            x = _center_crop(x, *self.crop)
        return (x * self.rescale - self.mean) / self.std

    @torch.no_grad()
    def image_embeds(self, images: np.ndarray) -> torch.Tensor:
        """float32 [N, D], unit norm: visual_projection(vision pooler output)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.pixel_values(images[start:start + self.batch_size]).to(self.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled).float())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """float32 [N, D], unit norm: text_projection(text pooler output); prompts truncated to the
        model's context (77 tokens for real CLIP)."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[start:start + self.batch_size], padding=True, truncation=True,
                                    max_length=self.max_tokens, return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
            out.append(self.model.text_projection(pooled).float())
        return F.normalize(torch.cat(out), dim=-1)


def _shortest_edge(processor) -> int:
    size = processor.size
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    if size.get("height") == size.get("width"):  # a square resize of square images is the same
        return int(size["height"])
    raise InvalidArgument(f"processor size {dict(size)}: expected shortest_edge (CLIP's resize)")


def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if h < height or w < width:  # the processor pads with zeros first; CLIP sizes never need it
        x = F.pad(x, (max(0, (width - w) // 2), max(0, width - w - (width - w) // 2),
                      max(0, (height - h) // 2), max(0, height - h - (height - h) // 2)))
        h, w = x.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top:top + height, left:left + width]


class _ClipReward(RewardBackend):
    """Loads the encoder; subclasses turn embeddings into scores."""

    with_text = True

    def __init__(self, device: str = "cpu", path: str | None = None, dtype: str = "auto",
                 processor_path: str | None = None, batch_size: int = 64):
        super().__init__(device)
        if batch_size < 1:
            raise InvalidArgument(f"reward {self.name!r}: batch_size: expected >= 1, got {batch_size}")
        directory = _require_dir(path, "path", self.name)
        processor_dir = _require_dir(processor_path, "processor_path", self.name) if processor_path else directory
        self.encoder = ClipEncoder(directory, processor_dir, device, resolve_dtype(dtype, device), batch_size,
                                   with_text=self.with_text)

    def cosine(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        """float32 [N]: cos(image_i, prompt_i). Each distinct prompt is encoded once (a GRPO group
        shares its prompt)."""
        positions: dict[str, int] = {}
        index = [positions.setdefault(p, len(positions)) for p in prompts]
        text = self.encoder.text_embeds(list(positions))[torch.tensor(index, device=self.device)]
        return (self.encoder.image_embeds(images) * text).sum(-1)


@register_backend("clipscore")
class ClipScore(_ClipReward):
    description = ("CLIPScore (Hessel et al. 2021): w * max(cos(image, prompt), 0) with w = 2.5, from a CLIP model "
                   "loaded from a local directory (e.g. openai/clip-vit-large-patch14).")
    inputs = "prompt (truncated to the model's 77 tokens); images resized and centre-cropped to the model's size"
    range = "[0, 2.5]"

    def __init__(self, device: str = "cpu", path: str | None = None, dtype: str = "auto",
                 processor_path: str | None = None, batch_size: int = 64, weight: float = 2.5):
        super().__init__(device, path, dtype, processor_path, batch_size)
        self.weight = weight

    def _score(self, images, prompts, metadata):
        return (self.weight * self.cosine(images, prompts).clamp(min=0)).cpu().numpy()


@register_backend("pickscore")
class PickScore(_ClipReward):
    description = ("PickScore (Kirstain et al. 2023): logit_scale.exp() * cos(image, prompt) of a CLIP-H preference "
                   "model (yuvalkirstain/PickScore_v1), as its reference code computes it; about 18-24 on real images.")
    inputs = "prompt (truncated to 77 tokens); images resized and centre-cropped to 224"
    range = "[-s, s] with s = logit_scale.exp() of the model (CLIP caps it at 100)"

    def _score(self, images, prompts, metadata):
        scale = self.encoder.model.logit_scale.detach().float().exp()
        return (scale * self.cosine(images, prompts)).cpu().numpy()


@register_backend("pickscore_pairwise")
class PickScorePairwise(PickScore):
    """Pick-a-Pic's preference probability, P(i > j) = softmax([s_i, s_j])[0] = sigmoid(s_i - s_j) with
    s the PickScore above, turned into each image's win rate against the rest of its group. Relative
    by construction: independent of the score's offset, bounded, and 0.5 on average in every group."""

    description = ("Win rate of each image against the others of its group under PickScore's pairwise "
                   "preference P(i > j) = softmax([s_i, s_j])[0], s = logit_scale.exp() * cos(image, prompt) "
                   "(Pick-a-Pic); mean over j != i. Group-aware: groups come from metadata 'group'.")
    inputs = "prompt (each image scored against its own); metadata 'group' (default: the request is one group)"
    range = "[0, 1]; a group of n sums to n / 2"
    group_aware = True

    def _score(self, images, prompts, metadata):
        s = PickScore._score(self, images, prompts, metadata).astype(np.float64)
        # sigmoid(d) = (1 + tanh(d / 2)) / 2: no overflow for the large gaps a scale of 100 allows
        preference = 0.5 * (1.0 + np.tanh((s[:, None] - s[None, :]) / 2.0))
        return win_rates(preference)


@register_backend("aesthetic")
class AestheticScore(_ClipReward):
    description = ("LAION aesthetic predictor v2 style: an MLP head (Linear layers, no activations) on the unit-norm "
                   "CLIP image embedding (CLIP ViT-L/14 for the published head); predicts a 1-10 rating.")
    inputs = "image only (prompt ignored)"
    range = "about [1, 10] for the published head"
    with_text = False

    def __init__(self, device: str = "cpu", path: str | None = None, dtype: str = "auto",
                 processor_path: str | None = None, batch_size: int = 64, head: str | None = None):
        super().__init__(device, path, dtype, processor_path, batch_size)
        head_path = Path(head).expanduser() if head else Path(path).expanduser() / AESTHETIC_HEAD_FILE
        self.layers = load_linear_head(head_path, self.encoder.model.config.projection_dim, device)

    def _score(self, images, prompts, metadata):
        x = self.encoder.image_embeds(images)
        for weight, bias in self.layers:
            x = F.linear(x, weight, bias)
        return x[:, 0].cpu().numpy()


def load_linear_head(path: Path, in_features: int, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(weight, bias)] of ``layers.<i>.weight/bias`` in index order (the LAION MLP's state-dict keys;
    its Dropout layers hold no tensors), float32. Checks the chain of shapes ends in one output."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise InvalidArgument(f"reward 'aesthetic': head={path}: no such file (expected a safetensors file with "
                              "layers.<i>.weight / layers.<i>.bias, see docs/rewards.md)")
    state = load_file(str(path))
    indices = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
    if not indices:
        raise InvalidArgument(f"reward 'aesthetic': {path}: no layers.<i>.weight tensors; keys: {sorted(state)[:6]}")
    layers, width = [], in_features
    for i in indices:
        weight, bias = state[f"layers.{i}.weight"].float(), state.get(f"layers.{i}.bias")
        if weight.ndim != 2 or weight.shape[1] != width:
            raise InvalidArgument(f"reward 'aesthetic': {path}: layers.{i}.weight has shape {list(weight.shape)}, "
                                  f"expected [*, {width}] (the CLIP projection is {in_features}-d)")
        bias = torch.zeros(weight.shape[0]) if bias is None else bias.float()
        layers.append((weight.to(device), bias.to(device)))
        width = weight.shape[0]
    if width != 1:
        raise InvalidArgument(f"reward 'aesthetic': {path}: the last layer has {width} outputs, expected 1")
    log.info("aesthetic head %s: %d linear layers, %d parameters", path, len(layers),
             sum(math.prod(w.shape) + b.numel() for w, b in layers))
    return layers
