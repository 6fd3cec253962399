"""The README's Quickstart is exactly two commands, and CI runs the second one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Quickstart has one fenced block"
    return [line for line in blocks[0].splitlines() if line.strip()]


def test_quickstart_is_two_commands_install_and_run_then_install_and_test():
    first, second = quickstart_commands()
    assert first.startswith("pip install torch==") and "epgrpo train" in first
    assert second.startswith("pip install torch==") and "pytest" in second


def test_ci_runs_the_readme_test_command():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert quickstart_commands()[1] in ci
