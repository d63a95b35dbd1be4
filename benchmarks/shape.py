"""A square input against one shaped like the scans, side by side at an equal training budget.

    nice -n 10 python benchmarks/shape.py --dataset hc18 --budget-images 3000
    nice -n 10 python benchmarks/shape.py --dataset busi --budget-images 4000 --folds 0

Both variants are the `default` preset (the shipped ultrasound model fine-tuned) on the training part of
fold K of the fixed 5-fold group-aware split (`crossval.cv.make_folds`, seed 0, groups from the set's
manifest), trained for the same number of images seen (`--budget-images`: the same training on a busy
or a quiet machine; the CPU-minutes each took are reported beside) or wall-clock minutes; only the input
differs: `square` is 256 x 256 (what every version before the data-shaped plan used), `shape` is what
the plan now fits to the set's median aspect ratio (`config.make_plan`; e.g. 224x320 for HC18's 800 x 540
scans). Scored on the held-out fold
with the final weights and flip TTA (`evaluate`, as benchmarks/pretrained.py does): lesion Dice, false
lesions on normal scans; on HC18 also the head circumference, the perimeter of the predicted outline at
the scan's pixel size (`measure_mask`, the number `hemaseg measure` reports) against the sonographer's
`hc_mm` (the challenge's score: mean absolute difference in mm). Predict ms per scan: `Predictor.predict`
at batch 1 on held-out scans at their own size, both variants timed interleaved (median of 20 after 3
warm-up rounds). Prints a table and writes benchmarks/results/shape_<dataset>.json (folds add up across
invocations).

`--start CKPT --tag NAME` fine-tunes from another pretrained checkpoint instead of the shipped model (a
leave-sources-out variant of benchmarks/pretrain_ultrasound.py --variant), under variant names like
`shape+NAME`; the leave-target-out rule is checked against that checkpoint's own provenance.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import CREDITS, RESULTS, RUNS, SHARED_DATA, hardware, require_data, table, write_result
from encoders import cpu_seconds, lscpu_model, mean_sd, time_predict
from pretrained import score

from hemaseg.config import format_size, resolve_config
from hemaseg.crossval.cv import make_folds
from hemaseg.data.dataset import find_samples
from hemaseg.data.images import read_image
from hemaseg.data.plan import configure
from hemaseg.inference.predictor import load_model
from hemaseg.measure.morphometry import measure_mask
from hemaseg.models.pretrained import PACKAGED, check_left_out
from hemaseg.spacing import Spacing
from hemaseg.training.train import fit

CREDITS = {**CREDITS, "hc18": "HC18 dataset, van den Heuvel et al., PLoS ONE 2018, CC BY 4.0"}
SQUARE = 256


def head_circumference(run, data, names) -> dict:
    """HC18: perimeter (mm) of the predicted outline's largest region at each scan's pixel size, against
    the sonographer's hc_mm."""
    with open(SHARED_DATA / "hc18" / "manifest.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    model = load_model(run / "last.pt", tta=True)
    paths = {s.name: s.image_path for s in find_samples(data)}
    errors, missed = [], 0
    for name in names:
        px = float(rows[name]["pixel_size_mm"])
        m = measure_mask(model.predict(read_image(paths[name])).mask, Spacing(px, px, "HC18 manifest"))
        if not m.lesions:
            missed += 1
            continue
        largest = max(m.lesions, key=lambda les: les.area_px)
        errors.append(abs(largest.perimeter_mm - float(rows[name]["hc_mm"])))
    return {"hc_mae_mm": float(np.mean(errors)) if errors else None,
            "hc_median_abs_mm": float(np.median(errors)) if errors else None, "hc_no_outline": missed}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="hc18", choices=sorted(CREDITS))
    p.add_argument("--budget-minutes", type=float, help="training wall time per variant and fold")
    p.add_argument("--budget-images", type=int, help="training images seen per variant and fold, instead")
    p.add_argument("--folds", default="0", help="which of the 5 fixed folds to hold out, comma-separated")
    p.add_argument("--variants", default="square,shape", help="comma-separated subset of square, shape")
    p.add_argument("--backend", default="torch-fast", help="inference backend timed for both variants")
    p.add_argument("--start", help="fine-tune from this pretrained checkpoint instead of the shipped model")
    p.add_argument("--tag", default="", help="suffix of the variant names for --start (e.g. no-busi)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in ("square", "shape")]:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from square, shape")
    data = require_data(args.dataset)
    if args.start:  # the `ultrasound` start of the default preset, for this process only
        PACKAGED["ultrasound"] = Path(args.start).resolve()
    check_left_out("ultrasound", args.dataset)  # both start from the shipped model: it must not know the set
    if (args.budget_minutes is None) == (args.budget_images is None):
        p.error("give --budget-minutes or --budget-images")
    budget = ({"budget_minutes": args.budget_minutes} if args.budget_minutes else
              {"budget_images": args.budget_images})
    base, loaded = configure(data, "default", budget)
    root = RUNS / f"shape_{args.dataset}"
    root.mkdir(parents=True, exist_ok=True)
    folds = make_folds(base, root, 5, seed=0)
    previous = RESULTS / f"shape_{args.dataset}.json"
    old = json.loads(previous.read_text()) if previous.is_file() else {}
    results = old.get("runs", {}) if old.get("budget") == budget else {}

    runs = {}
    for k in map(int, args.folds.split(",")):
        split = {"train": list(folds[k]["train"]), "val": list(folds[k]["val"])}
        for shape in names:
            name = shape + (f"+{args.tag}" if args.tag else "")
            cfg = resolve_config(data, "default", loaded.stats, base.plan.device_type,
                                 {**budget, "size": SQUARE if shape == "square" else None})
            out = root / f"{name}_fold{k}"
            cpu, wall = cpu_seconds(), time.perf_counter()
            summary = fit(cfg, out, dataset=loaded, split=split, overwrite=True, progress=False)
            cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
            row = {"variant": name, "start": args.start or "shipped", "input": format_size(cfg.data.size),
                   "fold": k, "n_train": summary["n_train"],
                   "epochs": summary["epochs"], "images_seen": summary["images_seen"],
                   "train_cpu_min": round(cpu / 60, 2), "train_wall_min": round(wall / 60, 2),
                   **score(out, data, split["val"], held_out=True)}  # held_out.npz for presence.py
            if args.dataset == "hc18":
                row.update(head_circumference(out, data, split["val"]))
            results[f"{name}/fold{k}"] = row
            runs[name] = out
            print(json.dumps(row), flush=True)

    val = sorted(folds[int(args.folds.split(",")[-1])]["val"])[:5]
    paths = {s.name: s.image_path for s in find_samples(data)}
    ms = time_predict(runs, [read_image(paths[n]) for n in val], args.backend)
    for row in results.values():
        if row["variant"] in ms:
            row["predict_ms"] = ms[row["variant"]]

    hc = args.dataset == "hc18"
    headers = ["input", "folds", "epochs", "images seen", "train CPU-min", "lesion Dice (held-out)",
               "normals with a false lesion"] + (["HC MAE mm", "HC median abs mm"] if hc else []) + \
              [f"predict ms/scan ({args.backend})"]
    rows = []
    for name in dict.fromkeys(r["variant"] for r in results.values()):
        rs = [r for r in results.values() if r["variant"] == name]
        if not rs:
            continue
        normals = sum(r["n_normal_val"] for r in rs)
        rows.append([f"{name} {rs[0]['input']}", ",".join(str(r["fold"]) for r in rs),
                     round(statistics.mean(r["epochs"] for r in rs), 1),
                     round(statistics.mean(r["images_seen"] for r in rs)),
                     round(statistics.mean(r["train_cpu_min"] for r in rs), 2),
                     mean_sd([r["dice_lesion"] for r in rs]),
                     f"{sum(r['fp_normals'] for r in rs)}/{normals}" if normals else "no normals"]
                    + ([mean_sd([r["hc_mae_mm"] for r in rs]), mean_sd([r["hc_median_abs_mm"] for r in rs])]
                       if hc else []) + [rs[-1].get("predict_ms")])
    hw = {**hardware(), "lscpu_model_name": lscpu_model()}
    load = os.getloadavg()
    print(f"\n{args.dataset}: held-out folds of the fixed 5-fold group-aware split, {budget} per "
          f"variant and fold, preset default (shipped model fine-tuned), final weights + flip TTA; on lscpu "
          f"'{hw['lscpu_model_name']}' {hw['cpu_flags']} ({hw['cores']} cores), load average {load[0]:.2f}")
    print(table(headers, rows))
    print(f"data credit: {CREDITS[args.dataset]}")
    out = write_result(f"shape_{args.dataset}", {
        "command": "python benchmarks/shape.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dataset": args.dataset, "credit": CREDITS[args.dataset], "budget": budget, "hardware": hw,
        "load_average": load, "runs": results, "table": {"headers": headers, "rows": rows}})
    print(f"written {out}")


if __name__ == "__main__":
    main()
