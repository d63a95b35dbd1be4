"""Recipe ablation: which training choices buy accuracy for a fixed CPU budget.

    python benchmarks/recipe.py --dataset usgra --budget-minutes 4 [--variants default,lr1e-2,...]

Every variant trains on the same split (fold 0 of the fixed 5-fold, group-aware split) for the same
wall-time budget, then its final weights are scored on the held-out fold with and without flip TTA
(the last column scores best.pt, picked on those same scans: optimistic, shown only for the size of
that bias). Prints one table and writes benchmarks/results/recipe_<dataset>.json. A variant changes
one thing from the `default` preset; keep only what wins, and only when the win is larger than the
noise between seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time

from common import CREDITS, RESULTS, RUNS, hardware, require_data, table, write_result

from hemaseg.config import DataConfig, RunConfig, TrainConfig
from hemaseg.training.cv import make_folds
from hemaseg.data.dataset import save_split
from hemaseg.evaluation.evaluate import evaluate
from hemaseg.models.unet import ModelConfig
from hemaseg.plan import fingerprint_stats, make_plan
from hemaseg.inference.predictor import load_model
from hemaseg.training.train import fit
from hemaseg.data.transforms import AugmentConfig

NO_AUG = {k: 0.0 for k in ("hflip", "vflip", "affine_p", "gamma_p", "contrast_p", "blur_p", "noise_p", "speckle_p")}
VARIANTS: dict[str, dict] = {
    "default": {},
    "seed2": {"train": {"seed": 2}},  # the same recipe, another seed: the noise floor
    "batch8-lr3e-3": {"train": {"batch_size": 8, "lr": 3e-3}},  # the default before this ablation
    "lr1e-2": {"train": {"lr": 1e-2}},
    "lr1e-3": {"train": {"lr": 1e-3}},
    "lr3e-3": {"train": {"lr": 3e-3}},
    "batch8": {"train": {"batch_size": 8}},
    "batch4": {"train": {"batch_size": 4}},
    "size192": {"data": {"size": 192}},
    "size320": {"data": {"size": 320}},
    "unet16": {"model": {"arch": "unet", "base_width": 16, "depth": 4}},
    "instance-norm": {"model": {"arch": "unet", "base_width": 8, "depth": 4, "norm": "instance"}},
    "dice+focal": {"train": {"loss": "dice_focal"}},
    "no-aug": {"augment": NO_AUG},
    "no-speckle-noise": {"augment": {"speckle_p": 0.0, "noise_p": 0.0}},
    # `default` autocasts to bf16 where native (since this ablation); these two pin the precision
    "fp32": {"train": {"precision": "fp32"}},
    "bf16": {"train": {"precision": "bf16"}},
}


def build_config(data: str, plan: dict, overrides: dict, budget: float) -> RunConfig:
    sections = {"data": {"root": data, **plan["data"]}, "model": dict(plan["model"]), "augment": dict(plan["augment"]),
                "train": {**plan["train"], "budget_minutes": budget}}
    for section, values in overrides.items():
        if section == "model":
            sections["model"] = dict(values)
        else:
            sections[section].update(values)
    return RunConfig(data=DataConfig(**sections["data"]), model=ModelConfig(**sections["model"]),
                     augment=AugmentConfig(**sections["augment"]), train=TrainConfig(**sections["train"]), plan=plan)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="usgra", choices=sorted(CREDITS))
    p.add_argument("--budget-minutes", type=float, default=4.0, help="training wall time per variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--rerun", action="store_true", help="train the named variants again (side by side, same load)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = require_data(args.dataset)
    plan = make_plan("default", fingerprint_stats(str(data)))
    root = RUNS / f"recipe_{args.dataset}"
    root.mkdir(parents=True, exist_ok=True)
    fold = make_folds(RunConfig(data=DataConfig(root=str(data))), root, 5, seed=0)[0]
    previous = RESULTS / f"recipe_{args.dataset}.json"
    results = json.loads(previous.read_text())["variants"] if previous.is_file() else {}  # variants add up
    for name in args.variants.split(","):
        cfg = build_config(str(data), plan, VARIANTS[name], args.budget_minutes)
        out = root / name
        if args.rerun and out.exists():
            shutil.rmtree(out)
        train_s = None
        if not (out / "summary.json").is_file():
            save_split({"train": fold["train"], "val": fold["val"]}, out / "splits.json")
            t = time.perf_counter()
            fit(cfg, out, progress=False)
            train_s = time.perf_counter() - t
        summary = json.loads((out / "summary.json").read_text())
        if train_s is None:
            train_s = summary["train_s"]
        row = {"epochs": summary["epochs"], "train_s": round(train_s, 1)}
        final = load_model(out / "last.pt")  # the final weights: best.pt was picked on these very scans
        for tta in (False, True):
            final.tta = tta
            s = evaluate(final, str(data), names=fold["val"], progress=False)["summary"]
            key = "tta" if tta else "plain"
            row[f"dice_{key}"], row[f"dice_lesion_{key}"] = s["dice_mean"], s["dice_mean_lesion"]
            row[f"fp_images_{key}"] = s["n_false_positive_images"]
        s = evaluate(load_model(out / "best.pt", tta=True), str(data), names=fold["val"], progress=False)["summary"]
        row["dice_lesion_tta_best_epoch"] = s["dice_mean_lesion"]  # optimistic: the selection saw these scans
        results[name] = {"overrides": VARIANTS[name], "budget_minutes": args.budget_minutes,
                         "threads": __import__("torch").get_num_threads(), "config": dataclasses.asdict(cfg), **row}
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
        "command": "python benchmarks/recipe.py " + " ".join(argv or __import__("sys").argv[1:]),
        "dataset": args.dataset, "credit": CREDITS[args.dataset], "budget_minutes": args.budget_minutes,
        "hardware": hardware(), "variants": results, "table": {"headers": headers, "rows": rows}})
    print(f"written {path}")


if __name__ == "__main__":
    main()
