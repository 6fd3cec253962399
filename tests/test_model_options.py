"""Each model family takes only its own options: another family's option stops the run, before any
model loads, with one line naming it (a typo in model.* is already an unknown-option error)."""

import dataclasses
import glob
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from epgrpo.trainer import config as cfg
from epgrpo.trainer.cli import main
from epgrpo.trainer.policy import base
from epgrpo.trainer.policy.base import check_policy_options, create_policy, policy_options, register_policy

FAMILIES = ("toy_digits", "toy_digits_ddpm", "sd3", "sd", "flux", "qwen_image", "flux2_klein", "z_image", "wan")
MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(cfg.ModelConfig) if f.name != "name"}
TRAINER_GIVES = {"device": "cpu", "dtype": "auto", "guidance_scale": 1.0, "progress": False}


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Adapters registered by a test are gone after it."""
    for name in FAMILIES:
        policy_options(name)  # imports and registers the family
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every built-in factory raises if it is called: the options must be refused before."""
    for name in FAMILIES:
        factory = base._REGISTRY[name]

        def loads(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name}: a model was loaded")

        loads.__signature__ = inspect.signature(factory)
        monkeypatch.setitem(base._REGISTRY, name, loads)


@pytest.mark.parametrize("family, option, value", [
    ("toy_digits", "resolution", 512),  # sd3, sd, flux
    ("toy_digits", "gradient_checkpointing", True),
    ("toy_digits_ddpm", "text_encoder_3", False),  # sd3
    ("sd3", "true_cfg_scale", 2.0),  # flux
    ("sd3", "pretrain_steps", 50),  # the toys
    ("sd", "max_sequence_length", 77),  # sd3, flux
    ("flux", "text_encoder_3", False),  # sd3
])
def test_a_family_refuses_another_familys_option(no_model_loads, family, option, value):
    with pytest.raises(ValueError) as info:
        create_policy(family, **{option: value}, **TRAINER_GIVES)
    message = str(info.value)
    assert message.startswith(f"model.{option}: not an option of model '{family}' (its options: ")
    assert "path" in message and option not in message.partition("(its options:")[2]


def test_guidance_is_named_by_its_own_key():
    @register_policy("test_unguided")
    def factory(path: str = "", device: str = "cpu", dtype: str = "auto", progress: bool = True):
        raise AssertionError("loaded")

    assert check_policy_options("test_unguided", {**TRAINER_GIVES})  # 1.0 = no guidance: dropped
    with pytest.raises(ValueError, match=r"^sampling.guidance_scale: not an option of model 'test_unguided'"):
        check_policy_options("test_unguided", {**TRAINER_GIVES, "guidance_scale": 4.5})
    # and the toys still refuse guidance themselves
    with pytest.raises(ValueError, match="sampling.guidance_scale: the toy digit model has no unconditional branch"):
        create_policy("toy_digits", **{**TRAINER_GIVES, "guidance_scale": 2.0}, pretrain_steps=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_never_trigger_it(family):
    given = {**MODEL_DEFAULTS, **TRAINER_GIVES}
    passed = check_policy_options(family, given)
    assert set(passed) == set(given) & set(policy_options(family))
    # what the CLI leaves out (options at their defaults) is what the factory does by itself
    params = inspect.signature(base._REGISTRY[family]).parameters
    for name, default in MODEL_DEFAULTS.items():
        if name in params and name not in ("device", "dtype"):  # the trainer always gives these
            assert params[name].default == default, (family, name)


@pytest.mark.parametrize("path", sorted(glob.glob(str(Path(__file__).parents[1] / "trainer/configs/*.yaml"))))
def test_the_shipped_configs_pass(path):
    config = cfg.load_config(path, [])
    options = {k: v for k, v in vars(config.model).items() if k != "name"}
    check_policy_options(config.model.name, {**options, **TRAINER_GIVES})


def test_a_plugin_with_kwargs_takes_anything_and_one_without_is_checked(tmp_path, monkeypatch):
    (tmp_path / "my_adapters.py").write_text(textwrap.dedent("""
        from epgrpo.trainer.policy.base import register_policy

        @register_policy("anything")
        def anything(**options):
            return options

        @register_policy("strict")
        def strict(path="", device="cpu", dtype="auto", guidance_scale=1.0, progress=True, lora_rank=0):
            return dict(path=path, lora_rank=lora_rank)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    options = {"true_cfg_scale": 2.0, "text_encoder_3": False, "pretrain_steps": 3, "whatever": 1, **TRAINER_GIVES}
    assert policy_options("my_adapters:anything") is None
    assert create_policy("my_adapters:anything", **options) == options
    assert create_policy("my_adapters:strict", lora_rank=4, true_cfg_scale=1.0, **TRAINER_GIVES) == \
        {"path": "", "lora_rank": 4}  # true_cfg_scale at its default: not set, not passed
    with pytest.raises(ValueError, match=r"^model.true_cfg_scale: not an option of model 'my_adapters:strict' "
                                         r"\(its options: path, device, dtype, lora_rank\)$"):
        create_policy("my_adapters:strict", true_cfg_scale=2.0, **TRAINER_GIVES)
    with pytest.raises(ValueError, match=r"^model.lora_rnak: not an option"):  # a typo through the Python API
        create_policy("my_adapters:strict", lora_rnak=4, **TRAINER_GIVES)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("overrides, line", [
    (["model.name=sd3", "model.true_cfg_scale=2"], "epgrpo: error: model.true_cfg_scale: not an option of model 'sd3' "
                                                   "(its options: path, device, dtype, resolution, "),
    (["model.text_encoder_3=false"], "epgrpo: error: model.text_encoder_3: not an option of model 'toy_digits' "),
    (["model.name=flux", "model.text_encoder_3=false"], "epgrpo: error: model.text_encoder_3: not an option of "
                                                        "model 'flux' "),
    (["model.bogus_option=1"], "epgrpo: config error: model.bogus_option: unknown option; known: "),
])
def test_the_cli_exits_2_with_one_line(no_model_loads, tmp_path, capsys, overrides, line):
    out = tmp_path / "run"
    assert main(["train", *overrides, f"out_dir={out}", "progress=false"]) == 2
    (only,) = error_lines(capsys.readouterr().err)
    assert only.startswith(line)
    assert not out.exists()  # nothing started: no services, no model


def test_epgrpo_train_bogus_option_exits_2():
    done = subprocess.run([sys.executable, "-m", "epgrpo.trainer.cli", "train", "model.bogus_option=1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    (only,) = error_lines(done.stderr)
    assert only.startswith("epgrpo: config error: model.bogus_option: unknown option")
