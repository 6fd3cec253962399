"""The bearer token file of a compose stack: what the one-shot ``token`` service of compose.yaml runs
before any other service starts, so ``docker compose up`` needs no manual step.

    python -m epgrpo.services.common.token_file /run/epgrpo/token

The file gets ``$EPGRPO_TOKEN`` when that is set (an explicit token always wins, also over a file
written before); otherwise an existing token is kept (the stack's token survives restarts and
rebuilds, it lives in a volume) and a missing or empty file gets a new random token (256 bits,
hex). Written atomically with mode 0600. The token itself is never printed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
from pathlib import Path

from epgrpo.services.common.auth import TOKEN_ENV, token_lines


def _existing(path: Path) -> str:
    try:
        return next(iter(token_lines(path.read_text())), "")
    except FileNotFoundError:
        return ""


def _write(path: Path, token: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created with mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_token_file(path: str | os.PathLike, override: str = "") -> str:
    """Makes ``path`` hold the stack's token; returns what happened: 'set' (``override``),
    'kept' (a token already there) or 'generated'."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    override = override.strip()
    if override:
        if override != _existing(path):
            _write(path, override)
        return "set"
    if _existing(path):
        return "kept"
    _write(path, secrets.token_hex(32))
    return "generated"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epgrpo.services.common.token_file",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the token file (compose: /run/epgrpo/token in the 'auth' volume)")
    args = parser.parse_args(argv)
    try:
        outcome = ensure_token_file(args.path, os.environ.get(TOKEN_ENV, ""))
    except OSError as exc:
        print(f"token_file: error: {args.path}: {exc.strerror}", file=sys.stderr)
        return 1
    described = {"set": f"${TOKEN_ENV}", "kept": "the existing token", "generated": "a new random token"}[outcome]
    print(f"{args.path}: {described}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
