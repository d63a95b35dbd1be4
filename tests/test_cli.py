"""One end-to-end smoke test per command, on tiny synthetic data, checking the files each writes."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hemaseg.cli import build_parser, main
from hemaseg.config import BACKENDS

COMMANDS = ["synth", "mix", "check", "train", "evaluate", "predict", "measure", "track", "convert", "cv", "report",
            "export", "serve", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_for_every_flag(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"
            assert action.option_strings[-1] in text


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "hemaseg.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("hemaseg ")


def test_synth_check_train_resume_evaluate_predict(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["-q", "synth", str(data), "--n", "12", "--size", "48", "--seed", "1"]) == 0
    assert len(list((data / "images").iterdir())) == 12 and (data / "mask" / "12.png").is_file()

    assert main(["-q", "check", str(data)]) == 0
    assert "12" in capsys.readouterr().out

    assert main(["-q", "train", str(data), "--out", str(run), "--size", "32", "--epochs", "1",
                 "--batch-size", "4"]) == 0
    assert {"best.pt", "last.pt", "config.json", "metrics.csv", "curves.png", "splits.json"} <= {
        p.name for p in run.iterdir()}
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["size"] == 32 and config["train"]["epochs"] == 1
    assert "best validation Dice" in capsys.readouterr().out

    # extend the finished run: resume continues from last.pt to the new epoch count
    assert main(["-q", "train", "--resume", str(run), "--epochs", "2"]) == 0
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 3

    assert main(["-q", "evaluate", str(run), str(data), "--split", "val", "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert {"dice_mean", "dice_mean_lesion", "n_images"} <= set(summary)
    assert summary["n_images"] == len(json.loads((run / "splits.json").read_text())["val"])
    assert "empty-mask rule" in capsys.readouterr().out

    assert main(["-q", "predict", str(run), str(data / "images" / "3.png"), "--out", str(tmp_path / "pred"),
                 "--threshold", "0.4"]) == 0
    assert {p.name for p in (tmp_path / "pred").iterdir()} == {"3_mask.png", "3_overlay.png", "predictions.csv",
                                                                "lesions.csv", "manifest.jsonl"}


def test_check_reports_problems_with_exit_status_1(tmp_path, capsys):
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    (root / "mask").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images" / "1.png")
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(root / "mask" / "1.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images" / "2.png")
    assert main(["-q", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "1.png" in out and "2.png" in out


def test_errors_are_one_line_and_name_the_file(tmp_path, tiny_data, capsys):
    assert main(["-q", "train", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err
    assert main(["-q", "predict", str(tmp_path / "norun"), "x.png", "--out", str(tmp_path / "o")]) == 2
    assert "norun" in capsys.readouterr().err
    assert main(["-q", "train", str(tiny_data), "--out", str(tmp_path / "r"), "--size", "50"]) == 2
    assert "--size" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["-q", "demo", "--out", str(out), "--n", "12", "--n-test", "4", "--size", "32", "--epochs", "1"]) == 0
    for path in ("report.html", "run/best.pt", "eval/per_image.csv", "eval/summary.json", "demo_summary.json"):
        assert (out / path).is_file(), path
    assert len(list((out / "predictions").glob("*_overlay.png"))) == 4
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3 and "Dice" in html and "http" not in html.lower().replace("http-equiv", "")
    assert "report.html" in capsys.readouterr().out


def test_cv_and_report_commands(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["-q", "synth", str(data), "--n", "10", "--size", "48", "--seed", "2"]) == 0
    cv = tmp_path / "cv"
    assert main(["-q", "cv", str(data), "--out", str(cv), "--folds", "2", "--size", "32", "--epochs", "1",
                 "--batch-size", "4"]) == 0
    assert "out-of-fold Dice" in capsys.readouterr().out
    assert (cv / "report.html").is_file() and (cv / "fold_1" / "best.pt").is_file()
    # predict and evaluate accept the cross-validation run (fold ensemble) and --tta
    assert main(["-q", "predict", str(cv), str(data / "images" / "1.png"), "--out", str(tmp_path / "p"), "--tta"]) == 0
    assert (tmp_path / "p" / "1_mask.png").is_file()
    assert main(["-q", "evaluate", str(cv), str(data), "--out", str(tmp_path / "ev"), "--tta"]) == 0
    assert (tmp_path / "ev" / "report.html").is_file()
    run = tmp_path / "run"
    assert main(["-q", "train", str(data), "--out", str(run), "--size", "32", "--epochs", "1"]) == 0
    assert main(["-q", "report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "Training" in html and "<table" in html


def test_presets_are_adapted_to_the_data_and_stored(tiny_data, tmp_path):
    run = tmp_path / "run"
    assert main(["-q", "train", str(tiny_data), "--out", str(run), "--preset", "large", "--epochs", "1",
                 "--batch-size", "4"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["plan"]["preset"] == "large" and config["model"]["base_width"] == 32
    assert config["data"]["size"] == 64  # capped at the scans' own 64 px instead of the preset's 384
    assert config["plan"]["stats"]["n_pairs"] == 16


def test_cli_backend_choices_are_the_registry():
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions
                  if a.dest == "backend")
    assert action.choices == list(BACKENDS) and action.default == "auto"


def _disk_full(monkeypatch, module_names):
    """Every atomic write raises ENOSPC, the way a full disk does (wrapped by torch for checkpoints)."""
    import errno
    import importlib

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    for name in module_names:
        module = importlib.import_module(name)
        for attr in ("atomic_write", "atomic_write_bytes", "atomic_write_text", "save_png"):
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, full)


@pytest.mark.parametrize("command", ["synth", "train", "resume", "evaluate"])
def test_a_full_disk_is_one_line_and_exit_code_3(command, tiny_data, tiny_run, tmp_path, monkeypatch, capsys):
    import shutil

    args = {"synth": ["synth", str(tmp_path / "s"), "--n", "2", "--size", "32"],
            "train": ["train", str(tiny_data), "--out", str(tmp_path / "r"), "--size", "32", "--epochs", "1"],
            "resume": ["train", "--resume", str(tmp_path / "copy"), "--epochs", "3"],
            "evaluate": ["evaluate", str(tiny_run), str(tiny_data), "--out", str(tmp_path / "e")]}[command]
    shutil.copytree(tiny_run, tmp_path / "copy")
    _disk_full(monkeypatch, ["hemaseg.io", "hemaseg.models.checkpoint", "hemaseg.data.synth", "hemaseg.data.dataset",
                             "hemaseg.training.train", "hemaseg.evaluation.evaluate", "hemaseg.evaluation.report",
                             "hemaseg.config"])
    assert main(["-q", *args]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "Traceback" not in err, err


def test_out_pointing_at_a_file_and_unexpected_errors_are_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["-q", "train", str(tiny_data), "--out", str(tmp_path / "f"), "--size", "32", "--epochs", "1"]) == 2
    assert "is a file" in capsys.readouterr().err
    import hemaseg.cli as cli

    def bug(args):
        raise ZeroDivisionError("oops")

    monkeypatch.setitem(cli.COMMANDS, "check", bug)
    assert main(["-q", "check", str(tiny_data)]) == 4
    assert capsys.readouterr().err.strip() == ("hemaseg check: error: internal error: ZeroDivisionError: oops "
                                               "(run with --debug for the traceback)")
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "check", str(tiny_data)])


def test_resume_refuses_flags_that_would_change_the_run_and_accepts_moved_data(tiny_data, tiny_run, tmp_path, capsys):
    import shutil

    shutil.copytree(tiny_run, tmp_path / "run")
    assert main(["-q", "train", "--resume", str(tmp_path / "run"), "--lr", "0.5"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    shutil.copytree(tiny_data, tmp_path / "moved")
    assert main(["-q", "train", str(tmp_path / "moved"), "--resume", str(tmp_path / "run"), "--epochs", "3"]) == 0
    assert main(["-q", "train", "--resume", str(tmp_path / "run"), "--epochs", "4", "--device", "cpu",
                 "--num-workers", "0"]) == 0  # another device or loader is not another run
