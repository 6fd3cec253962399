"""FSDP for full fine-tuning (``train.fsdp``): torch FSDP2 ``fully_shard`` over all ranks.

The trained transformer is sharded block by block (each block of the root's top-level
``ModuleList``s, then the root) on a 1-D device mesh over the world, so each rank holds 1/N of the
fp32 weights, of their gradients and, since the optimizer is built on the sharded parameters
(DTensors), of the AdamW states and the EMA shadow. The frozen reference copy is a second
``fully_shard``'ed module: each rank holds 1/N of it too, gathered block by block while it runs.

What changes for the loop:

- gradients are averaged by FSDP's reduce-scatter inside every backward (its default divides by
  the world size: the same mean as ``Distributed.all_reduce_mean_``), so the trainer's own
  all-reduce is off; ``clip_grad_norm_`` on DTensors computes the global norm (a collective);
- every forward and backward gathers parameters (collectives), so every rank must make the same
  number of calls: ``policy_update`` pads the micro-batch loop with zero-weight micro-batches,
  evaluation samples on every rank (rank 0 scores), export gathers on every rank;
- checkpoints: each rank writes its shards with torch.distributed.checkpoint (``sharded/`` in
  the checkpoint folder, which every rank must see: a shared ``out_dir``).

With one process there is nothing to shard: ``train.fsdp`` then changes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("epgrpo.fsdp")


def blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The units FSDP gathers one at a time: every block of the module's top-level ModuleLists
    (SD3/FLUX ``transformer_blocks``, FLUX ``single_transformer_blocks``, a UNet's down/up blocks)."""
    return [block for child in module.children() if isinstance(child, torch.nn.ModuleList) for block in child]


def local_numel(module: torch.nn.Module) -> int:
    """Parameter elements this rank stores (its shards under FSDP)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.parameters())


def shard_module(module: torch.nn.Module, mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in blocks(module):
        fully_shard(block, mesh=mesh)
    # reshard after forward also for the root (FSDP keeps the root gathered by default, expecting a
    # backward right after): rollouts and the reference run without one
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return module


class FSDP:
    """The sharded policy of one run: the mesh, what is sharded, sharded checkpoints and export."""

    def __init__(self, policy, world_size: int, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh

        transformer = getattr(policy, "transformer", None)
        if transformer is None or getattr(policy, "lora_config", None) is not None \
                or getattr(policy, "_reference_transformer", None) is None:
            raise ValueError(f"train.fsdp: needs full fine-tuning of a diffusers transformer (model.lora_rank=0); "
                             f"{type(policy).__name__} with this configuration is not one")
        self.policy = policy
        self.mesh = init_device_mesh(torch.device(device).type, (world_size,))
        self.world_size = world_size
        self.full_numel = sum(p.numel() for p in transformer.parameters())
        shard_module(transformer, self.mesh)
        shard_module(policy._reference_transformer, self.mesh)
        log.info("FSDP over %d ranks: this rank holds %d of the %d transformer parameters (and as much of the "
                 "reference)", world_size, local_numel(transformer), self.full_numel)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.policy.transformer

    # -- checkpoints --------------------------------------------------------------------------
    def _state(self, optimizer: torch.optim.Optimizer, ema, with_optimizer: bool) -> dict:
        """What DCP saves and loads in place: the sharded weights, optimizer state (FQN-keyed) and
        EMA shadow, each rank's own shards."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        state = {"model": get_model_state_dict(self.transformer)}
        if with_optimizer:  # an optimizer without state would be initialised by a fake step here
            state["optimizer"] = get_optimizer_state_dict(self.transformer, optimizer)
        if ema is not None:
            names = [n for n, p in self.transformer.named_parameters() if p.requires_grad]
            state["ema"] = dict(zip(names, ema.shadow))
        return state

    def save(self, directory: Path, optimizer: torch.optim.Optimizer, ema) -> None:
        """Every rank writes its shards (a collective: every rank calls it)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(optimizer, ema, bool(optimizer.state)), checkpoint_id=str(directory))

    def load(self, directory: Path, optimizer: torch.optim.Optimizer, ema, with_optimizer: bool) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if not (Path(directory) / ".metadata").is_file():
            raise ValueError(f"train.resume_from: {directory} holds no sharded checkpoint (no .metadata); FSDP "
                             f"checkpoints need an out_dir every rank shares")
        state = self._state(optimizer, ema, with_optimizer)
        dcp.load(state, checkpoint_id=str(directory))  # in place, into this rank's shards (the EMA's too)
        set_model_state_dict(self.transformer, state["model"])
        if with_optimizer:
            set_optimizer_state_dict(self.transformer, optimizer, state["optimizer"])

    # -- export -------------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole transformer's state on rank 0 (CPU; empty elsewhere). Every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.transformer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def export(self, out_dir: Path, is_main: bool) -> list[Path]:
        """``<out_dir>/transformer/`` as the unsharded model's ``save_pretrained`` writes it (what
        ``from_pretrained`` loads), gathered to rank 0 and written there. Every rank must call it."""
        state = self.full_state_dict()
        component = getattr(self.policy, "trained_component", "transformer")
        target = Path(out_dir) / component
        if is_main:
            # an unsharded twin without memory of its own (meta), given the gathered tensors
            from torch.distributed.fsdp import FSDPModule

            # fully_shard swapped the module's class for an FSDP subclass; the model's own class is below it
            cls = next(c for c in type(self.transformer).__mro__ if not issubclass(c, FSDPModule))
            with torch.device("meta"):
                twin = cls.from_config(self.transformer.config)
            twin.load_state_dict(state, assign=True)
            twin.save_pretrained(target)
        return [target]
