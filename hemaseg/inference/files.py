"""Files in, files out: `hemaseg predict` over a list of scans and folders.

A bad scan never stops the others: its problem is one line in `errors.csv` and on the log, and the
rest are segmented. A scan's outputs (mask, overlay, probabilities) are encoded in memory first and then
written, each atomically; if a write fails, the ones already written for that scan are removed, so a
scan's outputs appear whole or not at all. `predictions.csv` lists exactly the scans whose outputs
were written, and is written (with `errors.csv`) even when the run is interrupted.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hemaseg.data.dataset import natural_key
from hemaseg.data.images import IMAGE_SUFFIXES, MAX_PIXELS_DEFAULT, DataError, read_image
from hemaseg.evaluation.report import overlay_contours
from hemaseg.inference.predictor import Predictor
from hemaseg.io import atomic_write_bytes, atomic_write_text, png_bytes

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ("image", "width", "height", "lesion_area_px", "lesion_fraction", "n_lesions", "max_prob",
                      "confidence", "needs_review", "finding")
ERROR_COLUMNS = ("image", "code", "problem")


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to the images inside (an `images/` subfolder if present)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            folder = item / "images" if (item / "images").is_dir() else item
            found = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
            if not found:
                raise FileNotFoundError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files.extend(sorted(found, key=lambda p: natural_key(p.name)))
        elif item.exists() or item.is_symlink():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    unique = list(dict.fromkeys(p.absolute() for p in files))
    stems: dict[str, Path] = {}
    for p in unique:
        if p.stem in stems:
            raise ValueError(f"{p}: same name as {stems[p.stem]}; outputs would overwrite each other")
        stems[p.stem] = p
    return unique


@dataclass
class PredictResult:
    rows: list[dict] = field(default_factory=list)  # one per scan segmented, as in predictions.csv
    errors: list[dict] = field(default_factory=list)  # one per scan that failed, as in errors.csv
    out_dir: Path | None = None


def _write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _write_outputs(files: dict[Path, bytes]) -> None:
    """Every file or none: on a failure the ones already written are removed and the error re-raised."""
    done = []
    try:
        for path, data in files.items():
            atomic_write_bytes(path, data)
            done.append(path)
    except BaseException:
        for path in done:
            path.unlink(missing_ok=True)
        raise


def predict_files(predictor: Predictor, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  save_prob: bool = False, threshold: float | None = None, batch_size: int = 8,
                  progress: bool = True, fail_fast: bool = False,
                  max_pixels: int | None = MAX_PIXELS_DEFAULT) -> PredictResult:
    """Write `<stem>_mask.png`, `<stem>_overlay.png` (and `<stem>_prob.png`) per image at its original
    size, `predictions.csv` with per-image lesion measurements and, when any scan failed, `errors.csv`.

    A scan that cannot be read is recorded and skipped (`fail_fast` raises its DataError instead). OS
    errors while writing (a full disk) stop the run: they would fail every later scan too."""
    from tqdm import tqdm

    files = collect_inputs(inputs)  # before anything is created: a wrong argument leaves no empty folder
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    result = PredictResult(out_dir=out)
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress)
    try:
        for start in range(0, len(files), batch_size):
            chunk, images = [], []
            for path in files[start:start + batch_size]:
                try:
                    images.append(read_image(path, max_pixels))
                    chunk.append(path)
                except DataError as e:
                    if fail_fast:
                        raise
                    log.warning("skipped: %s", e)
                    result.errors.append({"image": str(path), "code": e.code, "problem": e.problem})
            for path, image, prob in zip(chunk, images, predictor.predict_proba_batch(images, batch_size)):
                pred = predictor.prediction(prob, threshold)
                outputs = {out / f"{path.stem}_mask.png": png_bytes(pred.mask.astype(np.uint8) * 255),
                           out / f"{path.stem}_overlay.png": png_bytes(overlay_contours(image, pred=pred.mask))}
                if save_prob:
                    outputs[out / f"{path.stem}_prob.png"] = png_bytes(np.round(prob * 255).astype(np.uint8))
                _write_outputs(outputs)
                result.rows.append({
                    "image": str(path), "width": image.shape[1], "height": image.shape[0],
                    "lesion_area_px": pred.area_px, "lesion_fraction": round(pred.area_px / image.size, 6),
                    "n_lesions": pred.n_lesions, "max_prob": round(float(prob.max()), 4),
                    "confidence": round(pred.confidence, 4),
                    "needs_review": predictor.needs_review(pred.confidence), "finding": predictor.finding(pred),
                })
            bar.update(len(files[start:start + batch_size]))
    finally:
        bar.close()
        # what was done is recorded even when the run stops early (an OS error, Ctrl-C, --fail-fast)
        _write_csv(out / "predictions.csv", result.rows, PREDICTION_COLUMNS)
        if result.errors:
            _write_csv(out / "errors.csv", result.errors, ERROR_COLUMNS)
        elif (out / "errors.csv").is_file():
            (out / "errors.csv").unlink()  # a rerun that succeeded leaves no stale error list
    return result
