"""Per-model defaults: settings a model family trains best with, in place of the global defaults.

A family registers a nested mapping of options (the same shape as a YAML config). ``load_config``
layers it between the global defaults and the user's YAML file and ``key=value`` overrides, so
anything the user sets still wins. The diffusion toy needs its own recipe: on stochastic DDIM
(eta = 1) the x0-previews rank trajectories poorly until late steps, and it learns from other
settings than the flow toy (evidence in docs/models.md#the-diffusion-toy and docs/benchmarks.md).
"""

from __future__ import annotations

import copy

_DEFAULTS: dict[str, dict] = {}


def register_model_defaults(name: str, values: dict) -> None:
    """Declares ``values`` (nested: {"train": {"lr": ...}}) as model ``name``'s defaults."""
    _DEFAULTS[name] = copy.deepcopy(values)


def model_defaults(name: str) -> dict:
    """The defaults registered for model ``name`` (empty when it uses the global ones)."""
    return copy.deepcopy(_DEFAULTS.get(name, {}))


def described_models() -> list[tuple[str, str]]:
    """(model name, 'prune.steps=[7, 8], ...') of every model with its own defaults, for help texts."""
    def flat(values: dict, prefix: str = ""):
        for key, value in values.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}={value}"

    return [(name, ", ".join(flat(values))) for name, values in sorted(_DEFAULTS.items())]


# The diffusion toy prunes late: on its eta = 1 DDIM rollouts the previews' rank correlation with the
# final reward is 0.25 at step 5 and 0.65 / 0.84 at steps 7 / 8 (epgrpo analyze, docs/benchmarks.md);
# pruning at {5, 7} keeps poorly chosen survivors and barely learns.
register_model_defaults("toy_digits_ddpm", {"prune": {"steps": [7, 8]}})
