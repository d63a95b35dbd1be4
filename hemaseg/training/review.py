"""A plain training run's decisions, taken on its own validation split: postprocessing, then review.

`hemaseg cv` decides both out of fold; a run trained with `hemaseg train` (or `train_model`) has only its
validation split held out, so they are decided there, on scans the weights were not trained on (best.pt
was picked on them, so the figures are somewhat optimistic; the files say so):
- RUN/postprocessing.json: the steps of `decide_plan` that raise the validation Dice, among them the
  "is there a lesion?" gate (an empty mask where the highest probability stays below a cut), which is
  what keeps faint blobs off normal scans. Fewer than TRUSTED_VAL_SCANS validation scans: no step.
- RUN/confidence.json: the review head and its cut, fitted on the postprocessed masks. Too few
  validation scans, or no failure among them, leave the rule of last resort in charge
  (`inference.review.decide`) and the file says why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hemaseg.config import RunConfig
from hemaseg.evaluation.decisions import MISS_WEIGHT, choose_review_threshold, decide_plan
from hemaseg.evaluation.evaluate import evaluate, failures, score_image
from hemaseg.inference.postprocess import PostprocessPlan
from hemaseg.inference.predictor import load_model
from hemaseg.inference.review import MIN_ROWS_TO_FIT, ReviewHead, review_features
from hemaseg.io import atomic_write_text, json_safe

log = logging.getLogger(__name__)

TRUSTED_VAL_SCANS = 20  # fewer validation scans (or no failure among them): the fitted cut is not to be trusted


def decide_on_validation(run: Path, cfg: RunConfig, val_names: Sequence[str]) -> dict:
    """Score best.pt on the validation scans; decide the postprocessing there (RUN/postprocessing.json),
    then fit the review head and its cut on the postprocessed masks (RUN/confidence.json), both read by
    `load_model(run)`. Returns {"postprocessing": ..., "review": ...}, what was written."""
    plan = PostprocessPlan()
    if not val_names:
        plan.save(run / "postprocessing.json", {"decided_on": None, "why": "no validation split"})
        review = {"threshold": None, "fitted_on": None,
                  "method": "rule of last resort (no validation split to fit a review decision on)"}
        atomic_write_text(run / "confidence.json", json.dumps(review, indent=2))
        return {"postprocessing": asdict(plan), "review": review}
    predictor = load_model(run, device=cfg.train.device, postprocess=False, backend="torch")
    rows = evaluate(predictor, cfg.data.root, names=val_names, mask_threshold=cfg.data.mask_threshold,
                    labels=cfg.data.labels, keep_masks=True, max_pixels=cfg.data.max_pixels,
                    progress=False)["rows"]
    n, threshold = len(rows), predictor.threshold
    if n >= TRUSTED_VAL_SCANS:
        plan, evidence = decide_plan([r["prob"] for r in rows], [r["ref"] for r in rows], threshold)
        plan.save(run / "postprocessing.json", {
            "decided_on": f"the validation split of this training run ({n} scans; best.pt was chosen on them)",
            **evidence})
        rows = [score_image(r["name"], r["prob"], r["ref"], predictor.to_mask(r["prob"], plan=plan), threshold)
                | {"prob": r["prob"]} for r in rows]
    else:
        plan.save(run / "postprocessing.json", {"decided_on": None, "why": f"{n} validation scans are too few "
                                                f"to decide postprocessing on (it needs {TRUSTED_VAL_SCANS})"})
    return {"postprocessing": asdict(plan), "review": _fit_review(run, rows, threshold)}


def _fit_review(run: Path, rows: list[dict], threshold: float) -> dict:
    """The review head and its cut, fitted on the (postprocessed) validation rows; RUN/confidence.json."""
    failed, missed = failures(rows)
    n, n_failed = len(rows), int(failed.sum())
    where = f"the validation split of this training run ({n} scans, {n_failed} failures; best.pt was chosen on them)"
    x = np.stack([review_features(r["prob"], r["pred"], threshold) for r in rows])
    head = ReviewHead.fit(x, ~failed, weights=np.where(missed, MISS_WEIGHT, 1.0))
    if head is None:
        review = {"threshold": None, "fitted_on": None, "n": n, "n_failed": n_failed,
                  "method": f"rule of last resort: {n} validation scans with {n_failed} failures are too few "
                            f"to fit a review head (it needs {MIN_ROWS_TO_FIT} scans and both outcomes)"}
        log.warning("%s: no review decision fitted (%s); every 'no lesion' will be flagged for review",
                    run, review["method"])
    else:
        scores = np.round(head.score_features(x), 4)
        dice = np.array([r["dice"] for r in rows], np.float64)
        review = {**choose_review_threshold(scores, failed, dice, missed), "head": head.to_dict(),
                  "fitted_on": where, "method": f"review head (a miss weighs {MISS_WEIGHT:g} failures), fitted and "
                                                "cut on the validation split"}
        if n < TRUSTED_VAL_SCANS or not failed.any():
            log.warning("%s: the review decision was fitted on %d validation scans with %d failures: too few to "
                        "trust; run `hemaseg cv` for an out-of-fold one", run, n, n_failed)
    atomic_write_text(run / "confidence.json", json.dumps(json_safe(review), indent=2))
    return review
