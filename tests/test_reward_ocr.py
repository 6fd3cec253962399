"""OCR reward: the formula on strings, and real recognition (RapidOCR's shipped PP-OCRv4 models) of
text rendered with PIL."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from epgrpo.services.common.errors import InvalidArgument
from epgrpo.services.reward.backends.base import create_backend
from epgrpo.services.reward.backends.ocr import edit_distance, ocr_reward, quoted_text


def render(text: str, size=(320, 96), channels: int = 3) -> np.ndarray:
    """Black text on white with PIL's bundled font: uint8 [H, W, C]."""
    image = Image.new("L", size, 255)
    ImageDraw.Draw(image).text((10, size[1] // 2 - 20), text, fill=0, font=ImageFont.load_default(size=36))
    array = np.asarray(image)[:, :, None]
    return np.repeat(array, 3, axis=2) if channels == 3 else array


@pytest.fixture(scope="module")
def ocr():
    return create_backend("ocr", threads=1)


@pytest.mark.parametrize("a, b, distance", [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3),
                                            ("flaw", "lawn", 2), ("open", "open", 0), ("ab", "ba", 2)])
def test_edit_distance(a, b, distance):
    assert edit_distance(a, b) == distance == edit_distance(b, a)


def test_reward_formula_matches_flow_grpo():
    assert ocr_reward("Hello World", "hello world") == 1.0  # case and spaces ignored
    assert ocr_reward("SALE TODAY ONLY", "today") == 1.0  # target contained: no penalty for extra text
    assert ocr_reward("OPEN", "OPFN") == pytest.approx(0.75)  # one substitution in four
    assert ocr_reward("", "open") == 0.0
    assert ocr_reward("xyzxyzxyzxyz", "ab") == 0.0  # distance capped at the target length


def test_target_is_the_quoted_text_or_metadata():
    prompts = ['a neon sign that says "Hello World" at night', "a poster reading “EPGRPO”", 'say "a" and "b"']
    assert quoted_text(prompts, []) == ["Hello World", "EPGRPO", "a"]
    assert quoted_text(["no quotes"], [{"text": "OPEN"}]) == ["OPEN"]
    with pytest.raises(InvalidArgument, match=r"prompts\[1\]: expected the text to render in double quotes"):
        quoted_text(['"ok"', "a cat's sign"], [])
    with pytest.raises(InvalidArgument, match=r"prompts\[0\]: the text to render is empty"):
        quoted_text(['a sign "  "'], [])


def test_reads_rendered_text(ocr):
    texts = ["Hello World", "EPGRPO 2026", "OPEN"]
    assert [ocr.read(render(t)).replace(" ", "").lower() for t in texts] == ["helloworld", "epgrpo2026", "open"]
    assert ocr.read(np.full((64, 64, 3), 255, np.uint8)) == ""  # a blank image has no text


def test_scores_rendered_text_against_the_prompt(ocr):
    images = np.stack([render("Hello World"), render("Hello World"), render("HELLO WORLD"), render("Help"),
                       np.full((96, 320, 3), 255, np.uint8)])
    prompts = ['a sign that says "hello world"', 'a sign that says "goodbye"', 'a sign "hello world"',
               'a sign that says "hello"', 'a sign that says "hello"']
    scores = ocr.score(images, prompts)
    expected = [1.0, ocr_reward("helloworld", "goodbye"), 1.0, ocr_reward("help", "hello"), 0.0]
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    assert 0.0 < scores[3] < 1.0 and scores[1] < 0.3


def test_gray_images_are_read_too(ocr):
    scores = ocr.score(np.stack([render("OPEN", channels=1)]), ['a door sign "open"'])
    assert scores.tolist() == [1.0]
