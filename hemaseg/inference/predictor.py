"""Inference: a Predictor built from a checkpoint alone, and the one batch function every path runs.

Training validation, `evaluate`, `cv`, `predict` and `serve` all reach the network through
`predict_boxed`: normalised letterboxed inputs -> backends (an ensemble and TTA flips averaged in
probability space) -> sigmoid -> each scan's original pixel grid (`transforms.unletterbox`). The
threshold is resolved once, in `Predictor.threshold` (the run's `inference.threshold` unless given).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from hemaseg.config import RunConfig
from hemaseg.data.images import to_gray
from hemaseg.data.transforms import Letterbox, preprocess, unletterbox
from hemaseg.device import select_device
from hemaseg.inference.backends import Backend, choose_backend, make_backend
from hemaseg.inference.postprocess import PostprocessPlan, apply_plan, confidence
from hemaseg.inference.review import ReviewHead
from hemaseg.lesions import count_lesions
from hemaseg.models.checkpoint import load_weights, resolve_checkpoint
from hemaseg.models.pretrained import resolve_model

log = logging.getLogger(__name__)

Flips = Sequence[tuple[int, ...]]
REVIEW_FALLBACK = 0.5  # needs-review cut for runs without an out-of-fold threshold (confidence.json)


@torch.no_grad()
def predict_boxed(runners: Sequence[Backend], inputs: np.ndarray, boxes: Sequence[Letterbox],
                  flips: Flips = (), device: torch.device | str = "cpu") -> list[np.ndarray]:
    """(N, S, S) normalised letterboxed inputs -> N probability maps, each on its scan's original grid.

    Every runner (one per ensemble member) sees the batch and each flipped copy (`flips`: dims such as
    (-1,) for a horizontal flip); their probabilities are averaged."""
    x = torch.as_tensor(inputs, dtype=torch.float32)[:, None].to(device)  # (N, 1, S, S)
    views = [(), *flips]
    total = torch.zeros(x.shape, dtype=torch.float32)
    for runner in runners:
        for dims in views:
            p = torch.sigmoid(runner(x.flip(dims) if dims else x).float()).cpu()
            total += p.flip(dims) if dims else p
    probs = (total / (len(runners) * len(views)))[:, 0]  # (N, S, S)
    return [unletterbox(p, box) for p, box in zip(probs, boxes)]


@dataclass
class Prediction:
    """One image's result on its original pixel grid."""

    prob: np.ndarray  # float32 HxW in [0, 1]
    mask: np.ndarray  # bool HxW, after the threshold and the run's postprocessing
    threshold: float = 0.5
    review_head: ReviewHead | None = None  # a CV run's learned confidence (inference.review)

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


# A fold's best.pt was picked on its validation scans, which in a cross-validation are the held-out
# scans it is scored on: scoring or ensembling it would report a selection made on the test data. The
# folds' final weights (the schedule has annealed the learning rate to zero there) are used instead,
# as nnU-Net does.
FOLD_WEIGHTS = "last.pt"


