"""Measure one decoded scan: pick its calibration, then `morphometry.measure_mask`.

This is where predict, measure and serve agree on which millimetres to trust:

1. A DICOM file's own calibration (`dicom.calibrate`: the ultrasound region holding every lesion, else
   Pixel Spacing) wins. When the file has calibration data that cannot be used (a region outside the
   image, lesions across regions of different scale, a delta or Pixel Spacing that is not a number in
   `spacing`'s plausible range), the figures stay in pixels and the reason is reported: a spacing typed
   by the user does not override a file that contradicts it.
2. Otherwise (PNG/JPEG, or DICOM without any calibration) the user's `--pixel-spacing`, if given.
3. Otherwise pixels, and the output says so.

Outputs carry only what is listed here (an allow-list): measurements, the spacing and its source, the
calibration note and whether the scanner burned text into the pixels; nothing else from a DICOM header.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hemaseg.data.images import Decoded
from hemaseg.spacing import Spacing
from hemaseg.measure.morphometry import ImageMeasurement, measure_mask

MAX_MEASURED_LESIONS = 20  # a noisy mask can hold thousands of specks; the report lists the largest

IMAGE_COLUMNS = ("n_lesions", "area_mm2", "longest_diameter_mm", "perpendicular_diameter_mm",
                 "longest_diameter_px", "perpendicular_diameter_px", "spacing_x_mm", "spacing_y_mm",
                 "spacing_source", "calibration_note")
LESION_COLUMNS = ("image", "frame", "lesion", "area_px", "area_mm2", "longest_diameter_mm", "perpendicular_diameter_mm",
                  "thickness_mm", "depth_top_mm", "depth_bottom_mm", "perimeter_mm", "circularity",
                  "echogenicity_ratio", "longest_diameter_px", "perpendicular_diameter_px", "thickness_px",
                  "perimeter_px", "depth_top_px", "depth_bottom_px", "bbox_x", "bbox_y", "bbox_w", "bbox_h")


@dataclass(frozen=True)
class ScanMeasurement:
    measurement: ImageMeasurement
    calibration_note: str | None  # why there are no millimetres, when there are none
    burned_in_annotation: bool | None  # DICOM only: text may be burned into the pixels (unknown = yes)

    def to_dict(self) -> dict:
        return {**self.measurement.to_dict(), "calibration_note": self.calibration_note,
                "burned_in_annotation": self.burned_in_annotation}

    def image_row(self) -> dict:
        """The per-image columns of predictions.csv / measurements.csv (IMAGE_COLUMNS)."""
        m, sp = self.measurement, self.measurement.spacing
        return {"n_lesions": m.n_lesions, "area_mm2": _round(m.total_area_mm2),
                "longest_diameter_mm": _round(m.longest_diameter_mm),
                "perpendicular_diameter_mm": _round(m.perpendicular_diameter_mm),
                "longest_diameter_px": _round(m.longest_diameter_px),
                "perpendicular_diameter_px": _round(m.perpendicular_diameter_px),
                "spacing_x_mm": None if sp is None else sp.x_mm, "spacing_y_mm": None if sp is None else sp.y_mm,
                "spacing_source": None if sp is None else sp.source, "calibration_note": self.calibration_note}

    def lesion_rows(self, image: str, frame: int | None = None) -> list[dict]:
        """One row per measured lesion (LESION_COLUMNS), largest first."""
        rows = []
        for les in self.measurement.lesions:
            d = les.to_dict()
            x, y, w, h = les.bbox
            rows.append({"image": image, "frame": frame, "lesion": les.label,
                         **{k: _round(d[k]) for k in LESION_COLUMNS[3:-4]},
                         "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h})
        return rows


def _round(v, digits: int = 3):
    if v is None or isinstance(v, (int, np.integer)):
        return None if v is None else int(v)
    return round(float(v), digits)


def lesions_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """x, y, w, h around every lesion of a bool HxW mask; None when it is empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def choose_spacing(decoded: Decoded, mask: np.ndarray,
                   pixel_spacing: Spacing | None = None) -> tuple[Spacing | None, str | None]:
    """(spacing, None) or (None, why the figures stay in pixels), by the rules in the module docstring."""
    scan = decoded.dicom
    if scan is not None and (scan.regions or scan.pixel_spacing is not None or scan.pixel_spacing_problem):
        spacing, reason = scan.spacing_for(lesions_bbox(mask))
        return spacing, reason
    if pixel_spacing is not None:
        return pixel_spacing, None
    if scan is not None:
        return None, "the DICOM file has no calibration (no ultrasound regions, no pixel spacing); " \
                     "give --pixel-spacing to measure in mm"
    return None, "no calibration given; --pixel-spacing MM (or X,Y) measures in mm"


def looks_like_sector(gray: np.ndarray) -> bool:
    """A curvilinear (sector) scan: the imaged area (non-zero pixels) widens with depth over the top of
    the image, where a linear probe's or a letterboxed scan's width is constant."""
    inside = np.asarray(gray) > 0
    h = inside.shape[0]
    if h < 20:
        return False
    widths = [int(np.count_nonzero(inside[int(h * f)])) for f in (0.1, 0.4)]
    return widths[1] > 0 and widths[0] < 0.8 * widths[1]


def measure_scan(decoded: Decoded, mask: np.ndarray, pixel_spacing: Spacing | None = None,
                 max_lesions: int | None = MAX_MEASURED_LESIONS) -> ScanMeasurement:
    """Measure the lesions of `mask` (bool HxW on `decoded.gray`'s grid) in mm where the scan is calibrated."""
    mask = np.asarray(mask, bool)
    spacing, note = choose_spacing(decoded, mask, pixel_spacing)
    m = measure_mask(mask, spacing, decoded.gray, sector=looks_like_sector(decoded.gray), max_lesions=max_lesions)
    return ScanMeasurement(m, note, None if decoded.dicom is None else decoded.dicom.burned_in_annotation)
