"""Inference: a Predictor built from a checkpoint alone, and batch prediction over files.

Every path into the network goes through `transforms.preprocess`, and every probability map comes
back through `transforms.unletterbox`, so masks land on each image's original pixel grid.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage

from .checkpoint import load_checkpoint, resolve_checkpoint
from .config import RunConfig
from .models import build_model
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
def forward_probs(model: torch.nn.Module, batch: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, S, S) normalised inputs -> (N, S, S) probabilities on the CPU."""
    x = torch.as_tensor(batch, dtype=torch.float32)[:, None].to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(x)
    return torch.sigmoid(logits.float())[:, 0].cpu()


@dataclass
class Prediction:
    """One image's result on its original pixel grid."""

    prob: np.ndarray  # float32 HxW in [0, 1]
    mask: np.ndarray  # bool HxW

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())

    @property
    def n_lesions(self) -> int:
        return int(ndimage.label(self.mask)[1])


class Predictor:
    """A trained model plus the preprocessing it was trained with."""

    def __init__(self, model: torch.nn.Module, config: RunConfig, device: str | torch.device = "auto",
                 threshold: float | None = None, metadata: dict | None = None):
        self.device = select_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.config = config
        self.threshold = config.train.threshold if threshold is None else threshold
        self.metadata = metadata or {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", threshold: float | None = None) -> "Predictor":
        """`path` is a run folder (uses best.pt) or a checkpoint file."""
        ckpt_path = resolve_checkpoint(path)
        ckpt = load_checkpoint(ckpt_path)
        config = RunConfig.from_dict(ckpt["config"])
        model = build_model(config.model)
        model.load_state_dict(ckpt["model"])
        meta = {k: ckpt.get(k) for k in ("version", "epoch", "metrics", "data_fingerprint")}
        meta["checkpoint"] = str(ckpt_path)
        return cls(model, config, device, threshold, meta)

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
            probs = forward_probs(self.model, np.stack([p for p, _ in prepared]), self.device)
            out.extend(unletterbox(p, box) for p, (_, box) in zip(probs, prepared))
        return out

    def predict(self, image: np.ndarray, threshold: float | None = None) -> Prediction:
        """One image (HxW or HxWxC, any dtype) -> Prediction(prob, mask) at its original size."""
        prob = self.predict_proba_batch([image])[0]
        return Prediction(prob, prob >= (self.threshold if threshold is None else threshold))


def load_model(path: str | Path, device: str = "auto", threshold: float | None = None) -> Predictor:
    """The Python API's entry point: `hemaseg.load_model("runs/x").predict(image)`."""
    return Predictor.from_checkpoint(path, device=device, threshold=threshold)


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
            pred = Prediction(prob, prob >= thr)
            save_png(out_dir / f"{path.stem}_mask.png", pred.mask.astype(np.uint8) * 255)
            save_png(out_dir / f"{path.stem}_overlay.png", overlay_contours(image, pred=pred.mask))
            if save_prob:
                save_png(out_dir / f"{path.stem}_prob.png", np.round(prob * 255).astype(np.uint8))
            rows.append({
                "image": str(path), "width": image.shape[1], "height": image.shape[0],
                "lesion_area_px": pred.area_px, "lesion_fraction": round(pred.area_px / image.size, 6),
                "n_lesions": pred.n_lesions, "max_prob": round(float(prob.max()), 4),
            })
        bar.update(len(chunk))
    bar.close()
    if rows:
        with open(out_dir / "predictions.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows
