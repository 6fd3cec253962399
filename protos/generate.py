"""Regenerate the Python stubs from the .proto files: ``python -m epgrpo.protos.generate``.

The .proto files import each other as ``epgrpo/protos/v1/<name>.proto`` so that the generated
modules import each other as ``epgrpo.protos.v1.<name>_pb2``. The files live in ``protos/v1/``;
generation happens in a temporary tree with that layout, and the outputs are copied back.
Generated stubs are committed; ``--check`` (run by the test suite) fails if they are stale.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent / "v1"
IMPORT_PREFIX = Path("epgrpo/protos/v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc on every .proto in ``protos/v1`` and writes the stubs into ``out_dir``."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate
    import grpc_tools

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "src" / IMPORT_PREFIX
        src.mkdir(parents=True)
        protos = sorted(PROTO_DIR.glob("*.proto"))
        for proto in protos:
            shutil.copy(proto, src / proto.name)
        gen = root / "gen"
        gen.mkdir()
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{root / 'src'}",
            f"-I{well_known}",
            f"--python_out={gen}",
            f"--pyi_out={gen}",
            f"--grpc_python_out={gen}",
            *[str(IMPORT_PREFIX / p.name) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see the messages above")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for f in sorted((gen / IMPORT_PREFIX).iterdir()):
            if f.name.endswith(GENERATED_SUFFIXES):
                shutil.copy(f, out_dir / f.name)
                written.append(out_dir / f.name)
        return written


def stale_files() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones (or are missing/extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name for p in generate(Path(tmp))}
        committed = {p.name for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
        stale = sorted(fresh ^ committed)
        for name in sorted(fresh & committed):
            if not filecmp.cmp(Path(tmp) / name, PROTO_DIR / name, shallow=False):
                stale.append(name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale stubs; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated stubs: " + ", ".join(stale) + " (run python -m epgrpo.protos.generate)")
            return 1
        print("generated stubs are up to date")
        return 0
    for path in generate(PROTO_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
