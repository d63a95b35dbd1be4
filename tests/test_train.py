import json
import time

import pytest
import torch

from hemaseg.models.checkpoint import load_checkpoint
from hemaseg.config import TrainConfig
from hemaseg.data.dataset import load_split
from hemaseg.training.train import fit, lr_factor

from .conftest import tiny_config


def test_run_folder_has_every_artifact(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"config.json", "splits.json", "best.pt", "last.pt", "metrics.csv", "curves.png", "summary.json"} <= names
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["meta"]["data_fingerprint"] and config["meta"]["torch_version"] == torch.__version__
    split = load_split(tiny_run / "splits.json")
    assert not set(split["train"]) & set(split["val"]) and len(split["train"]) + len(split["val"]) == 16
    rows = (tiny_run / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,lr,train_loss,val_dice") and len(rows) == 3
    last = load_checkpoint(tiny_run / "last.pt")
    assert {"optimizer", "scheduler", "rng", "history"} <= set(last) and last["epoch"] == 2


def test_same_seed_same_metrics_on_cpu(tiny_data, tiny_run, tmp_path):
    fit(tiny_config(tiny_data), tmp_path / "again", progress=False)
    a, b = load_checkpoint(tiny_run / "last.pt"), load_checkpoint(tmp_path / "again" / "last.pt")
    assert a["history"] == [{**h, "epoch_s": h2["epoch_s"], "elapsed_s": h2["elapsed_s"]}
                            for h, h2 in zip(b["history"], a["history"])]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("ema_decay, augment_on", [(0.0, "loader"), (0.9, "loader"), (0.0, "batch")])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_data, tmp_path, ema_decay, augment_on):
    cfg = tiny_config(tiny_data, epochs=3, ema_decay=ema_decay, augment_on=augment_on)
    fit(cfg, tmp_path / "full", progress=False)

    class Stop(Exception):
        pass

    def interrupt(epoch, row):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(cfg, tmp_path / "cut", progress=False, on_epoch_end=interrupt)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    fit(cfg, tmp_path / "cut", resume=True, progress=False)
    full, cut = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert cut["epoch"] == full["epoch"] == 3
    for key in ("model", "train_model") if ema_decay else ("model",):
        for k in full[key]:
            assert torch.equal(full[key][k], cut[key][k]), (key, k)
    assert [h["val_dice"] for h in full["history"]] == [h["val_dice"] for h in cut["history"]]


def test_ema_checkpoints_hold_the_average_and_training_resumes_from_the_raw_weights(tiny_data, tmp_path):
    fit(tiny_config(tiny_data, epochs=2, ema_decay=0.9), tmp_path / "ema", progress=False)
    last = load_checkpoint(tmp_path / "ema" / "last.pt")
    assert int(last["ema"]["n_averaged"]) == 2 * 3  # one update per step: 13 training scans // batch 4 = 3 steps
    weights = [k for k, v in last["model"].items() if v.is_floating_point() and "running" not in k]
    assert all(torch.equal(last["model"][k], last["ema"][f"module.{k}"]) for k in last["model"])
    assert any(not torch.equal(last["model"][k], last["train_model"][k]) for k in weights)


def test_ema_update_warms_its_decay_up_and_copies_integer_buffers():
    from hemaseg.training.train import ema_update

    update = ema_update(0.99)
    avg, new = [torch.zeros(2)], [torch.ones(2)]
    update(avg, new, torch.tensor(1))  # decay min(0.99, 2 / 11): the average moves 9/11 of the way
    assert torch.allclose(avg[0], torch.full((2,), 9 / 11))
    avg = [torch.zeros(2)]
    update(avg, new, torch.tensor(10**6))  # long after warm-up: the configured decay
    assert torch.allclose(avg[0], torch.full((2,), 0.01))
    counts = [torch.tensor(3)]
    update(counts, [torch.tensor(7)], torch.tensor(5))
    assert int(counts[0]) == 7


def test_a_budget_in_images_seen_fixes_the_epochs_whatever_the_clock(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, epochs=1, budget_images=50)  # 13 training scans, batch 4: 12 images an epoch
    summary = fit(cfg, tmp_path / "run", progress=False)
    assert summary["epochs"] == 4 and summary["images_seen"] == 48 and summary["budget_images"] == 50
    with pytest.raises(ValueError, match="not both"):
        tiny_config(tiny_data, budget_images=50, budget_minutes=1.0)


