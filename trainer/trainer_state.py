"""The trainer's state in one place: what a checkpoint holds (``state_dict`` / ``load_state_dict``),
saving and resuming. ``checkpoint.py`` keeps only the file format and I/O; with FSDP the sharded
tensors go through ``trainer/fsdp.py``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from epgrpo.trainer.checkpoint import (checkpoint_dir, jsonable, latest_checkpoint, load_checkpoint,
                                       load_optimizer_state, optimizer_state, prune_checkpoints, save_checkpoint,
                                       tuples)

log = logging.getLogger("epgrpo.trainer")


class TrainerState:
    """Mixed into ``Trainer`` (trainer/loop.py), whose attributes it reads."""

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What continues this run after ``completed_iteration``, the same on every rank: tensors
        named ``<group>/<name>`` (``weights/`` the trainable weights, ``optimizer/`` the optimizer's,
        ``ema/`` the EMA's) and JSON-able metadata: the completed iteration, the optimizer's param
        groups and scalars, LR scheduler, prompt sampler, stat tracker, NFE counters, EMA counters
        and the config. The global RNGs are not in it: they differ per rank (see checkpoint.py).
        With FSDP the tensors are sharded: none here, ``FSDP.save`` writes each rank's shards."""
        tensors, optimizer_meta = {}, None
        if self.fsdp is None:
            optimizer_tensors, optimizer_meta = optimizer_state(self.optimizer)
            tensors = {**{f"weights/{k}": v for k, v in self.policy.state_dict().items()},
                       **{f"optimizer/{k}": v for k, v in optimizer_tensors.items()}}
        meta = {
            "iteration": self.completed_iteration,
            "world_size": self.dist.world_size,
            "optimizer": optimizer_meta,
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "prompt_rng": jsonable(self.rng.getstate()),
            "stat_tracker": self.tracker.state_dict(),
            "nfe_cumulative": self.nfe_cumulative,
            "nfe_full_cumulative": self.nfe_full_cumulative,
            "config": self.config_dict(),
        }
        if self.fsdp is not None:  # an optimizer without state yet has nothing sharded to save
            meta["fsdp"] = {"optimizer_state": bool(self.optimizer.state)}
        if self.ema is not None:
            ema_tensors, meta["ema"] = self.ema.state_dict()
            if self.fsdp is None:
                tensors.update({f"ema/{k}": v for k, v in ema_tensors.items()})
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restores what ``state_dict`` returned (the config is not restored: the caller compares it)."""
        groups: dict[str, dict[str, torch.Tensor]] = {"weights": {}, "optimizer": {}, "ema": {}}
        for key, value in tensors.items():
            group, _, name = key.partition("/")
            if group not in groups:
                raise ValueError(f"unexpected trainer state tensor {key!r}")
            groups[group][name] = value
        if self.ema is not None and "ema" not in meta:
            raise ValueError("train.ema: the checkpoint was saved without EMA weights")
        if ("fsdp" in meta) != (self.fsdp is not None):
            raise ValueError(f"train.fsdp: the checkpoint was saved {'with' if 'fsdp' in meta else 'without'} FSDP "
                             f"sharding, this run is {'' if self.fsdp is not None else 'not '}sharded (train.fsdp="
                             f"{self.c.train.fsdp}, {self.dist.world_size} ranks); resume as it was saved")
        if self.fsdp is None:  # with FSDP, FSDP.load restores the tensors (checkpoint.py)
            device = self.policy.device
            self.policy.load_state_dict({k: v.to(device) for k, v in groups["weights"].items()})
            load_optimizer_state(self.optimizer, groups["optimizer"], meta["optimizer"])
        self.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        self.rng.setstate(tuples(meta["prompt_rng"]))
        self.tracker.load_state_dict(meta["stat_tracker"])
        self.nfe_cumulative = meta["nfe_cumulative"]
        self.nfe_full_cumulative = meta["nfe_full_cumulative"]
        if self.ema is not None and self.fsdp is None:
            self.ema.load_state_dict(groups["ema"], meta["ema"])
        elif self.ema is not None:  # the sharded shadow comes with FSDP.load
            self.ema.calls, self.ema.updates = int(meta["ema"]["calls"]), int(meta["ema"]["updates"])
        self.completed_iteration = int(meta["iteration"])

    def resume(self) -> int:
        """Restores the checkpoint named by train.resume_from; returns the last completed iteration."""
        source = self.c.train.resume_from
        if not source:
            return 0
        path = latest_checkpoint(self.out) if source == "latest" else Path(source)
        if path is None:
            log.info("train.resume_from=latest: no checkpoint in %s yet, starting fresh", self.out / "checkpoints")
            return 0
        done = load_checkpoint(self, path)
        log.info("resumed from %s after iteration %d", path, done)
        return done

    def checkpoint(self) -> Path:
        path = save_checkpoint(self, checkpoint_dir(self.out, self.completed_iteration))
        if self.dist.local_rank == 0:  # rank 0, and each node's first rank when out_dir is node-local
            prune_checkpoints(self.out, self.c.train.checkpoint_keep)
        return path

