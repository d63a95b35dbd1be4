"""Does needs-review catch the failures? Confidence against failure on held-out folds, old and new rule.

    python benchmarks/review.py --dataset busi --variant imagenet --folds 0,1,2

Takes the fold models that benchmarks/pretrained.py trained (benchmarks/runs/pretrained_<dataset>/
<variant>_fold<k>), predicts each one's held-out fold (final weights + flip TTA), pools the out-of-fold
rows and reports, for the confidence and for the earlier entropy-only one side by side: AUROC of low
confidence against failure (Dice < 0.5 on a lesion scan, a lesion predicted on a normal scan, or a lesion
missed), and with the review threshold chosen on these pooled rows as `hemaseg cv` does (Youden's J) the
share of all scans flagged and of missed-lesion scans flagged. Writes benchmarks/results/review_<dataset>_<variant>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np
from common import CREDITS, RUNS, hardware, require_data, table, write_result

from hemaseg.evaluation.evaluate import evaluate, failures
from hemaseg.inference.predictor import load_model
from hemaseg.evaluation.decisions import choose_review_threshold


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="busi", choices=sorted(CREDITS))
    p.add_argument("--variant", default="imagenet")
    p.add_argument("--folds", default="0,1,2")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = require_data(args.dataset)
    root = RUNS / f"pretrained_{args.dataset}"
    folds = json.loads((root / "folds.json").read_text())["folds"]
    rows = []
    for k in map(int, args.folds.split(",")):
        model = load_model(root / f"{args.variant}_fold{k}" / "last.pt")
        rows += evaluate(model, str(data), names=folds[k]["val"], progress=False, tta=True)["rows"]
    failed, missed = failures(rows)
    dice = np.array([r["dice"] for r in rows], np.float64)
    result = {}
    for name, key in (("confidence (margin when empty)", "confidence"), ("entropy only (before)", "confidence_entropy")):
        result[key] = choose_review_threshold(np.array([r[key] for r in rows]), failed, dice, missed)
    headers = ["confidence", "AUROC vs failure", "review threshold", "scans flagged", "missed lesions flagged",
               "failures", "misses"]
    out_rows = [[k, r["auroc"], r["threshold"], r["flagged_share"], r["missed_flagged_share"], r["n_failed"],
                 r["n_missed"]] for k, r in result.items()]
    hw = hardware()
    print(f"{args.dataset}, {args.variant} models, held-out folds {args.folds} pooled ({len(rows)} scans), on {hw['cpu']}")
    print(table(headers, out_rows))
    path = write_result(f"review_{args.dataset}_{args.variant}", {
        "command": "python benchmarks/review.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "dataset": args.dataset, "credit": CREDITS[args.dataset], "variant": args.variant, "folds": args.folds,
        "n_scans": len(rows), "hardware": hw, "review": result, "table": {"headers": headers, "rows": out_rows}})
    print(f"written {path}")


if __name__ == "__main__":
    main()
