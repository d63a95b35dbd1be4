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


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, epochs=3)
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
    for k in full["model"]:
        assert torch.equal(full["model"][k], cut["model"][k]), k
    assert [h["val_dice"] for h in full["history"]] == [h["val_dice"] for h in cut["history"]]


def test_a_one_minute_budget_stops_within_15_percent(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, epochs=1, budget_minutes=1.0)
    t = time.perf_counter()
    summary = fit(cfg, tmp_path / "budget", progress=False)
    wall = time.perf_counter() - t
    assert summary["epochs"] > 1  # chose more epochs than the 1 configured
    assert 0.85 * 60 <= wall <= 1.15 * 60, f"{wall:.1f} s for a 60 s budget"
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
