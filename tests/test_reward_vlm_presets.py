"""VLM judge presets (UnifiedReward formats) and the pairwise judge, against a fake OpenAI-compatible
server that answers in each preset's documented format from the pixels it was sent: brightness is
quality. A fake with a position bias checks that asking both orders cancels it."""

from __future__ import annotations

import base64
import io
import json
from http.server import BaseHTTPRequestHandler
from itertools import permutations

import numpy as np
import pytest
from conftest import http_server, send_chat_answer
from PIL import Image

from epgrpo.services.common.errors import InvalidArgument
from epgrpo.services.reward.backends.base import create_backend
from epgrpo.services.reward.backends.vlm_judge import JudgeError
from epgrpo.services.reward.backends.vlm_presets import PRESETS

BIAS = 0.2  # the biased fake: a brightness gap below this (on [0, 1]) goes to whichever image came first


def brightness(url: str) -> float:
    return float(np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))).mean() / 255)


def canned(question: str, levels: list[float], biased: bool) -> str:
    """The answer a judge gives in the format the question asks for; 'ramble' prompts get none."""
    if "ramble" in question:
        return "Both pictures have their charm; I cannot pick."
    if len(levels) == 1:
        (b,) = levels
        if "Final Score:" in question:  # unifiedreward: element checks, then the verdict
            return f"cat (object): 1\nred (attribute): 1\nFinal Score: {1 + 4 * b:.2f}"
        if "Alignment Score (1-5)" in question:  # unifiedreward2
            return (f"Alignment Score (1-5): {1 + 4 * b:.4f}\nCoherence Score (1-5): {1 + 4 * b:.4f}\n"
                    f"Style Score (1-5): {1 + 4 * b:.4f}")
        raise AssertionError(f"unexpected pointwise question {question[:60]!r}")
    first, second = levels
    gap = first - second
    one_wins = gap > 0 or (biased and abs(gap) < BIAS)
    if "<answer>" in question:  # unifiedreward_think: reasoning, then exactly one verdict
        verdict = "Image 1 is better" if one_wins else "Image 2 is better"
        return f"<think>\n1. Aesthetics: Image 1 (7/10); Image 2 (6/10)\n</think>\n<answer>{verdict}</answer>"
    if "sum to exactly 1.0" in question:  # unifiedreward2_pair: soft shares per dimension
        share = 0.5 + gap / 2
        return "\n\n".join(f"{d} Score:\n Image 1: {share:.4f}\n Image 2: {1 - share:.4f}"
                           for d in ("Alignment", "Coherence", "Style"))
    if gap == 0 and not biased:
        return "Both images are equally good."
    return "Image 1 is better." if one_wins else "Image 2 is better."


class FakeJudge(BaseHTTPRequestHandler):
    questions: list[str] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        urls = [p["image_url"]["url"] for p in user if p["type"] == "image_url"]
        question = user[-1]["text"]  # the images first, then the question
        FakeJudge.questions.append(question)
        answer = canned(question, [brightness(u) for u in urls], biased=self.path.startswith("/biased"))
        send_chat_answer(self, answer)


@pytest.fixture(scope="module")
def judge_url():
    with http_server(FakeJudge) as url:
        yield url


def flat(levels) -> np.ndarray:
    return np.stack([np.full((8, 8, 3), v, np.uint8) for v in levels])


def reference_win_rates(levels, rule) -> np.ndarray:
    """Brute force: P(i > j) = mean of rule(i first) and 1 - rule(j first), then the mean over j."""
    b = np.asarray(levels) / 255
    n = len(b)
    return np.array([np.mean([(rule(b[i], b[j]) + 1 - rule(b[j], b[i])) / 2 for j in range(n) if j != i])
                     for i in range(n)])


@pytest.mark.parametrize("preset", ["unifiedreward", "unifiedreward2"])
def test_pointwise_presets_map_the_documented_1_to_5_scores_to_unit_range(judge_url, preset):
    FakeJudge.questions.clear()
    judge = create_backend("vlm_judge", url=judge_url, preset=preset)
    levels = [0, 64, 255]
    np.testing.assert_allclose(judge.score(flat(levels), ["a red cat"] * 3), [v / 255 for v in levels], atol=2e-3)
    assert all(q.endswith("Text Caption: [a red cat]") for q in FakeJudge.questions)
    assert judge.max_tokens == PRESETS[preset].max_tokens


