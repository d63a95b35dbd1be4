"""Data-parallel training: 2 CPU processes under torchrun (gloo over loopback) on tiny synthetic data.

The torchrun tests start real processes (a few seconds of imports each), so they share launches: one
runs a refused run, a full run, an interrupted run and its resume in a single job.
"""

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hemaseg.models.checkpoint import load_checkpoint
from hemaseg import distributed
from hemaseg.training.train import RUN_FILES, EpochSampler, build_loss, fit, gather_shards, global_batch_loss

from .conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]

# Each rank records every file it opens for writing, renames, creates or removes under BASE (an audit
# hook sees os.open and open alike, so atomic writes, torch.save and matplotlib are all caught).
SCRIPT = r'''
import json, os, sys
from pathlib import Path

data, base, mode, settings = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
rank = int(os.environ["RANK"])
writes = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def audit(event, args):
    if event == "open":
        path, how, flags = args
        if not (isinstance(how, str) and any(c in how for c in "wax+")) and not (flags or 0) & WRITE_FLAGS:
            return
    elif event == "os.rename":  # os.replace too: the path a file appears at
        path = args[1]
    elif event in ("os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate"):
        path = args[0]
    else:
        return
    if isinstance(path, (str, bytes, os.PathLike)) and str(os.fsdecode(path)).startswith(str(base)):
        writes.append(f"{event} {os.fsdecode(path)}")


sys.addaudithook(audit)
import torch

torch.set_num_threads(1)
from hemaseg.config import resolve_config
from hemaseg import distributed
from hemaseg.training.train import fit

cfg = resolve_config(data, "seed", None, "cpu", settings)


class Stop(Exception):
    pass


def stop_after_epoch_1(epoch, row):
    if epoch == 1:
        raise Stop


def fail_on_rank_1(epoch, row):
    if rank == 1 and mode == "crash":
        raise RuntimeError("rank 1 broke down on purpose")
    if rank == 1 and mode == "hang":
        import time
        time.sleep(600)


if mode in ("crash", "hang"):  # fit joins the job itself, as `hemaseg train` under torchrun does
    fit(cfg, base / mode, progress=False, on_epoch_end=fail_on_rank_1)
    sys.exit(0)

def record(tag, payload):
    # one write per line: both ranks share the pipe, unbuffered (PYTHONUNBUFFERED), and print() writes its
    # pieces one by one, so two ranks' lines could interleave
    sys.stdout.write(tag + " " + json.dumps(payload) + "\n")
    sys.stdout.flush()


with distributed.session(torch.device("cpu")):  # one process group for the four fits
    try:
        fit(cfg, base / "used", progress=False)
    except Exception as e:
        record("REFUSED", {"rank": rank, "error": type(e).__name__, "message": str(e)})
    fit(cfg, base / "full", progress=False)
    try:
        fit(cfg, base / "cut", progress=False, on_epoch_end=stop_after_epoch_1)
    except Stop:
        pass
    fit(cfg, base / "cut", resume=True, progress=False)
record("WRITES", {"rank": rank, "writes": writes})
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# fp32 for determinism; lr 1e-4 so that float noise is not amplified past what the test can tell apart
# (at the seed preset's 3e-3 two 1-process runs on 1 and 2 threads already differ by 3 % in L2)
SETTINGS = {"size": 32, "epochs": 3, "precision": "fp32", "lr": 1e-4, "sync_batchnorm": True}


def _torchrun(tmp_path: Path, data: Path, mode: str, timeout: float = 240,
              collective_timeout_s: float = 180) -> subprocess.CompletedProcess:
    """SCRIPT in `mode` as a 2-process job, its runs under tmp_path/runs."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    return _launch(tmp_path, [str(script), str(data), str(tmp_path / "runs"), mode,
                              json.dumps({**SETTINGS, "batch_size": 2})], timeout, collective_timeout_s)


def _launch(tmp_path: Path, program: list[str], timeout: float = 240,
            collective_timeout_s: float = 180) -> subprocess.CompletedProcess:
    cwd = tmp_path / "cwd"  # the job's working folder: nothing may appear in it
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "HEMASEG_DIST_TIMEOUT_S": str(collective_timeout_s),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "--max-restarts", "0", *program]
    return subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _lines(out: str, tag: str) -> dict[int, dict]:
    rows = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith(tag + " ")]
    return {r["rank"]: r for r in rows}


@pytest.fixture(scope="module")
def job(tiny_data, tmp_path_factory):
    """One 2-process job (2 ranks x batch 2, fp32, SyncBatchNorm) and the 1-process run at batch 4."""
    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "runs" / "used").mkdir(parents=True)
    (tmp / "runs" / "used" / "notes.txt").write_text("someone else's run")
    proc = _torchrun(tmp, tiny_data, "train")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fit(tiny_config(tiny_data, **{**SETTINGS, "batch_size": 4}), tmp / "single", progress=False)
    return tmp, proc.stdout


def test_only_rank_0_writes_and_a_refusal_on_rank_0_stops_both(job):
    tmp, out = job
    writes = _lines(out, "WRITES")
    assert writes[1]["writes"] == []
    assert any(w.endswith("/full/last.pt") for w in writes[0]["writes"])  # the audit does see the writes
    for run in ("full", "cut"):
        assert sorted(p.name for p in (tmp / "runs" / run).iterdir()) == sorted(RUN_FILES)
    assert not list((tmp / "cwd").iterdir())
    refused = _lines(out, "REFUSED")
    assert refused[0]["error"] == "RunFolderError" and "not empty" in refused[0]["message"]
    assert refused[1]["error"] == "RankFailedError" and "failed on rank 0 of 2: RunFolderError" in \
        refused[1]["message"]
    assert sorted(p.name for p in (tmp / "runs" / "used").iterdir()) == ["notes.txt"]


def _relative_l2(a: dict, b: dict, keys: list[str]) -> float:
    diff = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys)
    return (diff / sum(float((b[k].double() ** 2).sum()) for k in keys)) ** 0.5


def test_two_processes_train_the_model_one_process_trains_at_the_global_batch(job):
    """2 ranks x batch 2 = 1 process x batch 4: the same batches, the same global-batch loss and
    BatchNorm statistics; only the summation order differs.

    Measured (9 AdamW steps, inputs from the uint16 training cache): weights 1.5e-3 apart in relative L2 and
    running statistics 2.2e-3, as far as two 1-process runs of the same settings on 1 and 2 threads are
    (1.5e-3 and 2.1e-3); with the uint8 cache they were 7.5e-4 (threads 6.8e-4). The train loss agrees to 1.3e-4 (threads:
    7.4e-5), the validation Dice of a barely trained model (0.15, many pixels near the threshold) to 2.2e-3
    (threads: 4.4e-4); the tolerances sit above those floors. Before the
    cache (float32 inputs) those were 1.0e-4 and 1.0e-4; then, without SyncBatchNorm they were 6.4e-3
    apart (loss 1.4e-3), with per-rank Dice losses averaged instead of the global batch's Dice 1.4e-3."""
    tmp, _ = job
    dist_run = load_checkpoint(tmp / "runs" / "full" / "last.pt")
    single = load_checkpoint(tmp / "single" / "last.pt")
    assert dist_run["world_size"] == 2 and single["world_size"] == 1
    meta = json.loads((tmp / "runs" / "full" / "config.json").read_text())["meta"]
    assert meta["world_size"] == 2 and meta["global_batch"] == 4
    a, b = dist_run["model"], single["model"]
    assert a.keys() == b.keys()
    weights = [k for k in b if b[k].is_floating_point() and "running" not in k]
    stats = [k for k in b if "running" in k]
    assert _relative_l2(a, b, weights) < 3e-3 and _relative_l2(a, b, stats) < 3e-3
    for got, want in zip(dist_run["history"], single["history"], strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=3e-4)
        assert got["val_dice"] == pytest.approx(want["val_dice"], abs=5e-3)
        assert got["lr"] == want["lr"]


def test_a_resumed_distributed_run_equals_the_uninterrupted_one(job, tiny_data):
    tmp, _ = job
    full, cut = (load_checkpoint(tmp / "runs" / run / "last.pt") for run in ("full", "cut"))
    assert cut["epoch"] == full["epoch"] == 3
    for k in full["model"]:
        assert torch.equal(full["model"][k], cut["model"][k]), k
    assert [h["val_dice"] for h in full["history"]] == [h["val_dice"] for h in cut["history"]]
    history = json.loads((tmp / "runs" / "cut" / "config.json").read_text())["history"]
    assert [(h["event"], h["at_epoch"], h["world_size"]) for h in history] == [("resume", 1, 2)]
    # one process cannot resume it: the global batch would change
    with pytest.raises(ValueError, match="trained by 2 process"):
        fit(tiny_config(tiny_data, **{**SETTINGS, "batch_size": 2}), tmp / "runs" / "cut", resume=True,
            progress=False, epochs=4)


def test_a_rank_that_fails_mid_run_ends_the_job_with_its_error(tiny_data, tmp_path):
    proc = _torchrun(tmp_path, tiny_data, "crash", timeout=120)  # rank 0 waits for it: torchrun stops it
    assert proc.returncode != 0
    assert "rank 1 broke down on purpose" in proc.stderr and "ChildFailedError" in proc.stderr


def test_a_rank_that_hangs_ends_the_job_at_the_collective_timeout(tiny_data, tmp_path):
    t = time.monotonic()
    # rank 1 sleeps 600 s; the job must end long before (the bound leaves room for a loaded machine's start-up)
    proc = _torchrun(tmp_path, tiny_data, "hang", timeout=400, collective_timeout_s=5)
    assert proc.returncode != 0 and time.monotonic() - t < 300
    # gloo words it "Timed out waiting ... ms" or "Application timeout caused pair closure"
    assert "[rank0]" in proc.stderr and ("timed out" in proc.stderr.lower() or "timeout" in proc.stderr.lower())


# `hemaseg` commands in one 2-process job: train, predict sharded, predict --skip-existing, cv one fold per
# process. Each step's file writes are recorded per rank, as in SCRIPT.
CLI_SCRIPT = SCRIPT.split("import torch\n", 1)[0].replace(
    "data, base, mode, settings = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])",
    "steps, base, records = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])") + r"""
import torch

from hemaseg.cli import main
from hemaseg import distributed

# one process group for every command, which each join: a group created again on torchrun's store right
# after one was destroyed can read the old group's addresses (one command per job does not meet this)
with distributed.session(torch.device("cpu")) as dist:
    for tag, argv in steps:
        if tag == "rm":
            if rank == 0:  # before the command: the next one sees it on rank 0, which alone reads the folder
                Path(argv).unlink()
            continue
        writes.clear()
        code = main(argv)
        # each rank its own file: a line longer than a pipe's atomic write could interleave on a shared stdout
        with open(records / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"tag": tag, "rank": rank, "code": code, "writes": list(writes)}) + "\n")
        dist.barrier()
"""


@pytest.fixture(scope="module")
def cli_job(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "sync.json").write_text(json.dumps({"train": {"sync_batchnorm": True}}))
    scans = tmp / "scans"
    scans.mkdir()
    for i, src in enumerate(sorted((tiny_data / "images").iterdir())[:7]):
        (scans / f"s{i}.png").write_bytes(src.read_bytes())
    (scans / "s7.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # one failure, on rank 1's shard
    run, pred, cv = tmp / "run", tmp / "pred", tmp / "cv"
    small = ["--preset", "seed", "--size", "32", "--epochs", "1", "--batch-size", "2"]
    steps = [
        ["train", ["-q", "train", str(tiny_data), "--out", str(run), "--config", str(tmp / "sync.json"), *small]],
        ["predict", ["-q", "predict", str(run), str(scans), "--out", str(pred), "--backend", "torch"]],
        ["rm", str(pred / "s4_mask.png")],
        ["resume", ["-q", "predict", str(run), str(scans), "--out", str(pred), "--backend", "torch",
                    "--skip-existing"]],
        ["cv", ["-q", "cv", str(tiny_data), "--out", str(cv), "--folds", "2", *small]],
    ]
    records = tmp_path_factory.mktemp("cli_records")
    (records / "job.py").write_text(CLI_SCRIPT)
    proc = _launch(records, [str(records / "job.py"), json.dumps(steps), str(tmp), str(records)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = {}
    for rank in (0, 1):
        for line in (records / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            out.setdefault(record["tag"], {})[rank] = record
    return tmp, out, proc


def _renamed(record: dict) -> list[str]:
    """The files a rank finished (atomic writes end in a rename), by name."""
    return [Path(w.split(" ", 1)[1]).name for w in record["writes"] if w.startswith("os.rename")]


def test_hemaseg_train_runs_unchanged_under_torchrun(cli_job):
    tmp, steps, _ = cli_job
    run = tmp / "run"
    assert steps["train"][0]["code"] == steps["train"][1]["code"] == 0
    assert steps["train"][1]["writes"] == []
    assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES)
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["sync_batchnorm"] and saved["meta"]["world_size"] == 2
    assert json.loads((run / "summary.json").read_text())["images_seen"] == 12  # 3 steps x 2 ranks x 2


def test_predict_under_torchrun_writes_each_output_once_and_rank_0_merges_the_tables(cli_job):
    tmp, steps, _ = cli_job
    pred = tmp / "pred"
    scans = [str(tmp / "scans" / f"s{i}.png") for i in range(8)]
    by_rank = {r: _renamed(steps["predict"][r]) for r in (0, 1)}
    masks = sorted(n for r in (0, 1) for n in by_rank[r] if n.endswith("_mask.png"))
    assert masks == [f"s{i}_mask.png" for i in range(7)]  # each good scan written once, by one rank
    assert {n for n in by_rank[1] if n.endswith("_mask.png")} == {"s1_mask.png", "s3_mask.png", "s5_mask.png"}
    assert not {"predictions.csv", "manifest.jsonl", "errors.csv"} & set(by_rank[1])
    assert steps["predict"][0]["code"] == 1  # a scan failed (s7, on rank 1): rank 0 reports it for the job
    with open(pred / "predictions.csv", newline="") as f:
        assert [row["image"] for row in csv.DictReader(f)] == scans[:7]  # input order, whichever rank did it
    assert "s7.png" in (pred / "errors.csv").read_text()
    entries = [json.loads(line) for line in (pred / "manifest.jsonl").read_text().splitlines()[1:]]
    assert [(e["input"], e["order"], e["rank"]) for e in entries] == [(s, i, i % 2) for i, s in enumerate(scans)]
    assert not list(pred.glob("manifest.part*"))


def test_an_interrupted_archive_job_resumes_under_torchrun_with_skip_existing(cli_job):
    tmp, steps, _ = cli_job
    redone = sorted(n for r in (0, 1) for n in _renamed(steps["resume"][r]) if n.endswith("_mask.png"))
    assert redone == ["s4_mask.png"]  # its mask was gone; the failed s7 was tried again and failed again
    assert (tmp / "pred" / "s4_mask.png").is_file()
    with open(tmp / "pred" / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 7


def test_cv_under_torchrun_trains_one_fold_per_process_and_rank_0_evaluates(cli_job):
    tmp, steps, _ = cli_job
    cv = tmp / "cv"
    assert steps["cv"][0]["code"] == steps["cv"][1]["code"] == 0

    def tops(record):  # the entries of the cv folder a rank wrote in (or created)
        paths = [Path(w.split(" ", 1)[1]) for w in record["writes"]]
        return {p.relative_to(cv).parts[0] if p != cv else "." for p in paths if p.is_relative_to(cv)}

    assert tops(steps["cv"][1]) == {"fold_1"}  # rank 1 trained fold 2 and wrote nothing else
    rank0 = tops(steps["cv"][0])
    assert "fold_0" in rank0 and "fold_1" not in rank0 and "cv_summary.json" in rank0
    for k in (0, 1):
        assert json.loads((cv / f"fold_{k}" / "config.json").read_text())["meta"]["world_size"] == 1


# --- the pieces, in one process --------------------------------------------------------------------


def test_the_ranks_share_of_an_epoch_is_the_single_process_batches():
    n, b, world = 13, 2, 2
    order = [i for _, i in EpochSampler(n, seed=5)]
    steps = n // (b * world)
    shards = [[i for _, i in EpochSampler(n, 5, r, world, keep=steps * b * world)] for r in range(world)]
    assert all(len(s) == steps * b for s in shards)
    for k in range(steps):  # the ranks' step k together = the single process's step k at batch b x world
        together = [i for s in shards for i in s[k * b:(k + 1) * b]]
        assert sorted(together) == sorted(order[k * b * world:(k + 1) * b * world])
    small = [[i for _, i in EpochSampler(3, 5, r, world)] for r in range(world)]  # fewer than a batch
    assert sorted(small[0] + small[1]) == [0, 1, 2] and len(small[0]) == 2


def test_validation_dice_is_the_mean_over_images_not_of_the_ranks_means():
    scores = np.array([1.0, 0.0, 1.0, np.nan, 1.0])  # rank 0 scores images 0, 2, 4; rank 1 images 1, 3
    parts = [list(scores[0::2]), list(scores[1::2])]
    gathered = gather_shards(parts, 5)
    np.testing.assert_array_equal(gathered, scores)
    assert np.nanmean(gathered) == 0.75  # while the mean of the ranks' means is (1 + 0) / 2


@pytest.mark.parametrize("loss", ["dice_bce", "dice_focal"])
def test_the_global_batch_loss_is_the_loss_in_one_process(tiny_data, loss):
    loss_fn = build_loss(tiny_config(tiny_data, loss=loss).train)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=g, requires_grad=True)
    target = (torch.rand(3, 1, 8, 8, generator=g) > 0.6).float()
    ours = global_batch_loss(loss_fn, logits, target, share=1.0)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    monai = loss_fn(logits, target)
    (grad_monai,) = torch.autograd.grad(monai, logits)
    torch.testing.assert_close(ours, monai)
    torch.testing.assert_close(grad_ours, grad_monai)


def test_jobs_that_work_apart_wait_for_their_slowest_process_far_longer_than_a_training_step():
    assert distributed.wait_timeout_s({}) == distributed.DEFAULT_WAIT_S >= 24 * 3600 > distributed.DEFAULT_TIMEOUT_S
    assert distributed.wait_timeout_s({"HEMASEG_DIST_WAIT_S": "90"}) == 90.0


def test_without_torchrun_a_run_is_a_single_process_and_sync_batchnorm_is_batchnorm():
    ctx = distributed.from_environment(torch.device("cpu"), environ={})
    assert ctx is distributed.SINGLE and ctx.is_main and not ctx.active
    assert ctx.broadcast(x := object()) is x and ctx.all_gather(3) == [3] and ctx.sum(2.5) == 2.5
    with pytest.raises(KeyError), ctx.agreed("a step"):
        raise KeyError("its own error, unchanged")
    with pytest.raises(ValueError, match="RANK is not"):
        distributed.from_environment(torch.device("cpu"), environ={"WORLD_SIZE": "2"})
    bn = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    ref.load_state_dict(bn.state_dict())
    assert distributed.convert_sync_batchnorm(bn) == 1 and isinstance(bn[1], distributed.SyncBatchNorm2d)
    x = torch.randn(4, 1, 6, 6)
    torch.testing.assert_close(bn(x), ref(x), rtol=0, atol=0)
    assert bn.state_dict().keys() == ref.state_dict().keys()
