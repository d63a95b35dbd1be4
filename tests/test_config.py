"""The one config resolver: every path that makes a run's config gets the same one for the same ask."""

import json

import pytest

import hemaseg
from hemaseg.cli import main
from hemaseg.config import PRESETS, SETTINGS, ConfigError, DatasetStats, RunConfig, TrainConfig, make_plan, \
    resolve_config
from hemaseg.demo import DEMO_PRESET, demo_overrides
from hemaseg.data.plan import configure


def _sections(path):
    saved = json.loads(path.read_text())
    return {k: saved[k] for k in ("data", "model", "train", "augment", "inference", "plan")}


def test_cli_python_api_and_demo_write_the_same_config_for_the_same_ask(tiny_data, tmp_path):
    ask = {"size": 32, "epochs": 1, "seed": 3}
    assert main(["-q", "train", str(tiny_data), "--out", str(tmp_path / "cli"), "--preset", DEMO_PRESET,
                 "--size", "32", "--epochs", "1", "--seed", "3"]) == 0
    hemaseg.train_model(tiny_data, tmp_path / "api", preset=DEMO_PRESET, progress=False, **ask)
    demo_cfg, _ = configure(tiny_data, DEMO_PRESET, demo_overrides(size=32, seed=3, epochs=1, budget_minutes=None))
    cli, api = _sections(tmp_path / "cli" / "config.json"), _sections(tmp_path / "api" / "config.json")
    assert cli == api
    assert json.loads(json.dumps({k: v for k, v in demo_cfg.to_dict().items() if k in cli})) == cli


def test_config_defaults_are_the_scratch_preset_and_help_shows_every_presets_values(capsys):
    default, cfg = PRESETS["scratch"], TrainConfig()
    assert (cfg.batch_size, cfg.lr, cfg.epochs) == (default.batch_size, default.lr, default.epochs)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"scratch {default.batch_size}, seed {PRESETS['seed'].batch_size}" in text
    assert f"scratch {default.lr}, seed {PRESETS['seed'].lr}" in text
    assert f"default {PRESETS['default'].batch_size}," in text


def test_the_plan_caps_the_size_at_the_scans_and_flags_win():
    stats = DatasetStats(n_pairs=10, median_longer_side=100, lesion_fraction_mean=0.1)
    assert make_plan("default", stats).size == 128  # the 256 px preset, capped at 100 rounded up to 32
    cfg = resolve_config("d", "default", stats, "cpu", {"size": 64, "lr": 0.5})
    assert cfg.data.size == 64 and cfg.train.lr == 0.5 and cfg.plan.preset == "default"
    assert resolve_config("d", "scratch", stats, "cpu", {"depth": 3}).model.arch == "unet"  # seed has no depth knob
    assert not any(resolve_config("d", "seed", None, "cpu", {"augment": False}).augment.__dict__[k]
                   for k in ("hflip", "affine_p", "gamma_p"))


def test_bad_settings_name_the_python_key_and_the_cli_flag(tiny_data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="^size must be a multiple of 32 for model 'unet'"):
        resolve_config("d", "scratch", None, "cpu", {"depth": 5, "size": 48})
    with pytest.raises(ConfigError, match="^batch_sise is not a setting"):
        resolve_config("d", "default", None, "cpu", {"batch_sise": 2})
    with pytest.raises(ConfigError, match="^batch_size must be >= 1"):
        hemaseg.train_model(tiny_data, tmp_path / "x", batch_size=0)
    assert main(["-q", "train", str(tiny_data), "--out", str(tmp_path / "y"), "--size", "40"]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("--size must be a multiple of 32 for model 'efficientnet-lite0-unet' (depth 5); "
                                "got 40, try 32 or 64")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "y").exists()


def test_settings_names_are_unique_across_sections():
    from dataclasses import fields

    from hemaseg.config import AugmentConfig, DataConfig, InferenceConfig, ModelConfig

    names = [f.name for t in (DataConfig, ModelConfig, AugmentConfig, TrainConfig, InferenceConfig) for f in fields(t)]
    assert len(names) == len(set(names)) == len(SETTINGS)


def test_a_saved_config_round_trips_with_its_plan(tmp_path):
    cfg = resolve_config("d", "large", DatasetStats(5, 300, 0.01, 1), "cuda", {"epochs": 2})
    cfg.save(tmp_path / "config.json", {"meta": {"x": 1}})
    assert RunConfig.load(tmp_path / "config.json") == cfg
