"""ImageReward (Xu et al. 2023): BLIP (a ViT image encoder and a BERT text encoder whose layers
cross-attend to the image tokens) and an MLP head on the text [CLS] feature, normalised with the
release's mean and std, exactly as the reference ``ImageReward.score`` computes it: the prompt is
tokenised with BLIP's BERT tokenizer (bert-base-uncased plus [DEC] and [ENC]), padded to 35 tokens,
and keeps its [CLS] first token (the reference's score() does not substitute [ENC]).

The checkpoint (``ImageReward.pt``: ``blip.visual_encoder.*``, ``blip.text_encoder.*``,
``mlp.layers.*``; BLIP's unused contrastive ``blip.vision_proj`` / ``blip.text_proj`` may be present)
is renamed into transformers' ``BlipVisionModel`` and ``BlipTextModel`` (BLIP's own HF port, the
modules ``BlipForImageTextRetrieval`` holds), as transformers' BLIP conversion script does. The
architecture is read off the tensor shapes (heads: width / ``head_dim``, 64 for every BLIP model).
Every checkpoint tensor must be consumed and every model weight filled.

Preprocessing is the reference's CLIP-style eval transform, batched in torch (see hps.py).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from epgrpo.services.common.errors import InvalidArgument
from epgrpo.services.reward.backends.base import RewardBackend, register_backend
from epgrpo.services.reward.backends.weights import load_exactly, load_tensors
from epgrpo.services.reward.backends.clip import resolve_dtype
from epgrpo.services.reward.backends.hps import OPENAI_MEAN, OPENAI_STD, eval_transform

log = logging.getLogger("epgrpo.reward.imagereward")

# ImageReward-v1.0's normalisation of the head's output (ImageReward.py).
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35  # the reference tokenises with padding='max_length', max_length=35
HEAD_INDICES = (0, 2, 4, 6, 7)  # the MLP's Linear layers (Dropout between them holds no tensors)
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
_VISION = [(r"cls_token", "embeddings.class_embedding"), (r"pos_embed", "embeddings.position_embedding"),
           (r"patch_embed\.proj\.", "embeddings.patch_embedding."), (r"norm\.", "post_layernorm."),
           (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
           (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
           (r"blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
           (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
           (r"blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp.")]


def rename(key: str) -> str | None:
    """ImageReward.pt key -> our module's key ('vision.*', 'text.*', 'head.*'); None for tensors the
    score does not use. Unknown keys raise."""
    if key.startswith(_UNUSED):
        return None
    if key.startswith("blip.text_encoder."):  # BLIP's med.py names are transformers' BlipText names
        return "text." + key.removeprefix("blip.text_encoder.")
    if key.startswith("blip.visual_encoder."):
        rest = key.removeprefix("blip.visual_encoder.")
        for pattern, replacement in _VISION:
            renamed, count = re.subn(f"^{pattern}", replacement, rest)
            if count:
                return "vision." + renamed
    match = re.fullmatch(r"mlp\.layers\.(\d+)\.(weight|bias)", key)
    if match and int(match[1]) in HEAD_INDICES:
        return f"head.{HEAD_INDICES.index(int(match[1]))}.{match[2]}"
    raise InvalidArgument(f"reward 'imagereward': checkpoint key {key!r} has no place in ImageReward "
                          "(BLIP visual_encoder + text_encoder + mlp); is this ImageReward.pt?")


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path, "imagereward", "ImageReward.pt")


def _shape(state: dict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise InvalidArgument(f"reward 'imagereward': the checkpoint lacks {key}")
    return tuple(state[key].shape)


def _count(state: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def build_model(state: dict[str, torch.Tensor], head_dim: int) -> torch.nn.ModuleDict:
    """BlipVisionModel + BlipTextModel + the head's Linear layers, shaped from the checkpoint and
    holding exactly its tensors."""
    from accelerate import init_empty_weights
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    width, _, patch, _ = _shape(state, v + "patch_embed.proj.weight")
    grid = round((_shape(state, v + "pos_embed")[1] - 1) ** 0.5)
    vocab, hidden = _shape(state, t + "embeddings.word_embeddings.weight")
    if width % head_dim or hidden % head_dim:
        raise InvalidArgument(f"reward 'imagereward': head_dim={head_dim} does not divide the widths {width}, {hidden}")
    vision = BlipVisionConfig(hidden_size=width, intermediate_size=_shape(state, v + "blocks.0.mlp.fc1.weight")[0],
                              num_hidden_layers=_count(state, v + "blocks."), num_attention_heads=width // head_dim,
                              image_size=grid * patch, patch_size=patch, layer_norm_eps=1e-6, hidden_act="gelu")
    text = BlipTextConfig(vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=width,
                          intermediate_size=_shape(state, t + "encoder.layer.0.intermediate.dense.weight")[0],
                          num_hidden_layers=_count(state, t + "encoder.layer."), num_attention_heads=hidden // head_dim,
                          max_position_embeddings=_shape(state, t + "embeddings.position_embeddings.weight")[0],
                          layer_norm_eps=1e-12, hidden_act="gelu", is_decoder=True)  # is_decoder: build cross-attention
    widths = [hidden] + [_shape(state, f"mlp.layers.{i}.weight")[0] for i in HEAD_INDICES]
    with init_empty_weights(include_buffers=False):  # weights come from the checkpoint: skip random init
        model = torch.nn.ModuleDict({
            "vision": BlipVisionModel(vision), "text": BlipTextModel(text, add_pooling_layer=False),
            "head": torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:]))})
    mapped = {}
    for key, value in state.items():
        name = rename(key)
        if name is not None:
            mapped[name] = value  # (float32 once loaded)
    return load_exactly(model, mapped, "imagereward")


@register_backend("imagereward")
class ImageReward(RewardBackend):
    description = ("ImageReward v1.0: a BLIP image-text encoder + MLP trained on human preference rankings, "
                   "normalised as the reference (about -2 to 2 on real images; higher is preferred).")
    inputs = "prompt (truncated to 35 BERT tokens); images resized and centre-cropped to 224"
    range = "unbounded (standardised: about [-2, 2])"

    def __init__(self, device: str = "cpu", path: str | None = None, tokenizer: str | None = None,
                 dtype: str = "auto", batch_size: int = 32, head_dim: int = 64):
        super().__init__(device)
        from transformers import BertTokenizer

        if not path:
            raise InvalidArgument("reward 'imagereward': option 'path' is required: the ImageReward.pt checkpoint "
                                  "(see docs/rewards.md)")
        if batch_size < 1:
            raise InvalidArgument(f"reward 'imagereward': batch_size: expected >= 1, got {batch_size}")
        self.dtype, self.batch_size = resolve_dtype(dtype, device), batch_size
        state = load_checkpoint(Path(path).expanduser())
        self.model = build_model(state, head_dim).to(device=device, dtype=self.dtype)
        token_dir = Path(tokenizer).expanduser() if tokenizer else Path(path).expanduser().parent
        vocab = self.model["text"].config.vocab_size
        try:
            self.tokenizer = BertTokenizer.from_pretrained(str(token_dir), local_files_only=True)
            # BLIP's init_tokenizer: [DEC] as bos, [ENC] as an extra special token (vocabulary + 2).
            self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
            self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
            problem = None if len(self.tokenizer) == vocab else \
                f"with [DEC] and [ENC] it has {len(self.tokenizer)} tokens, the model {vocab}"
        except (OSError, ValueError, TypeError) as exc:
            problem = str(exc)
        if problem is not None:
            raise InvalidArgument(f"reward 'imagereward': tokenizer={token_dir}: expected a bert-base-uncased "
                                  f"tokenizer directory (vocab.txt): {problem}")
        self.size = self.model["vision"].config.image_size
        self.mean = torch.tensor(OPENAI_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(OPENAI_STD, device=device).view(1, 3, 1, 1)
        log.info("loaded ImageReward from %s on %s (%s)", path, device, self.dtype)

    def pixel_values(self, images: np.ndarray) -> torch.Tensor:
        return eval_transform(images, self.size, self.mean, self.std)

    @torch.no_grad()
    def _score(self, images, prompts, metadata):
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            pixels = self.pixel_values(images[chunk]).to(self.dtype)
            image_embeds = self.model["vision"](pixel_values=pixels).last_hidden_state  # norm(all tokens)
            tokens = self.tokenizer(prompts[chunk], padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                    return_tensors="pt").to(self.device)
            text = self.model["text"](input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                      encoder_hidden_states=image_embeds,
                                      encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long,
                                                                        device=self.device))
            x = text.last_hidden_state[:, 0].float()
            for layer in self.model["head"]:  # no activations between the Linear layers, as the reference
                x = F.linear(x, layer.weight.float(), layer.bias.float())
            out.append((x[:, 0] - REWARD_MEAN) / REWARD_STD)
        return torch.cat(out).cpu().numpy()
