"""bench/bench_iteration.py runs (quick sizes) and records the transformer calls an iteration makes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_iteration_benchmark_runs_and_counts_the_calls(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_iteration.py"), "--quick", "--cache",
                           str(tmp_path / "models"), "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x floor" in proc.stdout and "update: reference forwards (KL)" in proc.stdout
    result = json.loads((tmp_path / "r.json").read_text())["grpo"]
    # --quick: 1 prompt x G=4, 4 steps, CFG (both branches in one batch of 8), every step but the last
    # trained, KL on: 4 sampling calls, 3 training forwards and 3 reference forwards, all of 8 rows
    calls = {}
    for key, count in result["transformer_calls"].items():
        phase, rows = key.split(" (")[0], int(key.split(" (")[1].split(",")[0])
        calls[phase, rows] = calls.get((phase, rows), 0) + count
    assert calls == {("sampling", 8): 4, ("train forward", 8): 3, ("reference", 8): 3}
    assert set(result["floor_s"]) == {"sampling", "train forward+backward", "reference"}
    assert all(v > 0 for v in result["floor_s"].values()) and result["iteration_s"]["inprocess"] > 0
