"""Inference: a Predictor built from a checkpoint alone, and batch prediction over files.

Every path into the network goes through `transforms.preprocess`, and every probability map comes
back through `transforms.unletterbox`, so masks land on each image's original pixel grid.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage

from .backends import Backend, make_backend
from .checkpoint import load_checkpoint, resolve_checkpoint
from .config import RunConfig
from .models import build_model
from .postprocess import PostprocessPlan, apply_plan, confidence
from .transforms import Letterbox, preprocess, unletterbox

log = logging.getLogger(__name__)


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_gray_unit(image: np.ndarray) -> np.ndarray:
    """Any 2-D/3-D image array -> float32 HxW in [0, 1] (integers scaled by their dtype's range,
    RGB/RGBA by ITU-R 601 luminance, floats above 1 by their maximum)."""
    a = np.asarray(image)
    if a.ndim == 3:
        if a.shape[-1] not in (1, 3, 4):
            raise ValueError(f"expected an HxW or HxWxC image with C in 1, 3, 4; got shape {a.shape}")
        a = a[..., 0] if a.shape[-1] == 1 else a[..., :3] @ np.array([0.299, 0.587, 0.114])
        if np.asarray(image).dtype.kind in "ui":
            a = a / np.iinfo(np.asarray(image).dtype).max
    elif a.ndim != 2:
        raise ValueError(f"expected an HxW or HxWxC image; got shape {a.shape}")
    elif a.dtype.kind in "ui":
        a = a / np.iinfo(a.dtype).max
    elif a.dtype == bool:
        a = a.astype(np.float32)
    a = a.astype(np.float32)
    peak = float(a.max()) if a.size else 0.0
    return a / peak if peak > 1 else a


@torch.no_grad()
def forward_probs(models: torch.nn.Module | Backend | Sequence[torch.nn.Module | Backend],
                  batch: np.ndarray | torch.Tensor, device: torch.device,
                  tta: bool | Sequence[tuple[int, ...]] = False) -> torch.Tensor:
    """(N, S, S) normalised inputs -> (N, S, S) probabilities on the CPU.

    Several models (a cross-validation ensemble) and, with `tta`, flipped copies are averaged in
    probability space. `tta=True` means horizontal and vertical flips; a list of flip dims (e.g.
    `[(-1,)]`) chooses them. A model is a network (run eager, bf16 autocast on CUDA) or a
    `backends.make_backend` callable.
    """
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    x = torch.as_tensor(batch, dtype=torch.float32)[:, None].to(device)
    if tta is True:
        tta = [(-1,), (-2,)]
    flips = [(), *tta] if tta else [()]
    total = torch.zeros(x.shape, dtype=torch.float32, device=device)
    for model in models:
        for dims in flips:
            xin = x.flip(dims) if dims else x
            eager = isinstance(model, torch.nn.Module)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and eager):
                logits = model(xin)
            p = torch.sigmoid(logits.float())
            total += p.flip(dims) if dims else p
    return (total / (len(models) * len(flips)))[:, 0].cpu()


@dataclass
class Prediction:
    """One image's result on its original pixel grid."""

    prob: np.ndarray  # float32 HxW in [0, 1]
    mask: np.ndarray  # bool HxW, after the run's postprocessing

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())

    @property
    def n_lesions(self) -> int:
        return int(ndimage.label(self.mask)[1])

    @property
    def confidence(self) -> float:
        return confidence(self.prob)


