"""Data-parallel scale-out: W processes train what one process trains at the same global batch. How fast?

    python benchmarks/scale.py                 # CPU: 1 vs 2 processes, gloo over loopback -> results/scale_cpu.json
    python benchmarks/scale.py --device cuda   # 1 vs 2, 4, 8 GPUs (NCCL; default with 2+ GPUs) -> scale_cuda.json
    python benchmarks/scale.py --procs 1,2,4 --global-batch 16 --tag b16                 # -> scale_cpu_b16.json
    python benchmarks/scale.py --data ../shared/data/busi --size 256 --epochs 3 --tag busi    # real data
    nice -n 19 python benchmarks/scale.py --n 24 --size 32 --epochs 2 --repeats 1 --out /tmp/scale_smoke.json

Every world size W in --procs trains the same run: preset --preset (default `default`, the project's
recipe: fine-tuned from the packaged ultrasound model, so a few epochs give a Dice worth comparing;
`seed` from scratch stayed at Dice 0 for 10 epochs on 96 px synthetic scans), input --size, --epochs
epochs (not a time budget: every run does the same work), fp32, seed 0, global batch --global-batch G
= W processes x G/W, BatchNorm synchronised over the processes. W = 1 is a plain
`python -m hemaseg.cli train DATA --batch-size G ...`, W > 1
`python -m torch.distributed.run --nproc-per-node W --master-addr 127.0.0.1 --master-port P
--max-restarts 0 -m hemaseg.cli train DATA --batch-size G/W --sync-batchnorm ...`. On the CPU each
process gets OMP_NUM_THREADS = CPUs // W (W = 1: all of them) and gloo talks over `lo`; on CUDA
process k trains on cuda:k over NCCL, with torch's and torchrun's own thread settings. The data is
`hemaseg synth` scans (--n of them, --size px square, written once to a temp folder) or --data DIR.

Speed: every W runs --repeats times in ABBA order (1, W, W, 1, 1, W ...), so a drifting shared host
hits both sides alike. Per run: epoch_s = the median of metrics.csv's epoch_s without epoch 1 (warm-up),
validation included (it is sharded too); train_s (summary.json); launch_s, the whole command (imports and
rendezvous included); img/s = training images per epoch / epoch_s. Per W, medians over the repeats:
speed-up = epoch_s(1) / epoch_s(W), efficiency = speed-up / W.

Agreement, two checks against the one-process run (exit status 1 when one fails):
- final val Dice of the speed runs: |last_val_dice(W) - last_val_dice(1)| of the same repeat <=
  --dice-tolerance (default 0.02: a tenth of the ~0.2 these short runs reach; 1 vs 2 processes measured
  0.0015 apart here);
- final weights (RUN/last.pt "model", BatchNorm running statistics apart) of extra --check-epochs (1)
  runs at lr --check-lr (1e-4): d = ||w(W) - w(1)|| / ||w(1) - w0||, the distance as a share of how far
  training moved the weights from their start w0 (a run at lr 1e-30: hemaseg's own initialisation), so
  d means the same for a pretrained model, whose weights barely move, as for one from scratch.
  d <= --tolerance (default 0.25). Measured on 2 CPU cores: float rounding alone (one process on 1
  vs 2 threads, the `floor` printed with each result) 0.011 (`default`, 96 px, 20 steps) and 0.077
  (`seed`, 32 px, 8 steps); 2 processes with SyncBatchNorm 0.007 and 0.078; without it 1.2 and 1.35.
  Why not the speed runs' weights (their d is recorded, not checked): at a training learning rate the
  trajectories part (AdamW's normalised steps turn tiny gradient differences into full-size updates):
  `seed` at lr 3e-3, one process on 1 vs 2 threads was 0.19 apart in ||a - b|| / ||b|| after 32 steps,
  as far as 2 processes were from 1. tests/test_distributed.py measured ||a - b|| / ||b|| = 1e-4 at lr
  1e-4 after 9 steps (6.4e-3 without SyncBatchNorm). On CUDA the floor is the same run again (cuDNN is not
  deterministic) and the check runs set NVIDIA_TF32_OVERRIDE=0 (torch lets cuDNN use TF32 in fp32).
Prints a table and writes benchmarks/results/scale_<device>[_<tag>].json (--out: elsewhere) with every
run's raw figures, the CPU model (hemaseg.device.describe_cpu), GPU and torch version.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, ROOT, hardware, table

from hemaseg.device import available_cpus
from hemaseg.io import atomic_write_text, json_safe
from hemaseg.models.checkpoint import load_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: dict | None = None) -> dict:
    """This environment with the repository importable (a checkout that is not pip-installed), plus `extra`."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def run(cmd: list[str], env: dict, timeout: float, what: str, done: Path | None = None) -> tuple[float, int]:
    """Run `cmd`; return (wall seconds, exit status). A failure or timeout prints the output's tail and
    exits 1, unless `done` exists: the work finished and a process failed on its way out (a torchrun
    rank was seen to abort at exit once the run folder was complete); then it warns and returns."""
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        sys.exit(f"{what}: timed out after {timeout:.0f} s\n{err[-3000:]}")
    if proc.returncode != 0:
        tail = f"{what}: exit {proc.returncode}\n$ {' '.join(cmd)}\n{proc.stdout[-1500:]}{proc.stderr[-3000:]}"
        if done is None or not done.is_file():
            sys.exit(tail)
        print(f"WARNING: {tail}\nWARNING: {done} was written: the run's figures are kept; exit status 1",
              file=sys.stderr, flush=True)
    return time.perf_counter() - t, proc.returncode


