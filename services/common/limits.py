"""Per-item bounds on what a request may carry, checked before anything is copied out of it.

A request's wire size is bounded by the message limit and its field count by
``wire_scan.MAX_REQUEST_FIELDS``; these bound what one item may hold, so that what a service
builds from a request (a prompt broadcast to every trajectory, metadata copied into each
upstream request) stays proportional to what it received.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from epgrpo.services.common.errors import InvalidArgument, show

MAX_TEXT_CHARS = 16384  # one prompt, one metadata key or value (a VLM judge's prompt is a few hundred)
MAX_METADATA_FIELDS = 32  # per image / trajectory
MAX_ID_CHARS = 256  # group_id, rollout_id, request_id


def check_count(count: int, allowed: Iterable[int], field: str, what: str) -> None:
    """InvalidArgument unless ``count`` (a repeated field's length, read without copying it) is allowed."""
    allowed = tuple(dict.fromkeys(allowed))
    if count not in allowed:
        expected = " or ".join(str(a) for a in allowed)
        raise InvalidArgument(f"{field}: expected {expected} {what}, got {count}")


def texts(values: Sequence[str], field: str) -> list[str]:
    """The strings of a repeated string field, each at most MAX_TEXT_CHARS."""
    out = list(values)
    for i, value in enumerate(out):
        if len(value) > MAX_TEXT_CHARS:
            raise InvalidArgument(f"{field}[{i}]: expected at most {MAX_TEXT_CHARS} characters, got {len(value)}")
    return out


def metadata_dicts(entries: Sequence, field: str) -> list[dict[str, str]]:
    """``Metadata`` messages as dicts; at most MAX_METADATA_FIELDS fields each, keys and values at
    most MAX_TEXT_CHARS."""
    out = []
    for i, entry in enumerate(entries):
        fields: Mapping[str, str] = entry.fields
        if len(fields) > MAX_METADATA_FIELDS:
            raise InvalidArgument(f"{field}[{i}].fields: expected at most {MAX_METADATA_FIELDS} fields, "
                                  f"got {len(fields)}")
        fields = dict(fields)
        for key, value in fields.items():
            if len(key) > MAX_TEXT_CHARS or len(value) > MAX_TEXT_CHARS:
                raise InvalidArgument(f"{field}[{i}].fields[{show(key)}]: expected keys and values of at most "
                                      f"{MAX_TEXT_CHARS} characters, got {max(len(key), len(value))}")
        out.append(fields)
    return out


def check_id(value: str, field: str) -> str:
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(f"{field}: expected at most {MAX_ID_CHARS} characters, got {len(value)}")
    return value
