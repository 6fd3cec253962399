"""Preview decoders: x̂0-previews [N, C, H, W] -> uint8 images [N, H, W, C] for the reward service,
and video previews [N, C, F, H, W] -> uint8 videos [N, T, H, W, C]. A decoder decodes whatever
frame count it receives (a trainer with ``prune.preview_frames=first`` sends one).

A registry by name (the rollout's ``decoder`` field). "pixel" is the identity decode of
pixel-space models (values in [-1, 1]). Latent models use a VAE decoder that the *pruner's operator*
configures (``epgrpo-pruner --vae [NAME=]DIR``, NAME defaulting to "vae"): clients only name it,
so a client can never make the pruner load an arbitrary path, and the trainer and the pruner may
see the model under different paths (containers). Factories run once: ``epgrpo-pruner`` loads every
decoder before it listens (:func:`load_decoders`), so it answers no probe until they are ready;
in-process servers load one on first use, off the event loop (:func:`get_decoder_async`). A
failed load is remembered (never retried per request) and answered FAILED_PRECONDITION without
the server's paths; the reason goes to the server log.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import threading
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from epgrpo.services.common.errors import FailedPrecondition, InvalidArgument, show

log = logging.getLogger("epgrpo.pruner.decode")

DEFAULT_DECODER = "pixel"


class Decoder(Protocol):
    def __call__(self, previews: np.ndarray, field: str) -> np.ndarray:
        """float previews [N, C, H, W] -> uint8 [N, H, W, C] (videos: [N, C, F, H, W] -> uint8
        [N, T, H, W, C]); InvalidArgument naming ``field``."""


_FACTORIES: dict[str, Callable[[], Decoder]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_INSTANCES: dict[str, Decoder] = {}
_FAILED: dict[str, str] = {}  # name -> why it failed to load (for the server log and load_decoders)
_LOCK = threading.Lock()


def register_decoder(name: str, factory: Callable[[], Decoder], description: str = "") -> None:
    """Makes ``factory()`` (called lazily, once) the decoder for ``name``."""
    if not name:
        raise ValueError("decoder name must be non-empty")
    with _LOCK:
        _FACTORIES[name] = factory
        _DESCRIPTIONS[name] = description
        _INSTANCES.pop(name, None)
        _FAILED.pop(name, None)


def decoder_names() -> list[str]:
    return sorted(_FACTORIES)


def decoder_descriptions() -> dict[str, str]:
    """Every served decoder's name and what it does (ListDecoders)."""
    with _LOCK:
        return {name: _DESCRIPTIONS.get(name, "") for name in sorted(_FACTORIES)}


def get_decoder(name: str, field: str = "decoder") -> Decoder:
    """The decoder for ``name`` ("" means the default), loaded on first use (blocking: servers call
    :func:`get_decoder_async`); InvalidArgument naming ``field`` if unknown, FailedPrecondition if
    it failed to load (now or before)."""
    name = name or DEFAULT_DECODER
    with _LOCK:
        if name in _INSTANCES:
            return _INSTANCES[name]
        factory = _FACTORIES.get(name)
        if factory is None:
            raise InvalidArgument(f"{field}: unknown decoder {show(name)}; "
                                  f"expected one of {', '.join(decoder_names())}")
        if name not in _FAILED:
            try:
                _INSTANCES[name] = factory()
                return _INSTANCES[name]
            except Exception as exc:  # noqa: BLE001 - remembered, reported without the server's paths
                _FAILED[name] = f"{type(exc).__name__}: {exc}"
                log.error("decoder %r failed to load: %s", name, _FAILED[name])
        raise FailedPrecondition(f"{field}: decoder {name!r} failed to load on this server (its log has the "
                                 "reason); ask its operator, or use another decoder")


async def get_decoder_async(name: str, field: str = "decoder") -> Decoder:
    """:func:`get_decoder` without blocking the event loop while a model loads."""
    loaded = _INSTANCES.get(name or DEFAULT_DECODER)
    return loaded if loaded is not None else await asyncio.to_thread(get_decoder, name, field)


def load_decoders() -> None:
    """Loads every registered decoder now; ValueError naming each one that failed and why."""
    for name in decoder_names():
        try:
            get_decoder(name)
        except FailedPrecondition:
            pass
    failed = {name: _FAILED[name] for name in decoder_names() if name in _FAILED}
    if failed:
        raise ValueError("; ".join(f"--vae {name}: failed to load: {why}" for name, why in failed.items()))


def pixel_decode(previews: np.ndarray, field: str = "previews") -> np.ndarray:
    """[-1, 1] floats [N, C, H, W] -> uint8 [N, H, W, C] = round(clip((x + 1) / 2, 0, 1) * 255);
    videos [N, C, T, H, W] -> uint8 [N, T, H, W, C] the same way."""
    if previews.ndim not in (4, 5) or previews.shape[1] not in (1, 3):
        raise InvalidArgument(f"{field}.shape: expected [N, C, H, W] (images) or [N, C, T, H, W] (videos) with C in "
                              f"{{1, 3}} for the pixel decoder, got {list(previews.shape)}")
    if previews.dtype.kind != "f":
        raise InvalidArgument(f"{field}.dtype: expected floats for the pixel decoder, got {previews.dtype}")
    x = previews.astype(np.float32, copy=False)
    pixels = np.rint(np.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)
    channels_last = (0, 2, 3, 1) if pixels.ndim == 4 else (0, 2, 3, 4, 1)
    return np.ascontiguousarray(pixels.transpose(channels_last))


