"""Prompt sets: the embedded task's digit prompts, or a text file of prompts (one per line)."""

from __future__ import annotations

from pathlib import Path

DIGIT_PROMPTS = [f"a handwritten digit {d}" for d in range(10)]


def load_prompts(path: str, field: str) -> list[str]:
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{field}: {path} holds no prompt")
    return prompts
