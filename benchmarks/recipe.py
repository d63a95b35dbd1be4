"""Recipe ablation: which training choices buy accuracy for a fixed CPU budget.

    python benchmarks/recipe.py --dataset usgra --budget-minutes 4 [--variants default,lr1e-2,...]

Every variant trains on the same split (fold 0 of the fixed 5-fold, group-aware split) for the same
wall-time budget, then its final weights are scored on the held-out fold with and without flip TTA
(the last column scores best.pt, picked on those same scans: optimistic, shown only for the size of
that bias). Prints one table and writes benchmarks/results/recipe_<dataset>.json. A variant changes
one thing from the `scratch` preset (the `default` before pretrained starts); keep only what wins, and only when the win is larger than the
noise between seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time

import torch
from common import CREDITS, RESULTS, RUNS, hardware, require_data, table, write_result

from hemaseg.config import resolve_config
from hemaseg.evaluation.evaluate import evaluate
from hemaseg.inference.predictor import load_model
from hemaseg.crossval.cv import make_folds
from hemaseg.data.plan import configure
from hemaseg.training.train import fit

# a variant is the overrides it passes to resolve_config (flat setting names, config.SETTINGS) on top of
# the `scratch` preset (the seed network from random weights) adapted to the data
VARIANTS: dict[str, dict] = {
    "default": {},
    "seed2": {"seed": 2},  # the same recipe, another seed: the noise floor
    "batch8-lr3e-3": {"batch_size": 8, "lr": 3e-3},  # the default before this ablation
    "lr1e-2": {"lr": 1e-2},
    "lr1e-3": {"lr": 1e-3},
    "lr3e-3": {"lr": 3e-3},
    "batch8": {"batch_size": 8},
    "batch4": {"batch_size": 4},
    "size192": {"size": 192},
    "size320": {"size": 320},
    "unet16": {"arch": "unet", "base_width": 16, "depth": 4},
    "instance-norm": {"arch": "unet", "base_width": 8, "depth": 4, "norm": "instance"},
    "dice+focal": {"loss": "dice_focal"},
    "no-aug": {"augment": False},
    "no-speckle-noise": {"speckle_p": 0.0, "noise_p": 0.0},
    # `default` autocasts to bf16 where native (since this ablation); these two pin the precision
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="usgra", choices=sorted(CREDITS))
    p.add_argument("--budget-minutes", type=float, default=4.0, help="training wall time per variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--rerun", action="store_true", help="train the named variants again (side by side, same load)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = require_data(args.dataset)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    # the data is read once; each variant is the default preset planned on its statistics plus the overrides
    base, loaded = configure(data, "scratch", {"budget_minutes": args.budget_minutes})
    root = RUNS / f"recipe_{args.dataset}"
    root.mkdir(parents=True, exist_ok=True)
    fold = make_folds(base, root, 5, seed=0)[0]
    split = {"train": fold["train"], "val": fold["val"]}
    previous = RESULTS / f"recipe_{args.dataset}.json"
    results = json.loads(previous.read_text())["variants"] if previous.is_file() else {}  # variants add up
    for name in names:
        cfg = resolve_config(data, "scratch", loaded.stats, base.plan.device_type,
                             {**VARIANTS[name], "budget_minutes": args.budget_minutes})
        out = root / name
        if args.rerun and out.exists():
            shutil.rmtree(out)
        train_s = None
        if not (out / "summary.json").is_file():
            t = time.perf_counter()
            # the variant's folder belongs to this benchmark: a run killed before its summary starts over
            fit(cfg, out, dataset=loaded, split=split, overwrite=True, progress=False)
            train_s = time.perf_counter() - t
        summary = json.loads((out / "summary.json").read_text())
        if train_s is None:
            train_s = summary["train_s"]
        row = {"epochs": summary["epochs"], "train_s": round(train_s, 1)}
        final = load_model(out / "last.pt")  # the final weights: best.pt was picked on these very scans
        for tta in (False, True):
            s = evaluate(final, str(data), names=fold["val"], progress=False, tta=tta)["summary"]
            key = "tta" if tta else "plain"
            row[f"dice_{key}"], row[f"dice_lesion_{key}"] = s["dice_mean"], s["dice_mean_lesion"]
            row[f"fp_images_{key}"] = s["n_false_positive_images"]
        best = load_model(out / "best.pt")
        s = evaluate(best, str(data), names=fold["val"], progress=False, tta=True)["summary"]
        row["dice_lesion_tta_best_epoch"] = s["dice_mean_lesion"]  # optimistic: the selection saw these scans
        results[name] = {"overrides": VARIANTS[name], "budget_minutes": args.budget_minutes,
                         "threads": torch.get_num_threads(), "config": cfg.to_dict(), **row}
        print(f"{name}: {row}", flush=True)

    if previous.is_file():  # another process may have added variants meanwhile: keep them
        results = {**json.loads(previous.read_text())["variants"], **results}
    headers = ["variant", "min", "epochs", "train s", "Dice", "Dice lesion imgs", "Dice +TTA", "Dice lesion +TTA",
               "FP imgs", "(best epoch: lesion +TTA)"]
    rows = [[n, r.get("budget_minutes"), r["epochs"], r["train_s"], r["dice_plain"], r["dice_lesion_plain"], r["dice_tta"],
             r["dice_lesion_tta"], r["fp_images_tta"], r.get("dice_lesion_tta_best_epoch")] for n, r in results.items()]
    print(f"\n{args.dataset}, fold 0 of 5 (group-aware), budget per variant in the 'min' column, on "
          f"{hardware()['cpu']} ({hardware()['cores']} cores)")
    print(table(headers, rows))
    print(f"data credit: {CREDITS[args.dataset]}")
    path = write_result(f"recipe_{args.dataset}", {
        "command": "python benchmarks/recipe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dataset": args.dataset, "credit": CREDITS[args.dataset], "budget_minutes": args.budget_minutes,
        "hardware": hardware(), "variants": results, "table": {"headers": headers, "rows": rows}})
    print(f"written {path}")


if __name__ == "__main__":
    main()
