"""Config and CLI: every option documented; a bad value is a clear error before any work starts."""

import re
import subprocess
import sys

import pytest

from epgrpo.trainer import config as cfg
from epgrpo.trainer.cli import main


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  iterations: 7\nprune:\n  mode: grpo\n  group_size: 6\n")
    c = cfg.load_config(path, ["train.lr=5e-4", "sampling.num_steps=12"])
    assert (c.train.lr, c.train.iterations, c.prune.mode, c.prune.group_size, c.sampling.num_steps) == (5e-4, 7, "grpo", 6, 12)
    assert cfg.schedule(c) == [] and cfg.final_keep(c) == 6


def test_paper_schedule():
    c = cfg.load_config(None, ["prune.group_size=48", "prune.steps=[5,7]", "prune.keeps=[24,12]"])
    assert cfg.schedule(c) == [(5, 24), (7, 12)] and cfg.final_keep(c) == 12


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lr=abc", "train.lr: expected float"),
        ("train.lr=-1", "train.lr: expected a finite number > 0"),
        ("train.lr=nan", "train.lr: expected a finite number > 0"),
        ("train.bogus=1", "train.bogus: unknown option"),
        ("model.bogus_option=1", "model.bogus_option: unknown option"),
        ("bogus.x=1", "bogus: unknown option"),
        ("prune.mode=magic", "prune.mode: expected grpo | full_ovf"),
        ("prune.keeps=[8,10]", "prune.keeps: expected strictly decreasing"),
        ("prune.steps=[4]", "prune.steps: expected 2 steps"),
        ("prune.steps=[6,4]", "prune.steps: expected strictly increasing"),
        ("prune.steps=[0,4]", "prune.steps: expected steps in [1, 9]"),
        ("train.iterations=2.5", "train.iterations: expected int"),
        ("reward.rewards=digit:x", "reward.rewards: weight of 'digit' must be a number"),
        ("reward.rewards=digit:inf", "reward.rewards: weight of 'digit' must be finite"),
        ("model.device=tpu", "model.device: expected auto, cpu or cuda"),
        ("launch_services=maybe", "launch_services: expected bool"),
        ("train.lr", "expected key=value"),
    ],
)
def test_bad_values_name_the_field(override, fragment):
    with pytest.raises(ValueError) as info:
        cfg.load_config(None, [override])
    assert fragment in str(info.value)


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["train", "train.lr=-3"]) == 2
    assert "train.lr: expected a finite number > 0, got -3" in capsys.readouterr().err


def test_help_explains_every_option():
    """`epgrpo train --help` prints every option followed by its whole help text."""
    out = subprocess.run([sys.executable, "-m", "epgrpo.trainer.cli", "train", "--help"], capture_output=True,
                         text=True, check=True).stdout
    fields = list(cfg.iter_fields())
    starts = {}
    for key, *_ in fields:
        match = re.search(rf"^  {re.escape(key)} \(", out, re.MULTILINE)  # "  key (type, default ...)"
        assert match, f"{key}: not in `epgrpo train --help`"
        starts[key] = match.start()
    ends = sorted(starts.values())[1:] + [len(out)]
    entry = {key: out[start:min(end for end in ends if end > start)] for key, start in starts.items()}
    for key, _, _, help_text in fields:
        assert help_text.strip(), f"{key}: no help text"
        words = "".join(help_text.split())  # wrapping changes only whitespace
        assert words in "".join(entry[key].split()), f"{key}: help text not printed under it:\n{entry[key]}"


def test_config_command_prints_resolved_yaml(capsys):
    assert main(["config", "train.iterations=3"]) == 0
    import yaml

    data = yaml.safe_load(capsys.readouterr().out)
    assert data["train"]["iterations"] == 3 and data["prune"]["mode"] == "expand_prune"
