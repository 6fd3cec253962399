"""Reward names on the wire: a served name ('pickscore'), or a video wrapper around one, with options
('frames(pickscore, k=4)', 'first_frame(digit)'). Shared by the reward service (which builds the
wrapper) and its clients (which split 'name:weight' lists and launch services for the inner names)."""

from __future__ import annotations

import re

_CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.DOTALL)


def split_top_level(text: str, separator: str = ",") -> list[str]:
    """Splits at ``separator`` outside parentheses: 'frames(a, k=2),b' -> ['frames(a, k=2)', 'b']."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def parse_wrapper(name: str) -> tuple[str, str, dict[str, str]] | None:
    """'frames(digit, k=4)' -> ('frames', 'digit', {'k': '4'}); None for a plain name. A malformed
    one (unbalanced parentheses, no inner name, an option without '=') raises ValueError."""
    if "(" not in name and ")" not in name:
        return None
    match = _CALL.match(name)
    if match is None or name.count("(") != name.count(")"):
        raise ValueError(f"reward {name!r}: expected wrapper(reward[, key=value]...), e.g. frames(pickscore, k=4)")
    wrapper, body = match.group(1), match.group(2)
    inner, *items = [part.strip() for part in split_top_level(body)]
    if not inner:
        raise ValueError(f"reward {name!r}: expected the name of an image reward inside {wrapper}(...)")
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"reward {name!r}: option {item!r}: expected key=value")
        options[key.strip()] = value.strip()
    return wrapper, inner, options


def served_name(name: str) -> str:
    """The reward a service must serve to answer ``name``: the innermost wrapped name (a malformed
    name as it is: the reward service answers it with the reason)."""
    try:
        parsed = parse_wrapper(name)
    except ValueError:
        return name
    return name if parsed is None else served_name(parsed[1])