register_decoder("pixel", lambda: pixel_decode, "identity: pixel-space previews in [-1, 1] (images [N, C, H, W] or "
                                                "videos [N, C, T, H, W])")


class VaeDecoder:
    """SD3-style latents -> uint8 images with a diffusers ``AutoencoderKL`` (frozen, no grad).

    ``vae.decode(z / scaling_factor + shift_factor)`` then [-1, 1] -> uint8: the same
    post-processing as the SD3 pipeline and the trainer's SD3 adapter (tested to agree).
    """

    def __init__(self, path: str | Path, device: str = "auto", dtype: str = "auto", batch_size: int = 8):
        import torch

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        if dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        path = Path(path)
        subfolder = "vae" if (path / "vae" / "config.json").is_file() else None  # a whole pipeline directory
        self.vae = self.vae_class().from_pretrained(path, subfolder=subfolder, local_files_only=True,
                                                    torch_dtype=self.dtype)
        self.vae.to(self.device).requires_grad_(False).eval()
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one decode at a time: concurrent rollouts share the model

    @staticmethod
    def vae_class():
        from diffusers import AutoencoderKL

        return AutoencoderKL

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def images(self, z):
        """Normalised latents -> images in [-1, 1] (the VAE's own normalisation undone first)."""
        config = self.vae.config
        return self.vae.decode(z / config.scaling_factor + (config.shift_factor or 0.0), return_dict=False)[0]

    def __call__(self, previews: np.ndarray, field: str = "previews") -> np.ndarray:
        import torch

        channels = self.latent_channels
        if previews.ndim != 4 or previews.shape[1] != channels:
            raise InvalidArgument(f"{field}.shape: expected latents [N, {channels}, h, w] for the VAE decoder, "
                                  f"got {list(previews.shape)}")
        if previews.dtype.kind != "f":
            raise InvalidArgument(f"{field}.dtype: expected floats for the VAE decoder, got {previews.dtype}")
        if not np.isfinite(previews).all():
            raise InvalidArgument(f"{field}: latents contain NaN or inf")
        out = []
        with self._lock, torch.no_grad():
            for chunk in torch.from_numpy(np.array(previews, dtype=np.float32)).split(self.batch_size):  # a writable copy
                image = self.images(chunk.to(self.device, self.dtype)).float()
                pixels = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
                out.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
        return np.ascontiguousarray(np.concatenate(out))


# VAE classes (the ``_class_name`` of their config.json) with a decoder of their own; others: VaeDecoder
def parse_vae_spec(spec: str) -> tuple[str, str]:
    """'NAME=DIR' or 'DIR' (named "vae") -> (name, dir)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "vae", spec
    if not name or not path:
        raise ValueError(f"--vae: expected [NAME=]DIR, got {spec!r}")
    return name, path


def register_vae_decoder(name: str, path: str | Path, device: str = "auto", dtype: str = "auto") -> None:
    """Registers decoder ``name`` for the VAE in ``path`` (a VAE directory or a pipeline directory
    with ``vae/``); checked now, loaded by :func:`load_decoders` or on first use. The VAE's class
    picks the decoder, i.e. how the family normalises its latents (``_VAE_DECODERS``)."""
    path = Path(path)
    if not ((path / "config.json").is_file() or (path / "vae" / "config.json").is_file()):
        raise ValueError(f"--vae {name}={path}: expected a diffusers VAE directory or a pipeline directory with vae/")
    config = path / "config.json" if (path / "config.json").is_file() else path / "vae" / "config.json"
    kind = json.loads(config.read_text()).get("_class_name", "AutoencoderKL")
    if kind not in _VAE_DECODERS:
        raise ValueError(f"--vae {name}={path}: no preview decoder for a {kind}; known: {', '.join(sorted(_VAE_DECODERS))}")
    module, _, cls = _VAE_DECODERS[kind].rpartition(":")

    def factory() -> Decoder:
        decoder_class = getattr(importlib.import_module(module), cls) if module else VaeDecoder
        return decoder_class(path, device, dtype)

    # the description reaches clients (ListDecoders): the model's directory name, never the server's path
    register_decoder(name, factory, f"diffusers {kind} ({path.name})")


# The decoder of each VAE class (its config's _class_name): "module:Class" (imported on first use), "" = VaeDecoder.
_VAE_DECODERS = {
    "AutoencoderKL": "",
    "AutoencoderKLQwenImage": "epgrpo.services.pruner.vae_families:QwenImageVaeDecoder",
    "AutoencoderKLFlux2": "epgrpo.services.pruner.vae_families:Flux2VaeDecoder",
    "AutoencoderKLWan": "epgrpo.services.pruner.decode_wan:WanVaeDecoder",
}
