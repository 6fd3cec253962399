"""Environment fallbacks of the services' flags (declared with the flag, ``env_option``) and the
trainer config's typed fields (enumerations, typed lists, one TLS/token option set)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from epgrpo.services.common.options import env_option, env_options
from epgrpo.services.pruner.main import build_parser as pruner_parser
from epgrpo.services.reward.main import build_parser as reward_parser
from epgrpo.trainer import config as cfg
from epgrpo.trainer.config_checks import ROUTE_OPTIONS

PARSERS = {"epgrpo-reward": reward_parser, "epgrpo-pruner": pruner_parser}
SECRETS = {"EPGRPO_TOKEN", "EPGRPO_REWARD_TOKEN"}  # tokens themselves, read where they are used, never flags
ROOT = Path(__file__).resolve().parents[1]


def sample(action: argparse.Action) -> tuple[str, object]:
    """A valid environment value for the option, and what the flag's value must then be."""
    if isinstance(action, argparse._StoreTrueAction):
        return "yes", True
    if isinstance(action, argparse._AppendAction):
        return "a=/x, b=/y", ["a=/x", "b=/y"]
    if action.choices:
        choice = list(action.choices)[-1]
        return choice, choice
    kind = action.type or str
    raw = {int: "7", float: "2.5"}.get(kind, "/some/value")
    return raw, kind(raw)


def env_cases():
    for prog, build in PARSERS.items():
        for action in build()._actions:
            if getattr(action, "env", None):
                yield pytest.param(prog, build, action.dest, action.env, id=f"{prog}:{action.env}")


@pytest.mark.parametrize("prog,build,dest,env", list(env_cases()))
def test_each_variable_sets_its_flag_and_the_flag_wins(prog, build, dest, env, monkeypatch):
    action = next(a for a in build()._actions if a.dest == dest)
    raw, expected = sample(action)
    monkeypatch.setenv(env, raw)
    parser = build()
    assert getattr(parser.parse_args([]), dest) == expected
    assert f"[env: ${env}]" in " ".join(parser.format_help().split())
    if not isinstance(action, (argparse._StoreTrueAction, argparse._AppendAction)):
        flag_value = str(list(action.choices)[0]) if action.choices else {int: "9", float: "0.5"}.get(action.type, "/cli")
        assert getattr(parser.parse_args([action.option_strings[0], flag_value]), dest) != expected


def checked_cases():
    """Options whose variable can hold a wrong value: numbers, choices and switches."""
    for prog, build in PARSERS.items():
        for action in build()._actions:
            if getattr(action, "env", None) and (action.type in (int, float) or action.choices
                                                  or isinstance(action, argparse._StoreTrueAction)):
                yield pytest.param(prog, build, action.dest, action.env, id=f"{prog}:{action.env}")


@pytest.mark.parametrize("prog,build,dest,env", list(checked_cases()))
def test_a_bad_variable_stops_naming_it(prog, build, dest, env, monkeypatch, capsys):
    monkeypatch.setenv(env, "not-a-value")
    with pytest.raises(SystemExit) as exit_info:
        build().parse_args([])
    assert exit_info.value.code == 2
    assert f"${env}" in capsys.readouterr().err


@pytest.mark.parametrize("prog", list(PARSERS))
def test_every_variable_in_the_help_is_declared_with_its_flag(prog):
    """No variable is read by hand: each one the help names is an env_option, except the tokens."""
    parser = PARSERS[prog]()
    named = set(re.findall(r"\$(EPGRPO_[A-Z0-9_]+)", parser.format_help()))
    declared = set(env_options(parser).values())
    assert declared, "no option with an environment fallback"
    assert named - SECRETS <= declared, f"variables in --help without an env_option: {sorted(named - SECRETS - declared)}"


def test_service_mains_read_no_environment_by_hand():
    for path in ["services/reward/main.py", "services/pruner/main.py", "services/common/server.py",
                 "services/common/healthcheck.py"]:
        assert "os.environ" not in (ROOT / path).read_text(), f"{path}: reads the environment outside env_option"


def test_env_option_lists_and_switches():
    parser = argparse.ArgumentParser(prog="p")
    env_option(parser, "--route", env="X_ROUTES", action="append", environ={"X_ROUTES": " a=1 ,, b=2 "})
    env_option(parser, "--on", env="X_ON", action="store_true", default=False, environ={"X_ON": "off"})
    env_option(parser, "--n", env="X_N", type=int, default=3, environ={"X_N": "  "})  # blank = unset
    args = parser.parse_args(["--route", "c=3"])
    assert args.route == ["a=1", "b=2", "c=3"] and args.on is False and args.n == 3
    assert env_options(parser) == {"--route": "X_ROUTES", "--on": "X_ON", "--n": "X_N"}


