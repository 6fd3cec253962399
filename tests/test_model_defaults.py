"""Per-model defaults: a model family's own settings sit between the global defaults and the user's
YAML file and overrides; the user always wins, and other models keep the global defaults."""

from epgrpo.trainer import config as cfg
from epgrpo.trainer import model_defaults as registry
from epgrpo.trainer.cli import _options_help
from epgrpo.trainer.model_defaults import model_defaults, register_model_defaults


def test_the_diffusion_toy_prunes_late_by_default_and_the_flow_toy_keeps_the_global_schedule():
    assert cfg.load_config(None, ["model.name=toy_digits_ddpm"]).prune.steps == [7, 8]
    assert cfg.load_config(None, []).prune.steps == cfg.PruneConfig().steps == [5, 7]


def test_the_users_yaml_and_overrides_win_over_the_models_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: toy_digits_ddpm\nprune:\n  steps: [6, 8]\n")
    assert cfg.load_config(path, []).prune.steps == [6, 8]
    assert cfg.load_config(path, ["prune.steps=[4,9]"]).prune.steps == [4, 9]
    assert cfg.load_config(None, ["model.name=toy_digits_ddpm", "prune.steps=[3,5]"]).prune.steps == [3, 5]


def test_a_registered_model_gets_its_defaults_and_help_lists_them(monkeypatch):
    monkeypatch.setattr(registry, "_DEFAULTS", dict(registry._DEFAULTS))  # the registration ends with the test
    register_model_defaults("test_plugin_model", {"train": {"lr": 3e-5}, "sampling": {"eta": 0.5}})
    c = cfg.load_config(None, ["model.name=test_plugin_model", "sampling.eta=0.7"])
    assert (c.train.lr, c.sampling.eta, c.train.beta) == (3e-5, 0.7, cfg.TrainConfig().beta)
    assert model_defaults("test_plugin_model") == {"train": {"lr": 3e-5}, "sampling": {"eta": 0.5}}
    assert "test_plugin_model: train.lr=3e-05, sampling.eta=0.5" in _options_help()
    assert "toy_digits_ddpm: prune.steps=[7, 8]" in _options_help()
