"""OCR reward (Flow-GRPO's): how well the image renders the text quoted in its prompt.

``1 - min(d, len(target)) / len(target)`` where ``d`` is the Levenshtein distance between the
recognised text and the target, both lower-cased with spaces removed, and ``d = 0`` when the
target occurs inside the recognised text (extra words in the image are not penalised). The
target is the text between the first pair of double quotes of the prompt (or metadata 'text').

Recognition is RapidOCR (PP-OCRv4 detection + recognition as ONNX models shipped inside the
``rapidocr-onnxruntime`` wheel), so this reward needs no weights directory.
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

import numpy as np

from epgrpo.services.common.errors import InvalidArgument, show
from epgrpo.services.reward.backends.base import RewardBackend, register_backend

log = logging.getLogger("epgrpo.reward.ocr")

# Straight or typographic double quotes; single quotes would break on apostrophes ("cat's").
_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


def quoted_text(prompts: Sequence[str], metadata: Sequence[dict[str, str]]) -> list[str]:
    """The text each sample must render: metadata 'text', else the first double-quoted span."""
    targets = []
    for i, prompt in enumerate(prompts):
        fields = metadata[i] if metadata else {}
        if "text" in fields:
            text, where = fields["text"], f"metadata[{i}].text"
        else:
            match = _QUOTED.search(prompt)
            if match is None:
                raise InvalidArgument(f'prompts[{i}]: expected the text to render in double quotes, e.g. '
                                      f'\'a sign that says "OPEN"\', got {show(prompt, 100)}')
            text, where = match.group(1) if match.group(1) is not None else match.group(2), f"prompts[{i}]"
        if not normalise(text):
            raise InvalidArgument(f"{where}: the text to render is empty")
        targets.append(text)
    return targets


def normalise(text: str) -> str:
    return text.replace(" ", "").lower()


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_reward(recognised: str, target: str) -> float:
    """Flow-GRPO's OCR reward of one sample, in [0, 1]."""
    recognised, target = normalise(recognised), normalise(target)
    distance = 0 if target in recognised else min(edit_distance(recognised, target), len(target))
    return 1.0 - distance / len(target)


@register_backend("ocr")
class OcrReward(RewardBackend):
    description = (
        "Flow-GRPO's OCR reward: 1 - normalised edit distance between the text RapidOCR (PP-OCRv4, ONNX) reads "
        "in the image and the text quoted in the prompt (case and spaces ignored; 1 if the target is contained)."
    )
    inputs = "prompt with the text to render in double quotes: 'a sign that says \"OPEN\"' (or metadata 'text'); RGB or gray"
    range = "[0, 1]"

    def __init__(self, device: str = "cpu", det_limit_side_len: int = 960, min_confidence: float = 0.5,
                 threads: int = 0):
        """``det_limit_side_len``: the detector sees the image with its longer side at most this
        (PaddleOCR's default; RapidOCR's own default upscales the shorter side to 736, 10x slower on
        small images). ``threads``: onnxruntime intra-op threads (0: its choice)."""
        super().__init__(device)
        from rapidocr_onnxruntime import RapidOCR  # heavy import: only when the reward is served

        use_cuda = device.startswith("cuda")  # needs onnxruntime-gpu; otherwise onnxruntime falls back to CPU
        threads_option = {"intra_op_num_threads": threads, "inter_op_num_threads": 1} if threads > 0 else {}
        self.engine = RapidOCR(
            det_limit_type="max", det_limit_side_len=det_limit_side_len, text_score=min_confidence,
            det_use_cuda=use_cuda, cls_use_cuda=use_cuda, rec_use_cuda=use_cuda, **threads_option,
        )

    def read(self, image: np.ndarray) -> str:
        """All text RapidOCR finds in one uint8 [H, W, C] RGB/gray image, in reading order."""
        bgr = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else np.ascontiguousarray(image[:, :, ::-1])
        # No angle classifier, as in Flow-GRPO (cls=False): generated text is upright.
        result, _ = self.engine(bgr, use_cls=False)
        return "".join(line[1] for line in result or [])

    def _score(self, images, prompts, metadata):
        targets = quoted_text(prompts, metadata)
        scores = np.empty(len(images), dtype=np.float32)
        for i, (image, target) in enumerate(zip(images, targets)):
            recognised = self.read(image)
            scores[i] = ocr_reward(recognised, target)
            log.debug("ocr sample %d: target %r, read %r -> %.3f", i, target, recognised, scores[i])
        return scores
