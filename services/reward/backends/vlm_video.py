"""VLM judge of videos: k frames of each video, in order, in one question to a vision-language model
served over an OpenAI-compatible API (the transport, parsing and presets of ``vlm_judge``)."""

from __future__ import annotations

import logging

import numpy as np

from epgrpo.services.common.errors import InvalidArgument
from epgrpo.services.reward.backends.base import VIDEO, register_backend
from epgrpo.services.reward.backends.video import frame_indices
from epgrpo.services.reward.backends.vlm_judge import VlmJudge

log = logging.getLogger("epgrpo.reward.vlm_video_judge")

DEFAULT_VIDEO_TEMPLATE = (
    'These images are frames of one video, in order. How well does the video match the description "{prompt}"? '
    "Consider content, motion and quality. Reply with one line of the form 'Score: N' where N is an integer "
    "from 0 (not at all) to 10 (perfectly)."
)


@register_backend("vlm_video_judge")
class VlmVideoJudge(VlmJudge):
    description = ("A vision-language model's rating of how well a video matches the prompt: `frames` evenly spaced "
                   "frames (first and last included) go in one message, in order, over an OpenAI-compatible "
                   "/v1/chat/completions API; the rating is parsed and mapped to [0, 1] like vlm_judge's.")
    inputs = "videos; prompt (inserted into the question template at {prompt}); frames sent as base64 PNG data URLs"
    range = "[0, 1]"
    modality = VIDEO

    def __init__(self, device: str = "cpu", url: str | None = None, model: str = "", frames: int = 4,
                 prompt_template: str | None = None, pattern: str | None = None, score_min: float | None = None,
                 score_max: float | None = None, system_prompt: str = "", api_key_env: str = "EPGRPO_VLM_API_KEY",
                 max_tokens: int | None = None, temperature: float = 0.0, timeout_s: float = 60.0,
                 concurrency: int = 8, preset: str = ""):
        if frames < 1:
            raise InvalidArgument(f"reward {self.name!r}: frames: expected >= 1, got {frames}")
        template = prompt_template or (None if preset else DEFAULT_VIDEO_TEMPLATE)
        super().__init__(device, url, model, template, pattern, score_min, score_max, system_prompt, api_key_env,
                         max_tokens, temperature, timeout_s, concurrency, preset)
        self.frames = frames

    def _score(self, videos, prompts, metadata):
        indices = frame_indices(videos.shape[1], self.frames, "uniform")

        def one(i: int) -> float:
            answer = self.ask(list(videos[i, indices]), prompts[i], f"video {i} (prompts[{i}], frames {indices.tolist()})")
            log.debug("vlm_video_judge video %d answer %r", i, answer)
            return self.rating(answer, prompts[i], i)

        return np.asarray(list(self._pool.map(one, range(len(videos)))), dtype=np.float32)
