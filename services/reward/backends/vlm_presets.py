"""Question templates and answer parsers for public VLM judge models (``vlm_judge`` / ``vlm_pairwise``
option ``preset``).

The UnifiedReward presets follow the inference scripts of github.com/CodeGoat24/UnifiedReward (the
model cards point there): each question states the scripts' criteria in short, keeps their
"Text Caption: [{prompt}]" ending and, word for word, the sentences that fix the answer's format;
the parsers read exactly the formats those sentences ask for. For the scripts' exact wording, set
``prompt_template`` (the preset's parser stays). A pointwise parser returns the judge's rating on [score_min, score_max]; a pairwise
parser returns P(image 1 is better) in [0, 1] (1, 0, or 0.5 for a tie; a soft value for the 2.0
pair-score format). An answer out of format raises :class:`AnswerFormatError` saying what was
expected; the backend adds the sample and quotes the answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


class AnswerFormatError(ValueError):
    """The judge's answer is not in the preset's format; the message says what was expected."""


@dataclass(frozen=True)
class Preset:
    name: str
    pairwise: bool  # two images per question (vlm_pairwise), else one (vlm_judge)
    template: str  # the question; {prompt} is replaced by the caption
    parse: Callable[[str], float]  # answer -> rating (pointwise) or P(image 1 is better) (pairwise)
    models: str  # the judge models it is written for (documentation)
    score_min: float = 0.0
    score_max: float = 1.0
    max_tokens: int = 512  # room for the reasoning the format asks for before the verdict


def _final_score(answer: str) -> float:
    # The last one: the model lists its element checks first and ends with the verdict.
    found = re.findall(r"Final Score:\s*\**\s*" + NUMBER, answer)
    if not found:
        raise AnswerFormatError("expected 'Final Score: x' with x from 1 to 5")
    return float(found[-1])


_DIMENSIONS = ("Alignment", "Coherence", "Style")


def _mean_dimension_score(answer: str) -> float:
    values = []
    for dimension in _DIMENSIONS:
        match = re.search(dimension + r" Score \(1-5\):\s*" + NUMBER, answer)
        if match is None:
            raise AnswerFormatError(f"expected a line '{dimension} Score (1-5): x' (and likewise for "
                                    f"{', '.join(_DIMENSIONS)})")
        values.append(float(match.group(1)))
    return sum(values) / len(values)


_VERDICTS = {"image 1 is better": 1.0, "image 2 is better": 0.0, "both images are equally good": 0.5}
_VERDICT = re.compile("|".join(re.escape(v) for v in _VERDICTS), re.IGNORECASE)


def _verdict(answer: str) -> float:
    # The last verdict: a model that reasons first may quote the options before it concludes.
    found = _VERDICT.findall(answer)
    if not found:
        raise AnswerFormatError("expected 'Image 1 is better', 'Image 2 is better' or 'Both images are equally good'")
    return _VERDICTS[found[-1].lower()]


def _think_verdict(answer: str) -> float:
    match = re.search(r"<answer>(.*?)</answer>", answer, re.DOTALL)
    if match is None:
        raise AnswerFormatError("expected <answer>Image 1 is better</answer> or <answer>Image 2 is better</answer> "
                                "after the <think> section")
    verdict = match.group(1).strip().rstrip(".").strip().lower()
    if verdict not in ("image 1 is better", "image 2 is better"):
        raise AnswerFormatError(f"expected exactly 'Image 1 is better' or 'Image 2 is better' inside <answer>, "
                                f"got {match.group(1).strip()[:80]!r}")
    return _VERDICTS[verdict]


def _pair_scores(answer: str) -> float:
    shares = []
    for dimension in _DIMENSIONS:
        match = re.search(dimension + r" Score:\s*Image 1:\s*" + NUMBER + r"\s*Image 2:\s*" + NUMBER, answer)
        if match is None:
            raise AnswerFormatError(f"expected '{dimension} Score:' followed by 'Image 1: x' and 'Image 2: y' "
                                    f"(for each of {', '.join(_DIMENSIONS)})")
        first, second = float(match.group(1)), float(match.group(2))
        if not (0 <= first <= 1 and 0 <= second <= 1 and first + second > 0):
            raise AnswerFormatError(f"expected {dimension} scores in [0, 1] summing to 1, got {first:g} and {second:g}")
        shares.append(first / (first + second))  # renormalised: the model's pairs sum to 1 up to rounding
    return sum(shares) / len(shares)


_CAPTION = "\nYour task is provided as follows:\nText Caption: [{prompt}]"

PRESETS = {p.name: p for p in (
    Preset(
        "unifiedreward", False,
        "You are given a text caption and an image generated from it. Evaluate the image on two criteria:\n"
        "1. Alignment with the caption: the objects, attributes and relationships it describes.\n"
        "2. Overall image quality: clarity, detail, color and aesthetic appeal.\n"
        "Extract key elements from the provided text caption, evaluate their presence in the generated image using "
        "the format: 'element (type): value' (where value=0 means not generated, and value=1 means generated), and "
        "assign a score from 1 to 5 after 'Final Score:'." + _CAPTION,
        _final_score, "CodeGoat24/UnifiedReward-qwen-7b (and the other UnifiedReward v1 / v1.5 checkpoints)",
        score_min=1.0, score_max=5.0),
    Preset(
        "unifiedreward2", False,
        "You are given an image generated from a text caption. Rate it from 1 to 5 on three axes: Alignment "
        "(does the content match the caption), Coherence (no visual glitches or distorted objects) and Style "
        "(aesthetic appeal, regardless of the caption).\n\nOutput your evaluation using the format below:\n\n"
        "Alignment Score (1-5): X\nCoherence Score (1-5): Y\nStyle Score (1-5): Z\n" + _CAPTION,
        _mean_dimension_score, "UnifiedReward-2.0 checkpoints (e.g. CodeGoat24/UnifiedReward-2.0-qwen-7b)",
        score_min=1.0, score_max=5.0, max_tokens=128),
    Preset(
        "pairwise", True,
        'Two images were generated for the description "{prompt}". Which one matches it better, considering '
        "content, composition and quality? End your answer with exactly one of: 'Image 1 is better', "
        "'Image 2 is better', 'Both images are equally good'.",
        _verdict, "any instruction-following VLM (e.g. Qwen/Qwen2.5-VL-7B-Instruct)", max_tokens=256),
    Preset(
        "unifiedreward_pair", True,
        "You are given a text caption and two images generated from it. Compare them on two criteria:\n"
        "1. Alignment with the caption: the objects, attributes and relationships it describes.\n"
        "2. Overall image quality: clarity, detail, color and aesthetic appeal.\n"
        "Select the image that aligns better with the caption while showing better visual quality.\n"
        'Provide a clear conclusion such as "Image 1 is better.", "Image 2 is better." and '
        '"Both images are equally good."' + _CAPTION,
        _verdict, "CodeGoat24/UnifiedReward-qwen-7b (pair rank)"),
    Preset(
        "unifiedreward_think", True,
        "Given a caption and two images generated from it, analyze both images in detail. Score each image from 1 to "
        "10 on semantic consistency with the caption, aesthetics, authenticity and any other dimension you find "
        "relevant, and add up each image's total. Enclose all your detailed reasoning within <think> and </think> "
        "tags. Then, in the <answer> tag, output exactly one of the following strings: 'Image 1 is better' or "
        "'Image 2 is better' based on the total scores. No additional text is allowed in the <answer> section.\n"
        + _CAPTION,
        _think_verdict, "CodeGoat24/UnifiedReward-Think-qwen-7b (and UnifiedReward-Think-7b)", max_tokens=2048),
    Preset(
        "unifiedreward2_pair", True,
        "You are given two images (Image 1 and Image 2) generated from one text caption. For each of three "
        "dimensions, Alignment (content matches the caption), Coherence (no visual glitches or distorted objects) and "
        "Style (aesthetic appeal), give each image a relative score between 0 and 1; the two scores of a dimension "
        "must sum to exactly 1.0.\n\nPlease provide your evaluation in the format below:\n\n"
        "Alignment Score:\n Image 1: X\n Image 2: Y\n\nCoherence Score:\n Image 1: X\n Image 2: Y\n\n"
        "Style Score:\n Image 1: X\n Image 2: Y\n" + _CAPTION,
        _pair_scores, "UnifiedReward-2.0 checkpoints (pair score)", max_tokens=256),
)}


def get_preset(name: str, pairwise: bool, reward: str) -> Preset:
    """The preset ``name`` of the right kind; a ValueError naming the choices otherwise."""
    kind = [p.name for p in PRESETS.values() if p.pairwise == pairwise]
    preset = PRESETS.get(name)
    if preset is None or preset.pairwise != pairwise:
        what = (f"unknown preset {name!r}" if preset is None else
                f"preset {name!r} is a {'pairwise' if preset.pairwise else 'pointwise'} preset")
        raise ValueError(f"reward {reward!r}: {what}; {reward} takes one of: {', '.join(kind)}")
    return preset
