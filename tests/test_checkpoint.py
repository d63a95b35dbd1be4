import os

import pytest
import torch

from hemaseg.checkpoint import atomic_write_text, load_checkpoint, resolve_checkpoint, save_checkpoint
from hemaseg.config import DataConfig, RunConfig, TrainConfig


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
    save_checkpoint(path, {"epoch": 1})

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
    save_checkpoint(path, {"model": {"w": torch.ones(100)}})
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
    with pytest.raises(ValueError, match="--size"):
        DataConfig(size=100)
    with pytest.raises(ValueError, match="--lr"):
        TrainConfig(lr=0)
    cfg = RunConfig(data=DataConfig(root="x", size=64), train=TrainConfig(epochs=5))
    cfg.save(tmp_path / "config.json", {"meta": {"a": 1}})
    assert RunConfig.load(tmp_path / "config.json") == cfg
