"""Rewards of the video toy (clips of a digit moving in the direction the prompt names,
"a digit 3 moving right"): motion correctness, and a held-out judge of digit and motion.

Per-frame digit correctness needs no backend of its own: ``frames(digit, k=all)`` is the digit CNN
averaged over every frame (backends/video.py).

``digit_motion``: where the digit's centre of mass goes. The mean displacement d of the
intensity-weighted centroid between consecutive frames (in pixels of a 16-pixel frame) against
the prompted step u (``pixels_per_frame`` along the direction): exp(-|d - u|^2 / (2 * 0.5^2)).
A static clip scores exp(-2) = 0.14 for a 1-pixel step, the opposite direction ~0.

``digit_video_judge`` (evaluation only, never trained against): an independent reading of both,
with other methods: the mean over frames of digit_judge's SVC probability of the prompted digit,
times the fraction of consecutive frame pairs whose best integer shift (the one of [-2, 2]^2 that
minimises the squared difference between the shifted frame and the next) is the prompted step.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from epgrpo.services.common.errors import InvalidArgument, show
from epgrpo.services.reward.backends.base import VIDEO, RewardBackend, register_backend
from epgrpo.services.reward.backends.digits import DigitJudge, parse_target_digits

FRAME = 16  # frames are read at 16x16 (the toy's size)
DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # (dx, dy), y down
_DIRECTION = re.compile(r"\bmoving\s+(" + "|".join(DIRECTIONS) + r")\b", re.IGNORECASE)
MOTION_TOLERANCE_PX = 0.5
MAX_SHIFT = 2


def parse_directions(prompts: Sequence[str], metadata: Sequence[dict[str, str]]) -> np.ndarray:
    """[N, 2] unit steps (dx, dy) the prompts ask for: metadata 'direction', else 'moving <direction>'."""
    out = np.empty((len(prompts), 2))
    for i, prompt in enumerate(prompts):
        fields = metadata[i] if metadata else {}
        if "direction" in fields:
            name = str(fields["direction"]).strip().lower()
            if name not in DIRECTIONS:
                raise InvalidArgument(f"metadata[{i}].direction: expected one of {', '.join(DIRECTIONS)}, "
                                      f"got {show(fields['direction'])}")
        else:
            match = _DIRECTION.search(prompt)
            if match is None:
                raise InvalidArgument(f"prompts[{i}]: expected a prompt naming a motion, e.g. 'a digit 3 moving right' "
                                      f"({', '.join(DIRECTIONS)}), got {show(prompt, 100)}")
            name = match.group(1).lower()
        out[i] = DIRECTIONS[name]
    return out


def gray_frames(videos: np.ndarray) -> torch.Tensor:
    """uint8 [N, T, H, W, C] -> float32 [N, T, 16, 16] in [0, 1] (channel mean, area-resized)."""
    n, t = videos.shape[:2]
    x = torch.from_numpy(videos.astype(np.float32) / 255.0).mean(-1).reshape(n * t, 1, *videos.shape[2:4])
    if x.shape[-2:] != (FRAME, FRAME):
        x = F.interpolate(x, size=(FRAME, FRAME), mode="area" if x.shape[-1] > FRAME else "bilinear")
    return x.reshape(n, t, FRAME, FRAME)


def centroids(frames: torch.Tensor) -> torch.Tensor:
    """[N, T, H, W] -> [N, T, 2] intensity-weighted (x, y); an empty frame's centroid is the centre."""
    h, w = frames.shape[-2:]
    ys, xs = torch.arange(h, dtype=frames.dtype), torch.arange(w, dtype=frames.dtype)
    mass = frames.sum((-2, -1))
    safe = mass.clamp_min(1e-6)
    cx = (frames.sum(-2) * xs).sum(-1) / safe
    cy = (frames.sum(-1) * ys).sum(-1) / safe
    empty = mass < 1e-6
    cx[empty], cy[empty] = (w - 1) / 2, (h - 1) / 2
    return torch.stack([cx, cy], -1)


def need_frames(name: str, videos: np.ndarray) -> None:
    if videos.shape[1] < 2:
        raise InvalidArgument(f"images.shape: reward {name!r} measures motion between frames; expected videos of at "
                              f"least 2 frames, got {list(videos.shape)}")