def train(args, data: Path, out: Path, w: int, threads: int | None, epochs: int, lr: float | None,
          env: dict | None = None) -> dict:
    """One training run by W processes; its figures from summary.json and metrics.csv."""
    argv = ["-q", "train", str(data), "--out", str(out), "--preset", args.preset, "--size", str(args.size),
            "--epochs", str(epochs), "--batch-size", str(args.global_batch // w), "--precision", "fp32",
            "--device", args.device, "--seed", "0"]
    argv += ["--lr", str(lr)] if lr else []
    argv += ["--num-workers", str(args.workers)] if args.workers is not None else []
    argv += ["--sync-batchnorm"] if args.sync_batchnorm else []  # a no-op for W = 1
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(w), "--master-addr",
                "127.0.0.1", "--master-port", str(free_port()), "--max-restarts", "0"] if w > 1 else \
        [sys.executable]
    if threads is not None:  # the CPU: its cores shared out between the processes; gloo over loopback
        env = {**(env or {}), "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    launch_s, code = run([*launcher, "-m", "hemaseg.cli", *argv], child_env(env), args.timeout,
                         f"training with {w} process(es)", done=out / "summary.json")  # rank 0 writes it last
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "metrics.csv", newline="") as f:
        epoch_s = [float(r["epoch_s"]) for r in csv.DictReader(f)]
    steady = statistics.median(epoch_s[1:] or epoch_s)
    return {"world_size": w, "threads_per_process": threads, "batch_per_process": args.global_batch // w,
            "epoch_s": round(steady, 3), "epoch_s_all": epoch_s, "train_s": summary["train_s"],
            "launch_s": round(launch_s, 1), "exit_code": code,
            "images_per_s": round(summary["images_seen"] / summary["epochs"] / steady, 1),
            "images_seen": summary["images_seen"], "last_val_dice": summary["last_val_dice"],
            "best_val_dice": summary["best_val_dice"], "run": out.name}


