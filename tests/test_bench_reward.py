"""The reward benchmark runs end to end (servers as child processes) and prints its full table.
Timings are never checked: only that every cell was measured."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_reward.py"


@pytest.mark.slow
def test_quick_benchmark_prints_every_cell():
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=300,
                            env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"^(clip|jpeg)\s+\d", line)]
    cells = {(r[0], int(r[1]), " ".join(r[2:-6])) for r in rows}
    modes = {"in-process", "in-process+batch 0ms", "grpc", "grpc+batch 0ms"}
    if (os.cpu_count() or 1) > 1:
        modes.add(f"grpc, {os.cpu_count()} workers")
    assert cells == {(b, n, m) for b in ("clip", "jpeg") for n in (1, 4, 8) for m in modes}, result.stdout
    for row in rows:
        rps, p50, p99 = float(row[-6]), float(row[-4]), float(row[-3])
        assert rps > 0 and 0 < p50 <= p99, row
        if row[2] == "in-process":
            assert row[-2] == "1.00"  # each row's ratio is against its own in-process cell
    assert "p99 ms" in result.stdout and "x in-proc" in result.stdout
