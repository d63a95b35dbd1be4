"""`hemaseg measure --masks DIR`: measure outlines that already exist (hand-drawn references, or masks
an earlier `hemaseg predict` wrote) on their scans, with the same calibration rules and figures as
predict (`measure.scan`). Like predict, a scan or mask that cannot be read is one line in `errors.csv`
and the others are measured; `measurements.csv` and `lesions.csv` are written even when a run stops.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from hemaseg.data.dataset import read_mask
from hemaseg.data.images import MAX_PIXELS_DEFAULT, DataError
from hemaseg.data.listing import collect_inputs, read_frames
from hemaseg.io import atomic_write_bytes
from hemaseg.spacing import Spacing
from hemaseg.measure.scan import IMAGE_COLUMNS, measure_scan
from hemaseg.measure.tables import PredictResult, write_tables

log = logging.getLogger(__name__)

MEASUREMENT_COLUMNS = ("image", "frame", "mask", "width", "height") + IMAGE_COLUMNS
MASK_NAMES = ("{name}.png", "{name}_mask.png")  # a reference mask, or what `hemaseg predict` wrote


def find_mask(masks_dir: Path, name: str) -> Path:
    for pattern in MASK_NAMES:
        if (path := masks_dir / pattern.format(name=name)).is_file():
            return path
    tried = " or ".join(p.format(name=name) for p in MASK_NAMES)
    raise DataError(masks_dir / MASK_NAMES[0].format(name=name), f"no mask for this scan ({tried} in {masks_dir})",
                    "missing")


def measure_files(inputs: Sequence[str | os.PathLike], masks_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  pixel_spacing: Spacing | None = None, frame: int | None = 0, fail_fast: bool = False,
                  mask_threshold: float | None = None,
                  max_pixels: int | None = MAX_PIXELS_DEFAULT, dicom_sr: bool = False) -> PredictResult:
    """Measure each scan's mask from `masks_dir` (NAME.png or NAME_mask.png, NAME = the scan's stem, or
    NAME_frameNNN for every frame of a cine); write measurements.csv, lesions.csv (and errors.csv).
    `dicom_sr`: for DICOM scans also NAME_sr.dcm (`measure.dicom_out`; it says the outline was supplied)."""
    files = collect_inputs(inputs)
    masks = Path(masks_dir)
    if not masks.is_dir():
        raise NotADirectoryError(f"{masks}: --masks is not a folder")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    result = PredictResult(out_dir=out)
    try:
        for path in files:
            try:
                for name, index, decoded in read_frames(path, frame, max_pixels):
                    mask_path = find_mask(masks, name)
                    mask = read_mask(mask_path, mask_threshold, max_pixels)
                    if mask.shape != decoded.gray.shape:
                        (mh, mw), (ih, iw) = mask.shape, decoded.gray.shape
                        raise DataError(mask_path, f"mask size {mw}x{mh} does not match its scan's {iw}x{ih}")
                    measured = measure_scan(decoded, mask, pixel_spacing)
                    if dicom_sr and decoded.dicom is not None:
                        from hemaseg.measure.dicom_out import dicom_outputs

                        files_, skipped = dicom_outputs(path, mask, measured, index, out / name, sr=True,
                                                        seg=False, model=None)
                        for sr_path, data in files_.items():
                            atomic_write_bytes(sr_path, data)
                        for why in skipped:
                            log.warning("no DICOM output: %s", why)
                    result.rows.append({"image": str(path), "frame": index, "mask": str(mask_path),
                                        "width": mask.shape[1], "height": mask.shape[0], **measured.image_row()})
                    result.lesions += measured.lesion_rows(str(path), index)
            except DataError as e:
                if fail_fast:
                    raise
                log.warning("skipped: %s", e)
                result.errors.append({"image": str(path), "code": e.code, "problem": str(e)})
    finally:
        write_tables(result, "measurements.csv", MEASUREMENT_COLUMNS)
    return result