@pytest.mark.parametrize("augment_on", ["loader", "batch"])  # batch: the CUDA default, which once ignored it
def test_a_budget_fits_the_epochs_to_the_time_on_a_fake_clock(tiny_data, tmp_path, augment_on):
    """Every clock reading advances 1 s, so an epoch 'takes' a fixed time whatever the machine does."""
    ticks = iter(range(10**6))
    cfg = tiny_config(tiny_data, epochs=1, budget_minutes=0.5, augment_on=augment_on)
    summary = fit(cfg, tmp_path / "run", progress=False,
                  clock=lambda: float(next(ticks)))
    history = load_checkpoint(tmp_path / "run" / "last.pt")["history"]
    per_epoch = history[2]["elapsed_s"] - history[1]["elapsed_s"]  # wall time per epoch, checkpoints included
    assert summary["epochs"] == len(history) > 3
    assert 30 - 2 * per_epoch < history[-1]["elapsed_s"] <= 30


@pytest.mark.slow
def test_a_20_second_budget_stops_within_15_percent(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, epochs=1, budget_minutes=20 / 60)
    t = time.perf_counter()
    summary = fit(cfg, tmp_path / "budget", progress=False)
    wall = time.perf_counter() - t
    assert summary["epochs"] > 1  # chose more epochs than the 1 configured
    assert 0.85 * 20 <= wall <= 1.15 * 20, f"{wall:.1f} s for a 20 s budget"
    last = load_checkpoint(tmp_path / "budget" / "last.pt")
    assert last["planned_epochs"] == summary["epochs"] == last["epoch"]  # the run records what it chose


def test_warmup_then_cosine_schedule():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)


def test_groups_from_the_manifest_never_span_train_and_val(tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    names = sorted(p.stem for p in (data / "images").iterdir())
    groups = {n: f"g{int(n) % 5}" for n in names}  # 5 groups of 3-4 near-duplicate scans
    (data / "manifest.csv").write_text("name,dup_group\n" + "".join(f"{n}.png,{g}\n" for n, g in groups.items()))
    fit(tiny_config(data, epochs=1), tmp_path / "run", progress=False)
    split = load_split(tmp_path / "run" / "splits.json")
    train_groups = {groups[n] for n in split["train"]}
    assert train_groups.isdisjoint(groups[n] for n in split["val"])


def test_precision_is_validated_and_bf16_trains_where_native(tiny_data, tmp_path):
    from hemaseg.device import bf16_supported
    from hemaseg.config import TrainConfig

    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")
    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    summary = fit(tiny_config(tiny_data, epochs=1, precision="bf16"), tmp_path / "bf16", progress=False)
    assert summary["epochs"] == 1 and summary["n_train"] > 0


def test_single_threaded_batches_match_the_loader_and_restore_threads():
    from torch.utils.data import DataLoader

    from hemaseg.training.train import single_threaded_batches

    loader = DataLoader(torch.arange(10.0), batch_size=4)
    threads = torch.get_num_threads()
    assert [b.tolist() for b in single_threaded_batches(loader)] == [b.tolist() for b in loader]
    assert torch.get_num_threads() == threads


def test_worker_processes_train_the_same_model_as_the_main_process(tiny_data, tmp_path):
    """Persistent loader workers must see each epoch's seeds: same batches, same weights."""
    fit(tiny_config(tiny_data, epochs=2), tmp_path / "main", progress=False)
    fit(tiny_config(tiny_data, epochs=2, num_workers=2), tmp_path / "workers", progress=False)
    a, b = load_checkpoint(tmp_path / "main" / "last.pt"), load_checkpoint(tmp_path / "workers" / "last.pt")
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_checkpoints_are_flushed_at_most_once_a_period_but_always_at_the_end(tiny_data, tmp_path):
    seen = []
    fit(tiny_config(tiny_data, epochs=3, checkpoint_every_s=3600.0), tmp_path / "run", progress=False,
        on_epoch_end=lambda epoch, row: seen.append(load_checkpoint(tmp_path / "run" / "last.pt")["epoch"]))
    assert seen == [1, 1, 3]  # first epoch, then nothing until the last
    # best.pt, held in memory between flushes, is the best epoch of the whole run
    history = load_checkpoint(tmp_path / "run" / "last.pt")["history"]
    best_epoch = max(history, key=lambda h: (h["val_dice"], -h["epoch"]))["epoch"]
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == best_epoch


def test_loader_workers_default_to_none_on_the_cpu_and_some_on_cuda():
    from hemaseg.training.train import loader_workers

    assert loader_workers(None, torch.device("cpu")) == 0
    assert 1 <= loader_workers(None, torch.device("cuda")) <= 4
    assert loader_workers(3, torch.device("cpu")) == 3  # an explicit choice wins
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        TrainConfig(num_workers=-1)


def test_auto_precision_uses_bf16_exactly_where_it_is_native_and_records_it(tiny_data, tmp_path):
    from hemaseg.device import bf16_supported
    from hemaseg.training.train import use_bf16

    cpu = torch.device("cpu")
    assert use_bf16("auto", cpu) == bf16_supported(cpu)
    assert use_bf16("fp32", cpu) is False
    fit(tiny_config(tiny_data, epochs=1), tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "config.json").read_text())["meta"]
    assert meta["bf16_autocast"] == bf16_supported(cpu)


