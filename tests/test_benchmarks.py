"""The benchmark and comparison scripts run (tiny sizes) and print their tables. No timing asserts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, timeout=600):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_rollout_benchmark_runs(tmp_path):
    out = run("bench_rollout.py", "--quick", "--prompts", "2", "--json", str(tmp_path / "r.json"))
    assert "| ep48 |" in out and "no model call is made for a preview" in out
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["ep48"]["nfe"] < results["full48+ovf"]["nfe"]
    assert results["ep48"]["trained"] == results["full48+ovf"]["trained"]


@pytest.mark.slow
def test_training_comparison_runs(tmp_path):
    out = run("compare_training.py", "--quick", "--out", str(tmp_path))
    assert "| E&P 16→8→4 |" in out
    summary = json.loads((tmp_path / "comparison.json").read_text())
    assert set(summary) == {"grpo G=8", "full16+ovf→4", "E&P 16→8→4", "E&P 16→8→4 late", "Flash 8→6→4"}
    assert summary["E&P 16→8→4"]["nfe"] < summary["full16+ovf→4"]["nfe"]
    assert (tmp_path / "comparison.png").stat().st_size > 1000


@pytest.mark.slow
def test_training_comparison_runs_on_the_diffusion_toy(tmp_path):
    out = run("compare_training.py", "--quick", "--model", "toy_digits_ddpm", "--only", "E&P 16→8→4 {7,8}",
              "--out", str(tmp_path))
    assert "training comparison: toy_digits_ddpm" in out and "| E&P 16→8→4 {7,8} |" in out
    summary = json.loads((tmp_path / "comparison.json").read_text())
    assert set(summary) == {"grpo G=8", "E&P 16→8→4 {7,8}"}  # the baseline always runs
    # 2 prompts x 2 iterations: G=8 costs 8 x 10 calls per prompt; 16→8→4 at {7, 8}: 8 x 8 + 4 x 9 + 4 x 10
    assert summary["grpo G=8"]["nfe"] == 2 * 2 * 80 and summary["E&P 16→8→4 {7,8}"]["nfe"] == 2 * 2 * 140


def test_training_comparison_names_an_unknown_configuration(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_training.py"), "--model", "toy_digits_ddpm",
                           "--only", "E&P 16→8→4 late", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--only: unknown configuration(s) 'E&P 16→8→4 late'" in proc.stderr


@pytest.mark.slow
def test_seed_sweep_runs_and_reads_finished_seeds_back(tmp_path):
    out = run("seed_sweep.py", "--quick", "--model", "toy_digits_ddpm", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["seed"] for r in rows] == [0] and len(rows[0]["train_reward"]) == 2
    assert rows[0]["gain"] == rows[0]["reward_last"] - rows[0]["reward_first"]
    assert "| 0 |" in out and "| all |" in out and (tmp_path / "sweep.png").stat().st_size > 1000
    again = run("seed_sweep.py", "--quick", "--model", "toy_digits_ddpm", "--reuse", "--out", str(tmp_path))
    table = out[out.index("seed sweep:"):]
    assert again == table  # read back from the run's summary: nothing re-runs, so no training output


@pytest.mark.slow
def test_training_comparison_of_an_algorithm_alone_and_under_expand_and_prune(tmp_path):
    out = run("compare_training.py", "--quick", "--algorithm", "nft", "--out", str(tmp_path))
    assert "| nft E&P 16→8→4 |" in out and "NFE to reach it" in out
    summary = json.loads((tmp_path / "comparison.json").read_text())
    assert set(summary) == {"grpo G=8", "nft G=8", "nft E&P 16→8→4"}
    assert summary["nft E&P 16→8→4"]["nfe"] > summary["nft G=8"]["nfe"]  # 16→8→4 costs more NFE than 8


@pytest.mark.slow
def test_transport_benchmark_runs():
    out = run("bench_transport.py", "--quick")
    assert "| reward.Score jpeg 48x16x16x1 uint8 |" in out and "pruner.PruneRollout previews" in out
    assert "SD3.5 latents" in out


@pytest.mark.slow
def test_short_soak_has_no_errors(tmp_path):
    out = run("soak.py", "--seconds", "3", "--clients", "4", "--json", str(tmp_path / "s.json"))
    results = json.loads((tmp_path / "s.json").read_text())
    assert len(results) == 2 and "| reward.Score" in out
    for r in results.values():
        assert r["calls"] > 0 and r["errors"] == {}


@pytest.mark.slow
def test_remote_benchmark_runs():
    out = run("bench_remote.py", "--quick")
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].replace(".", "").isdigit()]
    assert {(float(r[0]), int(r[1])) for r in rows} == {(0.0, 1), (0.0, 2), (20.0, 1), (20.0, 2)}
    assert all(float(r[2]) > 0 for r in rows) and "/ zero-delay waves=1" in out
