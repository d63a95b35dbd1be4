"""Fit the packaged model's review decision on scans it never saw, then measure what it flags on other
sets it never saw.

    python benchmarks/packaged_review.py [--fit-on hc18] [--extra-synthetic 200]

1. Scores the packaged model on the scans of `--fit-on` (shared sets it never trained on and that are not
   reported below) and on `--extra-synthetic` new synthetic scans (another seed than its pretraining's, half
   with no lesion: held out by construction, and the normal scans the other sources lack). The validation
   split of its own pretraining would be the first choice, but it cannot be rebuilt: the pretraining
   mixture's fingerprint no longer matches the checkpoint's.
2. Fits the review head and its cut (misses weighted as in `hemaseg cv`) there and writes
   hemaseg/weights/ultrasound.confidence.json, which `load_model("ultrasound")` reads.
3. Scores every scan of the sets the model never trained on and the fit never used (its provenance's
   `left_out` less `--fit-on`: busi, usgra) and reports the share of missed lesions flagged, of false
   lesions on normal scans flagged, and of all scans flagged, beside the rule of last resort
   (`benchmarks/results/packaged_review.json`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys

import numpy as np
from common import CREDITS, RESULTS, RUNS, SHARED_DATA, hardware, table, write_result

from hemaseg.data.synth import SynthConfig, write_synthetic_dataset
from hemaseg.evaluation.decisions import MISS_WEIGHT, choose_review_threshold
from hemaseg.evaluation.evaluate import evaluate, failures
from hemaseg.inference.predictor import load_model
from hemaseg.inference.review import ReviewHead, decide, review_features
from hemaseg.io import atomic_write_text, json_safe
from hemaseg.models.checkpoint import load_checkpoint
from hemaseg.models.pretrained import PACKAGED

CREDITS = {**CREDITS, "synthetic": "hemaseg's synthetic ultrasound generator",
           "hc18": "HC18 dataset, van den Heuvel et al., PLoS ONE 2018, CC BY 4.0"}


def scored_rows(predictor, root, names=None) -> list[dict]:
    rows = evaluate(predictor, root, names=names, keep_masks=True, progress=False, tta=False)["rows"]
    for r in rows:
        r["features"] = review_features(r["prob"], r["pred"], predictor.threshold)
        del r["prob"], r["image"], r["ref"]
    return rows


def flag_figures(rows: list[dict], threshold: float | None, head: ReviewHead | None, fitted_on: str | None) -> dict:
    """What the decision flags on rows scored by the packaged model."""
    scores = [float(head.score_features(r["features"])) if head else r["confidence"] for r in rows]
    flagged = np.array([decide(s, r["pred_area_px"] > 0, threshold, fitted_on).needs_review
                        for s, r in zip(scores, rows)])
    failed, missed = failures(rows)
    normal = np.array([r["ref_area_px"] == 0 for r in rows])
    false_lesion = normal & np.array([r["pred_area_px"] > 0 for r in rows])
    def share(mask):
        return float(flagged[mask].mean()) if mask.any() else None
    return {"n": len(rows), "flagged_share": float(flagged.mean()), "n_missed": int(missed.sum()),
            "missed_flagged_share": share(missed), "n_false_lesion_normals": int(false_lesion.sum()),
            "false_lesion_normals_flagged_share": share(false_lesion), "n_failed": int(failed.sum()),
            "failed_flagged_share": share(failed)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit-on", default="hc18", help="shared sets to fit on (comma-separated; never reported)")
    p.add_argument("--extra-synthetic", type=int, default=200)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    ckpt = load_checkpoint(PACKAGED["ultrasound"])
    prov = ckpt["provenance"]
    report = [s for s in prov["left_out"] if s not in args.fit_on.split(",")]
    if missing := [s for s in args.fit_on.split(",") + report if not (SHARED_DATA / s / "images").is_dir()]:
        print(f"skipped: {', '.join(missing)} absent (needs ../shared/data)")
        sys.exit(0)
    root = RUNS / "packaged_review"
    fit_sets = [n for n in args.fit_on.split(",") if n]
    if overlap := set(fit_sets) & set(prov["sources"]):
        sys.exit(f"--fit-on {','.join(sorted(overlap))}: the packaged model trained on it")
    predictor = load_model("ultrasound", device="cpu", postprocess=False)
    predictor.review_head, predictor.review_threshold = None, None  # a decision fitted before plays no part
    held_out = [r for name in fit_sets for r in scored_rows(predictor, SHARED_DATA / name)]
    extra = write_synthetic_dataset(root / "extra", args.extra_synthetic, size=256, seed=1, progress=False,
                                    config=SynthConfig(p_empty=0.5))
    held_out += scored_rows(predictor, extra)
    failed, missed = failures(held_out)
    x = np.stack([r["features"] for r in held_out])
    head = ReviewHead.fit(x, ~failed, weights=np.where(missed, MISS_WEIGHT, 1.0))
    scores = np.round(head.score_features(x), 4)
    dice = np.array([r["dice"] for r in held_out], np.float64)
    fitted_on = (f"{len(held_out)} scans it never trained on: {', '.join(fit_sets)} and {args.extra_synthetic} new "
                 "synthetic scans, half with no lesion")
    review = {**choose_review_threshold(scores, failed, dice, missed), "head": head.to_dict(), "fitted_on": fitted_on,
              "method": f"review head (a miss weighs {MISS_WEIGHT:g} failures)",
              "command": "python benchmarks/packaged_review.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = PACKAGED["ultrasound"].with_suffix(".confidence.json")
    atomic_write_text(out, json.dumps(json_safe(review), indent=2))

    results = {"held_out": flag_figures(held_out, review["threshold"], head, fitted_on)}
    for name in report:
        rows = scored_rows(predictor, SHARED_DATA / name)
        results[name] = {"fitted": flag_figures(rows, review["threshold"], head, fitted_on),
                         "rule_of_last_resort": flag_figures(rows, None, None, None)}
    print(table(["set", "decision", "scans", "flagged", "misses flagged", "false lesions on normals flagged"],
                [[name, kind, r["n"], r["flagged_share"], f"{r['missed_flagged_share']} of {r['n_missed']}",
                  f"{r['false_lesion_normals_flagged_share']} of {r['n_false_lesion_normals']}"]
                 for name, v in results.items() if name != "held_out" for kind, r in v.items()]))
    path = write_result("packaged_review", {
        "command": review["command"], "date": datetime.date.today().isoformat(), "hardware": hardware(),
        "credits": [CREDITS[s] for s in dict.fromkeys(prov["sources"] + fit_sets + report) if s in CREDITS],
        "review": {k: review[k] for k in ("threshold", "fitted_on", "method", "auroc") if k in review},
        "results": results})
    print(f"wrote {out} and {path} ({RESULTS})")


if __name__ == "__main__":
    main()
