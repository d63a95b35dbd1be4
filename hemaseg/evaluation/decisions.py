"""Decisions taken from held-out predictions, for training's validation split and cross-validation's
out-of-fold scans alike: which postprocessing steps to keep (`decide_plan`) and the confidence at or below
which a scan is flagged for review (`choose_review_threshold`)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
from scipy import stats

from hemaseg.evaluation.evaluate import REVIEW_BELOW_DICE, review_figures
from hemaseg.evaluation.metrics import dice
from hemaseg.inference.postprocess import PostprocessPlan, apply_plan

# The review head's fit counts a missed lesion as this many failures: a miss is the error decision support
# must catch first. Measured on the 10-minute BUSI CV (benchmarks/review_rules.py, head and threshold both
# chosen leave-one-fold-out; misses flagged at most 40 % flagged): weight 1 0.745, 2 0.915, 3 0.957, 5 0.979,
# AUROC against all failures 0.832 / 0.827 / 0.826 / 0.822. 3 was picked from that sweep.
MISS_WEIGHT = 3.0
# At most this share of scans is flagged (the review work a clinic can take): Youden's J cut, lowered to
# flag no more than this share of the out-of-fold scans when it would flag more.
REVIEW_MAX_FLAGGED = 0.4


def choose_review_threshold(conf: np.ndarray, failed: np.ndarray, dice: np.ndarray | None = None,
                            missed: np.ndarray | None = None, max_flagged: float | None = REVIEW_MAX_FLAGGED) -> dict:
    """Confidence at or below which a case is flagged: the cut that best separates failures (see
    `failures`) from the rest (Youden's J), lowered where it would flag more than `max_flagged` of the
    scans (None: no cap). Also reports the figures of `review_figures`, the uncapped cut and the Spearman
    correlation of confidence and Dice where Dice is defined."""
    conf, failed = np.asarray(conf, np.float64), np.asarray(failed, bool)
    missed = np.zeros_like(failed) if missed is None else np.asarray(missed, bool)
    result = {"n": int(len(conf)), "review_below_dice": REVIEW_BELOW_DICE, "threshold": None,
              "spearman_r": None, "spearman_p": None}
    if dice is not None:
        ok = np.isfinite(dice)
        if ok.sum() >= 3 and np.ptp(conf[ok]) > 0 and np.ptp(dice[ok]) > 0:
            r = stats.spearmanr(conf[ok], dice[ok])
            result["spearman_r"], result["spearman_p"] = float(r.statistic), float(r.pvalue)
    if failed.any() and (~failed).any():
        # every candidate cut at once (a loop over cuts was quadratic in the scans): counts at or below each
        cuts = np.unique(conf)
        flagged_n = np.searchsorted(np.sort(conf), cuts, side="right")
        failed_n = np.searchsorted(np.sort(conf[failed]), cuts, side="right")
        j = failed_n / failed.sum() - (flagged_n - failed_n) / (~failed).sum()
        best = int(np.argmax(j))  # the first (lowest) cut of the highest J
        best_t = float(cuts[best])
        result.update(threshold=best_t, youden_j=float(j[best]), youden_threshold=best_t, max_flagged=max_flagged)
        share = flagged_n / len(conf)
        if max_flagged is not None and share[best] > max_flagged:
            within = cuts[share <= max_flagged]
            result["threshold"] = float(within[-1]) if len(within) else None
    result.update(review_figures(conf, failed, missed,
                                 None if result["threshold"] is None else conf <= result["threshold"]))
    return result



def decide_plan(probs: list[np.ndarray], refs: list[np.ndarray], threshold: float = 0.5,
                min_px_candidates: tuple[int, ...] = (10, 50, 200),
                lesion_prob_candidates: tuple[float, ...] = (0.7, 0.8, 0.9, 0.95)) -> tuple[PostprocessPlan, dict]:
    """Greedily add each step that raises the mean Dice over `probs` vs `refs` (both-empty images
    count as 1 here, so removing a false positive is rewarded; an emptied lesion scan counts 0, so a
    gate that misses lesions pays for it). Returns (plan, evidence)."""
    masks = [np.asarray(p) >= threshold for p in probs]
    peaks = [np.full(1, float(np.max(p)) if np.size(p) else 0.0) for p in probs]  # apply_plan needs only the max

    def score(plan: PostprocessPlan) -> float:
        values = [dice(apply_plan(m, plan, pk), r)[0] for m, pk, r in zip(masks, peaks, refs)]
        return float(np.mean([1.0 if np.isnan(v) else v for v in values]))

    plan = PostprocessPlan()
    evidence = {"none": score(plan)}
    best = evidence["none"]
    candidates = [("fill_holes", {"fill_holes": True})]
    candidates += [(f"min_component_px={n}", {"min_component_px": n}) for n in min_px_candidates]
    candidates += [("keep_largest", {"keep_largest": True})]
    candidates += [(f"lesion_min_prob={q}", {"lesion_min_prob": q}) for q in lesion_prob_candidates]
    for name, change in candidates:
        if ("min_component_px" in change and plan.min_component_px) or \
                ("lesion_min_prob" in change and plan.lesion_min_prob):
            continue
        trial = PostprocessPlan(**{**asdict(plan), **change})
        evidence[name] = s = score(trial)
        if s > best + 1e-4:
            plan, best = trial, s
    evidence["chosen"] = best
    return plan, evidence
