"""The algorithm interface the one training loop talks to, and the algorithm registry.

An algorithm decides three things and nothing else: which rollout steps are stochastic (the
others are ODE steps), which steps or times are trained on, and the update that turns an
iteration's kept trajectories and advantages into optimizer steps. The rollout, the pruner
protocol (Expand-and-Prune works the same under every algorithm), waves, the services,
checkpoints, FSDP and data-parallel ranks do not know which algorithm runs.

Algorithms keep no state between iterations: everything they draw (SDE windows, training times,
forward-process noise) derives from (train.seed, iteration, trajectory id), so a resumed run and
any number of ranks see the same values.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from epgrpo.trainer.config import Config
    from epgrpo.trainer.optimize import UpdateStats
    from epgrpo.trainer.rollout import RolloutResult
    from epgrpo.trainer.samplers import Sampler


class Algorithm(ABC):
    name: ClassVar[str]
    #: the ``algo.*`` options this algorithm reads; any other one must stay at its default
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: "Config"):
        self.c = config
        self.o = config.algo

    @classmethod
    def validate(cls, config: "Config") -> None:
        """Checks this algorithm's options (ValueError naming the field); runs with the config's validation."""

    def check_sampler(self, sampler: "Sampler") -> None:
        """Refuses a model family the algorithm cannot train (a clear ValueError)."""

    @abstractmethod
    def sde_steps(self, iteration: int) -> list[int] | None:
        """The stochastic steps of this iteration's rollouts: None = every step but the last (all with
        sampling.sde_last_step), [] = a deterministic (ODE) rollout."""

    @abstractmethod
    def train_steps(self, batch: "RolloutResult", iteration: int) -> list[int]:
        """The rollout steps trained on this iteration (logged as ``trained_steps``)."""

    @abstractmethod
    def update(self, policy, optimizer, batch: "RolloutResult", advantages, sampler: "Sampler", *,
               iteration: int, train_steps: list[int], trajectory_offset: int = 0, **options) -> list["UpdateStats"]:
        """One iteration's optimisation; ``options`` are ``optimize.policy_update``'s keyword options;
        ``trajectory_offset`` + ``batch.trajectory_ids`` = the iteration-wide trajectory ids (same on any rank)."""


_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    from epgrpo.trainer.algorithms import awm, grpo, grpo_guard, mixgrpo, nft  # noqa: F401 - they register


def available_algorithms() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def algorithm_class(name: str) -> type[Algorithm]:
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"train.algorithm: unknown algorithm {name!r}; available: {', '.join(available_algorithms())}")
    return _REGISTRY[name]


def check_algorithm_options(config: "Config") -> None:
    """``train.algorithm`` is registered and no other algorithm's ``algo.*`` option is set (ValueError
    naming the option, the algorithm and its own options)."""
    cls = algorithm_class(config.train.algorithm)
    defaults = type(config.algo)()
    for f in dataclasses.fields(config.algo):
        if f.name not in cls.options and getattr(config.algo, f.name) != getattr(defaults, f.name):
            own = ", ".join(f"algo.{o}" for o in cls.options) or "none"
            raise ValueError(f"algo.{f.name}: not an option of algorithm {cls.name!r} (its options: {own})")
    cls.validate(config)


def create_algorithm(config: "Config") -> Algorithm:
    check_algorithm_options(config)
    return algorithm_class(config.train.algorithm)(config)