def fold_checkpoints(run: Path) -> list[Path]:
    """The final weights of every fold of a cross-validation run folder (empty for a plain run)."""
    if not (run / "folds.json").is_file():
        return []
    paths = sorted(run.glob(f"fold_*/{FOLD_WEIGHTS}"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not paths:
        raise FileNotFoundError(f"{run}: a cross-validation run without any trained fold (fold_*/{FOLD_WEIGHTS})")
    return paths


class Predictor:
    """One model, or a cross-validation ensemble, plus the preprocessing and postprocessing it was
    trained and validated with. Networks always run through a backend (`backend`, default `auto`)."""

    def __init__(self, models: torch.nn.Module | Sequence[torch.nn.Module], config: RunConfig,
                 device: str | torch.device = "auto", threshold: float | None = None,
                 metadata: dict | None = None, tta: bool = False, plan: PostprocessPlan | None = None,
                 backend: str = "auto"):
        self.device = select_device(device)
        models = [models] if isinstance(models, torch.nn.Module) else list(models)
        self.models = [m.to(self.device).eval() for m in models]
        self.config = config
        self.metadata = dict(metadata or {})
        if backend == "auto":  # measured on the first member; an ensemble's members share one architecture
            name, first, record = choose_backend(self.models[0], self.device, config.data.size)
            self.runners = [first] + [make_backend(m, name, self.device) for m in self.models[1:]]
            self.metadata["backend_auto"] = record
        else:
            name = backend
            self.runners = [make_backend(m, name, self.device) for m in self.models]
        self.backend = name  # the backend that runs, never "auto"
        self.threshold = config.inference.threshold if threshold is None else float(threshold)
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, got {self.threshold}")
        self.tta = tta
        self.plan = plan or PostprocessPlan()
        self.review_threshold: float | None = None  # confidence at or below which a case needs review
        self.review_head: ReviewHead | None = None  # learned out of fold by `hemaseg cv` (confidence.json)

    @property
    def model(self) -> torch.nn.Module:
        return self.models[0]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", threshold: float | None = None,
                        tta: bool = False, postprocess: bool = True, backend: str = "auto") -> "Predictor":
        """`path` is a run folder (best.pt), a cross-validation run (every fold's final weights, averaged)
        or a checkpoint file, or the name of a packaged model ("ultrasound"). A run's postprocessing.json
        is applied unless postprocess=False."""
        path = resolve_model(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such run folder or checkpoint")
        folds = fold_checkpoints(path) if path.is_dir() else []
        paths = folds or [resolve_checkpoint(path)]
        loaded = [load_weights(p) for p in paths]
        config, ckpt = loaded[0][1], loaded[0][2]
        meta = {k: ckpt.get(k) for k in ("version", "epoch", "metrics", "data_fingerprint")}
        meta["checkpoint"] = str(paths[0]) if len(paths) == 1 else str(path)
        meta["n_models"] = len(paths)
        run_dir = path if path.is_dir() else path.parent
        plan = None
        if postprocess and (run_dir / "postprocessing.json").is_file():
            plan = PostprocessPlan.load(run_dir / "postprocessing.json")
        predictor = cls([m for m, _, _ in loaded], config, device, threshold, meta, tta, plan, backend)
        if (run_dir / "confidence.json").is_file():
            review = json.loads((run_dir / "confidence.json").read_text())
            predictor.review_threshold = review.get("threshold")
            if review.get("head"):
                predictor.review_head = ReviewHead.from_dict(review["head"])
        return predictor

    @property
    def tta_flips(self) -> list[tuple[int, ...]]:
        """Only the flips the model saw in training: a vertical flip turns an ultrasound scan's depth
        upside down, which a model trained without it has never seen (it ruins the average)."""
        aug = self.config.augment
        return [dims for dims, p in (((-1,), aug.hflip), ((-2,), aug.vflip)) if p > 0] or [(-1,)]

    @property
    def size(self) -> int:
        return self.config.data.size

    def predict_proba_batch(self, images: Sequence[np.ndarray], batch_size: int = 8,
                            tta: bool | None = None) -> list[np.ndarray]:
        """Probability maps (float32, each image's original HxW) for a list of images of any sizes and
        dtypes (`data.images.to_gray`). `tta` None means the predictor's setting."""
        flips = self.tta_flips if (self.tta if tta is None else tta) else ()
        out = []
        for start in range(0, len(images), batch_size):
            prepared = [preprocess(to_gray(im), self.size, self.config.data.normalize)
                        for im in images[start:start + batch_size]]
            out.extend(predict_boxed(self.runners, np.stack([x for x, _ in prepared]), [b for _, b in prepared],
                                     flips, self.device))
        return out

    def to_mask(self, prob: np.ndarray, threshold: float | None = None,
                plan: PostprocessPlan | None = None) -> np.ndarray:
        """Threshold (the predictor's unless given), then postprocessing (the run's unless given)."""
        return apply_plan(prob >= (self.threshold if threshold is None else threshold),
                          self.plan if plan is None else plan, prob)

    def prediction(self, prob: np.ndarray, threshold: float | None = None) -> Prediction:
        thr = self.threshold if threshold is None else threshold
        return Prediction(prob, self.to_mask(prob, thr), thr, self.review_head)

    def needs_review(self, conf: float) -> bool:
        """Flag a case whose confidence is at or below the run's review threshold, chosen out of fold by
        `hemaseg cv` (confidence.json); a run without one flags confidence below REVIEW_FALLBACK."""
        if self.review_threshold is None:
            return conf < REVIEW_FALLBACK
        return conf <= self.review_threshold

    def finding(self, pred: Prediction) -> str:
        """The words predict, serve and the page show: never '100 % confident' for an empty mask whose
        evidence is weak."""
        found = "lesion found" if pred.area_px else "no lesion found"
        return f"{found} - review" if self.needs_review(pred.confidence) else found

    def predict(self, image: np.ndarray, threshold: float | None = None, tta: bool | None = None) -> Prediction:
        """One image (HxW or HxWxC, any dtype) -> Prediction(prob, mask) at its original size."""
        return self.prediction(self.predict_proba_batch([image], tta=tta)[0], threshold)


def load_model(path: str | Path, device: str = "auto", threshold: float | None = None, tta: bool = False,
               postprocess: bool = True, backend: str = "auto") -> Predictor:
    """The Python API's entry point: `hemaseg.load_model("runs/x").predict(image)`. `backend` is one of
    `config.BACKENDS`; `auto` measures which exact backend is fastest here when the model loads."""
    return Predictor.from_checkpoint(path, device=device, threshold=threshold, tta=tta, postprocess=postprocess,
                                     backend=backend)
