"""VLM judge: asks a vision-language model served over an OpenAI-compatible API (vLLM, SGLang,
``/v1/chat/completions``) to rate each image, and parses the rating from its answer.

Every image goes as a base64 PNG data URL (lossless) with the configured question; the first group
of ``pattern`` in the answer is the rating, mapped linearly from [score_min, score_max] to [0, 1].
``preset=`` picks the question and the parser of a public judge model instead (vlm_presets.py).
An answer without a rating, or with one out of range, fails the request with an error naming the
sample and quoting the answer: a judge that stops answering in the expected form must be noticed,
never read as 0.

``vlm_pairwise`` (group-aware) asks the judge to compare two images of a group, in both orders to
cancel the judge's position bias, and scores each image by its win rate against the rest of its group.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from epgrpo.services.common.errors import InvalidArgument, ServiceError, Unavailable
from epgrpo.services.reward.backends.base import RewardBackend, register_backend, win_rates
from epgrpo.services.reward.backends.vlm_presets import AnswerFormatError, Preset, get_preset

log = logging.getLogger("epgrpo.reward.vlm_judge")

DEFAULT_TEMPLATE = (
    'How well does this image match the description "{prompt}"? Consider content, composition and quality. '
    "Reply with one line of the form 'Score: N' where N is an integer from 0 (not at all) to 10 (perfectly)."
)
DEFAULT_PATTERN = r"Score:\s*(-?[0-9]+(?:\.[0-9]+)?)"


class JudgeError(ServiceError):
    """The judge server answered, but not usably: an HTTP 4xx (wrong URL, model or key) or an answer
    without a valid rating. INTERNAL: neither the caller's fault nor transient; the service's
    configuration (URL, model, template, pattern) needs fixing. 5xx and network errors are
    Unavailable (clients retry those)."""


def png_data_url(image: np.ndarray) -> str:
    """uint8 [H, W, C] -> 'data:image/png;base64,...' (PNG: lossless, like our wire)."""
    pil = Image.fromarray(image[:, :, 0], mode="L") if image.shape[2] == 1 else Image.fromarray(image, mode="RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_endpoint(url: str) -> str:
    """Accepts the server's base URL ('http://host:8000' or '.../v1') or the full endpoint."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def answer_text(body: dict) -> str:
    """choices[0].message.content: a string, or a list of parts (some servers) whose texts are joined."""
    content = body["choices"][0]["message"]["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


@register_backend("vlm_judge")
class VlmJudge(RewardBackend):
    description = ("A vision-language model's rating of how well the image matches the prompt, asked over an "
                   "OpenAI-compatible /v1/chat/completions API (vLLM, SGLang); the rating is parsed from the answer "
                   "with a configurable pattern and mapped from [score_min, score_max] to [0, 1].")
    inputs = "prompt (inserted into the question template at {prompt}); image sent as a base64 PNG data URL"
    range = "[0, 1]"

    pairwise = False  # one image per question (vlm_pairwise: two)
    # Waits on HTTP answers (urllib releases the GIL) with immutable settings: requests run side by
    # side on their own pool instead of queueing behind one another and behind the other rewards.
    concurrent = True
    waits_on_network = True

    def __init__(self, device: str = "cpu", url: str | None = None, model: str = "", prompt_template: str | None = None,
                 pattern: str | None = None, score_min: float | None = None, score_max: float | None = None,
                 system_prompt: str = "", api_key_env: str = "EPGRPO_VLM_API_KEY", max_tokens: int | None = None,
                 temperature: float = 0.0, timeout_s: float = 60.0, concurrency: int = 8, preset: str = ""):
        super().__init__(device)  # the model runs elsewhere
        me = f"reward {self.name!r}"
        if not url:
            raise InvalidArgument(f"{me}: option 'url' is required, e.g. url=http://127.0.0.1:8000/v1")
        self.preset: Preset | None = None
        if preset or self.pairwise:
            try:
                self.preset = get_preset(preset or "pairwise", self.pairwise, self.name)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
            given = [k for k, v in (("pattern", pattern), ("score_min", score_min), ("score_max", score_max)) if v is not None]
            if given:  # the preset's parser reads the answer: a pattern or range would be silently ignored
                raise InvalidArgument(f"{me}: preset {self.preset.name!r} parses answers itself; drop option(s) "
                                      f"{', '.join(given)}")
            prompt_template = prompt_template or self.preset.template
            score_min, score_max = self.preset.score_min, self.preset.score_max
            max_tokens = max_tokens or self.preset.max_tokens
        prompt_template = prompt_template or DEFAULT_TEMPLATE
        score_min, score_max = (0.0 if score_min is None else score_min), (10.0 if score_max is None else score_max)
        if "{prompt}" not in prompt_template:
            raise InvalidArgument(f"{me}: prompt_template must contain {{prompt}}, got {prompt_template!r}")
        try:
            self.pattern = re.compile(DEFAULT_PATTERN if pattern is None else pattern)
        except re.error as exc:
            raise InvalidArgument(f"{me}: pattern {pattern!r} is not a regular expression: {exc}") from None
        if not score_max > score_min:
            raise InvalidArgument(f"{me}: expected score_min < score_max, got {score_min}, {score_max}")
        if concurrency < 1 or timeout_s <= 0:
            raise InvalidArgument(f"{me}: expected concurrency >= 1 and timeout_s > 0, got {concurrency}, {timeout_s}")
        self.endpoint, self.model, self.template = chat_endpoint(url), model, prompt_template
        self.score_min, self.score_max, self.system_prompt = score_min, score_max, system_prompt
        self.max_tokens, self.temperature, self.timeout_s = max_tokens or 64, temperature, timeout_s
        self.headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vlm-judge")

    def request_body(self, images: list[np.ndarray], prompt: str) -> dict:
        """One user message: the images in order (Image 1, Image 2, ...), then the question."""
        question = self.template.replace("{prompt}", prompt)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": [
            *({"type": "image_url", "image_url": {"url": png_data_url(image)}} for image in images),
            {"type": "text", "text": question},
        ]})
        return {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": self.temperature}

    def ask(self, images: list[np.ndarray], prompt: str, sample: str) -> str:
        """The judge's answer about ``images``; transport failures raise Unavailable naming the sample."""
        data = json.dumps(self.request_body(images, prompt)).encode()
        request = urllib.request.Request(self.endpoint, data=data, headers=self.headers, method="POST")
        where = f"reward {self.name!r}: {sample}: POST {self.endpoint}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            error = Unavailable if exc.code >= 500 or exc.code == 429 else JudgeError
            raise error(f"{where} failed: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise Unavailable(f"{where} failed: {getattr(exc, 'reason', exc)}") from None
        except json.JSONDecodeError as exc:
            raise JudgeError(f"{where}: response is not JSON: {exc}") from None
        try:
            return answer_text(body)
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"{where}: no choices[0].message.content in {json.dumps(body)[:300]}") from None

    def rating(self, answer: str, prompt: str, index: int) -> float:
        """The parsed rating mapped to [0, 1]; JudgeError naming the sample otherwise."""
        where = f"reward {self.name!r}: sample {index} (prompts[{index}] = {prompt[:80]!r})"
        if self.preset is not None:
            value = self.parse(answer, where)
            if not self.score_min <= value <= self.score_max:
                raise JudgeError(f"{where}: rating {value:g} in answer {answer[:300]!r} is outside "
                                 f"[{self.score_min:g}, {self.score_max:g}] (preset {self.preset.name!r})")
            return (value - self.score_min) / (self.score_max - self.score_min)
        match = self.pattern.search(answer)
        if match is None:
            raise JudgeError(f"{where}: answer {answer[:300]!r} does not match pattern {self.pattern.pattern!r}")
        text = match.group(1) if self.pattern.groups else match.group(0)
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise JudgeError(f"{where}: {text!r} in answer {answer[:300]!r} is not a number") from None
        if not self.score_min <= value <= self.score_max:
            raise JudgeError(f"{where}: rating {value:g} in answer {answer[:300]!r} is outside "
                                   f"[{self.score_min:g}, {self.score_max:g}]")
        return (value - self.score_min) / (self.score_max - self.score_min)

    def parse(self, answer: str, where: str) -> float:
        """The preset's reading of an answer; JudgeError naming the sample and quoting it otherwise."""
        try:
            return self.preset.parse(answer)
        except AnswerFormatError as exc:
            raise JudgeError(f"{where}: answer {answer[:300]!r} is not in preset {self.preset.name!r}'s format: "
                             f"{exc}") from None

    def _score(self, images, prompts, metadata):
        def one(i: int) -> float:
            answer = self.ask([images[i]], prompts[i], f"sample {i} (prompts[{i}])")
            log.debug("vlm_judge sample %d answer %r", i, answer)
            return self.rating(answer, prompts[i], i)

        # list() re-raises the first failing sample's error in sample order.
        return np.asarray(list(self._pool.map(one, range(len(images)))), dtype=np.float32)


@register_backend("vlm_pairwise")
class VlmPairwise(VlmJudge):
    description = ("Win rate of each image against the others of its group, judged by a vision-language model "
                   "comparing two images at a time (both orders, averaged, to cancel position bias) over an "
                   "OpenAI-compatible API; presets for UnifiedReward pairwise judges. Group-aware: groups come from "
                   "metadata 'group'; n images cost n * (n - 1) judge calls.")
    inputs = ("prompt (one per group: the images of a group are compared under it); metadata 'group' (default: "
              "the request is one group); images sent as base64 PNG data URLs, Image 1 first")
    range = "[0, 1]; a group of n sums to n / 2"
    group_aware = True
    pairwise = True

    def _score(self, images, prompts, metadata):
        n = len(images)
        group = metadata[0].get("group", "") if metadata else ""
        where = f"group {group!r}" if group else "the request (one group)"
        different = next((j for j in range(n) if prompts[j] != prompts[0]), None)
        if different is not None:
            raise InvalidArgument(f"prompts: {where}: vlm_pairwise compares a group's images under one prompt; got "
                                  f"{prompts[0][:80]!r} and {prompts[different][:80]!r}")
        if n == 1:
            return np.full(1, 0.5, dtype=np.float32)
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]

        def first_wins(pair: tuple[int, int]) -> float:
            i, j = pair
            sample = f"{where}, images {i} and {j} (as Image 1 and Image 2)"
            answer = self.ask([images[i], images[j]], prompts[0], sample)
            log.debug("vlm_pairwise %s answer %r", sample, answer)
            value = self.parse(answer, f"reward {self.name!r}: {sample}")
            if not 0.0 <= value <= 1.0:  # a preset's promise; checked so a bad one cannot skew the win rates
                raise JudgeError(f"reward {self.name!r}: {sample}: preference {value:g} outside [0, 1]")
            return value

        # a[i, j] = P(Image 1 wins) with image i shown first; P(i > j) averages both orders:
        # (a[i, j] + 1 - a[j, i]) / 2, so P(i > j) + P(j > i) = 1 whatever the judge's bias.
        first = np.zeros((n, n))
        for (i, j), value in zip(pairs, self._pool.map(first_wins, pairs)):
            first[i, j] = value
        preference = (first + 1.0 - first.T) / 2.0
        return win_rates(preference).astype(np.float32)
