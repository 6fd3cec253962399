"""The hand-listed packages of pyproject.toml match the source tree: a wheel ships every package
(each folder with an __init__.py under protos/, services/, trainer/, by its ``epgrpo.`` name) and
lists none that does not exist; no folder holds Python code outside a package; package data
globs match files."""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]  # {"epgrpo.protos": "protos", ...}
SKIP = {"__pycache__"}


def folder_of(package: str) -> Path:
    """The source folder of a dotted package name, through ``package-dir``."""
    prefix = max((p for p in PACKAGE_DIR if package == p or package.startswith(p + ".")), key=len, default=None)
    assert prefix is not None, f"{package}: under no package-dir entry ({', '.join(PACKAGE_DIR)})"
    return ROOT / PACKAGE_DIR[prefix] / Path(*package[len(prefix):].split(".")[1:])


def source_folders() -> dict[str, Path]:
    """{dotted name: folder} of every folder below the package-dir roots (the roots included)."""
    found = {}
    for prefix, top in PACKAGE_DIR.items():
        root = ROOT / top
        for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            relative = folder.relative_to(root).parts
            if SKIP.intersection(relative) or any(part.startswith(".") for part in relative):
                continue
            found[".".join((prefix, *relative))] = folder
    return found


def test_every_package_in_the_tree_is_listed_and_every_listed_one_exists():
    listed = set(SETUPTOOLS["packages"])
    in_tree = {name for name, folder in source_folders().items() if (folder / "__init__.py").is_file()}
    assert sorted(in_tree - listed) == [], "packages missing from [tool.setuptools] packages in pyproject.toml"
    assert sorted(name for name in listed if not (folder_of(name) / "__init__.py").is_file()) == [], \
        "listed packages without a folder and __init__.py"
    assert len(SETUPTOOLS["packages"]) == len(listed), "a package is listed twice"


def test_no_python_code_outside_a_package():
    """A .py file in a folder without __init__.py would not be shipped (nor be importable as epgrpo.*)."""
    stray = sorted(str(py.relative_to(ROOT)) for folder in source_folders().values()
                   if not (folder / "__init__.py").is_file() for py in folder.glob("*.py"))
    assert stray == []


def test_package_data_globs_match_files():
    for package, patterns in SETUPTOOLS.get("package-data", {}).items():
        for pattern in patterns:
            assert list(folder_of(package).glob(pattern)), f"package-data {package}: {pattern} matches nothing"
