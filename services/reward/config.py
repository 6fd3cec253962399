"""Which rewards a reward-service instance serves, with per-reward options, and its batching.

Two sources, combinable:

* a spec string (``--rewards`` / ``$EPGRPO_REWARDS``): comma-separated entries
  ``[served_name=]backend[:key=value[;key=value...]]``, e.g.
  ``digit, pickscore:path=/models/pickscore;dtype=float16, clip_l=clipscore:path=/models/clip-l``.
  Values cannot contain ',' or ';' there: use the YAML file for those (prompt templates, patterns).
* a YAML file (``--rewards-config`` / ``$EPGRPO_REWARDS_CONFIG``)::

      rewards:
        pickscore: {path: /models/pickscore, dtype: float16}
        judge: {backend: vlm_judge, url: "http://vllm:8000/v1", model: Qwen2.5-VL-7B-Instruct}
      batching: {max_size: 32, max_delay_ms: 5}

Option values from strings are converted to the type the backend's constructor declares
(int, float, bool, str); unknown options and bad values fail at startup naming the reward.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from epgrpo.services.common.errors import InvalidArgument
from epgrpo.services.reward.backends.base import RewardBackend, backend_class, create_backend


@dataclass(frozen=True)
class RewardEntry:
    name: str  # the name clients ask for
    backend: str  # the registered backend class
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching: requests within ``max_delay_ms`` of the oldest waiting one are merged into
    one backend call of at most ``max_size`` images. ``max_size <= 1`` turns it off."""

    max_size: int = 1
    max_delay_ms: float = 0.0  # 0: merge what queued while the model was busy (no added latency)

    @property
    def enabled(self) -> bool:
        return self.max_size > 1

    def __post_init__(self):
        if self.max_size < 1:
            raise InvalidArgument(f"batching.max_size: expected >= 1, got {self.max_size}")
        if not self.max_delay_ms >= 0:
            raise InvalidArgument(f"batching.max_delay_ms: expected >= 0, got {self.max_delay_ms}")


def parse_spec(spec: str) -> list[RewardEntry]:
    """Parses the ``--rewards`` string (see the module docstring)."""
    entries = []
    for raw in spec.split(","):
        raw = raw.strip()
        if not raw:
            continue
        head, _, option_text = raw.partition(":")
        name, _, backend = head.strip().partition("=")
        name, backend = name.strip(), (backend.strip() or name.strip())
        if not name or not backend:
            raise InvalidArgument(f"rewards: entry {raw!r}: expected [name=]backend[:key=value;...]")
        options = {}
        for item in option_text.split(";") if option_text.strip() else []:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise InvalidArgument(f"rewards: entry {raw!r}: option {item!r}: expected key=value")
            options[key.strip()] = value.strip()
        entries.append(RewardEntry(name, backend, options))
    return entries


def load_config_file(path: str | Path) -> tuple[list[RewardEntry], BatchingConfig | None]:
    """Reads the YAML file (see the module docstring)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"rewards-config {path}: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"rewards", "batching"}:
        raise InvalidArgument(f"rewards-config {path}: expected a mapping with keys 'rewards' and optionally 'batching'")
    rewards = data.get("rewards") or {}
    if not isinstance(rewards, dict):
        raise InvalidArgument(f"rewards-config {path}: 'rewards' must map served names to option mappings")
    entries = []
    for name, options in rewards.items():
        options = dict(options or {})
        if not all(isinstance(k, str) for k in options):
            raise InvalidArgument(f"rewards-config {path}: rewards.{name}: option names must be strings")
        backend = str(options.pop("backend", name))
        entries.append(RewardEntry(str(name), backend, options))
    batching = data.get("batching")
    if batching is None:
        return entries, None
    if not isinstance(batching, dict) or set(batching) - {"max_size", "max_delay_ms"}:
        raise InvalidArgument(f"rewards-config {path}: 'batching' takes max_size and max_delay_ms, got {batching!r}")
    return entries, BatchingConfig(**batching)


def merge_entries(*groups: Sequence[RewardEntry]) -> list[RewardEntry]:
    """Concatenates entry lists, dropping exact repeats; one name configured two different ways is
    an error (which options would win?)."""
    merged: dict[str, RewardEntry] = {}
    for entry in (e for group in groups for e in group):
        if entry.name in merged and merged[entry.name] != entry:
            raise InvalidArgument(f"rewards: {entry.name!r} is configured twice, differently: "
                                  f"{merged[entry.name]} and {entry}")
        merged.setdefault(entry.name, entry)
    return list(merged.values())


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Converts a string option to the constructor's declared type; other values pass unchanged."""
    if not isinstance(value, str):
        return value
    types = set(typing.get_args(annotation)) or {annotation}
    types.discard(type(None))
    if str in types or not types:
        return value
    if bool in types:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise InvalidArgument(f"{where}: expected true or false, got {value!r}")
    for kind in (int, float):
        if kind in types:
            try:
                return kind(value)
            except ValueError:
                raise InvalidArgument(f"{where}: expected {kind.__name__}, got {value!r}") from None
    return value


def build_backend(entry: RewardEntry, device: str) -> RewardBackend:
    """Constructs one configured backend; ``device`` applies unless the entry sets its own."""
    cls = backend_class(entry.backend)
    hints = typing.get_type_hints(cls.__init__)
    parameters = inspect.signature(cls).parameters
    options = {"device": device, **entry.options}
    typed = {k: _coerce(v, hints.get(k, str), f"rewards: {entry.name}: option {k}") if k in parameters else v
             for k, v in options.items()}
    return create_backend(entry.backend, **typed)