@register_backend("digit_motion")
class DigitMotion(RewardBackend):
    description = ("Motion correctness of the video toy: exp(-|d - u|^2 / 0.5), d the mean displacement of the "
                   "digit's centre of mass between consecutive frames, u the prompted step (pixels_per_frame along "
                   "the direction), in pixels of 16x16 frames.")
    inputs = ("videos of >= 2 frames; prompt naming a motion: 'a digit 3 moving right' (left, right, up, down; or "
              "metadata 'direction')")
    range = "[0, 1]"
    modality = VIDEO

    def __init__(self, device: str = "cpu", pixels_per_frame: float = 1.0):
        super().__init__(device)
        if not pixels_per_frame > 0:
            raise InvalidArgument(f"reward {self.name!r}: pixels_per_frame: expected > 0, got {pixels_per_frame}")
        self.pixels_per_frame = float(pixels_per_frame)

    def _score(self, videos, prompts, metadata):
        need_frames(self.name, videos)
        target = parse_directions(prompts, metadata) * self.pixels_per_frame
        c = centroids(gray_frames(videos)).double().numpy()
        displacement = np.diff(c, axis=1).mean(1)  # [N, 2]
        error = ((displacement - target) ** 2).sum(1)
        return np.exp(-error / (2 * MOTION_TOLERANCE_PX ** 2))


def best_shifts(frames: torch.Tensor) -> torch.Tensor:
    """[N, T, H, W] -> [N, T-1, 2]: the integer (dx, dy) in [-2, 2]^2 that best maps each frame onto
    the next (least squared difference; black fills what comes into view)."""
    n, t, h, w = frames.shape
    current, following = frames[:, :-1], frames[:, 1:]
    padded = F.pad(current, (MAX_SHIFT,) * 4)
    candidates, errors = [], []
    for dy in range(-MAX_SHIFT, MAX_SHIFT + 1):
        for dx in range(-MAX_SHIFT, MAX_SHIFT + 1):
            moved = padded[..., MAX_SHIFT - dy:MAX_SHIFT - dy + h, MAX_SHIFT - dx:MAX_SHIFT - dx + w]
            errors.append(((moved - following) ** 2).sum((-2, -1)))
            candidates.append((dx, dy))
    best = torch.stack(errors, -1).argmin(-1)  # ties: the first candidate
    return torch.tensor(candidates, dtype=torch.float32)[best]


@register_backend("digit_video_judge")
class DigitVideoJudge(RewardBackend):
    description = ("Held-out judge of the video toy (never train against it): digit_judge's SVC probability of the "
                   "prompted digit averaged over frames, times the fraction of consecutive frame pairs whose best "
                   "integer shift (block matching within +-2 px) is the prompted step.")
    inputs = "videos of >= 2 frames; prompt naming a digit and a motion: 'a digit 3 moving right'"
    range = "[0, 1]"
    modality = VIDEO

    def __init__(self, device: str = "cpu", pixels_per_frame: int = 1):
        super().__init__(device)
        if not 1 <= pixels_per_frame <= MAX_SHIFT:
            raise InvalidArgument(f"reward {self.name!r}: pixels_per_frame: expected 1..{MAX_SHIFT}, got {pixels_per_frame}")
        self.pixels_per_frame = pixels_per_frame
        self.digit_judge = DigitJudge(device)

    def _score(self, videos, prompts, metadata):
        need_frames(self.name, videos)
        n, t = videos.shape[:2]
        digit = self.digit_judge.score(videos.reshape(n * t, *videos.shape[2:]), [p for p in prompts for _ in range(t)],
                                       [m for m in metadata for _ in range(t)])
        target = torch.from_numpy(parse_directions(prompts, metadata) * self.pixels_per_frame).float()
        shifts = best_shifts(gray_frames(videos))
        motion = (shifts == target[:, None]).all(-1).float().mean(1).numpy()
        parse_target_digits(prompts, metadata)  # a prompt without a digit fails here with its index
        return digit.reshape(n, t).astype(np.float64).mean(1) * motion
