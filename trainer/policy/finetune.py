"""Fine-tuning a diffusers transformer: LoRA (peft) or full, the reference policy, mixed precision.

Shared by every adapter around a diffusers transformer (toy digits, SD3; FLUX would be the same):
the adapter builds its transformer and conditioning, ``FineTunedPolicy`` does the rest.

- LoRA: the base weights are frozen (in the compute dtype), the LoRA weights are trained in fp32;
  the reference policy is the same network with the adapter disabled (no second copy).
- Full fine-tuning: all transformer weights are trained (fp32 master weights); the reference is
  a frozen copy in the compute dtype.
- Mixed precision: with bf16/fp16 the forward runs under ``torch.autocast``; the velocity is
  returned in fp32, and the SDE log-probs are computed in fp32 from it (``sde.py``).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch

from epgrpo.trainer.policy.base import PolicyAdapter

# Flow-GRPO's SD3 targets: every attention projection of both streams (a suffix match).
DEFAULT_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """'auto' = bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype: expected auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def parse_targets(targets: str | Sequence[str] | None) -> list[str]:
    if not targets:
        return list(DEFAULT_LORA_TARGETS)
    if isinstance(targets, str):
        targets = targets.split(",")
    return [t.strip() for t in targets if t.strip()]


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Moves, and casts only when needed (diffusers warns on every dtype cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return module


class FineTunedPolicy(PolicyAdapter):
    """A PolicyAdapter whose trainable part is one diffusers transformer (``self.transformer``)."""

    transformer: torch.nn.Module
    lora_config = None  # peft LoraConfig when training LoRA

    def setup_finetuning(self, transformer: torch.nn.Module, *, device: torch.device, dtype: torch.dtype,
                         lora_rank: int = 0, lora_alpha: float = 0.0, lora_targets=None,
                         gradient_checkpointing: bool = False) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.transformer = transformer
        self._reference_transformer = None
        if lora_rank > 0:
            from peft import LoraConfig

            _place(transformer, self.device, dtype).requires_grad_(False)
            self.lora_config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank,
                                          init_lora_weights="gaussian", target_modules=parse_targets(lora_targets))
            cuda = [self.device.index or 0] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):  # the same initial LoRA on every rank and in every run
                torch.manual_seed(0)
                transformer.add_adapter(self.lora_config)
            for p in transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # LoRA weights (and their optimizer state) in fp32
        else:
            self._reference_transformer = _place(copy.deepcopy(transformer), self.device, dtype)
            self._reference_transformer.requires_grad_(False).eval()
            _place(transformer, self.device, torch.float32).requires_grad_(True)
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self._active = transformer

    def run_transformer(self, **inputs) -> torch.Tensor:
        """The active network's (policy or reference) output, in fp32."""
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        with autocast:
            out = self._active(**inputs, return_dict=False)[0]
        # Z-Image's transformer returns one tensor per sample (a list), the others a batch tensor
        return torch.stack([o.float() for o in out]) if isinstance(out, (list, tuple)) else out.float()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self):
        if self.lora_config is not None:
            self.transformer.disable_adapters()
            try:
                yield
            finally:
                self.transformer.enable_adapters()
        else:
            self._active = self._reference_transformer
            try:
                yield
            finally:
                self._active = self.transformer

    def train(self, mode: bool = True) -> None:
        self.transformer.train(mode)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.transformer.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        if set(own) != set(state):
            missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            raise ValueError(f"checkpoint weights do not match the model (LoRA rank/targets or model changed?): "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(state[name])

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights in peft's naming (``...lora_A.weight``), as diffusers saves them."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer)
