"""Inference: a Predictor built from a checkpoint alone, and the one batch function every path runs.

Training validation, `evaluate`, `cv`, `predict` and `serve` all reach the network through
`predict_boxed`: normalised letterboxed inputs -> backends (an ensemble and TTA flips averaged in
probability space) -> sigmoid -> each scan's original pixel grid (`transforms.unletterbox`). The
threshold is resolved once, in `Predictor.threshold` (the run's `inference.threshold` unless given).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hemaseg.config import RunConfig
from hemaseg.data.cache import default_cache_dir
from hemaseg.data.images import to_gray
from hemaseg.data.transforms import Letterbox, preprocess, unletterbox
from hemaseg.device import select_device
from hemaseg.inference.backends import Backend, choose_backend_cached, make_backend
from hemaseg.inference.manifest import weights_fingerprint
from hemaseg.inference.prediction import Prediction
from hemaseg.inference.postprocess import PostprocessPlan, apply_plan
from hemaseg.inference.review import Finding, ReviewHead, decide
from hemaseg.models.checkpoint import load_weights, resolve_checkpoint
from hemaseg.models.pretrained import PROMPTABLE, resolve_model

log = logging.getLogger(__name__)

Flips = Sequence[tuple[int, ...]]


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
            # remembered per weights, machine and libraries in the user's cache folder: a second load is quick
            name, first, record = choose_backend_cached(self.models[0], self.device, config.data.size,
                                                        default_cache_dir())
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
        self.review_head: ReviewHead | None = None  # learned on held-out scans (confidence.json)
        self.review_fitted_on: str | None = None  # which held-out scans the cut was chosen on, in words

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
        predictor.load_review(_confidence_file(path, paths))
        return predictor

    def load_review(self, path: Path | None) -> None:
        """The review decision of confidence.json (`hemaseg cv`, `hemaseg train`, or the packaged model's
        NAME.confidence.json); none: the rule of last resort (`inference.review.decide`)."""
        if path is None:
            return
        review = json.loads(path.read_text())
        self.review_threshold = review.get("threshold")
        self.review_head = ReviewHead.from_dict(review["head"]) if review.get("head") else None
        self.review_fitted_on = review.get("fitted_on", "out-of-fold scans of a cross-validation")

    @property
    def tta_flips(self) -> list[tuple[int, ...]]:
        """Only the flips the model saw in training: a vertical flip turns an ultrasound scan's depth
        upside down, which a model trained without it has never seen (it ruins the average)."""
        aug = self.config.augment
        return [dims for dims, p in (((-1,), aug.hflip), ((-2,), aug.vflip)) if p > 0] or [(-1,)]

    @property
    def size(self) -> int | tuple[int, int]:
        """The network input: a square side or (height, width)."""
        return self.config.data.size

    def identity(self) -> dict:
        """What decides this predictor's outputs besides the threshold (a bulk job's manifest records it,
        and --skip-existing refuses to resume with another)."""
        return {"weights": weights_fingerprint(self.models), "tta": self.tta,
                "postprocess": dataclasses.asdict(self.plan),
                "size": self.size if isinstance(self.size, int) else list(self.size)}  # as JSON reads it back

    def predict_proba_batch(self, images: Sequence[np.ndarray], batch_size: int = 8,
                            tta: bool | None = None, names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Probability maps (float32, each image's original HxW) for a list of images of any sizes and
        dtypes (`data.images.to_gray`). `tta` None means the predictor's setting. `names` (the scans'
        output names) matter only to predictors that prompt each scan (`promptable.BoxedScans`)."""
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
        return Prediction(prob, self.to_mask(prob, thr), thr, self.review_head,
                          (self.review_threshold, self.review_fitted_on))

    def decide(self, confidence_: float, found: bool) -> Finding:
        """The finding for a scan scored elsewhere (evaluate's rows): this model's review decision."""
        return decide(confidence_, found, self.review_threshold, self.review_fitted_on)

    def predict(self, image: np.ndarray, threshold: float | None = None, tta: bool | None = None) -> Prediction:
        """One image (HxW or HxWxC, any dtype) -> Prediction(prob, mask) at its original size."""
        return self.prediction(self.predict_proba_batch([image], tta=tta)[0], threshold)


def _confidence_file(path: Path, checkpoints: Sequence[Path]) -> Path | None:
    """A run's (or CV run's) confidence.json, else NAME.confidence.json beside a checkpoint file."""
    run_dir = path if path.is_dir() else path.parent
    candidates = [run_dir / "confidence.json"] if path.is_dir() or len(checkpoints) > 1 else \
        [path.with_suffix(".confidence.json"), run_dir / "confidence.json"]
    return next((c for c in candidates if c.is_file()), None)


def load_model(path: str | Path, device: str = "auto", threshold: float | None = None, tta: bool = False,
               postprocess: bool = True, backend: str = "auto"):
    """The Python API's entry point: `hemaseg.load_model("runs/x").predict(image)` (a `Predictor`), or
    `hemaseg.load_model("litemedsam").predict(image, box=(x0, y0, x1, y1))` (a box-prompted
    `promptable.BoxPredictor`). `backend` is one of `config.BACKENDS`; `auto` measures which exact backend
    is fastest here when the model loads."""
    if str(path) in PROMPTABLE and not Path(path).exists():
        from hemaseg.inference.promptable import BoxPredictor

        if tta or threshold is not None:
            raise ValueError(f"{path}: a box-prompted model takes no --tta, and its threshold goes to predict()")
        return BoxPredictor(device=device, backend=backend)
    return Predictor.from_checkpoint(path, device=device, threshold=threshold, tta=tta, postprocess=postprocess,
                                     backend=backend)
