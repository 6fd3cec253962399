"""Reading a published reward checkpoint from local disk: safetensors, or a torch file holding a
state dict (or ``{'state_dict': ...}``), loaded with ``weights_only=True`` so no pickled code runs."""

from __future__ import annotations

from pathlib import Path

import torch

from epgrpo.services.common.errors import InvalidArgument


def load_tensors(path: Path, reward: str, expected: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors; any unreadable or foreign file is an InvalidArgument naming
    ``reward``'s ``path`` option and what was ``expected`` there."""
    if not path.is_file():
        raise InvalidArgument(f"reward {reward!r}: path={path}: no such file (expected {expected}; see docs/rewards.md)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)  # never runs pickled code
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a configuration error
        raise InvalidArgument(f"reward {reward!r}: path={path}: cannot load: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidArgument(f"reward {reward!r}: path={path}: expected a state dict of tensors or {{'state_dict': ...}}")
    return state
