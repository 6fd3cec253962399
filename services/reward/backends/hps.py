"""HPSv2 / HPSv2.1 (Wu et al. 2023, Human Preference Score v2): an open_clip ViT-H-14 fine-tuned on
human preferences; the score is cos(image, prompt) of its unit-norm features, exactly as the
reference ``hpsv2`` code computes it (``diag(image_features @ text_features.T)``, no logit scale).

The checkpoint (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``) is an open_clip state dict
(``visual.*``, ``transformer.*``, ``token_embedding.weight``, ...), saved as ``{'state_dict': ...}``
or bare, as a torch file or safetensors. It is renamed here into transformers' ``CLIPModel``,
which computes the same network (pre-norm blocks, exact GELU, class-token pooling after ln_post,
text pooled at the end-of-text token after ln_final), so no open_clip / torchvision install is
needed: PyPI's torchvision is built against CUDA torch and does not import beside a CPU torch.
Every checkpoint tensor must be consumed and every model weight filled, with matching shapes.

Preprocessing follows open_clip's eval transform, batched in torch on the model's device: resize
the shorter side to the model's size (bicubic, antialiased; rounded to uint8 like PIL), centre crop
with torchvision's rounding, normalise with OpenAI CLIP's mean/std. Tokenisation: a CLIP BPE
tokenizer directory (the vocabulary open_clip's ViT-H-14 uses), truncated to the context length.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from epgrpo.services.common.errors import InvalidArgument
from epgrpo.services.reward.backends.base import RewardBackend, register_backend
from epgrpo.services.reward.backends.clip import resolve_dtype
from epgrpo.services.reward.backends.weights import load_exactly, load_tensors

log = logging.getLogger("epgrpo.reward.hps")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# open_clip's model_configs/<name>.json for the architectures HPS-style checkpoints use.
ARCHITECTURES = {
    "ViT-H-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-L-14": {"embed_dim": 768,
                 "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}},
}
# Config fields whose defaults we support; anything else changes the network (timm/HF towers,
# attentional pooling, layer scale, ...) and is refused rather than silently ignored.
_VISION_DEFAULTS = {"image_size": None, "layers": None, "width": None, "patch_size": None, "head_width": 64,
                    "mlp_ratio": 4.0}
_TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0}


def model_config(model: str) -> dict:
    """An open_clip architecture by name (ARCHITECTURES) or from an open_clip model-config JSON file."""
    if model in ARCHITECTURES:
        cfg = ARCHITECTURES[model]
    else:
        path = Path(model).expanduser()
        if not path.is_file():
            raise InvalidArgument(f"reward 'hpsv2': model={model}: expected one of {', '.join(ARCHITECTURES)} "
                                  "or an open_clip model-config JSON file")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"reward 'hpsv2': model={model}: {exc}") from None
    extra = set(cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
    for section, defaults in (("vision_cfg", _VISION_DEFAULTS), ("text_cfg", _TEXT_DEFAULTS)):
        extra |= {f"{section}.{k}" for k in set(cfg.get(section, {})) - set(defaults)}
        missing = [k for k, v in defaults.items() if v is None and k not in cfg.get(section, {})]
        if missing:
            raise InvalidArgument(f"reward 'hpsv2': model={model}: {section} lacks {', '.join(missing)}")
    if extra:
        raise InvalidArgument(f"reward 'hpsv2': model={model}: unsupported open_clip options {sorted(extra)} "
                              "(only plain CLIP ViT towers are supported)")
    vision = {**_VISION_DEFAULTS, **cfg["vision_cfg"]}
    text = {**_TEXT_DEFAULTS, **cfg.get("text_cfg", {})}
    return {"embed_dim": int(cfg["embed_dim"]), "quick_gelu": bool(cfg.get("quick_gelu", False)),
            "vision": vision, "text": text}


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors; a DataParallel 'module.' prefix is dropped."""
    state = load_tensors(path, "hpsv2", "the HPSv2 checkpoint, e.g. HPS_v2.1_compressed.pt")
    return {k.removeprefix("module."): v for k, v in state.items()}


