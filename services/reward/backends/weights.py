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


def load_exactly(model: torch.nn.Module, mapped: dict[str, torch.Tensor], reward: str, where: str = "",
                 hint: str = "") -> torch.nn.Module:
    """Loads renamed checkpoint tensors into ``model`` (built on the meta device) in float32, only if
    they fill every weight with the right shape and nothing is left over; else an InvalidArgument
    naming the tensor (``where``: the file, ``hint``: what to check). Returns the model in eval mode."""
    at = f"reward {reward!r}: " + (f"{where}: " if where else "")
    tail = f" ({hint})" if hint else ""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise InvalidArgument(f"{at}the checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:3]}{tail}")
    for name, tensor in mapped.items():
        if name not in expected or tuple(tensor.shape) != tuple(expected[name].shape):
            want = list(expected[name].shape) if name in expected else "nothing"
            raise InvalidArgument(f"{at}checkpoint tensor for {name} has shape {list(tensor.shape)}, the model "
                                  f"expects {want}{tail}")
    model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=True, assign=True)
    return model.eval()
