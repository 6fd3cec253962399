"""Training data for the digit CNN: augmented real digits and generated "not a digit" junk.

The junk families are what an RL policy finds when it games a digit classifier (saturated
blobs, checkerboards at the transformer's patch size) plus the other obvious non-digits. Everything draws from an explicit ``torch.Generator`` so training is
deterministic. Images are float [N, 1, 16, 16] in [0, 1], on uint8 levels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Rounds to uint8 levels, as images arrive at the reward (uint8 = round(p * 255))."""
    return (x.clamp(0.0, 1.0) * 255.0).round() / 255.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N, 1, H, W] in [0, 1] -> uint8 [N, H, W, 1], the wire layout."""
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, 1, 1, 1, generator=gen)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (sigma [N]) with zero padding (the background is black)."""
    radius = 4
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernels = torch.exp(-(offsets[None] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)  # [N, K]
    n = len(x)
    # Depthwise conv with one kernel per image: images as channels of a single batch element.
    y = F.conv2d(x.reshape(1, n, *x.shape[2:]), kernels[:, None, :, None], padding=(radius, 0), groups=n)
    y = F.conv2d(y, kernels[:, None, None, :], padding=(0, radius), groups=n)
    return y.reshape_as(x)


def shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shifts each image by up to ``max_shift`` pixels in x and y, filling with black."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for oy in range(2 * max_shift + 1):
        for ox in range(2 * max_shift + 1):
            mask = (dy == oy) & (dx == ox)
            out[mask] = padded[mask, :, oy:oy + h, ox:ox + w]
    return out


def augment_digits(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Real digits as an imperfect generator might draw them: +-1 px shifts, brightness and
    contrast jitter, mild blur and noise. None of it leaves the space of plausible digits."""
    n = len(x)
    x = shift(x, 1, gen)
    mild = torch.where(torch.rand(n, generator=gen) < 0.3, 0.3 + 0.5 * torch.rand(n, generator=gen), torch.zeros(n))
    x = torch.where(mild[:, None, None, None] > 0, gaussian_blur(x, mild), x)
    x = x * _uniform(n, 0.7, 1.25, gen) + _uniform(n, -0.1, 0.12, gen)
    x = x + _uniform(n, 0.0, 0.08, gen) * torch.randn(x.shape, generator=gen)
    return quantize(x)


def _grid(h: int = 16, w: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return ys[None, None], xs[None, None]


def checkerboards(n: int, period: int, gen: torch.Generator) -> torch.Tensor:
    """0/1 checkerboards whose cells are period/2 pixels wide, random phase."""
    ys, xs = _grid()
    py = torch.randint(0, period, (n, 1, 1, 1), generator=gen)
    px = torch.randint(0, period, (n, 1, 1, 1), generator=gen)
    half = period // 2
    return ((((ys + py) // half) + ((xs + px) // half)) % 2).float()


def blobs(n: int, gen: torch.Generator, count: int = 3) -> torch.Tensor:
    """Sums of up to ``count`` Gaussian blobs, scaled past 1 and clipped: saturated blobs."""
    ys, xs = _grid()
    out = torch.zeros(n, 1, 16, 16)
    for k in range(count):
        cy, cx = _uniform(n, 1.0, 14.0, gen), _uniform(n, 1.0, 14.0, gen)
        sigma = _uniform(n, 1.0, 4.5, gen)
        present = (torch.rand(n, 1, 1, 1, generator=gen) < (1.0 if k == 0 else 0.5)).float()
        out = out + present * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2))
    return (out * _uniform(n, 1.0, 4.0, gen)).clamp(0.0, 1.0)


def _other_digits(labels: torch.Tensor, digits: torch.Tensor, digit_labels: torch.Tensor, gen) -> torch.Tensor:
    """For each label, a random real digit of a different class."""
    picks = torch.randint(0, len(digits), (len(labels),), generator=gen)
    for _ in range(20):  # resample collisions; 20 rounds leave none in practice
        same = digit_labels[picks] == labels
        if not same.any():
            break
        picks[same] = torch.randint(0, len(digits), (int(same.sum()),), generator=gen)
    return digits[picks]


def junk_images(n: int, digits: torch.Tensor, digit_labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``n`` "not a digit" images drawn evenly from every junk family."""
    families = [
        lambda m: torch.rand(m, 1, 16, 16, generator=gen) * _uniform(m, 0.3, 1.0, gen) + _uniform(m, 0.0, 0.5, gen),
        lambda m: blobs(m, gen),
        lambda m: _uniform(m, 0.0, 1.0, gen).expand(m, 1, 16, 16),  # constant, incl. black and white
        lambda m: _checker_mix(m, 2, gen),
        lambda m: _checker_mix(m, 4, gen),
        lambda m: blobs(m, gen) * checkerboards(m, 2 if torch.rand(1, generator=gen) < 0.5 else 4, gen),
        lambda m: _rectangles(m, gen),
        lambda m: _digit_with_checkerboard(m, digits, gen),
        lambda m: _overlay_two_digits(m, digits, digit_labels, gen),
        lambda m: _heavy_blur(m, digits, gen),
    ]
    counts = [n // len(families) + (1 if i < n % len(families) else 0) for i in range(len(families))]
    out = torch.cat([family(m) for family, m in zip(families, counts) if m > 0])
    return quantize(out)


def _checker_mix(m: int, period: int, gen) -> torch.Tensor:
    low, contrast = _uniform(m, 0.0, 0.4, gen), _uniform(m, 0.4, 1.0, gen)
    return low + contrast * checkerboards(m, period, gen)


def _rectangles(m: int, gen) -> torch.Tensor:
    ys, xs = _grid()
    y0, x0 = torch.randint(0, 10, (m, 1, 1, 1), generator=gen), torch.randint(0, 10, (m, 1, 1, 1), generator=gen)
    hh, ww = torch.randint(3, 16, (m, 1, 1, 1), generator=gen), torch.randint(3, 16, (m, 1, 1, 1), generator=gen)
    return ((ys >= y0) & (ys < y0 + hh) & (xs >= x0) & (xs < x0 + ww)).float()


def _sample(digits: torch.Tensor, m: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, len(digits), (m,), generator=gen)
    return digits[idx], idx


def _digit_with_checkerboard(m: int, digits: torch.Tensor, gen) -> torch.Tensor:
    # A strong patch-size texture on top of a digit: the gamed look seen in the prototype.
    base, _ = _sample(digits, m, gen)
    period = 2 if torch.rand(1, generator=gen) < 0.5 else 4
    sign = 2 * checkerboards(m, period, gen) - 1
    return base + _uniform(m, 0.5, 1.0, gen) * sign


def _overlay_two_digits(m: int, digits: torch.Tensor, labels: torch.Tensor, gen) -> torch.Tensor:
    idx = torch.randint(0, len(digits), (m,), generator=gen)
    other = _other_digits(torch.as_tensor(labels)[idx], digits, torch.as_tensor(labels), gen)
    return torch.maximum(digits[idx], shift(other, 1, gen))


def _heavy_blur(m: int, digits: torch.Tensor, gen) -> torch.Tensor:
    base, _ = _sample(digits, m, gen)
    blurred = gaussian_blur(base, 2.0 + 1.5 * torch.rand(m, generator=gen))
    # Half keep their faint contrast, half are stretched to full range (a bright smudge).
    peak = blurred.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    stretch = torch.rand(m, 1, 1, 1, generator=gen) < 0.5
    return torch.where(stretch, blurred / peak, blurred)