@pytest.mark.parametrize("preset", ["pairwise", "unifiedreward_pair", "unifiedreward_think", "unifiedreward2_pair"])
def test_pairwise_presets_give_win_rates_of_both_orders(judge_url, preset):
    FakeJudge.questions.clear()
    judge = create_backend("vlm_pairwise", url=judge_url, preset=preset, concurrency=4)
    levels = [30, 200, 120, 120]
    scores = judge.score(flat(levels), ["a red cat"] * 4)
    if preset == "unifiedreward2_pair":
        rule = lambda a, c: 0.5 + (a - c) / 2  # noqa: E731 - the fake's soft shares
    else:
        rule = lambda a, c: 1.0 if a > c else (0.5 if a == c else 0.0)  # noqa: E731
    np.testing.assert_allclose(scores, reference_win_rates(levels, rule), atol=1e-4)
    assert scores.sum() == pytest.approx(2.0, abs=1e-5)
    assert len(FakeJudge.questions) == 4 * 3  # every ordered pair once


def test_pairwise_order_invariance_and_position_bias_cancel(judge_url):
    judge = create_backend("vlm_pairwise", url=judge_url + "/biased/v1", preset="unifiedreward_pair")
    levels = [100, 110, 200]  # 100 vs 110: within the bias, the first shown always "wins"
    scores = judge.score(flat(levels), ["p"] * 3)
    biased = lambda a, c: 1.0 if a - c > 0 or abs(a - c) < BIAS else 0.0  # noqa: E731
    np.testing.assert_allclose(scores, reference_win_rates(levels, biased), atol=1e-6)
    assert scores[0] == pytest.approx(0.25) and scores[1] == pytest.approx(0.25)  # the bias cancelled to a tie
    for order in permutations(range(3)):
        np.testing.assert_allclose(judge.score(flat(np.array(levels)[list(order)]), ["p"] * 3), scores[list(order)],
                                   atol=1e-6)


def test_pairwise_groups_are_judged_separately(judge_url):
    judge = create_backend("vlm_pairwise", url=judge_url)
    levels, labels = [10, 250, 20, 240, 30], ["a", "b", "a", "b", "a"]
    scores = judge.score(flat(levels), ["p" if g == "a" else "q" for g in labels], [{"group": g} for g in labels])
    np.testing.assert_allclose(scores, [0.0, 1.0, 0.5, 0.0, 1.0], atol=1e-6)


def test_unparseable_answers_name_the_sample_and_the_expected_format(judge_url):
    point = create_backend("vlm_judge", url=judge_url, preset="unifiedreward")
    with pytest.raises(JudgeError, match=r"sample 1 \(prompts\[1\] = 'please ramble'\): answer 'Both pictures.*is "
                                         r"not in preset 'unifiedreward''s format: expected 'Final Score: x'"):
        point.score(flat([0, 10]), ["a", "please ramble"])
    think = create_backend("vlm_pairwise", url=judge_url, preset="unifiedreward_think")
    with pytest.raises(JudgeError, match=r"group 'g7', images 0 and 1 .*expected <answer>Image 1 is better</answer>"):
        think.score(flat([0, 10]), ["ramble on"] * 2, [{"group": "g7"}] * 2)
    pair = create_backend("vlm_pairwise", url=judge_url, preset="unifiedreward2_pair")
    with pytest.raises(JudgeError, match=r"expected 'Alignment Score:' followed by 'Image 1: x'"):
        pair.score(flat([0, 10]), ["ramble"] * 2)


def test_preset_configuration_errors(judge_url):
    with pytest.raises(InvalidArgument, match="preset 'unifiedreward_think' is a pairwise preset; vlm_judge takes one "
                                              "of: unifiedreward, unifiedreward2"):
        create_backend("vlm_judge", url=judge_url, preset="unifiedreward_think")
    with pytest.raises(InvalidArgument, match="unknown preset 'nope'; vlm_pairwise takes one of: pairwise"):
        create_backend("vlm_pairwise", url=judge_url, preset="nope")
    with pytest.raises(InvalidArgument, match="preset 'unifiedreward' parses answers itself; drop option"):
        create_backend("vlm_judge", url=judge_url, preset="unifiedreward", pattern="Score: (\\d)")
    with pytest.raises(InvalidArgument, match="prompts: the request \\(one group\\): vlm_pairwise compares"):
        create_backend("vlm_pairwise", url=judge_url).score(flat([0, 10]), ["a", "b"])
    custom = create_backend("vlm_judge", url=judge_url, preset="unifiedreward",
                            prompt_template="Judge [{prompt}]. End with 'Final Score:' and 1-5.")
    assert custom.score(flat([255]), ["x"]).tolist() == pytest.approx([1.0], abs=1e-3)  # own words, preset's parser
