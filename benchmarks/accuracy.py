"""Real-data accuracy: k-fold cross-validation with `hemaseg cv` at a stated size and CPU budget.

    python benchmarks/accuracy.py                       # usgra vessels, 5 folds, 60 CPU-minutes in all
    python benchmarks/accuracy.py --dataset busi        # breast lesions, group-aware folds (dup_group)
    python benchmarks/accuracy.py --dataset busi --per-fold-minutes 10   # the budget of issue #13's goals
    python benchmarks/accuracy.py --dataset busi --summarize RUN         # tabulate a finished `hemaseg cv` RUN

Prints one table (per-fold and out-of-fold Dice, HD95, lesion sensitivity, with and without TTA and
postprocessing, wall time) and writes benchmarks/results/accuracy_<dataset>.json. Skips with a message
when ../shared/data is absent. Folds are fixed (seed 0) and group-aware where the data has groups.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time

from common import CREDITS, RUNS, hardware, require_data, table, write_result

from hemaseg.config import PRESETS, parse_size
from hemaseg.crossval.cv import run_cv
from hemaseg.data.plan import configure


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="usgra", choices=sorted(CREDITS))
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--budget-minutes", type=float, default=60.0, help="wall-time budget for ALL folds together")
    p.add_argument("--per-fold-minutes", type=float, help="wall-time budget per fold instead (training only)")
    p.add_argument("--summarize", metavar="RUN", help="tabulate this finished `hemaseg cv` run folder (trained "
                                                      "with the same dataset and preset) instead of running one")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--size", type=parse_size, help="override the plan's input: 256 or height x width (224x320)")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs of this benchmark first")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    data = require_data(args.dataset)
    # leave room for out-of-fold inference when the budget is for all folds together
    per_fold = args.per_fold_minutes or args.budget_minutes / args.folds * 0.93
    if args.summarize:
        from pathlib import Path

        from hemaseg.config import RunConfig

        out = Path(args.summarize)
        cfg = RunConfig.load(out / "fold_0" / "config.json")
        per_fold, size, t0 = cfg.train.budget_minutes, cfg.data.size, time.perf_counter()
        s = json.loads((out / "cv_summary.json").read_text())
        wall = sum(json.loads((out / f"fold_{k}" / "summary.json").read_text())["train_s"] for k in range(args.folds))
    else:
        # the preset adapted to the data (read once, and reused by every fold trained in this process);
        # --size None leaves the plan's size
        cfg, loaded = configure(data, args.preset, {"size": args.size, "budget_minutes": per_fold})
        size = cfg.data.size
        out = RUNS / f"accuracy_{args.dataset}_{args.preset}_{size}"
        if args.fresh and out.exists():
            shutil.rmtree(out)
        t0 = time.perf_counter()
        result = run_cv(cfg, out, folds=args.folds, seed=0, progress=False, dataset=loaded)
        wall = time.perf_counter() - t0
        s = result["summary"]
    v = s["variants"]
    fold_summaries = [json.loads((out / f"fold_{k}" / "summary.json").read_text()) for k in range(args.folds)]
    epochs = [f["epochs"] for f in fold_summaries]
    images_seen = [f["images_seen"] for f in fold_summaries]

    headers = ["inference", *[f"fold {k}" for k in range(args.folds)], "OOF Dice", "OOF Dice (lesion imgs)",
               "HD95 px (median)", "lesion sens.", "FP imgs"]
    rows = [[name, *x["fold_dice"], x["dice_mean"], x["dice_mean_lesion"], x["hd95_px_median"],
             x["lesion_sensitivity"], x["n_false_positive_images"]] for name, x in v.items()]
    print(f"\n{args.dataset}: {args.folds}-fold CV, preset {args.preset}, {size} px, "
          f"{per_fold:.1f} min budget per fold, epochs per fold {epochs}, images seen {images_seen}; "
          f"{'training ' if args.summarize else ''}wall {wall / 60:.1f} min on "
          f"{hardware()['cpu']} ({hardware()['cores']} cores)")
    print(table(headers, rows))
    print(f"chosen: {s['inference']} + postprocessing {s['postprocessing']}; confidence vs Dice Spearman r = "
          f"{s['confidence'].get('spearman_r')}")
    print(f"data credit: {CREDITS[args.dataset]}")
    name = f"accuracy_{args.dataset}" + (f"_{out.name}" if args.summarize else "")
    path = write_result(name, {
        "command": "python benchmarks/accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dataset": args.dataset, "credit": CREDITS[args.dataset], "folds": args.folds, "preset": args.preset,
        "size": size, "budget_minutes_total": args.budget_minutes, "budget_minutes_per_fold": per_fold,
        "epochs_per_fold": epochs, "images_seen_per_fold": images_seen, "run": str(out),
        "wall_s": round(wall, 1), "wall_counts": "training only" if args.summarize else "training + evaluation", "hardware": hardware(),
        "config": cfg.to_dict(), "cv_summary": s, "table": {"headers": headers, "rows": rows},
    })
    print(f"written {path}")


if __name__ == "__main__":
    main()
