"""Exponential moving average of the trainable weights (Flow-GRPO's ``train.ema``).

The average is what evaluation samples with and what the run exports; training itself always
continues from the raw weights. The decay warms up as Flow-GRPO's ``EMAModuleWrapper`` does, from
the optimizer step count: after optimizer step s (0-based) the average is taken when
(s + 1) % every == 0, with decay ``min(decay, (1 + s) / (10 + s))`` (with every = 8: 0.47 at the
first average, s = 7; 0.90 from s = 79 on), so early averages are not dominated by the initial
weights. (Flow-GRPO's train_sd3.py passes its step counter after incrementing it and calls the
EMA once per sample micro-batch, so its first average comes one optimizer step earlier and, with
gradient accumulation, is repeated per micro-batch; here it is one average per averaging step.)
"""

from __future__ import annotations

import contextlib

import torch


class EMA:
    def __init__(self, params: list[torch.nn.Parameter], decay: float = 0.9, every: int = 1):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay: expected a number in [0, 1), got {decay}")
        self.params = list(params)
        self.decay, self.every = decay, max(1, every)
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.calls = 0  # optimizer steps seen
        self.updates = 0  # averages taken

    @torch.no_grad()
    def step(self) -> None:
        """Called after every optimizer step; averages every ``every``-th one."""
        self.calls += 1
        if self.calls % self.every:
            return
        step = self.calls - 1  # the optimizer step just taken, 0-based (Flow-GRPO's optimization_step)
        decay = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.mul_(decay).add_(p.detach().float(), alpha=1 - decay)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model for the duration of the block, then the raw ones back."""
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for r, p in zip(raw, self.params):
                    p.copy_(r)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors for safetensors, JSON-able counters)."""
        return {f"ema.{k}": s for k, s in enumerate(self.shadow)}, {"calls": self.calls, "updates": self.updates}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if len(tensors) != len(self.shadow):
            raise ValueError(f"checkpoint EMA has {len(tensors)} tensors, the model {len(self.shadow)}")
        for k, s in enumerate(self.shadow):
            s.copy_(tensors[f"ema.{k}"])
        self.calls, self.updates = int(meta["calls"]), int(meta["updates"])
