"""Checkpoints and exact resume: the file format and its I/O. What a run's state is comes from
``Trainer.state_dict()`` / ``load_state_dict()``; this module writes it. Tensors go to
safetensors, everything else to JSON: nothing is pickled (``torch.save`` of an optimizer state
would be), so a checkpoint is safe to load from anywhere.

    <out_dir>/checkpoints/iter_000010/
        weights.safetensors     trainable weights (LoRA weights only, with LoRA)
        optimizer.safetensors   optimizer tensors, "state.<param index>.<name>"
        ema.safetensors         the EMA weights (train.ema)
        state.json              iteration, optimizer param groups and scalars, LR scheduler,
                                prompt-sampler RNG state, stat tracker, NFE and EMA counters, config
        rng_rank<r>.safetensors torch CPU/CUDA generator states of rank r
        rng_rank<r>.json        numpy and python RNG states of rank r
        sharded/                with train.fsdp, instead of the three tensor files: each rank's shards of
                                the weights, optimizer state and EMA (torch.distributed.checkpoint)
        metrics.jsonl, eval.jsonl  the run's metrics up to this iteration

Per-trajectory noise, SDE windows, trained-step subsets and pruner seeds derive from
(seed, iteration), so they need no state. Resuming N + M iterations reproduces an uninterrupted
run bit for bit on CPU (tested). With several ranks every rank must call ``save_checkpoint``
(each writes its own RNG file; rank 0 writes the rest; with FSDP each writes its shards).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("epgrpo.checkpoint")

METRIC_FILES = ("metrics.jsonl", "eval.jsonl")
SHARDED_DIR = "sharded"  # with train.fsdp: torch.distributed.checkpoint's files, one per rank, plus .metadata
# Trainer.state_dict() names its tensors "<group>/<name>"; each group is the file <group>.safetensors
# (ema only with train.ema).
TENSOR_FILES = ("weights", "optimizer", "ema")
# Options (prefixes) that may change between a run and its resumption without changing what it
# computes: the length of the run (except under a linear or cosine LR schedule, which decays over it:
# refused, see _check_schedule_horizon), where services live and how to reach them, evaluation.
RESUMABLE_CHANGES = ("train.iterations", "train.resume_from", "train.checkpoint_", "out_dir", "launch_services",
                     "progress", "reward.address", "reward.deadline_s", "reward.retry_budget_s", "reward.tls_",
                     "reward.token_file", "pruner.", "eval.", "model.device")


def checkpoint_dir(out_dir: Path, iteration: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"iter_{iteration:06d}"


CHECKPOINT_NAME = re.compile(r"iter_(\d+)")  # a folder being written is iter_N.tmp: never taken


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """The finished checkpoints of ``out_dir``, oldest first. A checkpoint is renamed from its
    ``.tmp`` folder only after every rank wrote its part, so ``iter_N`` is complete by construction;
    one without a readable state.json (e.g. copied by hand) is skipped all the same."""
    found = []
    for p in (Path(out_dir) / "checkpoints").glob("iter_*"):
        match = CHECKPOINT_NAME.fullmatch(p.name)
        if match and p.is_dir() and _readable_state(p):
            found.append((int(match.group(1)), p))
    return [p for _, p in sorted(found)]


def _readable_state(directory: Path) -> bool:
    try:
        return "iteration" in json.loads((directory / "state.json").read_text())
    except (OSError, ValueError):
        return False


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (``train.resume_from=latest``), never a half-written ``.tmp``."""
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None


def _tensors(d: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in d.items()}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for k, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{k}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": jsonable(random.getstate())}


def jsonable(state):
    """A Python RNG state (nested tuples) as JSON lists."""
    return [jsonable(s) for s in state] if isinstance(state, tuple) else state


def tuples(state):
    """The inverse of ``jsonable``."""
    return tuple(tuples(s) for s in state) if isinstance(state, list) else state


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as tensors ("state.<param index>.<name>") and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}  # betas
              for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": dict(sorted(state.items())), "param_groups": groups})


def save_checkpoint(trainer, directory: str | Path) -> Path:
    """Writes everything needed to continue ``trainer`` after its last completed iteration
    (``trainer.completed_iteration``) to ``directory`` (replaced atomically); returns it.

    Works with a shared ``out_dir`` and with node-local ones: a node that does not see rank 0's
    folder writes its own complete copy (weights and optimizer state are the same on every rank),
    so every node can resume from its own disk. Every rank must call it."""
    directory = Path(directory)
    dist = trainer.dist
    tmp = directory.with_name(directory.name + ".tmp")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    # rank 0's folder is not here: this node's disk is its own; its local rank 0 writes a full copy
    writer = dist.is_main or (dist.local_rank == 0 and not tmp.is_dir())
    sharded = getattr(trainer, "fsdp", None) is not None
    if sharded and dist.sum([float(writer and not dist.is_main)])[0]:  # decided together: no rank left waiting
        raise ValueError(f"train.fsdp: sharded checkpoints need an out_dir every rank shares; {tmp.parent} is "
                         f"node-local (rank 0's folder is not visible on every node)")
    dist.barrier()  # every rank has looked before any creates the folder on its own disk
    tmp.mkdir(parents=True, exist_ok=True)
    rng_tensors, rng_meta = _rng_state()
    save_file(_tensors(rng_tensors), tmp / f"rng_rank{dist.rank}.safetensors")
    (tmp / f"rng_rank{dist.rank}.json").write_text(json.dumps(rng_meta))
    if sharded:
        trainer.fsdp.save(tmp / SHARDED_DIR, trainer.optimizer, trainer.ema)  # every rank writes its own shards
    if writer:
        _write_replicated_state(trainer, tmp)
    dist.barrier()  # every rank's RNG file is in place
    if writer:
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    dist.barrier()
    return directory


