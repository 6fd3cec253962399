"""Exponential moving average of the trainable weights (Flow-GRPO's ``train.ema``).

The average is what evaluation samples with and what the run exports; training itself always
continues from the raw weights. The decay warms up as Flow-GRPO's does,
``min(decay, (1 + n) / (10 + n))`` for the n-th update, so early averages are not dominated by
the initial weights.
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
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
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
