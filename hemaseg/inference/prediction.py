"""One scan's answer: its probabilities and mask at the scan's own size, and the finding that goes with it.
Made by every model hemaseg runs (`predictor.Predictor`, `promptable.BoxPredictor`)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from hemaseg.inference.postprocess import confidence
from hemaseg.inference.review import Finding, ReviewHead, decide
from hemaseg.lesions import count_lesions


@dataclass
class Prediction:
    """One image's result on its original pixel grid."""

    prob: np.ndarray  # float32 HxW in [0, 1]
    mask: np.ndarray  # bool HxW, after the threshold and the run's postprocessing
    threshold: float = 0.5
    review_head: ReviewHead | None = None  # the model's learned confidence (inference.review)
    decision: tuple[float | None, str | None] = (None, None)  # (review cut, what it was fitted on)

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())

    @property
    def n_lesions(self) -> int:
        return count_lesions(self.mask)

    @cached_property  # predict, serve and finding() each ask; the head computes several maps' statistics
    def confidence(self) -> float:
        """0..1: a CV run's review head (the estimated probability that this answer is acceptable),
        else the margin rule (`postprocess.confidence`)."""
        if self.review_head is not None:
            return self.review_head.score(self.prob, self.mask, self.threshold)
        return confidence(self.prob, self.threshold)

    @cached_property
    def finding(self) -> Finding:
        """Lesion found or not, needs review, confidence and why (`inference.review.decide`)."""
        return decide(self.confidence, self.area_px > 0, *self.decision)

    @property
    def needs_review(self) -> bool:
        return self.finding.needs_review
