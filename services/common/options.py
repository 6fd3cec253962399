"""Command-line options with an environment fallback declared next to the option.

Containers configure the services through the environment, people through flags; the flag wins.
``env_option(parser, "--workers", env="EPGRPO_REWARD_WORKERS", type=int, default=1, help=...)``
reads the variable when the parser is built, converts it like the flag, names the variable in the
error when it cannot (exit 2, before any work) and appends ``[env: $EPGRPO_REWARD_WORKERS]`` to the
help, so ``--help`` lists every variable. Lists (``action="append"``) take comma-separated values,
switches (``action="store_true"``) take 1/true/yes/on or 0/false/no/off.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Mapping

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _from_env(raw: str, action: str | None, convert: Callable[[str], Any], choices) -> Any:
    if action == "store_true":
        if raw.lower() in TRUE + FALSE:
            return raw.lower() in TRUE
        raise ValueError(f"expected one of {', '.join(TRUE + FALSE)}")
    if action == "append":
        return [convert(item.strip()) for item in raw.split(",") if item.strip()]
    value = convert(raw)
    if choices is not None and value not in choices:  # argparse checks choices only on the command line
        raise ValueError(f"expected one of {', '.join(map(str, choices))}")
    return value


def env_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: str, env: str,
               environ: Mapping[str, str] | None = None, **kwargs) -> argparse.Action:
    """``parser.add_argument(*flags, **kwargs)`` whose default comes from ``$env`` when it is set
    and not blank. The returned action carries ``env`` (tests and docs enumerate them)."""
    environ = os.environ if environ is None else environ
    action_kind = kwargs.get("action")
    convert = kwargs.get("type") or str
    raw = environ.get(env, "").strip()
    if raw:
        try:
            kwargs["default"] = _from_env(raw, action_kind, convert, kwargs.get("choices"))
        except (TypeError, ValueError) as exc:
            name = getattr(convert, "__name__", "value")
            detail = str(exc) if str(exc).startswith("expected one of") else f"expected {name}"
            prog = getattr(parser, "prog", None) or os.path.basename(sys.argv[0])
            print(f"{prog}: error: ${env} (for {flags[0]}): {detail}, got {raw!r}", file=sys.stderr)
            raise SystemExit(2) from None
    elif action_kind == "append" and kwargs.get("default") is None:
        kwargs["default"] = []
    kwargs["help"] = f"{kwargs.get('help', '')} [env: ${env}]".strip()
    action = parser.add_argument(*flags, **kwargs)
    action.env = env
    return action


def env_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{flag: environment variable} of every option declared with ``env_option``."""
    return {a.option_strings[0]: a.env for a in parser._actions if getattr(a, "env", None)}
