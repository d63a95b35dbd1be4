"""A learned estimate of whether an answer can be trusted: the review head `hemaseg cv` fits out of fold.

The rule-based confidences (`postprocess.confidence`, `entropy_confidence`) each see one symptom. On the
10-minute BUSI cross-validation (benchmarks/review_rules.py) the margin rule flagged only 49 % of the
missed lesions and the entropy rule ranked failures at AUROC 0.79; a logistic model on both plus the
peak probability and the predicted area, fitted leave-one-fold-out with a missed lesion weighing 3
failures, reached AUROC 0.83 and flagged 96 % of the misses within a 40 % review budget. So `hemaseg cv` fits this head on its out-of-fold rows (what it scores there comes from
heads fitted without that fold), stores it in confidence.json, and a CV run's predictor reports its score
as the confidence: the estimated probability that the answer is acceptable (Dice >= 0.5 on a scan with a
lesion, or a correct "no lesion"). `hemaseg train` fits the same head on its validation split, and the
packaged model carries one fitted on scans it never trained on (NAME.confidence.json beside its weights).

`Finding` is the one answer every surface shows (Python, CSVs, service, pages, DICOM SR): lesion found or
not, whether it needs review, the confidence and why. A model with no fitted decision falls back on the
rule of last resort: "no lesion found" is never trusted (always review), and a found lesion is flagged
when the margin rule's confidence is below REVIEW_FALLBACK.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hemaseg.inference.postprocess import confidence, entropy_confidence

REVIEW_FALLBACK = 0.5  # margin-rule cut for a found lesion when no review decision was fitted
REVIEW_FEATURES = ("confidence", "confidence_entropy", "max_prob", "log_area", "found")
MIN_ROWS_TO_FIT = 20  # fewer out-of-fold scans (or no failure among them) leave the rule in charge


def review_features(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """The head's inputs for one scan (REVIEW_FEATURES): the margin and entropy confidences, the highest
    probability, log(1 + 1000 x the final mask's area fraction) and whether anything was found."""
    prob, mask = np.asarray(prob), np.asarray(mask, bool)
    area = float(mask.mean()) if mask.size else 0.0
    return np.array([confidence(prob, threshold), entropy_confidence(prob, threshold),
                     float(np.max(prob)) if prob.size else 0.0, math.log1p(1000 * area), float(mask.any())])


@dataclass(frozen=True)
class ReviewHead:
    """P(acceptable | features) = sigmoid(weights . features + bias)."""

    weights: tuple[float, ...]
    bias: float

    def score_features(self, x: np.ndarray) -> np.ndarray:
        """(N, len(REVIEW_FEATURES)) or one row -> probabilities in (0, 1)."""
        z = np.asarray(x, np.float64) @ np.asarray(self.weights) + self.bias
        return 1 / (1 + np.exp(-z))

    def score(self, prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> float:
        return float(self.score_features(review_features(prob, mask, threshold)))

    @classmethod
    def fit(cls, x: np.ndarray, acceptable: np.ndarray, l2: float = 0.01,
            weights: np.ndarray | None = None) -> ReviewHead | None:
        """L2-regularised logistic regression, each row's log-likelihood weighted by `weights` (default 1);
        None when there are too few rows or only one outcome."""
        from scipy import optimize

        x, y = np.asarray(x, np.float64), np.asarray(acceptable, np.float64)
        if len(x) < MIN_ROWS_TO_FIT or y.min() == y.max():
            return None
        c = np.ones(len(x)) if weights is None else np.asarray(weights, np.float64)
        xb = np.c_[x, np.ones(len(x))]

        def loss(w):
            z = xb @ w
            p = 1 / (1 + np.exp(-z))
            grad = xb.T @ (c * (p - y)) + 2 * l2 * np.r_[w[:-1], 0.0]
            return np.sum(c * (np.logaddexp(0, z) - y * z)) + l2 * np.sum(w[:-1] ** 2), grad

        w = optimize.minimize(loss, np.zeros(xb.shape[1]), jac=True, method="L-BFGS-B").x
        return cls(tuple(float(v) for v in w[:-1]), float(w[-1]))

    def to_dict(self) -> dict:
        return {"features": list(REVIEW_FEATURES), "weights": list(self.weights), "bias": self.bias}

    @classmethod
    def from_dict(cls, d: dict) -> "ReviewHead":
        if list(d.get("features", [])) != list(REVIEW_FEATURES):
            raise ValueError(f"review head features {d.get('features')} are not {list(REVIEW_FEATURES)}")
        return cls(tuple(float(v) for v in d["weights"]), float(d["bias"]))


@dataclass(frozen=True)
class Finding:
    """What a clinician is told about one scan."""

    found: bool  # the final mask has a lesion
    needs_review: bool
    confidence: float  # 0..1 (the review head's P(acceptable), else the margin rule)
    why: str  # the rule that decided needs_review, in words

    @property
    def text(self) -> str:
        """'lesion found', 'no lesion found', each followed by ' - review' when flagged."""
        words = "lesion found" if self.found else "no lesion found"
        return f"{words} - review" if self.needs_review else words

    def row(self) -> dict:
        """The columns predict, measure and evaluate write (and the service returns)."""
        return {"finding": self.text, "needs_review": self.needs_review, "confidence": round(self.confidence, 4),
                "review_reason": self.why}


def decide(confidence_: float, found: bool, threshold: float | None, fitted_on: str | None) -> Finding:
    """needs_review for one scan: confidence at or below `threshold`, the cut fitted on `fitted_on` held-out
    scans; without one (None), the rule of last resort (an empty result always goes to review)."""
    if threshold is not None:
        flagged = confidence_ <= threshold
        why = f"confidence {confidence_:.2f} {'<=' if flagged else '>'} {threshold:.2f}, the cut fitted on {fitted_on}"
    elif not found:
        flagged, why = True, "no review decision fitted for this model: 'no lesion' is never trusted unreviewed"
    else:
        flagged = confidence_ < REVIEW_FALLBACK
        why = (f"margin rule (no review decision fitted): confidence {confidence_:.2f} "
               f"{'<' if flagged else '>='} {REVIEW_FALLBACK}")
    return Finding(bool(found), bool(flagged), float(confidence_), why)