def test_a_model_learns_a_handful_of_scans(tmp_path):
    """Overfitting 8 synthetic scans must reach a high Dice in seconds: the whole loop learns."""
    from hemaseg.data.synth import write_synthetic_dataset
    from hemaseg.training.train import train_model

    import hemaseg
    from hemaseg.evaluation.evaluate import evaluate

    data = write_synthetic_dataset(tmp_path / "data", 10, size=32, seed=5, progress=False)
    split = {"train": [str(i) for i in range(1, 9)], "val": ["9", "10"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    train_model(data, tmp_path / "run", preset="seed", size=32, epochs=100, batch_size=2, lr=1e-2,
                augment=False, split_file=str(tmp_path / "split.json"), progress=False)
    model = hemaseg.load_model(tmp_path / "run" / "last.pt", device="cpu")
    result = evaluate(model, data, names=split["train"], progress=False)
    assert result["summary"]["dice_mean"] > 0.9, result["summary"]["dice_mean"]


def test_a_fresh_run_into_a_used_folder_is_refused_unless_overwrite(tiny_data, tiny_run, tmp_path):
    import shutil

    from hemaseg.training.train import RunFolderError

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "splits.json").read_text()
    with pytest.raises(RunFolderError, match="not empty.*--overwrite"):
        fit(tiny_config(tiny_data, epochs=1, val_fraction=0.5, split_seed=7), run, progress=False)
    assert (run / "splits.json").read_text() == before  # nothing touched
    fit(tiny_config(tiny_data, epochs=1, val_fraction=0.5, split_seed=7), run, progress=False, overwrite=True)
    split = load_split(run / "splits.json")
    assert len(split["val"]) == 8  # the new settings' split, not the old folder's
    with pytest.raises(NotADirectoryError, match="is a file"):
        fit(tiny_config(tiny_data, epochs=1), run / "config.json", progress=False)


def test_a_failed_run_writes_nothing_and_a_rerun_after_fixing_the_data_works(tiny_data, tmp_path):
    import shutil

    from hemaseg.data.images import DataError

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "images" / "3.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="3.png"):
        fit(tiny_config(data, epochs=1), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    (data / "images" / "3.png").unlink()
    (data / "mask" / "3.png").unlink()
    fit(tiny_config(data, epochs=1), tmp_path / "run", progress=False)
    assert len(sum(load_split(tmp_path / "run" / "splits.json").values(), [])) == 15


def test_resume_refuses_changed_data_and_settings_and_records_what_it_accepts(tiny_data, tmp_path):
    import shutil

    import numpy as np
    from PIL import Image

    from hemaseg.training.train import RunFolderError

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_data, data)
    cfg = tiny_config(data, epochs=2)
    fit(cfg, run, progress=False)
    original = json.loads((run / "config.json").read_text())
    img = np.asarray(Image.open(data / "images" / "5.png")).copy()
    img[0, 0] ^= 255
    Image.fromarray(img).save(data / "images" / "5.png")  # same names, other pixels
    with pytest.raises(RunFolderError, match="data changed .* same scan names, different file contents"):
        fit(cfg, run, resume=True, progress=False, epochs=3)
    with pytest.raises(RunFolderError, match=r"changed: lr 0.003 -> 0.1"):
        fit(tiny_config(data, epochs=2, lr=0.1), run, resume=True, progress=False, allow_changed_data=True)
    with pytest.raises(RunFolderError, match="already trained 2 epochs"):
        fit(cfg, run, resume=True, progress=False, epochs=1, allow_changed_data=True)
    fit(cfg, run, resume=True, progress=False, epochs=3, allow_changed_data=True)
    saved = json.loads((run / "config.json").read_text())
    assert {k: saved[k] for k in ("data", "model", "train")} == {k: original[k] for k in ("data", "model", "train")}
    assert [h["event"] for h in saved["history"]] == ["resume"] and saved["history"][0]["allow_changed_data"]
    assert load_checkpoint(run / "last.pt")["epoch"] == 3


def test_stale_temp_files_of_a_killed_write_are_removed_at_the_next_start(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, epochs=1)
    fit(cfg, tmp_path / "run", progress=False)
    (tmp_path / "run" / ".last.pt.abcd1234.tmp").write_bytes(b"half a checkpoint")
    fit(cfg, tmp_path / "run", resume=True, progress=False, epochs=2)
    assert not list((tmp_path / "run").glob("*.tmp"))


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_never_costs_the_run(tiny_data, tmp_path):
    """Three SIGKILLs, each while a checkpoint is half written (writes are slowed so the kill lands inside
    one); every restart resumes; the final model equals an uninterrupted run's, and no temp is left."""
    import os
    import signal
    import subprocess
    import sys

    epochs, n_kills = 6, 3
    script = f"""
import sys, time, hemaseg.io as io
real = io.atomic_write
def slow(path, write, fsync=True):
    def halves(f):
        write(f); f.flush(); time.sleep(0.4)
    return real(path, halves, fsync)
io.atomic_write = slow
import hemaseg.models.checkpoint as ck
ck.atomic_write = slow
import torch; torch.set_num_threads(1)
from hemaseg.config import resolve_config
from hemaseg.training.train import fit
cfg = resolve_config({str(tiny_data)!r}, "seed", None, "cpu",
                     {{"size": 32, "epochs": {epochs}, "batch_size": 4, "checkpoint_every_s": 0}})
resume = sys.argv[1] == "resume"
fit(cfg, {str(tmp_path / 'killed')!r}, resume=resume, overwrite=not resume, progress=False)
"""
    run = tmp_path / "killed"
    kills = 0
    for attempt in range(40):
        resume = (run / "last.pt").is_file()
        proc = subprocess.Popen([sys.executable, "-c", script, "resume" if resume else "fresh"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if kills < n_kills and list(run.glob(".last.pt.*.tmp")):  # a checkpoint is being written now
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.wait(timeout=120)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert kills == n_kills and proc.returncode == 0
    assert not list(run.glob("*.tmp"))
    fit(tiny_config(tiny_data, epochs=epochs, checkpoint_every_s=0), tmp_path / "whole", progress=False)
    killed, whole = load_checkpoint(run / "last.pt"), load_checkpoint(tmp_path / "whole" / "last.pt")
    assert killed["epoch"] == whole["epoch"] == epochs
    for k in whole["model"]:
        assert torch.equal(killed["model"][k], whole["model"][k]), k


def test_train_decodes_each_file_once_and_again_only_to_build_the_cache(tiny_data, tmp_path, monkeypatch):
    """Plan statistics and fingerprint come from one pass over the data; the training cache is built from
    a second one the first time (the pixels are not kept: data may not fit in memory), then reused."""
    import hemaseg.data.dataset as dataset
    from hemaseg.training.train import train_model

    monkeypatch.setenv("HEMASEG_CACHE_DIR", str(tmp_path / "cache"))
    # the review decision fitted after training reads the validation scans at full size once more: not
    # the training data path counted here (training/review.py has its own tests)
    monkeypatch.setattr("hemaseg.training.train.decide_on_validation", lambda *a, **k: {})
    opened = []
    real = dataset.open_image
    monkeypatch.setattr(dataset, "open_image", lambda *a, **k: opened.append(1) or real(*a, **k))
    real_decode = dataset.decode_image
    monkeypatch.setattr(dataset, "decode_image", lambda *a, **k: opened.append(1) or real_decode(*a, **k))
    cached = []
    real_load = dataset.load_sample
    monkeypatch.setattr(dataset, "load_sample", lambda *a, **k: cached.append(1) or real_load(*a, **k))
    train_model(tiny_data, tmp_path / "run", preset="seed", size=32, epochs=1, progress=False)
    assert len(cached) == 16  # each pair decoded once more, to build the cache
    opened.clear(), cached.clear()
    train_model(tiny_data, tmp_path / "run2", preset="seed", size=32, epochs=1, progress=False)
    assert len(opened) == 32 and not cached  # another run on the same data and size: the cache is reused
