"""Analysis tools: the pure measures on constructed data, and `epgrpo analyze` end to end."""

import json
import subprocess
import sys
from itertools import combinations

import numpy as np
import pytest

from epgrpo.services.pruner.ovf import ovf_select
from epgrpo.trainer.analysis import GroupRecord, clustering, fidelity, nfe, schedule_ablation, uniform_std, what_if


def select(scores, k):
    return sorted(ovf_select(np.asarray(scores), k).tolist())


def record(final, previews):
    return GroupRecord("a handwritten digit 1", np.asarray(final, float), np.asarray(previews, float))


def test_nfe_counts_survivors_per_step():
    # pruning at s follows the call at x_s: steps 0-5 with 48, 6-7 with 24, 8-9 with 12
    assert nfe(48, [(5, 24), (7, 12)], 10) == 48 * 6 + 24 * 2 + 12 * 2 == 360
    assert nfe(24, [], 10) == 240


def test_uniform_std_matches_exhaustive_average():
    values = np.array([0.0, 0.1, 0.5, 0.9, 1.0, 0.3])
    exact = np.mean([values[list(c)].std() for c in combinations(range(6), 3)])
    assert uniform_std(values, 3, np.random.default_rng(0), draws=20000) == pytest.approx(exact, abs=0.01)


def test_clustered_rewards_make_ovf_spread_larger_than_uniform():
    rng = np.random.default_rng(0)
    finals = [np.concatenate([rng.normal(0.5, 0.02, 20), [0.0, 1.0, 0.05, 0.95]]) for _ in range(5)]
    result = clustering([record(f, np.zeros((4, 24))) for f in finals], 4, select)
    assert result["std_ratio_ovf_over_uniform"] > 2.0
    for row in result["groups"]:
        assert row["std_ovf"] == pytest.approx(np.std([0.0, 0.05, 0.95, 1.0]))  # the four outliers


def test_fidelity_is_one_for_perfect_previews_and_tracks_noise():
    rng = np.random.default_rng(1)
    final = rng.random(16)
    previews = np.stack([final + rng.normal(0, s, 16) for s in (10.0, 0.0)])
    rho = fidelity([record(final, previews)])["per_step"]
    assert rho[1]["rho_mean"] == pytest.approx(1.0)
    assert abs(rho[0]["rho_mean"]) < 0.9


def test_what_if_decides_on_the_previews_of_the_pruning_step_and_chains_checkpoints():
    final = np.arange(8, dtype=float)
    previews = np.zeros((4, 8))
    previews[1] = [9, 9, 9, 0, 1, 9, 9, 9]  # one step early: would keep other trajectories
    previews[2] = np.arange(8)  # OVF(4) keeps the extremes 0, 1, 6, 7
    previews[3] = [10, 3, 50, 50, 50, 50, 4, 20]  # among 0, 1, 6, 7: OVF(2) keeps 3 and 20
    assert what_if(record(final, previews), [(2, 4)], select).tolist() == [0, 1, 6, 7]
    assert what_if(record(final, previews), [(2, 4), (3, 2)], select).tolist() == [1, 7]


def test_perfect_previews_reach_the_oracle():
    rng = np.random.default_rng(2)
    records = [record(f, np.stack([f] * 6)) for f in rng.random((4, 12))]
    out = schedule_ablation(records, {"late": [(5, 3)]}, select, 3)
    assert out["late"]["kept_std"] == pytest.approx(out["late"]["oracle_std"])
    assert out["late"]["kept_std"] > out["late"]["uniform_std"]


@pytest.mark.slow
def test_analyze_command_writes_json_and_plots(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "epgrpo.trainer.cli", "analyze", "--groups", "2", "--group-size", "9", "--keep", "3",
         "model.pretrain_steps=3", "sampling.num_steps=5", "prune.mode=grpo", f"out_dir={tmp_path}", "progress=false"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "analysis.json")
    result = json.loads((tmp_path / "analysis.json").read_text())
    assert len(result["fidelity"]["per_step"]) == 5 and result["clustering"]["k"] == 3
    for name in ("clustering.png", "fidelity.png", "ablation_steps.png", "ablation_gmax.png"):
        assert (tmp_path / name).stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize("family", ["toy_digits_ddpm", "sd3", "sd", "flux"])
def test_analyze_runs_on_every_family_and_uses_the_prompt_file(family, tmp_path, request):
    from epgrpo.trainer.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 4\na handwritten digit 7\n" if family.startswith("toy") else
                       "a red cat\na blue dog\n")
    model = {"toy_digits_ddpm": ["model.pretrain_steps=3"],
             "sd3": [f"model.path={request.getfixturevalue('tiny_sd3_dir')}", "model.max_sequence_length=8"],
             "sd": [f"model.path={request.getfixturevalue('tiny_sd_dir')}"],
             "flux": [f"model.path={request.getfixturevalue('tiny_flux_dir')}", "model.max_sequence_length=16",
                      "model.resolution=32"]}
    out = tmp_path / "out"
    assert main(["analyze", "--groups", "2", "--group-size", "4", "--keep", "2", f"model.name={family}",
                 *model[family], "model.device=cpu", "sampling.num_steps=3", "prune.mode=grpo",
                 "reward.rewards=jpeg_compressibility:1",
                 "reward.judge=", f"train.prompt_file={prompts}", f"out_dir={out}", "progress=false"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert [g["prompt"] for g in result["clustering"]["groups"]] == prompts.read_text().split("\n")[:2]
    assert len(result["fidelity"]["per_step"]) == 3
