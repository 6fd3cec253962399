"""Preview decoders: x̂0-previews [N, C, H, W] -> uint8 images [N, H, W, C] for the reward service.

A registry by name (the rollout's ``decoder`` field). "pixel" is the identity decode of
pixel-space models (values in [-1, 1]). Latent models plug in a decoder here (e.g. an SD3 VAE):
``register_decoder("sd3-vae", factory)``; the factory runs once, on first use, so importing this
module never loads a model.
"""

from __future__ import annotations

import threading
from typing import Callable, Protocol

import numpy as np

from epgrpo.services.common.errors import InvalidArgument

DEFAULT_DECODER = "pixel"


class Decoder(Protocol):
    def __call__(self, previews: np.ndarray, field: str) -> np.ndarray:
        """float previews [N, C, H, W] -> uint8 [N, H, W, C]; InvalidArgument naming ``field``."""


_FACTORIES: dict[str, Callable[[], Decoder]] = {}
_INSTANCES: dict[str, Decoder] = {}
_LOCK = threading.Lock()


def register_decoder(name: str, factory: Callable[[], Decoder]) -> None:
    """Makes ``factory()`` (called lazily, once) the decoder for ``name``."""
    if not name:
        raise ValueError("decoder name must be non-empty")
    with _LOCK:
        _FACTORIES[name] = factory
        _INSTANCES.pop(name, None)


def decoder_names() -> list[str]:
    return sorted(_FACTORIES)


def get_decoder(name: str, field: str = "decoder") -> Decoder:
    """The decoder for ``name`` ("" means the default); InvalidArgument naming ``field`` if unknown."""
    name = name or DEFAULT_DECODER
    with _LOCK:
        if name in _INSTANCES:
            return _INSTANCES[name]
        factory = _FACTORIES.get(name)
        if factory is None:
            raise InvalidArgument(f"{field}: unknown decoder {name!r}; expected one of {', '.join(decoder_names())}")
        _INSTANCES[name] = factory()
        return _INSTANCES[name]


def pixel_decode(previews: np.ndarray, field: str = "previews") -> np.ndarray:
    """[-1, 1] floats [N, C, H, W] -> uint8 [N, H, W, C] = round(clip((x + 1) / 2, 0, 1) * 255)."""
    if previews.ndim != 4 or previews.shape[1] not in (1, 3):
        raise InvalidArgument(
            f"{field}.shape: expected [N, C, H, W] with C in {{1, 3}} for the pixel decoder, got {list(previews.shape)}"
        )
    if previews.dtype.kind != "f":
        raise InvalidArgument(f"{field}.dtype: expected floats for the pixel decoder, got {previews.dtype}")
    x = previews.astype(np.float32, copy=False)
    pixels = np.rint(np.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))


register_decoder("pixel", lambda: pixel_decode)
