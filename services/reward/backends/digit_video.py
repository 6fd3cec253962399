"""Rewards of the video toy (clips of a digit moving in the direction the prompt names,
"a digit 3 moving right"): motion correctness, and a held-out judge of digit and motion.

Per-frame digit correctness needs no backend of its own: ``frames(digit, k=all)`` is the digit CNN
averaged over every frame (backends/video.py).

``digit_motion``: block matching. For each pair of consecutive frames, the squared difference
between the next frame and the current one moved by each of five candidate steps (none, or
``pixels_per_frame`` left, right, up, down; black fills what comes into view): e_prompted for the
prompted step, e_other the least of the four others. The pair scores e_other / (e_prompted +
e_other): 1/2 when another step explains the next frame as well, towards 1 when only the prompted
one does, towards 0 when another does and it does not. The clip's reward is the mean over pairs.

``digit_video_judge`` (evaluation only, never trained against): an independent reading with other
methods: the mean over frames of digit_judge's SVC probability of the prompted digit, times
exp(-|d - u|^2 / (2 * 0.5^2)), d the mean displacement of the frames' intensity-weighted centroid
between consecutive frames and u the prompted step (pixels of 16x16 frames).
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


CANDIDATE_STEPS = ((0, 0), (1, 0), (-1, 0), (0, -1), (0, 1))  # none, right, left, up, down


def step_errors(frames: torch.Tensor, pixels: int) -> torch.Tensor:
    """[N, T, H, W] -> [N, T-1, 5]: squared difference between each next frame and the current one
    moved by each of CANDIDATE_STEPS x ``pixels``."""
    h, w = frames.shape[-2:]
    current, following = frames[:, :-1], frames[:, 1:]
    padded = F.pad(current, (pixels,) * 4)
    errors = []
    for dx, dy in CANDIDATE_STEPS:
        ox, oy = pixels - dx * pixels, pixels - dy * pixels
        errors.append(((padded[..., oy:oy + h, ox:ox + w] - following) ** 2).sum((-2, -1)))
    return torch.stack(errors, -1)


@register_backend("digit_motion")
class DigitMotion(RewardBackend):
    description = ("Motion correctness of the video toy, by block matching: for each pair of consecutive frames, "
                   "e_other / (e_prompted + e_other) with e the squared difference between the next frame and the "
                   "current one moved by the prompted step (e_prompted) or by the best of the other steps among none, "
                   "left, right, up, down (e_other); the mean over pairs.")
    inputs = ("videos of >= 2 frames; prompt naming a motion: 'a digit 3 moving right' (left, right, up, down; or "
              "metadata 'direction')")
    range = "[0, 1]"
    modality = VIDEO

    def __init__(self, device: str = "cpu", pixels_per_frame: int = 1):
        super().__init__(device)
        if not 1 <= pixels_per_frame <= 4:
            raise InvalidArgument(f"reward {self.name!r}: pixels_per_frame: expected 1..4, got {pixels_per_frame}")
        self.pixels_per_frame = pixels_per_frame

    def _score(self, videos, prompts, metadata):
        need_frames(self.name, videos)
        directions = parse_directions(prompts, metadata)
        prompted = torch.tensor([CANDIDATE_STEPS.index((int(dx), int(dy))) for dx, dy in directions])
        errors = step_errors(gray_frames(videos), self.pixels_per_frame).double()  # [N, T-1, 5]
        mine = errors.gather(-1, prompted.view(-1, 1, 1).expand(-1, errors.shape[1], 1))[..., 0]
        others = errors.scatter(-1, prompted.view(-1, 1, 1).expand(-1, errors.shape[1], 1), float("inf")).min(-1).values
        total = mine + others
        share = torch.where(total > 0, others / total.clamp_min(1e-12), torch.full_like(total, 0.5))  # blank: a tie
        return share.mean(1).numpy()


@register_backend("digit_video_judge")
class DigitVideoJudge(RewardBackend):
    description = ("Held-out judge of the video toy (never train against it): digit_judge's SVC probability of the "
                   "prompted digit averaged over frames, times exp(-|d - u|^2 / 0.5) with d the mean displacement of "
                   "the frames' centre of mass between consecutive frames and u the prompted step.")
    inputs = "videos of >= 2 frames; prompt naming a digit and a motion: 'a digit 3 moving right'"
    range = "[0, 1]"
    modality = VIDEO

    def __init__(self, device: str = "cpu", pixels_per_frame: float = 1.0):
        super().__init__(device)
        if not pixels_per_frame > 0:
            raise InvalidArgument(f"reward {self.name!r}: pixels_per_frame: expected > 0, got {pixels_per_frame}")
        self.pixels_per_frame = float(pixels_per_frame)
        self.digit_judge = DigitJudge(device)

    def _score(self, videos, prompts, metadata):
        need_frames(self.name, videos)
        n, t = videos.shape[:2]
        parse_target_digits(prompts, metadata)  # a prompt without a digit fails here, naming its index
        digit = self.digit_judge.score(videos.reshape(n * t, *videos.shape[2:]), [p for p in prompts for _ in range(t)],
                                       [m for m in metadata for _ in range(t)])
        target = parse_directions(prompts, metadata) * self.pixels_per_frame
        displacement = np.diff(centroids(gray_frames(videos)).double().numpy(), axis=1).mean(1)  # [N, 2]
        motion = np.exp(-((displacement - target) ** 2).sum(1) / (2 * MOTION_TOLERANCE_PX ** 2))
        return digit.reshape(n, t).astype(np.float64).mean(1) * motion
