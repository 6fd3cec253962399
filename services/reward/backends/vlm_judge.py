"""VLM judge: asks a vision-language model served over an OpenAI-compatible API (vLLM, SGLang,
``/v1/chat/completions``) to rate each image, and parses the rating from its answer.

Every image goes as a base64 PNG data URL (lossless) with the configured question; the first group
of ``pattern`` in the answer is the rating, mapped linearly from [score_min, score_max] to [0, 1].
An answer without a rating, or with one out of range, fails the request with an error naming the
sample and quoting the answer: a judge that stops answering in the expected form must be noticed,
never read as 0.
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
from epgrpo.services.reward.backends.base import RewardBackend, register_backend

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

    def __init__(self, device: str = "cpu", url: str | None = None, model: str = "", prompt_template: str = DEFAULT_TEMPLATE,
                 pattern: str = DEFAULT_PATTERN, score_min: float = 0.0, score_max: float = 10.0,
                 system_prompt: str = "", api_key_env: str = "EPGRPO_VLM_API_KEY", max_tokens: int = 64,
                 temperature: float = 0.0, timeout_s: float = 60.0, concurrency: int = 8):
        super().__init__(device)  # the model runs elsewhere
        if not url:
            raise InvalidArgument("reward 'vlm_judge': option 'url' is required, e.g. url=http://127.0.0.1:8000/v1")
        if "{prompt}" not in prompt_template:
            raise InvalidArgument(f"reward 'vlm_judge': prompt_template must contain {{prompt}}, got {prompt_template!r}")
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise InvalidArgument(f"reward 'vlm_judge': pattern {pattern!r} is not a regular expression: {exc}") from None
        if not score_max > score_min:
            raise InvalidArgument(f"reward 'vlm_judge': expected score_min < score_max, got {score_min}, {score_max}")
        if concurrency < 1 or timeout_s <= 0:
            raise InvalidArgument(f"reward 'vlm_judge': expected concurrency >= 1 and timeout_s > 0, got {concurrency}, {timeout_s}")
        self.endpoint, self.model, self.template = chat_endpoint(url), model, prompt_template
        self.score_min, self.score_max, self.system_prompt = score_min, score_max, system_prompt
        self.max_tokens, self.temperature, self.timeout_s = max_tokens, temperature, timeout_s
        self.headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vlm-judge")

    def request_body(self, image: np.ndarray, prompt: str) -> dict:
        question = self.template.replace("{prompt}", prompt)
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(image)}},
            {"type": "text", "text": question},
        ]})
        return {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": self.temperature}

    def ask(self, image: np.ndarray, prompt: str, index: int) -> str:
        """The judge's answer for one sample; transport failures raise Unavailable naming the sample."""
        data = json.dumps(self.request_body(image, prompt)).encode()
        request = urllib.request.Request(self.endpoint, data=data, headers=self.headers, method="POST")
        where = f"reward 'vlm_judge': sample {index} (prompts[{index}]): POST {self.endpoint}"
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
        match = self.pattern.search(answer)
        where = f"reward 'vlm_judge': sample {index} (prompts[{index}] = {prompt[:80]!r})"
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

    def _score(self, images, prompts, metadata):
        def one(i: int) -> float:
            answer = self.ask(images[i], prompts[i], i)
            log.debug("vlm_judge sample %d answer %r", i, answer)
            return self.rating(answer, prompts[i], i)

        # list() re-raises the first failing sample's error in sample order.
        return np.asarray(list(self._pool.map(one, range(len(images)))), dtype=np.float32)
