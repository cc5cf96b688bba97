"""Run configuration: TOML -> frozen dataclasses, every field checked."""

from __future__ import annotations

import dataclasses

import pytest

from xpcat import config as c
from xpcat.config import ConfigError, RunConfig, config_from_dict, load_config, write_config


def test_defaults_are_the_paper():
    cfg = RunConfig()
    assert cfg.model.hidden_width == 32 and cfg.model.n_hidden == 3
    assert cfg.training.batch_size == 512 and cfg.training.epochs == 128
    assert cfg.training.lr_drop_epochs == (32, 64, 96)
    assert cfg.inference.n_prior_samples == 512
    assert cfg.training.gmm_components == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.hidden_width = 3  # type: ignore[misc]


def test_every_field_documented():
    for f in dataclasses.fields(RunConfig):
        docs = c.field_docs(type(getattr(RunConfig(), f.name)))
        assert docs and all(len(d) > 10 for d in docs.values()), f.name


@pytest.mark.parametrize(
    "d, message",
    [
        ({"model": {"hidden_width": -3}}, r"\[model\] hidden_width = -3: must be >= 1"),
        ({"model": {"hidden_width": "32"}}, r"\[model\] hidden_width = '32': expected int"),
        ({"model": {"hidden_width": True}}, r"hidden_width = True: expected int"),
        ({"model": {"activation": "relu"}}, r"activation = 'relu'"),
        ({"modle": {}}, r"unknown section\(s\) \[modle\]"),
        ({"training": {"epoch": 3}}, r"\[training\] unknown key\(s\) epoch"),
        ({"run": {"seed": 1.5}}, r"\[run\] seed = 1.5: expected int"),
        ({"data": {"partition_level": 13}}, r"partition_level = 13: must be <= 12"),
        ({"training": {"lr_drop_epochs": [1, "a"]}}, r"lr_drop_epochs"),
        ({"training": "quick"}, r"\[training\] must be a table"),
    ],
)
def test_bad_values_name_the_field(d, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(d)


def test_preset_then_explicit_values_win():
    cfg = config_from_dict({"training": {"preset": "quick", "epochs": 7}})
    assert cfg.training.epochs == 7
    assert cfg.training.phase6_steps == c.PRESETS["training"]["quick"]["phase6_steps"]


def test_replace_with_a_preset_resolves_like_the_toml():
    """``replace(training={"preset": "quick"})`` is the quick schedule, not the paper's values renamed."""
    for section in ("training", "confidence"):
        got = RunConfig().replace(**{section: {"preset": "quick", "batch_size": 256}})
        want = config_from_dict({section: {"preset": "quick", "batch_size": 256}})
        assert getattr(got, section) == getattr(want, section)
    # a value customised before the switch stays; switching back restores the paper's values
    custom = RunConfig().replace(training={"epochs": 7}).replace(training={"preset": "quick"})
    assert custom.training.epochs == 7 and custom.training.model_optimizer == "adam"
    back = RunConfig().replace(training={"preset": "quick"}).replace(training={"preset": "paper"})
    assert back.training == RunConfig().training


def test_toml_roundtrip_and_diff(tmp_path):
    cfg = config_from_dict({"training": {"preset": "quick"}, "cluster": {"profile": "slurm", "options": {"queue": "normal"}}})
    path = write_config(cfg, tmp_path / "run")
    back = load_config(path)
    assert back == cfg
    changed = back.replace(model={"hidden_width": 16})
    assert c.diff_configs(back, changed) == ["[model] hidden_width: 32 -> 16"]


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    p = tmp_path / "bad.toml"
    p.write_text("[model\nhidden_width = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    p.write_text("[model]\nwidth = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml: \[model\] unknown key\(s\) width"):
        load_config(p)


def test_fetch_workers_bounded():
    """[fetch] workers: ranges fetched at once, polite to the shared archive (1..8, default 6)."""
    from xpcat.config import ConfigError, RunConfig, config_from_dict
    from xpcat.production.ingest.archive import fetch_options

    assert RunConfig().fetch.workers == 6
    assert fetch_options(config_from_dict({"fetch": {"workers": 2}})).workers == 2
    for bad in (0, 9):
        with pytest.raises(ConfigError, match=r"\[fetch\] workers"):
            config_from_dict({"fetch": {"workers": bad}})


def test_fetch_xp_product():
    """[fetch] xp: the DataLink product `xpcat fetch` asks for, continuous by default, sampled on request."""
    from xpcat.config import ConfigError
    from xpcat.production.ingest.archive import fetch_options

    assert RunConfig().fetch.xp == "continuous" and fetch_options(RunConfig()).xp == "continuous"
    assert fetch_options(config_from_dict({"fetch": {"xp": "sampled"}})).xp == "sampled"
    with pytest.raises(ConfigError, match=r"\[fetch\] xp = 'coefficients'"):
        config_from_dict({"fetch": {"xp": "coefficients"}})


def test_inference_refit_settings_reach_the_fit():
    from xpcat.model.inference import InferenceSettings

    assert InferenceSettings.from_config(RunConfig()).refit is True
    s = InferenceSettings.from_config(RunConfig().replace(inference={"refit": False, "polish_iterations": 7}))
    assert (s.refit, s.polish_iterations) == (False, 7)
    with pytest.raises(ConfigError, match="polish_iterations"):
        RunConfig().replace(inference={"polish_iterations": 0})