def _load_weights(ckpt_path: Path) -> tuple[torch.nn.Module, RunConfig, dict]:
    ckpt = load_checkpoint(ckpt_path)
    config = RunConfig.from_dict(ckpt["config"])
    model = build_model(config.model)
    model.load_state_dict(ckpt["model"])
    return model, config, ckpt


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
    trained and validated with."""

    def __init__(self, models: torch.nn.Module | Sequence[torch.nn.Module], config: RunConfig,
                 device: str | torch.device = "auto", threshold: float | None = None,
                 metadata: dict | None = None, tta: bool = False, plan: PostprocessPlan | None = None,
                 backend: str = "torch"):
        self.device = select_device(device) if isinstance(device, str) else device
        models = [models] if isinstance(models, torch.nn.Module) else list(models)
        self.models = [m.to(self.device).eval() for m in models]
        self.backend = backend  # how the networks run (backends.BACKENDS); "torch" runs them as they are
        self.runners = self.models if backend == "torch" else [make_backend(m, backend, self.device)
                                                               for m in self.models]
        self.config = config
        self.threshold = config.train.threshold if threshold is None else threshold
        self.metadata = metadata or {}
        self.tta = tta
        self.plan = plan or PostprocessPlan()
        self.review_threshold: float | None = None  # confidence at or below which a case needs review

    @property
    def model(self) -> torch.nn.Module:
        return self.models[0]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", threshold: float | None = None,
                        tta: bool = False, postprocess: bool = True, backend: str = "torch") -> "Predictor":
        """`path` is a run folder (best.pt), a cross-validation run (every fold's final weights, averaged)
        or a checkpoint file. A run's postprocessing.json is applied unless postprocess=False."""
        path = Path(path)
        folds = fold_checkpoints(path) if path.is_dir() else []
        paths = folds or [resolve_checkpoint(path)]
        loaded = [_load_weights(p) for p in paths]
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
            predictor.review_threshold = json.loads((run_dir / "confidence.json").read_text()).get("threshold")
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

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        return preprocess(to_gray_unit(image), self.size, self.config.data.normalize)

    def predict_proba_batch(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """Probability maps (float32, each image's original HxW) for a list of images of any sizes."""
        out = []
        for start in range(0, len(images), batch_size):
            prepared = [self._prepare(im) for im in images[start:start + batch_size]]
            probs = forward_probs(self.runners, np.stack([p for p, _ in prepared]), self.device,
                                  self.tta_flips if self.tta else False)
            out.extend(unletterbox(p, box) for p, (_, box) in zip(probs, prepared))
        return out

    def to_mask(self, prob: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Threshold, then the run's postprocessing."""
        return apply_plan(prob >= (self.threshold if threshold is None else threshold), self.plan)

    def needs_review(self, conf: float) -> bool:
        """Flag a case whose confidence is at or below the threshold chosen out of fold (False
        when the run has no such threshold)."""
        return self.review_threshold is not None and conf <= self.review_threshold

    def predict(self, image: np.ndarray, threshold: float | None = None) -> Prediction:
        """One image (HxW or HxWxC, any dtype) -> Prediction(prob, mask) at its original size."""
        prob = self.predict_proba_batch([image])[0]
        return Prediction(prob, self.to_mask(prob, threshold))


def load_model(path: str | Path, device: str = "auto", threshold: float | None = None, tta: bool = False,
               postprocess: bool = True, backend: str = "torch") -> Predictor:
    """The Python API's entry point: `hemaseg.load_model("runs/x").predict(image)`. `backend` is one of
    `backends.BACKENDS` ("torch-fast", "torch-bf16", "onnxruntime" run faster on a CPU)."""
    return Predictor.from_checkpoint(path, device=device, threshold=threshold, tta=tta, postprocess=postprocess,
                                     backend=backend)


# --- files in, files out ---------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def collect_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the images inside (an `images/` subfolder if present)."""
    from .data import natural_key

    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            folder = item / "images" if (item / "images").is_dir() else item
            found = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                raise FileNotFoundError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files.extend(sorted(found, key=lambda p: natural_key(p.name)))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    stems: dict[str, Path] = {}
    for p in unique:
        if p.stem in stems:
            raise ValueError(f"{p}: same name as {stems[p.stem]}; outputs would overwrite each other")
        stems[p.stem] = p
    return unique


def predict_files(predictor: Predictor, inputs: Sequence[str | Path], out_dir: str | Path,
                  save_prob: bool = False, threshold: float | None = None, batch_size: int = 8,
                  progress: bool = True) -> list[dict]:
    """Write `<stem>_mask.png`, `<stem>_overlay.png` (and `<stem>_prob.png`) per image at its original
    size, plus `predictions.csv` with per-image lesion measurements. Returns the CSV rows."""
    from tqdm import tqdm

    from .data import read_image
    from .report import overlay_contours, save_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = collect_inputs(inputs)
    thr = predictor.threshold if threshold is None else threshold
    rows = []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress)
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = [read_image(p) for p in chunk]
        for path, image, prob in zip(chunk, images, predictor.predict_proba_batch(images, batch_size)):
            pred = Prediction(prob, predictor.to_mask(prob, thr))
            save_png(out_dir / f"{path.stem}_mask.png", pred.mask.astype(np.uint8) * 255)
            save_png(out_dir / f"{path.stem}_overlay.png", overlay_contours(image, pred=pred.mask))
            if save_prob:
                save_png(out_dir / f"{path.stem}_prob.png", np.round(prob * 255).astype(np.uint8))
            rows.append({
                "image": str(path), "width": image.shape[1], "height": image.shape[0],
                "lesion_area_px": pred.area_px, "lesion_fraction": round(pred.area_px / image.size, 6),
                "n_lesions": pred.n_lesions, "max_prob": round(float(prob.max()), 4),
                "confidence": round(pred.confidence, 4),
                "needs_review": predictor.needs_review(pred.confidence),
            })
        bar.update(len(chunk))
    bar.close()
    if rows:
        with open(out_dir / "predictions.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows
