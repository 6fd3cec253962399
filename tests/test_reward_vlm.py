"""VLM judge against a fake OpenAI-compatible server (http.server in a thread) that checks the
request format, decodes the PNG it was sent and answers with a rating derived from its pixels."""

from __future__ import annotations

import base64
import io
import json
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
from conftest import http_server, send_chat_answer
from PIL import Image

from epgrpo.services.common.errors import InvalidArgument, Unavailable
from epgrpo.services.reward.backends.base import create_backend
from epgrpo.services.reward.backends.vlm_judge import JudgeError
from epgrpo.services.reward.config import build_backend, parse_spec


class FakeJudge(BaseHTTPRequestHandler):
    """Rating = mean pixel / 25.5 (0-10, one decimal). Prompts containing 'ramble' get an answer
    without a rating; 'overrate' gets 11/10; path /broken answers HTTP 500."""

    requests: list[dict] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            self.send_error(500 if self.path.startswith("/broken") else 404, "no such endpoint")
            return
        FakeJudge.requests.append({"body": body, "auth": self.headers.get("Authorization")})
        user = body["messages"][-1]["content"]
        url = next(p["image_url"]["url"] for p in user if p["type"] == "image_url")
        question = next(p["text"] for p in user if p["type"] == "text")
        assert url.startswith("data:image/png;base64,")
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
        if "ramble" in question:
            answer = "What a lovely picture! I would not put a number on it."
        elif "overrate" in question:
            answer = "Score: 11"
        else:
            answer = f"The image is fine.\nScore: {pixels.mean() / 25.5:.1f}"
        send_chat_answer(self, answer)


@pytest.fixture(scope="module")
def judge_url():
    with http_server(FakeJudge) as url:
        yield url


def flat_images(levels, channels=3) -> np.ndarray:
    return np.stack([np.full((12, 10, channels), v, np.uint8) for v in levels])


def test_scores_are_parsed_ratings_mapped_to_unit_range(judge_url, monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sekrit")
    FakeJudge.requests.clear()
    judge = create_backend("vlm_judge", url=judge_url + "/v1", model="fake-vl", api_key_env="TEST_JUDGE_KEY",
                           prompt_template="Rate '{prompt}' {literally braces}.", concurrency=3)
    levels = [0, 51, 102, 255, 204]
    scores = judge.score(flat_images(levels), [f"prompt {i}" for i in range(5)])
    np.testing.assert_allclose(scores, [v / 255 for v in levels], atol=1e-6)
    assert len(FakeJudge.requests) == 5
    sent = FakeJudge.requests[0]
    assert sent["auth"] == "Bearer sekrit" and sent["body"]["model"] == "fake-vl" and sent["body"]["temperature"] == 0.0
    questions = sorted(next(p["text"] for p in r["body"]["messages"][-1]["content"] if p["type"] == "text")
                       for r in FakeJudge.requests)
    assert questions == [f"Rate 'prompt {i}' {{literally braces}}." for i in range(5)]


def test_png_is_lossless_and_gray_works(judge_url):
    FakeJudge.requests.clear()
    judge = create_backend("vlm_judge", url=judge_url)  # base URL without /v1 is accepted too
    image = np.random.default_rng(0).integers(0, 256, (1, 9, 7, 1), dtype=np.uint8)
    judge.score(image, ["p"])
    url = FakeJudge.requests[0]["body"]["messages"][-1]["content"][0]["image_url"]["url"]
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    np.testing.assert_array_equal(decoded, image[0, :, :, 0])
    assert FakeJudge.requests[0]["auth"] is None  # no key configured: no header


def test_custom_pattern_and_range(judge_url):
    judge = create_backend("vlm_judge", url=judge_url, pattern=r"fine\.\s+Score: ([0-9.]+)", score_min=0, score_max=20)
    np.testing.assert_allclose(judge.score(flat_images([255]), ["p"]), [0.5], atol=1e-6)


def test_unparseable_or_out_of_range_answers_name_the_sample(judge_url):
    judge = create_backend("vlm_judge", url=judge_url)
    with pytest.raises(JudgeError, match=r"sample 2 \(prompts\[2\] = 'please ramble'\): answer 'What a lovely.*does not match pattern"):
        judge.score(flat_images([0, 10, 20]), ["a", "b", "please ramble"])
    with pytest.raises(JudgeError, match=r"sample 0 .*rating 11 in answer 'Score: 11' is outside \[0, 10\]"):
        judge.score(flat_images([0]), ["overrate me"])


def test_server_errors_are_unavailable_and_client_errors_are_judge_errors(judge_url):
    with pytest.raises(Unavailable, match=r"sample 0 \(prompts\[0\]\): POST .*/broken/v1/chat/completions failed: HTTP 500"):
        create_backend("vlm_judge", url=judge_url + "/broken").score(flat_images([0]), ["p"])
    with pytest.raises(JudgeError, match=r"sample 0 .*/elsewhere/v1/chat/completions failed: HTTP 404"):
        create_backend("vlm_judge", url=judge_url + "/elsewhere/v1").score(flat_images([0]), ["p"])
    with pytest.raises(Unavailable, match="sample 0"):  # nothing listens on port 1
        create_backend("vlm_judge", url="http://127.0.0.1:1/v1", timeout_s=5).score(flat_images([0]), ["p"])


def test_configuration_errors_and_spec_options(judge_url):
    with pytest.raises(InvalidArgument, match="option 'url' is required"):
        create_backend("vlm_judge")
    with pytest.raises(InvalidArgument, match="must contain {prompt}"):
        create_backend("vlm_judge", url=judge_url, prompt_template="Rate it")
    with pytest.raises(InvalidArgument, match="is not a regular expression"):
        create_backend("vlm_judge", url=judge_url, pattern="Score: (")
    # The URL holds ':' -- fine in a spec string, options are split on ';'.
    judge = build_backend(parse_spec(f"judge=vlm_judge:url={judge_url}/v1;score_max=20;concurrency=2")[0], "cpu")
    np.testing.assert_allclose(judge.score(flat_images([255]), ["p"]), [0.5], atol=1e-6)
