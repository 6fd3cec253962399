"""Reward backends: the interface, batch validation, and the name -> class registry.

A backend is a plain class usable in-process (no server): benchmarks compare in-process and
over-the-wire scoring on identical code. ``score`` validates the batch, then calls ``_score``.

A ``group_aware`` backend scores each image relative to the others of its group (e.g. a win rate
within a GRPO group): ``score`` partitions the batch by the per-image metadata ``group`` and calls
``_score`` once per group. Images without a ``group`` form one group together, so a batch without
group metadata is one group.
"""

from __future__ import annotations

import abc
import importlib
import inspect
from typing import Callable, ClassVar, Sequence

import numpy as np

from epgrpo.services.common.errors import InvalidArgument

# Modules whose import registers the built-in backends (imported on first registry use, so
# importing this module stays cheap).
_BUILTIN_MODULES = tuple(
    f"epgrpo.services.reward.backends.{m}"
    for m in ("digits", "jpeg", "ocr", "clip", "vlm_judge", "hps", "imagereward", "video", "vlm_video", "digit_video")
)
_REGISTRY: dict[str, type["RewardBackend"]] = {}
GROUP_KEY = "group"  # per-image metadata naming the image's group
# What a backend scores (``RewardBackend.modality``): images [N, H, W, C], videos [N, T, H, W, C], or both.
IMAGE, VIDEO, BOTH = "image", "video", "both"
MODALITIES = (IMAGE, VIDEO, BOTH)


def batch_modality(images: np.ndarray) -> str:
    """IMAGE for a [N, H, W, C] batch, VIDEO for [N, T, H, W, C]."""
    return VIDEO if images.ndim == 5 else IMAGE


def accepts(modality: str, batch: str) -> bool:
    return modality == BOTH or modality == batch


def group_indices(metadata: Sequence[dict]) -> list[np.ndarray]:
    """Image indices of each group (metadata ``group``; missing or empty: one group of all such
    images), groups in order of first appearance, indices ascending."""
    groups: dict[str | None, list[int]] = {}
    for i, fields in enumerate(metadata):
        groups.setdefault(fields.get(GROUP_KEY) or None, []).append(i)
    return [np.asarray(indices, dtype=np.int64) for indices in groups.values()]


def win_rates(preference: np.ndarray) -> np.ndarray:
    """float64 [n]: mean over j != i of P(i beats j), from an [n, n] matrix with P[i, j] + P[j, i] = 1
    (the diagonal is ignored). A group's win rates sum to n / 2; a group of one scores 0.5."""
    preference = np.asarray(preference, dtype=np.float64)
    n = len(preference)
    if n == 1:
        return np.full(1, 0.5)
    return (preference.sum(axis=1) - np.diag(preference)) / (n - 1)


def check_batch(images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict]) -> list[dict[str, str]]:
    """Validates a batch; returns metadata with one (possibly empty) dict per image."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        dtype = getattr(images, "dtype", type(images).__name__)
        raise InvalidArgument(f"images.dtype: expected uint8, got {dtype}")
    if images.ndim not in (4, 5) or images.shape[-1] not in (1, 3):
        raise InvalidArgument(f"images.shape: expected [N, H, W, C] with C in {{1, 3}} (images) or [N, T, H, W, C] "
                              f"(videos), got {list(images.shape)}")
    if min(images.shape[:-1]) < 1:
        names = "N, T, H, W" if images.ndim == 5 else "N, H, W"
        raise InvalidArgument(f"images.shape: expected {names} >= 1, got {list(images.shape)}")
    n = images.shape[0]
    if len(prompts) != n:
        raise InvalidArgument(f"prompts: expected {n} prompts (one per image), got {len(prompts)}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise InvalidArgument(f"prompts[{i}]: expected a string, got {type(prompt).__name__}")
    if len(metadata) not in (0, n):
        raise InvalidArgument(f"metadata: expected 0 or {n} entries (one per image), got {len(metadata)}")
    if not metadata:
        return [{} for _ in range(n)]
    for i, fields in enumerate(metadata):
        if not isinstance(fields, dict):
            raise InvalidArgument(f"metadata[{i}]: expected a dict of strings, got {type(fields).__name__}")
    return list(metadata)


def check_modality(name: str, modality: str, images: np.ndarray, field: str = "rewards") -> None:
    """InvalidArgument naming the reward when it does not score this batch's modality."""
    batch = batch_modality(images)
    if accepts(modality, batch):
        return
    if batch == VIDEO:
        hint = (f"; score videos with a video reward, e.g. frames({name}) (k frames averaged) or "
                f"first_frame({name})")
        raise InvalidArgument(f"{field}: reward {name!r} scores images [N, H, W, C], got videos "
                              f"{list(images.shape)}{hint}")
    raise InvalidArgument(f"{field}: reward {name!r} scores videos [N, T, H, W, C], got images {list(images.shape)}")


