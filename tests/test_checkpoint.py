import os

import pytest
import torch

from hemaseg.io import atomic_write_text
from hemaseg.models.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from hemaseg.config import ConfigError, DataConfig, RunConfig, TrainConfig


def test_checkpoint_round_trip_is_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "config": RunConfig().to_dict(), "epoch": 3})
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["model"]["w"], torch.ones(2)) and ckpt["epoch"] == 3
    assert RunConfig.from_dict(ckpt["config"]) == RunConfig()


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ValueError, match="evil.pt: not a readable hemaseg checkpoint"):
        load_checkpoint(path)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "config": {}, "model": {}})

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_checkpoint_gives_a_one_line_error(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(100)}, "config": {}})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="best.pt"):
        load_checkpoint(path)


def test_run_folder_resolves_to_best_then_last(tmp_path):
    with pytest.raises(FileNotFoundError, match="no best.pt"):
        resolve_checkpoint(tmp_path)
    atomic_write_text(tmp_path / "last.pt", "x")
    assert resolve_checkpoint(tmp_path).name == "last.pt"
    atomic_write_text(tmp_path / "best.pt", "x")
    assert resolve_checkpoint(tmp_path).name == "best.pt"


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*epochz"):
        RunConfig.from_dict({"train": {"epochz": 3}})
    with pytest.raises(ConfigError, match="^size must be a multiple of 16 .* try 96 or 112"):
        RunConfig(data=DataConfig(size=100))  # a rule that spans sections: the model's depth divides the size
    with pytest.raises(ConfigError, match="^lr must be > 0"):
        TrainConfig(lr=0)
    cfg = RunConfig(data=DataConfig(root="x", size=64), train=TrainConfig(epochs=5))
    cfg.save(tmp_path / "config.json", {"meta": {"a": 1}})
    assert RunConfig.load(tmp_path / "config.json") == cfg


def test_a_checkpoint_of_an_unknown_format_or_with_foreign_weights_is_refused_in_one_line(tmp_path, tiny_run):
    from hemaseg.models.checkpoint import load_weights

    ckpt = load_checkpoint(tiny_run / "best.pt")
    assert ckpt["format"] == "hemaseg-checkpoint/2"
    torch.save({**ckpt, "format": "hemaseg-checkpoint/9"}, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="future.pt: checkpoint format 'hemaseg-checkpoint/9' is not one"):
        load_checkpoint(tmp_path / "future.pt")
    wrong = {k: torch.zeros(3) for k in ckpt["model"]}  # right names, wrong shapes
    torch.save({**ckpt, "model": wrong}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong.pt: the weights do not fit a 'seed' network \(size mismatch") as e:
        load_weights(tmp_path / "wrong.pt")
    assert "\n" not in str(e.value)
    torch.save({**ckpt, "model": {"x": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="foreign.pt: the weights do not fit .* missing, 1 unexpected"):
        load_weights(tmp_path / "foreign.pt")


def test_a_format_1_checkpoint_still_loads(tmp_path, tiny_run):
    """Before the inference section: the threshold lived in train, with an amp switch."""
    from hemaseg.models.checkpoint import load_weights

    ckpt = load_checkpoint(tiny_run / "best.pt")
    old = {**ckpt["config"], "train": {**ckpt["config"]["train"], "threshold": 0.4, "amp": False}}
    del old["inference"]
    torch.save({**{k: v for k, v in ckpt.items() if k != "format"}, "config": old}, tmp_path / "old.pt")
    _, config, _ = load_weights(tmp_path / "old.pt")
    assert config.inference.threshold == 0.4 and config.train.precision == "fp32"
