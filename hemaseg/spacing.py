"""Pixel spacing: how many millimetres one pixel spans along x (columns) and y (rows), and where that
figure came from.

x and y stay separate everywhere (ultrasound pixels are often not square), and every measurement carries
its `Spacing.source`, so a reader can tell a DICOM region calibration from a number a user typed. A scan
with no trustworthy calibration has no Spacing at all (None): its figures stay in pixels and say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# real scans span ~0.02 mm/px (zoomed high-frequency probe) to ~1 (deep view); beyond these, a unit slip
MIN_MM_PER_PIXEL = 0.005
MAX_MM_PER_PIXEL = 5.0


def spacing_problem(x_mm, y_mm) -> str | None:
    """Why (x_mm, y_mm) mm per pixel cannot be a scan's calibration, or None when it can: each must be a
    finite number within [MIN_MM_PER_PIXEL, MAX_MM_PER_PIXEL]."""
    for axis, v in (("x", x_mm), ("y", y_mm)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            return f"pixel spacing along {axis} must be a finite number of mm > 0; got {v!r}"
        if not MIN_MM_PER_PIXEL <= v <= MAX_MM_PER_PIXEL:
            return (f"pixel spacing along {axis} of {v:g} mm is outside the plausible range for ultrasound "
                    f"({MIN_MM_PER_PIXEL:g} to {MAX_MM_PER_PIXEL:g} mm per pixel)")
    return None


@dataclass(frozen=True)
class Spacing:
    """Millimetres per pixel along x (image columns) and y (image rows)."""

    x_mm: float
    y_mm: float
    source: str  # e.g. "ultrasound region 0 (0018,6011)", "pixel spacing (0028,0030)", "--pixel-spacing"

    def __post_init__(self):
        problem = spacing_problem(self.x_mm, self.y_mm)
        if problem is not None:
            raise ValueError(problem)

    @property
    def pixel_area_mm2(self) -> float:
        return self.x_mm * self.y_mm

    def to_dict(self) -> dict:
        return {"x_mm": self.x_mm, "y_mm": self.y_mm, "source": self.source}


def parse_pixel_spacing(text: str, source: str = "--pixel-spacing") -> Spacing:
    """'0.1' (square pixels) or '0.1,0.2' (x, y) in mm -> Spacing; ValueError with the fix otherwise."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"pixel spacing {text!r} is not a number of mm; give MM or X,Y (e.g. 0.1 or 0.1,0.12)") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2:
        raise ValueError(f"pixel spacing {text!r} needs one value (square pixels) or two (x,y); got {len(values)}")
    return Spacing(values[0], values[1], source)