class RewardBackend(abc.ABC):
    """Scores uint8 images [N, H, W, C] (or videos [N, T, H, W, C], see ``modality``) against their
    prompts; higher is better."""

    name: ClassVar[str] = ""  # set by @register_backend
    description: ClassVar[str] = ""
    inputs: ClassVar[str] = ""  # what it needs besides the image
    range: ClassVar[str] = ""  # e.g. "[0, 1]", or "(-inf, 0]"
    #: safe to call from several threads at once, with work that releases the GIL (CPU backends such
    #: as JPEG): ``epgrpo-reward --workers N`` then scores N requests in parallel. Others run one at a time.
    concurrent: ClassVar[bool] = False
    #: scores an image relative to the others of its group: ``_score`` gets one whole group per call
    #: (see the module docstring), and clients must never split a group across requests.
    group_aware: ClassVar[bool] = False
    #: the batches it scores: IMAGE ([N, H, W, C]), VIDEO ([N, T, H, W, C]) or BOTH; ``score``
    #: refuses the other modality with InvalidArgument naming the reward
    modality: ClassVar[str] = IMAGE

    def __init__(self, device: str = "cpu"):
        self.device = device

    def score(self, images: np.ndarray, prompts: Sequence[str], metadata: Sequence[dict] = ()) -> np.ndarray:
        """float32 [N] scores. Raises InvalidArgument naming the field of a bad sample."""
        metadata = check_batch(images, prompts, metadata)
        check_modality(self.name, self.modality, images)
        if not self.group_aware:
            return np.asarray(self._score(images, list(prompts), metadata), dtype=np.float32)
        scores = np.empty(len(images), dtype=np.float32)
        for indices in group_indices(metadata):
            part = np.asarray(self._score(images[indices], [prompts[i] for i in indices],
                                          [metadata[i] for i in indices]), dtype=np.float32)
            if part.shape != indices.shape:  # a plain assignment would broadcast a scalar silently
                raise ValueError(f"reward {self.name!r} returned shape {list(part.shape)} for a group of "
                                 f"{len(indices)} images")
            scores[indices] = part
        return scores

    @abc.abstractmethod
    def _score(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, str]]) -> np.ndarray:
        """Scores a validated batch."""

    def info(self) -> dict[str, str | bool]:
        return {"name": self.name, "description": self.description, "inputs": self.inputs, "range": self.range,
                "group_aware": self.group_aware, "modality": self.modality}


def register_backend(name: str) -> Callable[[type[RewardBackend]], type[RewardBackend]]:
    """Class decorator: makes the backend available to ``create_backend(name)``."""

    def decorator(cls: type[RewardBackend]) -> type[RewardBackend]:
        if not (isinstance(cls, type) and issubclass(cls, RewardBackend)):
            raise TypeError(f"@register_backend({name!r}) expects a RewardBackend subclass, got {cls!r}")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"reward {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_backends() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def backend_class(name: str) -> type[RewardBackend]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidArgument(
            f"unknown reward {name!r}; known rewards: {', '.join(sorted(_REGISTRY))}"
        ) from None


def create_backend(name: str, **options) -> RewardBackend:
    """Constructs a registered backend. Unknown names or options raise InvalidArgument."""
    cls = backend_class(name)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        raise InvalidArgument(f"reward {name!r}: bad options {sorted(options)}: {exc}") from None
    return cls(**options)
