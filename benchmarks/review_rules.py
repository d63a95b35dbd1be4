"""Which needs-review rule catches the failures? Candidate rules side by side on a CV run's out-of-fold rows.

    python benchmarks/review_rules.py benchmarks/runs/cv_busi_default_10min

Reads RUN/oof/per_image.csv (written by `hemaseg cv`) and scores, for each rule, the AUROC of its score
against failure (Dice < 0.5 on a lesion scan, a lesion predicted on a normal scan, or a lesion missed) and,
with the review threshold chosen leave-one-fold-out (Youden's J on the other folds, applied to the
held-out one), the share of scans flagged, of failures flagged and of missed-lesion scans flagged. Rules:
the confidence hemaseg uses now (entropy with a margin for empty predictions), the entropy-only one it
used before, and a small logistic quality head on (confidence, entropy confidence, max probability,
log predicted area, anything predicted) fitted leave-one-fold-out (the earlier head, Youden's cut), and
hemaseg's head now: a missed lesion weighted MISS_WEIGHT in the fit, the cut capped at REVIEW_MAX_FLAGGED. Writes benchmarks/results/review_rules_<run name>.json.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from common import hardware, table, write_result

from hemaseg.evaluation.evaluate import REVIEW_BELOW_DICE, review_figures
from hemaseg.inference.review import ReviewHead
from hemaseg.evaluation.decisions import MISS_WEIGHT, REVIEW_MAX_FLAGGED, choose_review_threshold


def load_rows(run: Path) -> dict[str, np.ndarray]:
    with open(run / "oof" / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = {k: np.array([float(r[k]) if r[k] not in ("", "nan") else np.nan for r in rows])
           for k in ("dice", "confidence", "confidence_entropy", "max_prob", "fold", "ref_area_px", "pred_area_px",
                     "height", "width")}
    if "confidence_rule" in rows[0]:  # a run whose `confidence` is already its review head's score
        out["confidence"] = np.array([float(r["confidence_rule"]) for r in rows])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a `hemaseg cv` run folder")
    args = p.parse_args(argv)
    d = load_rows(args.run)
    fold = d["fold"].astype(int)
    ref, pred = d["ref_area_px"] > 0, d["pred_area_px"] > 0
    missed = ref & ~pred
    failed = (ref & ~(d["dice"] >= REVIEW_BELOW_DICE)) | (~ref & pred)
    features = np.stack([d["confidence"], d["confidence_entropy"], d["max_prob"],
                         np.log1p(1000 * d["pred_area_px"] / (d["height"] * d["width"])), pred.astype(float)], 1)
    scores = {"confidence_rule (margin when empty)": d["confidence"],
              "confidence_entropy (before)": d["confidence_entropy"]}
    head = np.zeros(len(fold))
    for k in np.unique(fold):
        head[fold == k] = ReviewHead.fit(features[fold != k], ~failed[fold != k]).score_features(features[fold == k])
    scores["logistic quality head (fitted leave-one-fold-out)"] = head
    # hemaseg's review head now: misses weighted MISS_WEIGHT in the fit, Youden's cut capped at
    # REVIEW_MAX_FLAGGED of the scans; head and threshold both from the other folds
    weighted = np.zeros(len(fold))
    weight = np.where(missed, MISS_WEIGHT, 1.0)
    for k in np.unique(fold):
        fitted = ReviewHead.fit(features[fold != k], ~failed[fold != k], weights=weight[fold != k])
        weighted[fold == k] = fitted.score_features(features[fold == k])
    now = f"review head, misses x{MISS_WEIGHT:g}, cut capped at {REVIEW_MAX_FLAGGED:.0%} flagged (hemaseg now)"
    scores[now] = weighted
    result, rows = {}, []
    for name, score in scores.items():
        flagged = np.zeros(len(score), bool)
        for k in np.unique(fold):
            cap = REVIEW_MAX_FLAGGED if name == now else None  # the others: Youden's cut as it was
            cut = choose_review_threshold(score[fold != k], failed[fold != k], max_flagged=cap)["threshold"]
            flagged[fold == k] = score[fold == k] <= cut
        r = review_figures(score, failed, missed, flagged)
        r["failures_flagged_share"] = float(flagged[failed].mean())
        result[name] = r
        rows.append([name, r["auroc"], r["flagged_share"], r["failures_flagged_share"], r["missed_flagged_share"]])
    headers = ["rule", "AUROC vs failure", "scans flagged", "failures flagged", "missed lesions flagged"]
    print(f"{args.run}: {len(fold)} out-of-fold scans, {failed.sum()} failures, {missed.sum()} missed lesions; "
          f"thresholds chosen leave-one-fold-out (goals of #18: misses flagged >= 0.8 at <= 0.4 flagged, AUROC >= 0.8)")
    print(table(headers, rows))
    path = write_result(f"review_rules_{args.run.name}", {
        "command": "python benchmarks/review_rules.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "run": str(args.run), "n_scans": int(len(fold)), "n_failed": int(failed.sum()), "n_missed": int(missed.sum()),
        "hardware": hardware(), "rules": result, "table": {"headers": headers, "rows": rows}})
    print(f"written {path}")


if __name__ == "__main__":
    main()
