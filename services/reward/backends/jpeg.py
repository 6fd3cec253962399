"""JPEG (in)compressibility rewards, as DDPO defines them: the size of the image encoded by PIL as
JPEG at quality 95, in kB (bytes / 1000); compressibility = -size, incompressibility = +size."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from epgrpo.services.reward.backends.base import RewardBackend, register_backend

JPEG_QUALITY = 95


def jpeg_sizes_kb(images: np.ndarray) -> np.ndarray:
    """float32 [N]: JPEG (quality 95) size of each uint8 [H, W, C] image, in kB."""
    sizes = np.empty(len(images), dtype=np.float32)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[:, :, 0], mode="L") if image.shape[2] == 1 else Image.fromarray(image, mode="RGB")
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes[i] = buffer.tell() / 1000.0
    return sizes


@register_backend("jpeg_compressibility")
class JpegCompressibility(RewardBackend):
    concurrent = True  # PIL encodes without the GIL; no shared state
    description = "Negative JPEG size (PIL, quality 95) in kB: simpler, flatter images score higher (DDPO)."
    inputs = "image only (prompt ignored)"
    range = "(-inf, 0)"

    def _score(self, images, prompts, metadata):
        return -jpeg_sizes_kb(images)


@register_backend("jpeg_incompressibility")
class JpegIncompressibility(RewardBackend):
    concurrent = True
    description = "JPEG size (PIL, quality 95) in kB: detailed, noisy images score higher (DDPO)."
    inputs = "image only (prompt ignored)"
    range = "(0, inf)"

    def _score(self, images, prompts, metadata):
        return jpeg_sizes_kb(images)