def _write_replicated_state(trainer, tmp: Path) -> None:
    """What every rank holds identically: ``trainer.state_dict()`` (a safetensors file per tensor
    group, the rest as state.json) and the metric files."""
    tensors, meta = trainer.state_dict()
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in TENSOR_FILES if (g != "ema" or "ema" in meta)
                                                  and "fsdp" not in meta}  # FSDP: the tensors are in sharded/
    for key, value in tensors.items():
        group, _, name = key.partition("/")
        if group not in groups:
            raise ValueError(f"trainer state tensor {key!r}: expected <group>/<name>, group one of {', '.join(groups)}")
        groups[group][name] = value
    for group, values in groups.items():
        save_file(_tensors(values), tmp / f"{group}.safetensors")
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    for name in METRIC_FILES:
        if (trainer.out / name).exists():
            shutil.copyfile(trainer.out / name, tmp / name)


def _changed_options(saved: dict, current: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(saved) | set(current)):
        a, b, name = saved.get(key), current.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_options(a, b, f"{name}.")
        elif a != b and not name.startswith(RESUMABLE_CHANGES):
            changed.append(f"{name}: {a!r} -> {b!r}")
    return changed


# LR schedules whose value at an iteration depends on train.iterations (the horizon).
HORIZON_SCHEDULES = ("linear", "cosine")


def _check_schedule_horizon(saved: dict, current: dict) -> None:
    """Extending (or shortening) a run on resume is harmless, except for a schedule that decays over
    train.iterations: the LR of every remaining iteration would change without a word (cosine at
    iteration 50 of 100: 0.5 x lr; resumed with 200: 0.854 x lr). Refused, naming the way out."""
    before, after = saved.get("train", {}), current.get("train", {})
    schedule = after.get("lr_schedule")
    if schedule in HORIZON_SCHEDULES and before.get("iterations") != after.get("iterations"):
        raise ValueError(f"train.iterations: the checkpoint's run has {before.get('iterations')} iterations and "
                         f"train.lr_schedule={schedule} decays over them; resuming with {after.get('iterations')} "
                         f"would change the learning rate of every remaining iteration. Resume with "
                         f"train.iterations={before.get('iterations')}, or start a new run (a constant schedule "
                         "may be extended)")


def _require_rng_files(dist, directory: Path, state: dict) -> None:
    """Every rank restores its own RNG state, never another's: a missing file is an error on every rank
    (decided together, so no rank is left waiting for one that stopped)."""
    names = [f"rng_rank{dist.rank}.safetensors", f"rng_rank{dist.rank}.json"]
    missing = [n for n in names if not (directory / n).is_file()]
    first = next((r for r, m in enumerate(dist.counts(int(bool(missing)))) if m), None)
    if first is not None:
        raise ValueError(f"train.resume_from: {directory} has no rng_rank{first}.safetensors / rng_rank{first}.json "
                         f"(rank {first}'s RNG state; saved by {state.get('world_size', '?')} ranks, this run has "
                         f"{dist.world_size}): resume from a complete checkpoint with the ranks it was saved with")


def load_checkpoint(trainer, directory: str | Path) -> int:
    """Restores ``trainer`` from ``directory`` (and the metric files into its out_dir); returns the
    iteration to continue after."""
    directory = Path(directory)
    if not (directory / "state.json").is_file():
        raise ValueError(f"train.resume_from: {directory} is not a checkpoint (no state.json)")
    state = json.loads((directory / "state.json").read_text())
    _require_rng_files(trainer.dist, directory, state)
    _check_schedule_horizon(state["config"], trainer.config_dict())
    for change in _changed_options(state["config"], trainer.config_dict()):
        log.warning("resuming with a changed option (the run will not match an uninterrupted one): %s", change)
    tensors = {f"{group}/{name}": value for group in TENSOR_FILES if (directory / f"{group}.safetensors").is_file()
               for name, value in load_file(directory / f"{group}.safetensors").items()}
    try:
        trainer.load_state_dict(tensors, state)
        if "fsdp" in state:
            trainer.fsdp.load(directory / SHARDED_DIR, trainer.optimizer, trainer.ema,
                              with_optimizer=state["fsdp"]["optimizer_state"])
    except ValueError as e:
        raise ValueError(f"{e} ({directory})") from None
    rank = trainer.dist.rank
    rng_tensors = load_file(directory / f"rng_rank{rank}.safetensors")
    rng_meta = json.loads((directory / f"rng_rank{rank}.json").read_text())
    torch.set_rng_state(rng_tensors["torch"])
    cuda = [rng_tensors[f"cuda.{k}"] for k in range(len(rng_tensors) - 1) if f"cuda.{k}" in rng_tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = rng_meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(tuples(rng_meta["python"]))
    if trainer.dist.is_main:
        trainer.out.mkdir(parents=True, exist_ok=True)
        for name in METRIC_FILES:  # drop lines of iterations after the checkpoint (a crashed run's tail)
            if (directory / name).exists():
                shutil.copyfile(directory / name, trainer.out / name)
            else:
                (trainer.out / name).unlink(missing_ok=True)
    trainer.dist.barrier()
    return int(state["iteration"])


def prune_checkpoints(out_dir: Path, keep: int) -> None:
    """Keeps the newest ``keep`` iteration checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for old in complete_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