def relative_l2(run: Path, reference: Path, init: Path) -> dict:
    """How far apart two runs' final weights are (last.pt "model"; parameters, BatchNorm running statistics
    apart): relative to the reference's weights, ||a - b|| / ||b||, and to how far the reference moved in
    training, ||a - b|| / ||b - w0||, w0 = `init`'s (the same seed: both runs start there)."""
    a, b, w0 = (load_checkpoint(r / "last.pt")["model"] for r in (run, reference, init))
    keys = [k for k in b if b[k].is_floating_point() and "running" not in k]

    def norm(x, y=None):  # ||x - y|| over `keys`, in float64
        return sum(float(((x[k].double() - (0 if y is None else y[k].double())) ** 2).sum()) for k in keys) ** 0.5

    apart = norm(a, b)
    return {"rel_l2_weights": apart / max(norm(b), 1e-30), "rel_l2_update": apart / max(norm(b, w0), 1e-30)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.device_count() > 1 else "cpu",
                   help="default: cuda where 2 or more GPUs are visible, else cpu")
    p.add_argument("--procs", help="world sizes, comma-separated, 1 first (default: 1,2 on the CPU; on CUDA "
                                   "1, 2, 4, 8 up to the GPUs present, and their number if it divides G)")
    p.add_argument("--global-batch", type=int, help="G, images per step over all processes (CPU 8, CUDA 32)")
    p.add_argument("--preset", default="default", help="hemaseg train --preset (default: default)")
    p.add_argument("--size", type=int, help="input size in px, also of the synthetic scans (CPU 96, CUDA 256)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per speed run (default 4)")
    p.add_argument("--lr", type=float, help="peak learning rate of the speed runs (default: the preset's)")
    p.add_argument("--workers", type=int, help="hemaseg train --num-workers per process (default: hemaseg's)")
    p.add_argument("--no-sync-batchnorm", dest="sync_batchnorm", action="store_false",
                   help="per-process BatchNorm statistics (DDP's default): other math, to compare")
    p.add_argument("--repeats", type=int, default=3, help="speed runs of each world size (default 3)")
    p.add_argument("--data", type=Path, help="a dataset folder instead of synthetic scans")
    p.add_argument("--n", type=int, help="synthetic scans (CPU 200, CUDA 800)")
    p.add_argument("--dice-tolerance", type=float, default=0.02, help="max |final val Dice - W=1's| (0.02)")
    p.add_argument("--tolerance", type=float, default=0.25, help="max ||w(W) - w(1)|| / ||w(1) - w0|| of the "
                                                                 "check runs' final weights (default 0.25)")
    p.add_argument("--check-lr", type=float, default=1e-4, help="learning rate of the check runs (1e-4)")
    p.add_argument("--check-epochs", type=int, default=1, help="epochs of the check runs (1)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per training run (default 1800)")
    p.add_argument("--workdir", type=Path, help="keep data and runs here (default: a temp folder, removed)")
    p.add_argument("--tag", default="", help="suffix of the result file")
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/scale_<device>[_<tag>].json)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    gpus = torch.cuda.device_count() if cuda else 0
    if cuda and gpus < 2 and not args.procs:  # NCCL refuses two ranks on one GPU
        p.error(f"--device cuda: {gpus} GPU(s) visible to torch, nothing to scale out to (2 or more needed)")
    args.global_batch = args.global_batch or (32 if cuda else 8)
    args.size, args.n = args.size or (256 if cuda else 96), args.n or (800 if cuda else 200)
    if args.procs:
        procs = [int(w) for w in args.procs.split(",")]
    else:
        top = gpus if cuda else 2
        procs = sorted({w for w in (1, 2, 4, 8, top) if w <= top and args.global_batch % w == 0})
    if procs[0] != 1 or len(procs) < 2 or len(set(procs)) < len(procs):
        p.error(f"--procs must start with 1 and name other world sizes, each once; got {procs}")
    if bad := [w for w in procs if args.global_batch % w]:
        p.error(f"--global-batch {args.global_batch} is not divisible by {bad}: each process takes G/W images")
    if cuda and max(procs) > gpus:
        p.error(f"--procs {max(procs)} > the {gpus} GPUs present")
    cpus = available_cpus()
    threads = {w: None if cuda else max(1, cpus // w) for w in procs}
    hw = hardware()
    print(f"{hw['cpu']} ({cpus} CPUs){f', {gpus} x ' + hw['gpu'] if cuda else ''}; torch {torch.__version__}; "
          f"{args.device}, W = {procs}, global batch {args.global_batch}, preset {args.preset}, {args.size} px, "
          f"{args.epochs} epochs, fp32, BatchNorm {'synchronised' if args.sync_batchnorm else 'per process'}",
          flush=True)
    if not cuda:
        print("threads per process (OMP_NUM_THREADS): " + ", ".join(f"W={w}: {t}" for w, t in threads.items())
              + ("  (more processes than CPUs: oversubscribed)" if max(procs) > cpus else ""), flush=True)

    with tempfile.TemporaryDirectory(prefix="hemaseg-scale-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = args.data
        if data is None and not ((data := work / "data") / "images").is_dir():
            run([sys.executable, "-m", "hemaseg.cli", "-q", "synth", str(data), "--n", str(args.n), "--size",
                 str(args.size), "--seed", "0"], child_env(), 600, "hemaseg synth")
        # the weights check: short low-lr runs; w0 (a run at lr 1e-30 moves no weight by a representable
        # amount: the initial weights, by hemaseg's own code); the float-noise floor (one process once more)
        check_env = {"NVIDIA_TF32_OVERRIDE": "0"} if cuda else {}
        checks = {}
        for w, name, t, lr in [(1, "w1", threads[1], args.check_lr), (1, "init", threads[1], 1e-30),
                               (1, "floor", threads[procs[-1]], args.check_lr)] + \
                [(w, f"w{w}", threads[w], args.check_lr) for w in procs[1:]]:
            checks[name] = train(args, data, work / f"check_{name}", w, t, args.check_epochs, lr, check_env)
        for name in ["floor"] + [f"w{w}" for w in procs[1:]]:
            checks[name].update(relative_l2(work / f"check_{name}", work / "check_w1", work / "check_init"))
        floor = checks["floor"]["rel_l2_update"]
        print(f"  check runs ({args.check_epochs} epoch(s), lr {args.check_lr}): d vs W=1 " +
              ", ".join(f"W={w}: {checks[f'w{w}']['rel_l2_update']:.2e}" for w in procs[1:]) +
              f"; floor (1 process again{'' if cuda else f' on {threads[procs[-1]]} thread(s)'}): {floor:.2e}",
              flush=True)
        runs: list[dict] = []
        for r in range(args.repeats):
            for w in procs if r % 2 == 0 else procs[::-1]:  # ABBA: a linear drift cancels out
                runs.append({"repeat": r, **train(args, data, work / f"r{r}_w{w}", w, threads[w], args.epochs,
                                                  args.lr)})
                x = runs[-1]
                print(f"  repeat {r + 1}/{args.repeats}, W={w}: epoch {x['epoch_s']:.2f} s, {x['images_per_s']} "
                      f"img/s, last val Dice {x['last_val_dice']:.4f}", flush=True)
            base = next(x for x in runs if x["repeat"] == r and x["world_size"] == 1)
            for x in runs[-len(procs):]:  # informative only: float noise grows at this lr (see above)
                x.update(relative_l2(work / x["run"], work / base["run"], work / "check_init"))
                x["dice_diff"] = abs(x["last_val_dice"] - base["last_val_dice"])

    t1 = statistics.median(x["epoch_s"] for x in runs if x["world_size"] == 1)
    summary, rows, failed = [], [], False
    for w in procs:
        mine = [x for x in runs if x["world_size"] == w]
        ep, dd = statistics.median(x["epoch_s"] for x in mine), max(x["dice_diff"] for x in mine)
        l2 = checks[f"w{w}"].get("rel_l2_update", 0.0)
        ok = l2 <= args.tolerance and dd <= args.dice_tolerance
        failed |= not ok
        s = {"world_size": w, "threads_per_process": threads[w], "batch_per_process": args.global_batch // w,
             "epoch_s": ep, "images_per_s": statistics.median(x["images_per_s"] for x in mine),
             "train_s": statistics.median(x["train_s"] for x in mine),
             "launch_s": statistics.median(x["launch_s"] for x in mine), "speedup": t1 / ep,
             "efficiency": t1 / ep / w, "last_val_dice": [x["last_val_dice"] for x in mine],
             "max_dice_diff": dd, "check_rel_l2_update": l2,
             "speed_runs_max_rel_l2_update": max(x["rel_l2_update"] for x in mine),
             "check": "-" if w == 1 else "PASS" if ok else "FAIL"}
        summary.append(s)
        rows.append([w, threads[w] or "-", s["batch_per_process"], f"{ep:.3f}", f"{s['images_per_s']:.1f}",
                     f"{s['train_s']:.1f}", f"{s['launch_s']:.1f}", f"{s['speedup']:.2f}",
                     f"{s['efficiency']:.2f}",
                     " ".join(f"{d:.4f}" for d in s["last_val_dice"]), "-" if w == 1 else f"{dd:.4f}",
                     "-" if w == 1 else f"{l2:.2e}", s["check"]])
    headers = ["W", "threads/proc", "batch/proc", "epoch s", "img/s", "train s", "launch s", "speed-up",
               "efficiency", "last val Dice (per repeat)", "max dDice", "d (check)", "check"]
    print(f"\n{args.device}, global batch {args.global_batch}: medians of {args.repeats} repeat(s); check: "
          f"dDice <= {args.dice_tolerance} (same repeat), d = ||w(W) - w(1)|| / ||w(1) - w0|| of the check runs "
          f"<= {args.tolerance} (float-noise floor {floor:.2e}"
          f"{': ABOVE the tolerance: fewer --check-epochs' * (floor > args.tolerance)})")
    print(table(headers, rows))
    out = args.out or RESULTS / f"scale_{args.device}{'_' + args.tag if args.tag else ''}.json"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"command": "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "hardware": hw, "cpus": cpus, "gpus": gpus, "device": args.device, "settings": settings,
              "procs": procs, "summary": summary, "checks": checks, "floor_rel_l2_update": floor, "runs": runs,
              "table": {"headers": headers, "rows": rows}}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(json_safe(result), indent=2))
    print(f"written {out}")
    bad_exits = [(x["world_size"], x["run"], x["exit_code"]) for x in [*checks.values(), *runs] if x["exit_code"]]
    if bad_exits:
        print(f"runs (W, run, exit status) that failed on their way out: {bad_exits}", file=sys.stderr)
    return 1 if failed or bad_exits else 0


if __name__ == "__main__":
    sys.exit(main())