def test_bad_variable_exits_2_from_the_command_line():
    result = subprocess.run([sys.executable, "-m", "epgrpo.services.reward.main", "--list-rewards"],
                            env={"EPGRPO_REWARD_WORKERS": "many", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert result.returncode == 2
    assert "$EPGRPO_REWARD_WORKERS (for --workers): expected int, got 'many'" in result.stderr


# --- trainer config: enumerations, typed lists, one TLS/token option set ---------------------------------

def enumerations():
    return [(key, t) for key, t, _, _ in cfg.iter_fields() if typing.get_origin(t) is typing.Literal]


def algorithm_declaring(key: str) -> str:
    from epgrpo.trainer.algorithms.base import algorithm_class, available_algorithms

    return next(a for a in available_algorithms() if key.split(".")[1] in algorithm_class(a).options)


def test_enumerations_cover_the_modes():
    keys = {key for key, _ in enumerations()}
    assert {"prune.mode", "eval.sampler", "pruner.on_unavailable", "train.lr_schedule", "model.dtype"} <= keys


@pytest.mark.parametrize("key,t", enumerations(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_enumeration_accepts_its_choices_and_names_them_on_a_bad_value(key, t):
    choices = typing.get_args(t)
    for choice in choices:
        extra = ["train.lr_warmup_iterations=1"] if key == "train.lr_schedule" and choice != "constant" else []
        if key.startswith("algo."):  # an algorithm's option is set with that algorithm
            extra = [f"train.algorithm={algorithm_declaring(key)}"]
        section, name = key.split(".")
        if (key, choice) == ("model.dtype", "fp16"):  # a known choice, refused for training (no loss scaling)
            with pytest.raises(ValueError, match="model.dtype: expected auto, fp32 or bf16: fp16 trains without"):
                cfg.load_config(None, [f"{key}={choice}"])
            continue
        assert getattr(getattr(cfg.load_config(None, [f"{key}={choice}", *extra]), section), name) == choice
    with pytest.raises(ValueError) as err:
        cfg.load_config(None, [f"{key}=bogus_choice"])
    assert str(err.value) == f"{key}: expected {cfg.type_name(t)}, got 'bogus_choice'"


def test_enumerations_are_checked_in_a_config_built_in_code():
    from epgrpo.trainer.config_checks import validate

    c = cfg.Config()
    c.pruner.on_unavailable = "ignore"
    with pytest.raises(ValueError, match=r"^pruner\.on_unavailable: expected retry \| no_prune, got 'ignore'$"):
        validate(c)
    c = cfg.Config()
    c.prune.steps = [5, "7"]
    with pytest.raises(ValueError, match=r"^prune\.steps\[1\]: expected int, got '7'$"):
        validate(c)


@pytest.mark.parametrize("value,message", [
    ("[5, x]", "prune.steps[1]: expected int, got 'x'"),
    ("[5, 7.5]", "prune.steps[1]: expected int, got 7.5"),
    ("[5, true]", "prune.steps[1]: expected int, got True"),
    ("{a: 1}", "prune.steps[0]: expected int, got {'a': 1}"),
])
def test_typed_lists_name_the_bad_element(value, message):
    with pytest.raises(ValueError) as err:
        cfg.load_config(None, [f"prune.steps={value}"])
    assert str(err.value).startswith(message)


def test_typed_lists_accept_the_usual_spellings():
    assert cfg.load_config(None, ["prune.steps=3,6", "prune.keeps=[8, 4]"]).prune.steps == [3, 6]
    assert cfg.load_config(None, ["prune.steps=[2.0, 6]"]).prune.steps == [2, 6]


def test_one_channel_option_set_for_every_connection():
    shared = {f.name for f in dataclasses.fields(cfg.ChannelOptions)}
    assert shared == {"tls_ca", "tls_cert", "tls_key", "tls_server_name", "token_file"}
    for section in (cfg.RewardConfig, cfg.PrunerConfig):
        assert issubclass(section, cfg.ChannelOptions)
        assert not shared & set(section.__dict__.get("__annotations__", {})), f"{section.__name__} redeclares them"
    assert shared <= set(ROUTE_OPTIONS)  # a reward.services entry takes the same set
    help_by_key = {key: text for key, _, _, text in cfg.iter_fields()}
    assert "$EPGRPO_REWARD_TOKEN" in help_by_key["reward.token_file"]
    assert "$EPGRPO_PRUNER_TOKEN" in help_by_key["pruner.token_file"]
    assert "the reward server's" in help_by_key["reward.tls_ca"] and "the pruner server's" in help_by_key["pruner.tls_ca"]
    keys = [key for key, *_ in cfg.iter_fields() if key.startswith("reward.")]
    assert keys[0] == "reward.address" and keys.index("reward.tls_ca") > keys.index("reward.judge")
