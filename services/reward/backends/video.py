"""Video rewards: wrappers that turn any image reward into a video reward, and temporal consistency.

Videos arrive as uint8 [N, T, H, W, C]. A wrapper is asked for by name, around the name of an image
reward the instance serves, with options after it (the grammar ``wrapper(inner[, key=value]...)``)::

    frames(pickscore)                  # the mean of pickscore over 4 evenly spaced frames
    frames(digit, k=all)               # ... over every frame
    frames(jpeg_compressibility, k=2, at=start)   # ... over the first 2 frames
    first_frame(pickscore)             # pickscore of frame 0 (DanceGRPO's advice for video)

``k``: how many frames (an integer >= 1, or ``all``; a video with fewer frames uses all of them);
``at``: which ones: ``uniform`` (default: round(linspace(0, T - 1, k)), first and last included),
``start`` (the first k) or ``end`` (the last k). Nothing has to be configured: a server that serves
``pickscore`` answers ``frames(pickscore, k=8)`` too (``RewardScorer`` builds wrappers on first use).

``temporal_consistency`` (a video reward of its own): the mean cosine similarity of consecutive
frames' CLIP image embeddings when ``path`` names a CLIP directory, else a measure that needs no
model and no optical flow: 1 - the mean absolute difference of consecutive frames (pixels in [0, 1]).
Both reward a video for changing little between frames, so a static video scores highest: combine it
with rewards for content and motion.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from epgrpo.protos import reward_names
from epgrpo.services.common.errors import InvalidArgument, show
from epgrpo.services.reward.backends.base import IMAGE, VIDEO, RewardBackend, register_backend

FRAME_POSITIONS = ("uniform", "start", "end")
DEFAULT_FRAMES = 4


def parse_wrapper(name: str) -> tuple[str, str, dict[str, str]] | None:
    """protos.reward_names.parse_wrapper, with InvalidArgument for a malformed name."""
    try:
        return reward_names.parse_wrapper(name)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def frame_indices(total: int, count: int | None, at: str) -> np.ndarray:
    """Indices of the frames a wrapper scores, of a video of ``total`` frames (``count`` None: all)."""
    k = total if count is None else min(count, total)
    if at == "start":
        return np.arange(k)
    if at == "end":
        return np.arange(total - k, total)
    return np.unique(np.rint(np.linspace(0, total - 1, k)).astype(np.int64)) if k > 1 else np.zeros(1, np.int64)


class FrameReward(RewardBackend):
    """An image reward averaged over some frames of each video. Built by ``make_wrapper``; its
    ``name`` is the name it was asked for, ``inner`` the image reward it wraps."""

    modality = VIDEO
    range = "the wrapped reward's"

    def __init__(self, name: str, inner: RewardBackend, inner_name: str, count: int | None, at: str):
        super().__init__(inner.device)
        self.name, self.inner, self.inner_name, self.count, self.at = name, inner, inner_name, count, at
        # a group-aware reward compares a group's videos frame by frame: clients must send groups whole
        self.group_aware = inner.group_aware
        self.concurrent = inner.concurrent
        frames = "every frame" if count is None else f"{count} frame{'s' if count > 1 else ''} ({at})"
        self.description = f"{inner_name} averaged over {frames} of each video. {inner_name}: {inner.description}"
        self.inputs = inner.inputs
        self.range = inner.range

    def _score(self, videos, prompts, metadata):
        n, total = videos.shape[:2]
        indices = frame_indices(total, self.count, self.at)
        if self.inner.group_aware:
            # frame j of every video of the group, scored together: a win rate among frame j's
            per_frame = [self.inner.score(np.ascontiguousarray(videos[:, j]), prompts, metadata) for j in indices]
            return np.mean(np.stack(per_frame, axis=1, dtype=np.float64), axis=1)
        frames = np.ascontiguousarray(videos[:, indices]).reshape(n * len(indices), *videos.shape[2:])
        k = len(indices)
        scores = self.inner.score(frames, [p for p in prompts for _ in range(k)], [m for m in metadata for _ in range(k)])
        return scores.reshape(n, k).astype(np.float64).mean(axis=1)


def _frames_options(name: str, options: dict[str, str], defaults: dict[str, str]) -> tuple[int | None, str]:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise InvalidArgument(f"reward {show(name)}: unknown option(s) {', '.join(unknown)}; "
                              f"expected {', '.join(sorted(defaults)) or 'none'}")
    values = {**defaults, **options}
    count: int | None = None
    if values.get("k", "all") != "all":
        try:
            count = int(values["k"])
        except ValueError:
            count = 0
        if count < 1:
            raise InvalidArgument(f"reward {show(name)}: k: expected an integer >= 1 or 'all', got {show(values['k'])}")
    at = values.get("at", "start")
    if at not in FRAME_POSITIONS:
        raise InvalidArgument(f"reward {show(name)}: at: expected one of {', '.join(FRAME_POSITIONS)}, got {show(at)}")
    return count, at


def _frames(name, inner, inner_name, options):
    return FrameReward(name, inner, inner_name, *_frames_options(name, options, {"k": str(DEFAULT_FRAMES), "at": "uniform"}))


def _first(name, inner, inner_name, options):
    _frames_options(name, options, {})  # refuses any option
    return FrameReward(name, inner, inner_name, 1, "start")


#: wrapper name -> factory(requested name, inner backend, inner name, options) -> backend
WRAPPERS: dict[str, Callable[..., RewardBackend]] = {"frames": _frames, "first_frame": _first}


def make_wrapper(name: str, lookup: Callable[[str], RewardBackend]) -> RewardBackend:
    """The video reward ``name`` ('frames(pickscore, k=4)'), around the image reward that
    ``lookup(inner name)`` returns (it raises InvalidArgument for a name it does not serve)."""
    parsed = parse_wrapper(name)
    if parsed is None:
        raise InvalidArgument(f"reward {show(name)}: not a wrapper name")
    wrapper, inner_name, options = parsed
    if wrapper not in WRAPPERS:
        raise InvalidArgument(f"reward {show(name)}: unknown wrapper {show(wrapper)}; known: {', '.join(sorted(WRAPPERS))}")
    inner = lookup(inner_name)
    if inner.modality != IMAGE and inner.modality != "both":
        raise InvalidArgument(f"reward {show(name)}: {wrapper}(...) wraps an image reward; {inner_name!r} scores videos")
    return WRAPPERS[wrapper](name, inner, inner_name, options)


def consecutive_pixel_similarity(video: np.ndarray) -> float:
    """1 - mean |frame[t+1] - frame[t]| over pixels, channels and pairs, pixels scaled to [0, 1]."""
    x = video.astype(np.float32) / 255.0
    return float(1.0 - np.abs(np.diff(x, axis=0)).mean())


@register_backend("temporal_consistency")
class TemporalConsistency(RewardBackend):
    description = ("How little a video changes from frame to frame: the mean cosine similarity of consecutive frames' "
                   "CLIP image embeddings when 'path' names a CLIP directory, else 1 - the mean absolute difference "
                   "of consecutive frames (pixels in [0, 1]; no model, no optical flow). A static video scores "
                   "highest: combine with content and motion rewards.")
    inputs = "videos of at least 2 frames; the prompt is not used"
    range = "[-1, 1] with CLIP, [0, 1] without"
    modality = VIDEO

    def __init__(self, device: str = "cpu", path: str = "", dtype: str = "auto", processor_path: str = "",
                 batch_size: int = 64):
        super().__init__(device)
        self.encoder = None
        if path:
            from epgrpo.services.reward.backends.clip import ClipEncoder, _require_dir, resolve_dtype

            if batch_size < 1:
                raise InvalidArgument(f"reward {self.name!r}: batch_size: expected >= 1, got {batch_size}")
            directory = _require_dir(path, "path", self.name)
            processor_dir = _require_dir(processor_path, "processor_path", self.name) if processor_path else directory
            self.encoder = ClipEncoder(directory, processor_dir, device, resolve_dtype(dtype, device), batch_size,
                                       with_text=False)

    def _score(self, videos, prompts, metadata):
        n, total = videos.shape[:2]
        if total < 2:
            raise InvalidArgument(f"images.shape: reward {self.name!r} compares consecutive frames; expected videos of "
                                  f"at least 2 frames, got {list(videos.shape)}")
        if self.encoder is None:  # one video at a time: float temporaries stay 4x one video's bytes
            return np.array([consecutive_pixel_similarity(video) for video in videos], dtype=np.float64)
        embeds = self.encoder.image_embeds(videos.reshape(n * total, *videos.shape[2:])).reshape(n, total, -1)
        return (embeds[:, 1:] * embeds[:, :-1]).sum(-1).mean(1).double().cpu().numpy()
