"""Data parallelism: ranks started by ``accelerate launch`` (or torchrun), or one plain process.

accelerate sets up the process group (NCCL on GPUs, gloo on CPUs) and each rank's device. The
model is deliberately *not* wrapped in DDP: with Expand-and-Prune the forward calls differ per
step (the reference pass runs with the LoRA adapter disabled, under no_grad), and DDP's per-backward
bucket hooks would all-reduce on every one of the many backward calls of an accumulated step.
Instead the trainer averages the gradients itself, once per optimizer step, in one flat
all-reduce — what DDP with ``no_sync`` accumulation does — so every rank applies the same update.

Whole groups live on one rank (a rank samples, prunes and trains its own prompts), so per-group
statistics never straddle ranks; rewards are all-gathered so that every rank computes the same
per-prompt advantages and keeps an identical stat tracker (checkpointed once).
"""

from __future__ import annotations

import os

import torch


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class Distributed:
    """Rank facade; with one process every collective is the identity."""

    def __init__(self, device: str = "auto"):
        self.world_size = launched_world_size()
        self.rank, self.local_rank = 0, 0
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self._comm_device = torch.device("cpu")
        if self.world_size > 1:
            from accelerate import PartialState

            state = PartialState(cpu=self.device.type == "cpu")
            self.rank, self.local_rank = state.process_index, state.local_process_index
            if self.device.type == "cuda":
                self.device = state.device  # cuda:<local rank>
                self._comm_device = state.device  # NCCL needs device tensors
            else:
                self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_mean_(self, params: list[torch.nn.Parameter]) -> None:
        """Averages the parameters' gradients across ranks in place (a missing grad counts as 0)."""
        if self.world_size == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]).to(self._comm_device)
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(p.device, g.dtype)
            offset += n

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks (rank order); the first dimension may differ between ranks
        (e.g. a rank whose groups went on unpruned keeps more trajectories)."""
        if self.world_size == 1:
            return tensor
        counts = self.counts(len(tensor))
        local = tensor.contiguous().to(self._comm_device)
        padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[:len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(tensor.device)

    def counts(self, count: int) -> list[int]:
        """Every rank's ``count``, in rank order."""
        if self.world_size == 1:
            return [count]
        mine = torch.tensor([count], dtype=torch.int64, device=self._comm_device)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, mine)
        return [int(p) for p in parts]

    def sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def mean(self, values: list[float]) -> list[float]:
        return [v / self.world_size for v in self.sum(values)]

    def broadcast_text(self, text: str) -> str:
        """Rank 0's string on every rank (as bytes in a tensor: nothing pickled)."""
        if self.world_size == 1:
            return text
        data = torch.tensor(list(text.encode()) if self.is_main else [], dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self._comm_device)
        torch.distributed.broadcast(size, 0)
        buffer = data.to(self._comm_device) if self.is_main else torch.empty(int(size), dtype=torch.uint8,
                                                                               device=self._comm_device)
        torch.distributed.broadcast(buffer, 0)
        return bytes(buffer.cpu().tolist()).decode()