def eval_transform(images: np.ndarray, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, C] -> normalised float32 [N, 3, size, size] on mean's device, as open_clip's
    (and CLIP's) eval transform does on PIL images: Resize(size, BICUBIC), CenterCrop(size), ToTensor,
    Normalize(mean, std)."""
    x = torch.tensor(images, device=mean.device).permute(0, 3, 1, 2).float()  # a copy: requests are read-only
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    new_long = int(size * max(h, w) / min(h, w))  # torchvision's Resize(int) rounding
    new = (size, new_long) if h <= w else (new_long, size)
    if new != (h, w):  # PIL resizes uint8 images: round and clamp like it does
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True).round().clamp(0, 255)
    top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))  # torchvision's CenterCrop
    return (x[..., top:top + size, left:left + size] / 255.0 - mean) / std


_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP = {"visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final": "text_model.final_layer_norm", "logit_scale": "logit_scale"}


def to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP state dict -> transformers CLIPModel state dict. Unknown keys raise."""
    out = {}
    for key, value in state.items():
        if key in ("visual.proj", "text_projection"):  # open_clip multiplies x @ proj; Linear stores proj.T
            out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = value.t()
            continue
        tower, block, rest = key.partition("transformer.resblocks.")
        if block and tower in ("", "visual."):
            index, _, name = rest.partition(".")
            prefix = f"{'vision' if tower else 'text'}_model.encoder.layers.{index}."
            if name.startswith("attn.in_proj_"):  # fused [q; k; v] rows, as nn.MultiheadAttention stores them
                kind = name.rsplit("_", 1)[1]  # weight | bias
                for part, tensor in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{part}_proj.{kind}"] = tensor
                continue
            module, _, kind = name.rpartition(".")
            if module in _BLOCK:
                out[f"{prefix}{_BLOCK[module]}.{kind}"] = value
                continue
        else:
            module, _, kind = key.rpartition(".")
            if key in _TOP:
                out[_TOP[key]] = value
                continue
            if module in _TOP:
                out[f"{_TOP[module]}.{kind}"] = value
                continue
        raise InvalidArgument(f"reward 'hpsv2': checkpoint key {key!r} has no place in a plain open_clip CLIP "
                              "(is this an HPSv2 checkpoint, and model= its architecture?)")
    return out


def build_clip(cfg: dict, state: dict[str, torch.Tensor], eos_token_id: int, bos_token_id: int, where: str):
    """A transformers CLIPModel of ``cfg``'s shape holding exactly the checkpoint's tensors."""
    from accelerate import init_empty_weights
    from transformers import CLIPConfig, CLIPModel

    vision, text, act = cfg["vision"], cfg["text"], "quick_gelu" if cfg["quick_gelu"] else "gelu"
    config = CLIPConfig(
        text_config=dict(vocab_size=text["vocab_size"], hidden_size=text["width"],
                         intermediate_size=int(text["width"] * text["mlp_ratio"]), num_hidden_layers=text["layers"],
                         num_attention_heads=text["heads"], max_position_embeddings=text["context_length"],
                         hidden_act=act, layer_norm_eps=1e-5, eos_token_id=eos_token_id, bos_token_id=bos_token_id,
                         pad_token_id=eos_token_id),
        vision_config=dict(hidden_size=vision["width"], intermediate_size=int(vision["width"] * vision["mlp_ratio"]),
                           num_hidden_layers=vision["layers"],
                           num_attention_heads=vision["width"] // vision["head_width"],
                           image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_act=act,
                           layer_norm_eps=1e-5),
        projection_dim=cfg["embed_dim"],
    )
    with init_empty_weights(include_buffers=False):  # weights come from the checkpoint: skip random init
        model = CLIPModel(config)
    mapped = to_transformers(state)
    return load_exactly(model, mapped, "hpsv2", where, "is model= its architecture?")


@register_backend("hpsv2")
class HpsV2(RewardBackend):
    description = ("HPSv2 / HPSv2.1 human preference score: cos(image, prompt) of an open_clip ViT-H-14 fine-tuned "
                   "on human preferences, as the reference hpsv2 code computes it (about 0.2-0.35 on real images).")
    inputs = "prompt (truncated to 77 tokens); images resized and centre-cropped to 224"
    range = "[-1, 1]"

    def __init__(self, device: str = "cpu", path: str | None = None, tokenizer: str | None = None,
                 model: str = "ViT-H-14", dtype: str = "auto", batch_size: int = 32):
        super().__init__(device)
        from transformers import CLIPTokenizer

        if not path:
            raise InvalidArgument("reward 'hpsv2': option 'path' is required: the HPSv2 checkpoint file "
                                  "(HPS_v2.1_compressed.pt; see docs/rewards.md)")
        if batch_size < 1:
            raise InvalidArgument(f"reward 'hpsv2': batch_size: expected >= 1, got {batch_size}")
        self.dtype, self.batch_size = resolve_dtype(dtype, device), batch_size
        cfg = model_config(model)
        state = load_state_dict(Path(path).expanduser())
        token_dir = Path(tokenizer).expanduser() if tokenizer else Path(path).expanduser().parent
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(token_dir), local_files_only=True)
            problem = None
        except (OSError, ValueError, TypeError) as exc:
            problem = str(exc)
        # A directory without vocabulary files still loads, as an empty tokenizer: compare the size.
        vocab_size = cfg["text"]["vocab_size"]
        if problem is None and len(self.tokenizer) != vocab_size:
            problem = f"its vocabulary has {len(self.tokenizer)} tokens, the model {vocab_size}"
        if problem is not None:
            raise InvalidArgument(f"reward 'hpsv2': tokenizer={token_dir}: expected a directory with CLIP tokenizer "
                                  f"files (e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K's): {problem}")
        self.eos = self.tokenizer.eos_token_id
        self.model = build_clip(cfg, state, self.eos, self.tokenizer.bos_token_id, f"path={path}")
        self.model.to(device=device, dtype=self.dtype)
        self.context = cfg["text"]["context_length"]
        self.size = cfg["vision"]["image_size"]
        self.mean = torch.tensor(OPENAI_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_STD, device=device).view(1, 3, 1, 1)
        log.info("loaded HPSv2 (%s) from %s on %s (%s)", model, path, device, self.dtype)

    def pixel_values(self, images: np.ndarray) -> torch.Tensor:
        return eval_transform(images, self.size, self.mean, self.std)

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.pixel_values(images[start:start + self.batch_size]).to(self.dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output  # ln_post(class token)
            out.append(self.model.visual_projection(pooled).float())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[start:start + self.batch_size], padding=True, truncation=True,
                                    max_length=self.context, return_tensors="pt").to(self.device)
            ids = tokens["input_ids"]
            hidden = self.model.text_model(input_ids=ids, attention_mask=tokens["attention_mask"]).last_hidden_state
            # open_clip pools at argmax(ids): the first end-of-text token (the highest id in CLIP's vocabulary).
            end = (ids == self.eos).int().argmax(dim=-1)
            pooled = hidden[torch.arange(len(ids), device=ids.device), end]
            out.append(self.model.text_projection(pooled).float())
        return F.normalize(torch.cat(out), dim=-1)

    def _score(self, images, prompts, metadata):
        positions: dict[str, int] = {}  # a GRPO group shares its prompt: encode each distinct one once
        index = [positions.setdefault(p, len(positions)) for p in prompts]
        text = self.text_features(list(positions))[torch.tensor(index, device=self.device)]
        return (self.image_features(images) * text).sum(-1).cpu().numpy()
