"""The Wan VAE preview decoder: x̂0-previews of Wan 2.x videos [N, C, F', h, w] -> uint8 [N, T, H, W, C].

``epgrpo-pruner --vae NAME=DIR`` serves it when DIR's VAE is an ``AutoencoderKLWan`` (its
config.json says so; ``decode.register_vae_decoder`` picks the class). The latents are
de-normalised per channel with the VAE's ``latents_mean``/``latents_std`` exactly as
``WanPipeline`` does (``z / (1 / std) + mean``), decoded, and mapped [-1, 1] -> uint8: the same
as the trainer's wan adapter (tested to agree).

Any number of latent frames decodes: the VAE is causal, so F' latent frames give 1 + 4 (F' - 1)
video frames and the first latent frame alone decodes to the first video frame (what a trainer
sending first-frame previews, ``prune.preview_frames=first``, relies on; tested).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from epgrpo.services.common.errors import InvalidArgument

DTYPES = ("fp32", "bf16", "fp16")


class WanVaeDecoder:
    """A frozen ``AutoencoderKLWan`` decoding one video at a time (videos are large)."""

    def __init__(self, path: str | Path, device: str = "auto", dtype: str = "auto", batch_size: int = 1):
        import torch
        from diffusers import AutoencoderKLWan

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        # auto = fp32 on every device: Wan's VAE is run in fp32 by its reference code and by WanPipeline users
        self.dtype = {"auto": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16,
                      "fp16": torch.float16}[dtype]
        path = Path(path)
        subfolder = "vae" if (path / "vae" / "config.json").is_file() else None  # a whole pipeline directory
        self.vae = AutoencoderKLWan.from_pretrained(path, subfolder=subfolder, local_files_only=True,
                                                    torch_dtype=self.dtype)
        self.vae.to(self.device).requires_grad_(False).eval()
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        self.mean = torch.tensor(config.latents_mean).view(shape).to(self.device, self.dtype)
        self.inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(self.device, self.dtype)
        self.batch_size = batch_size
        self._lock = threading.Lock()  # one decode at a time: concurrent rollouts share the model

    def __call__(self, previews: np.ndarray, field: str = "previews") -> np.ndarray:
        import torch

        channels = self.vae.config.z_dim
        if previews.ndim != 5 or previews.shape[1] != channels:
            raise InvalidArgument(f"{field}.shape: expected video latents [N, {channels}, F', h, w] for the Wan VAE "
                                  f"decoder, got {list(previews.shape)}")
        if previews.dtype.kind != "f":
            raise InvalidArgument(f"{field}.dtype: expected floats for the Wan VAE decoder, got {previews.dtype}")
        if not np.isfinite(previews).all():
            raise InvalidArgument(f"{field}: latents contain NaN or inf")
        out = []
        with self._lock, torch.no_grad():
            for chunk in torch.from_numpy(np.array(previews, dtype=np.float32)).split(self.batch_size):
                z = chunk.to(self.device, self.dtype) / self.inverse_std + self.mean
                video = self.vae.decode(z, return_dict=False)[0].float()  # [N, C, T, H, W] in [-1, 1]
                pixels = ((video / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
                out.append(pixels.permute(0, 2, 3, 4, 1).cpu().numpy())
        return np.ascontiguousarray(np.concatenate(out))
