"""Lesion morphometry: size, shape, depth below the skin and echogenicity, per lesion and per scan.

What a clinician follows from visit to visit is a handful of figures per lesion: its area, its longest
diameter and the diameter across it, its thickness and how deep it lies under the skin, and whether it is
darker or brighter than the tissue around it. This module computes them from a mask (lesions are
`lesions.label_lesions` components, ordered largest first like `lesions.find_lesions`) and, when given,
the scan itself.

Units. Every field names its unit. With a `Spacing` the `_mm` fields are filled and computed in physical
coordinates: a pixel centre (col, row) lies at (col * x_mm, row * y_mm), and every length and angle is
taken after that scaling, so pixels that are not square are measured exactly, not stretched afterwards.
The `_px` fields are always filled: they are the same measurement on the pixel grid as if pixels were
unit squares (on non-square pixels a `_px` length is therefore not the `_mm` length divided by a
spacing, and the longest diameter may even run in a different direction). Without a Spacing the `_mm`
fields are None and the scan says "no calibration".

Definitions and estimators (accuracy measured on shapes drawn analytically in physical space at
spacings (0.1, 0.1), (0.1, 0.25) and (0.3, 0.08) mm, centres and angles random, one "px" below being
the larger pixel side):

- Outline. Lengths are taken on the mask's half-way outline: the points midway between a lesion pixel
  centre and a background one (the mid-points of the pixel edges on the border; the 0.5 level line of the
  mask). Pixel centres alone make every lesion about a pixel short; the pixel squares' outer corners make
  a disc's longest diameter 1.0-1.4 px too long (the corners stick out along the diagonals and the
  maximum over directions finds them), which is outside a one-pixel tolerance.
- longest diameter = maximum Feret (caliper) diameter of the convex hull of the half-way outline, by
  brute force over hull vertices. Measured error (semi-axes 5-40 px): discs +0.6..+0.9 px on average
  (the maximum over directions picks the widest digitisation), ellipses +0.1..+0.5 px, rectangle
  diagonals -0.2..+0.1 px; worst case 1.0 px.
- perpendicular diameter = the caliper width of that hull measured along the direction perpendicular to
  the longest diameter (the distance between the two tangent lines parallel to the longest diameter).
  For an ellipse this is the minor axis; for a rectangle it is 2wh/sqrt(w^2 + h^2), not the short side.
  Measured error on ellipses (axis ratio 0.3-0.8): +0.5..+0.75 px on average, worst about 1.1 px on
  nearly round ones, whose longest direction is poorly determined. Across a rectangle's diagonal it is
  ill-conditioned (the width changes fast with the diagonal's direction): -0.5..-1 px, worst 2.6 px.
- thickness = the number of image rows the lesion spans (times y_mm): its extent along the beam axis on
  a linear probe. Measured: discs and ellipses within one row; a sharp corner's tip can fall between
  pixel centres, so a rotated rectangle reads up to 1.3 px thin. On a sector (curvilinear) image rows
  are not the beam axis away from the centre line; pass `sector=True` and the scan carries a warning.
- perimeter = length of the outer boundary (holes filled) by the Cauchy-Crofton formula: boundary
  crossings counted along lattice lines in every direction whose primitive pixel step is at most
  sqrt(5) times the larger pixel side (the 8 king and knight directions on square pixels, more on
  anisotropic pixels so that no physical direction is far from a counted one), weighted by each
  direction's share of the half circle and by its line spacing, all in physical units. Crack-edge length
  (counting pixel sides) overestimates by up to 4/pi and a polygon through border pixel centres comes up
  short by about pi pixels; this estimator is unbiased on average. Measured: discs within 1 % from a
  radius of 5 px; ellipses within 2 % from a semi-major axis of 10 px, 1.2 % from 20 px, 5 % at 5 px;
  rectangles short by their corners (5 % at a 10 px side, 0.7 % at 80 px); specks of a few pixels
  are far off (a single pixel reads 2.1 px around).
- circularity = 4 pi A / P^2 from the filled area and that perimeter, both physical (pixel units without
  a Spacing, i.e. as if pixels were square); 1 for a disc (measured within 1.7 % from a radius of 5 px),
  lower for elongated or lobulated outlines. Capped at 1: digitisation can push tiny lesions above it.
- echogenicity ratio = mean grey level inside the lesion / mean grey level in a band of tissue around
  it (pixel centres within `ring_mm` of the lesion, physical distance, or `ring_px` without a Spacing),
  leaving out every lesion pixel, the black surround of a sector or letterbox (zero-valued pixels
  connected to the image border) and, when the skin line is known, the gel above it. Below 1 is
  hypoechoic, above 1 hyperechoic. It is a ratio of displayed grey levels (after log compression), not of
  echo power, so it compares lesions within one scanner setting, not across machines.
- skin line and depth: see `find_skin_line`. Depths are measured along y (image rows) from the skin
  line's leading edge to the lesion's top (bottom) pixel edge, using the median skin row over the
  lesion's own columns; negative when the lesion's top lies above the skin line (an exophytic part).

Also `ellipsoid_volume_mm3` for the pi/6 L W H volume from two orthogonal planes of one lesion.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from hemaseg.spacing import Spacing
from hemaseg.lesions import label_lesions

NO_CALIBRATION = "no calibration: figures are in pixels and the mm fields are None"
SECTOR_THICKNESS = ("sector/curvilinear image: thickness and depths are measured along image rows, "
                    "which are not the beam axis away from the centre line")
NO_IMAGE = "no image given: echogenicity and depths below the skin were not measured"
NO_SKIN_LINE = "skin line not found: depths below the skin are None"


@dataclass(frozen=True)
class LesionMeasurement:
    """One lesion's figures; see the module docstring for each definition and its measured accuracy.

    Coordinates are pixels of the original image, x to the right (columns), y down (rows).
    """

    label: int  # 1..n, largest lesion first (the order of lesions.find_lesions)
    bbox: tuple[int, int, int, int]  # x, y, width, height in px
    area_px: int  # lesion pixels (holes excluded), as lesions.find_lesions counts them
    area_mm2: float | None
    longest_diameter_px: float  # maximum Feret diameter of the half-way outline
    longest_diameter_mm: float | None
    # the two ends of the longest diameter as measured (physically when calibrated), image (x, y) px,
    # so a viewer can draw the caliper line a clinician would check
    longest_diameter_ends: tuple[tuple[float, float], tuple[float, float]]
    perpendicular_diameter_px: float  # caliper width perpendicular to the longest diameter
    perpendicular_diameter_mm: float | None
    thickness_px: int  # image rows spanned (the beam axis on a linear probe)
    thickness_mm: float | None
    perimeter_px: float  # outer boundary, Cauchy-Crofton estimate
    perimeter_mm: float | None
    circularity: float  # 4 pi A / P^2 of the filled outline, in [0, 1]; physical when calibrated
    skin_line_row: int | None  # median skin row over the lesion's columns; None when not found
    depth_top_px: int | None  # skin line to the lesion's top edge along y; None without a skin line
    depth_top_mm: float | None
    depth_bottom_px: int | None  # skin line to the lesion's bottom edge along y
    depth_bottom_mm: float | None
    echogenicity_ratio: float | None  # mean inside / mean of the surrounding tissue band; None without image

    def to_dict(self) -> dict:
        """Plain JSON-ready values (tuples become lists)."""
        d = asdict(self)
        d["bbox"] = list(self.bbox)
        d["longest_diameter_ends"] = [list(p) for p in self.longest_diameter_ends]
        return d


@dataclass(frozen=True)
class ImageMeasurement:
    """All lesions of one mask plus the scan-level figures a report needs.

    The diameters are the largest lesion's (None when there is none); `n_lesions` and the total area
    count every lesion even when `max_lesions` measured fewer. `warnings` says in words why a figure is
    missing or must be read with care (no calibration, sector image, skin line not found, capped lesions).
    """

    lesions: tuple[LesionMeasurement, ...]
    n_lesions: int
    total_area_px: int
    total_area_mm2: float | None
    longest_diameter_px: float | None
    longest_diameter_mm: float | None
    perpendicular_diameter_px: float | None
    perpendicular_diameter_mm: float | None
    skin_line_row: int | None  # median skin row over the whole scan; None when not found or no image
    spacing: Spacing | None
    warnings: tuple[str, ...]

    def to_dict(self) -> dict:
        """Plain JSON-ready values; `spacing` as Spacing.to_dict() (with its source) or None."""
        return {
            "n_lesions": self.n_lesions,
            "total_area_px": self.total_area_px,
            "total_area_mm2": self.total_area_mm2,
            "longest_diameter_px": self.longest_diameter_px,
            "longest_diameter_mm": self.longest_diameter_mm,
            "perpendicular_diameter_px": self.perpendicular_diameter_px,
            "perpendicular_diameter_mm": self.perpendicular_diameter_mm,
            "skin_line_row": self.skin_line_row,
            "spacing": None if self.spacing is None else self.spacing.to_dict(),
            "warnings": list(self.warnings),
            "lesions": [les.to_dict() for les in self.lesions],
        }


# --------------------------------------------------------------------------------------------- geometry


def _halfway_points(comp: np.ndarray) -> np.ndarray:
    """Bool hxw component -> (k, 2) (x, y) points whose convex hull is that of the half-way outline.

    Each row's outermost pixels contribute their outer, top and bottom edge mid-points; every other
    border mid-point lies on a segment between two of these, so the hull is the same at O(rows) points.
    """
    rows = np.nonzero(comp.any(axis=1))[0]
    sub = comp[rows]
    left = sub.argmax(axis=1).astype(float)
    right = (comp.shape[1] - 1 - sub[:, ::-1].argmax(axis=1)).astype(float)
    r = rows.astype(float)
    return np.concatenate([
        np.c_[left - 0.5, r], np.c_[left, r - 0.5], np.c_[left, r + 0.5],
        np.c_[right + 0.5, r], np.c_[right, r - 0.5], np.c_[right, r + 0.5],
    ])


def _calipers(points: np.ndarray, sx: float, sy: float) -> tuple[float, float, np.ndarray]:
    """(x, y) px points -> (longest diameter, width perpendicular to it, its two ends in px), physical.

    Brute force over hull vertices: a lesion's hull has at most a few hundred, and it is exact where
    rotating calipers would add code for no measurable time.
    """
    p = points * (sx, sy)
    hull = p[ConvexHull(p).vertices]
    d2 = ((hull[:, None, :] - hull[None, :, :]) ** 2).sum(axis=-1)
    i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
    longest = math.sqrt(float(d2[i, j]))
    u = (hull[j] - hull[i]) / longest
    across = hull @ np.array([-u[1], u[0]])
    ends = np.array([hull[i], hull[j]]) / (sx, sy)
    ends = ends[np.lexsort((ends[:, 1], ends[:, 0]))]  # left end first, so the output is deterministic
    return longest, float(across.max() - across.min()), ends


@lru_cache(maxsize=64)
def _crofton_steps(sx: float, sy: float) -> tuple[tuple[int, int, float], ...]:
    """Lattice steps (dx, dy) and each one's Crofton weight (angular share * line spacing / 2).

    The steps are every primitive (dx, dy) no longer than sqrt(5) times the larger pixel side: on square
    pixels the 4 king and 4 knight directions; on non-square pixels also longer steps along the finer
    axis, which fill the physical angles that the king and knight steps leave wide open (on 0.3 x 0.08 mm
    pixels they all lie within 28 degrees of the x axis), so no boundary direction is far from a counted
    one. Measured on such pixels: 8 fixed directions read ellipses up to 6 % off, these within 1 %
    from a semi-major axis of 20 px.
    """
    reach2 = 5.0 * max(sx, sy) ** 2 * (1.0 + 1e-9)
    imax, jmax = int(math.sqrt(reach2) / sx), int(math.sqrt(reach2) / sy)
    steps = [(i, j) for i in range(imax + 1) for j in range(-jmax, jmax + 1)
             if (i > 0 or j > 0) and math.gcd(i, abs(j)) == 1 and (i * sx) ** 2 + (j * sy) ** 2 <= reach2]
    angles = np.array([math.atan2(j * sy, i * sx) % math.pi for i, j in steps])
    order = np.argsort(angles)
    a = angles[order]
    gaps = np.diff(np.r_[a, a[0] + math.pi])  # gap after each direction, around the half circle
    share = 0.5 * (gaps + np.roll(gaps, 1))  # each direction owns half the gap on either side
    out = []
    for k, idx in enumerate(order):
        i, j = steps[idx]
        line_spacing = sx * sy / math.hypot(i * sx, j * sy)  # distance between parallel lattice lines
        out.append((i, j, 0.5 * float(share[k]) * line_spacing))
    return tuple(out)


def _crofton_perimeter(filled: np.ndarray, sx: float, sy: float) -> float:
    """Boundary length of a bool hxw region by Cauchy-Crofton: L = 1/2 * integral of line crossings.

    A crossing is a pair of lattice points one step apart, one inside and one outside.
    """
    steps = _crofton_steps(float(sx), float(sy))
    pad_x = max(i for i, _, _ in steps)
    pad_y = max(abs(j) for _, j, _ in steps)
    m = np.pad(filled, ((pad_y, pad_y), (pad_x, pad_x)))
    h, w = m.shape
    total = 0.0
    for i, j, weight in steps:
        ya, yb = max(0, -j), h - max(0, j)
        crossings = np.count_nonzero(m[ya:yb, : w - i] != m[ya + j : yb + j, i:])
        total += weight * crossings
    return total


@dataclass(frozen=True)
class _Shape:
    longest: float
    across: float
    ends: np.ndarray
    perimeter: float
    circularity: float


def _shape(points: np.ndarray, filled: np.ndarray, sx: float, sy: float) -> _Shape:
    longest, across, ends = _calipers(points, sx, sy)
    perimeter = _crofton_perimeter(filled, sx, sy)
    area = float(np.count_nonzero(filled)) * sx * sy
    circ = min(1.0, 4.0 * math.pi * area / perimeter**2) if perimeter > 0 else 0.0
    return _Shape(float(longest), float(across), ends, float(perimeter), float(circ))


# -------------------------------------------------------------------------------------------- skin line

_SKIN_DARK = 0.2  # share of the scan's contrast range below which a pixel counts as gel / black
_SKIN_BRIGHT = 0.5  # share above which it counts as an echo
_SKIN_GAP = 3  # dark rows needed just above the interface (the row right above may be the blurred rise)
_SKIN_DARK_SHARE = 0.75  # share of all rows above the interface that must be dark
_SKIN_TOP = 0.02  # top share of rows where a bright probe/near-field band is tolerated
# share of image columns that must show the interface (a sector's probe arc spans only a part of the
# columns: its sides start at the slanted edges), and share that must continue it in the next column
_SKIN_MIN_COLUMNS = 0.2
_SKIN_MIN_RUNS = 0.15
_SKIN_MAX_STEP = 2  # median row change between neighbouring columns of a real skin line


def _gray(image: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """HxW gray or HxWx{1,3,4} colour (alpha ignored) -> float64 HxW; ValueError naming the fix."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        a = a[..., 0] if a.shape[2] == 1 else a[..., :3].astype(np.float64).mean(axis=2)
    if a.ndim != 2:
        raise ValueError(f"image must be HxW gray or HxWx3 colour; got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"image is {a.shape[0]}x{a.shape[1]} but the mask is {shape[0]}x{shape[1]}: "
                         "measure the mask on the scan it belongs to (resize the mask back to the scan "
                         "first)")
    return a.astype(np.float64)


def _skin_rows(gray: np.ndarray) -> np.ndarray:
    """Float HxW scan -> per column the skin line's row (its leading edge), -1 where none is seen.

    A column shows the interface at the first row that is bright, has `_SKIN_GAP` dark rows just above
    it, mostly dark rows above that and no echo above it below the top few rows (a contact scan's bright
    dermis above the fat must not make the fascia look like the skin). Levels are shares of the scan's
    own contrast range, so uint8 and [0, 1] scans behave alike. The row is then refined on the column's
    profile (smoothed across columns only) to the first row at half way from the gel level to the echo's
    peak, the same convention as a clinician's caliper on the leading edge.
    """
    h, w = gray.shape
    rows = np.full(w, -1, dtype=np.intp)
    if h < _SKIN_GAP + 4:
        return rows
    smooth = ndimage.gaussian_filter(gray, (1.0, 2.0))  # speckle is finer across than along the skin
    lo, hi = np.percentile(smooth, [2.0, 99.5])  # the skin echo is thin: a high percentile finds it
    span = float(hi - lo)
    if not span > 1e-6 * max(abs(float(hi)), abs(float(lo)), 1e-12):
        return rows  # a uniform scan has no interface
    dark = smooth <= lo + _SKIN_DARK * span
    bright = smooth >= lo + _SKIN_BRIGHT * span
    c_dark = np.vstack([np.zeros((1, w), np.intp), np.cumsum(dark, axis=0)])  # c[k] = dark rows in [0, k)
    c_bright = np.vstack([np.zeros((1, w), np.intp), np.cumsum(bright, axis=0)])
    top = max(2, int(round(_SKIN_TOP * h)))
    y = np.arange(_SKIN_GAP + 1, h)  # candidate rows; each needs GAP rows above the blurred rise
    gap_dark = (c_dark[y - 1] - c_dark[y - 1 - _SKIN_GAP]) == _SKIN_GAP
    mostly_dark = c_dark[y - 1] >= _SKIN_DARK_SHARE * (y - 1)[:, None]
    no_echo_above = (c_bright[y - 1] - c_bright[np.minimum(top, y - 1)]) == 0
    cand = bright[_SKIN_GAP + 1 :] & gap_dark & mostly_dark & no_echo_above
    found = cand.any(axis=0)
    if not found.any():
        return rows
    cols = np.nonzero(found)[0]
    first = cand[:, cols].argmax(axis=0) + _SKIN_GAP + 1
    profile = ndimage.gaussian_filter1d(gray, 2.0, axis=1)
    offsets = np.arange(-1 - _SKIN_GAP, 3)  # rows first-1-GAP .. first+2
    win = profile[np.clip(first[None, :] + offsets[:, None], 0, h - 1), cols[None, :]]
    gel = np.median(win[:_SKIN_GAP], axis=0)
    peak = win[_SKIN_GAP:].max(axis=0)
    rising = win[_SKIN_GAP - 1 :] >= 0.5 * (gel + peak)[None, :]  # rows first-2 .. first+2
    rows[cols] = first - 2 + rising.argmax(axis=0)
    return rows


def _skin_consensus(rows: np.ndarray, gray: np.ndarray) -> int | None:
    """Per-column rows -> the scan's skin row, or None unless enough columns agree on a smooth line.

    Noise yields an interface in a few scattered columns at random rows; a real skin line shows in a
    good share of the columns as a continuous line that moves by a row or so between neighbours (tilted
    lines and a sector's arc included).
    """
    content = np.count_nonzero((gray != 0).any(axis=0))  # columns wholly outside a sector do not vote
    found = rows >= 0
    if content == 0 or np.count_nonzero(found) < _SKIN_MIN_COLUMNS * content:
        return None
    cols = np.nonzero(found)[0]
    steps = np.abs(np.diff(rows[cols]))[np.diff(cols) == 1]  # between found neighbours only
    if steps.size < max(1.0, _SKIN_MIN_RUNS * content) or float(np.median(steps)) > _SKIN_MAX_STEP:
        return None
    return int(round(float(np.median(rows[cols]))))


def find_skin_line(image: np.ndarray) -> int | None:
    """Row of the skin line in a B-mode scan (HxW gray or HxWx3), or None when there is no clear one.

    The skin line is the first bright interface below the dark band at the top of the scan (stand-off
    gel, or the black margin above the probe face): its leading edge, as the median over the columns that
    show it. None for a uniform scan, for noise, and for a contact scan whose bright skin starts at the
    very top with no dark band above it (the top of the image is then not known to be the skin surface,
    and depths are better missing than guessed). A black margin above the field of view counts as the
    dark band, so a sector's arc or a letterboxed linear scan gives the top of the field of view.

    Known limits: a bright band within the top 2 % of rows is tolerated as the probe's near field, so a
    contact scan whose skin echo is that thin, over dark fat, can report the fascia under the fat; and
    a bright reverberation line inside thick gel is taken for the skin.
    """
    gray = _gray(image)
    return _skin_consensus(_skin_rows(gray), gray)


# -------------------------------------------------------------------------------------------- measuring


def _surround(gray: np.ndarray) -> np.ndarray:
    """Zero-valued pixels connected to the image border: the black surround of a sector or a letterbox.

    Zeros inside the field of view (an anechoic vessel) stay: they are tissue, however dark.
    """
    zeros = gray == 0
    if not zeros.any():
        return zeros
    lab, _ = ndimage.label(zeros)
    edge = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    return np.isin(lab, edge[edge > 0])


def _echogenicity(
    gray: np.ndarray, labels: np.ndarray, lab: int, sl: tuple[slice, slice], valid: np.ndarray,
    skin_row: int | None, ring: float, sampling: tuple[float, float],
) -> float | None:
    """Mean inside the lesion / mean over the tissue band around it; None when either is empty or 0."""
    ry, rx = int(math.ceil(ring / sampling[0])) + 1, int(math.ceil(ring / sampling[1])) + 1
    h, w = gray.shape
    win = (slice(max(0, sl[0].start - ry), min(h, sl[0].stop + ry)),
           slice(max(0, sl[1].start - rx), min(w, sl[1].stop + rx)))
    lab_w, ok = labels[win], valid[win]
    inside = lab_w == lab
    dist = ndimage.distance_transform_edt(~inside, sampling=sampling)  # to the nearest lesion pixel centre
    band = (lab_w == 0) & (dist <= ring) & ok
    if skin_row is not None:  # gel above the skin is not tissue
        band &= (np.arange(win[0].start, win[0].stop) >= skin_row)[:, None]
    inner, outer = gray[win][inside & ok], gray[win][band]
    if inner.size == 0 or outer.size == 0:
        return None
    ref = float(outer.mean())
    return float(inner.mean()) / ref if ref > 0 else None


def measure_mask(
    mask: np.ndarray,
    spacing: Spacing | None = None,
    image: np.ndarray | None = None,
    sector: bool = False,
    *,
    max_lesions: int | None = None,
    ring_mm: float = 2.0,
    ring_px: int = 10,
) -> ImageMeasurement:
    """Measure every lesion of an HxW mask (nonzero = lesion); see the module docstring for definitions.

    `spacing`: mm per pixel, or None for pixel figures only. `image`: the HxW (or HxWx3) scan the mask
    belongs to, any numeric range; without it echogenicity and depths are None. `sector`: the scan comes
    from a curvilinear probe (adds a warning: rows are not the beam axis). `max_lesions` measures only
    the largest ones, like `find_lesions` (a noisy mask can hold thousands of specks). `ring_mm` /
    `ring_px`: width of the tissue band for the echogenicity ratio, with / without a Spacing.
    An empty mask gives zero lesions and None diameters.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW; got shape {mask.shape}")
    if not (ring_mm > 0 and ring_px > 0):
        raise ValueError(f"ring_mm and ring_px must be > 0; got {ring_mm!r}, {ring_px!r}")
    labels, n = label_lesions(mask)
    gray = None if image is None else _gray(image, mask.shape)
    sx, sy = (1.0, 1.0) if spacing is None else (float(spacing.x_mm), float(spacing.y_mm))
    warnings: list[str] = []
    if spacing is None:
        warnings.append(NO_CALIBRATION)
    if sector:
        warnings.append(SECTOR_THICKNESS)
    skin_rows, skin_row, valid = None, None, None
    if gray is None:
        warnings.append(NO_IMAGE)
    else:
        skin_rows = _skin_rows(gray)
        skin_row = _skin_consensus(skin_rows, gray)
        if skin_row is None:
            warnings.append(NO_SKIN_LINE)
        valid = ~_surround(gray)

    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-areas, kind="stable")[: n if max_lesions is None else max_lesions]  # as find_lesions
    if len(order) < n:
        warnings.append(f"measured the largest {len(order)} of {n} lesions")
    slices = ndimage.find_objects(labels)
    ring, sampling = (ring_px, (1.0, 1.0)) if spacing is None else (ring_mm, (sy, sx))

    def mm(value: float) -> float | None:
        return None if spacing is None else float(value)

    lesions = []
    for rank, idx in enumerate(order, start=1):
        sl = slices[idx]
        comp = labels[sl] == idx + 1
        y0, x0 = sl[0].start, sl[1].start
        height, width = sl[0].stop - y0, sl[1].stop - x0
        points = _halfway_points(comp)
        filled = ndimage.binary_fill_holes(comp)  # the outline's shape: a vessel hole is not a boundary
        in_px = _shape(points, filled, 1.0, 1.0)
        phys = in_px if spacing is None else _shape(points, filled, sx, sy)

        own_skin = None
        if skin_row is not None:
            near = skin_rows[x0 : x0 + width]
            near = near[near >= 0]
            own_skin = int(round(float(np.median(near)))) if near.size else skin_row
        top_px = None if own_skin is None else int(y0 - own_skin)
        bottom_px = None if own_skin is None else int(y0 + height - own_skin)
        echo = (None if gray is None
                else _echogenicity(gray, labels, idx + 1, sl, valid, own_skin, ring, sampling))
        area_px = int(areas[idx])
        lesions.append(LesionMeasurement(
            label=rank,
            bbox=(int(x0), int(y0), int(width), int(height)),
            area_px=area_px,
            area_mm2=mm(area_px * sx * sy),
            longest_diameter_px=in_px.longest,
            longest_diameter_mm=mm(phys.longest),
            longest_diameter_ends=tuple((float(x + x0), float(y + y0)) for x, y in phys.ends),
            perpendicular_diameter_px=in_px.across,
            perpendicular_diameter_mm=mm(phys.across),
            thickness_px=int(height),
            thickness_mm=mm(height * sy),
            perimeter_px=in_px.perimeter,
            perimeter_mm=mm(phys.perimeter),
            circularity=phys.circularity,
            skin_line_row=own_skin,
            depth_top_px=top_px,
            depth_top_mm=None if top_px is None else mm(top_px * sy),
            depth_bottom_px=bottom_px,
            depth_bottom_mm=None if bottom_px is None else mm(bottom_px * sy),
            echogenicity_ratio=echo,
        ))

    total_px = int(areas.sum())
    big = lesions[0] if lesions else None
    return ImageMeasurement(
        lesions=tuple(lesions),
        n_lesions=int(n),
        total_area_px=total_px,
        total_area_mm2=mm(total_px * sx * sy),
        longest_diameter_px=None if big is None else big.longest_diameter_px,
        longest_diameter_mm=None if big is None else big.longest_diameter_mm,
        perpendicular_diameter_px=None if big is None else big.perpendicular_diameter_px,
        perpendicular_diameter_mm=None if big is None else big.perpendicular_diameter_mm,
        skin_line_row=skin_row,
        spacing=spacing,
        warnings=tuple(warnings),
    )


def ellipsoid_volume_mm3(length_mm: float, width_mm: float, height_mm: float) -> float:
    """Ellipsoid volume pi/6 * L * W * H in mm^3 from three orthogonal diameters of one lesion.

    Only meaningful with two orthogonal planes of the same lesion (longitudinal and transverse): L and W
    are the two planes' longest diameters along the skin and H the larger thickness. One plane does not
    give a volume: the third axis would be a guess.
    """
    for name, v in (("length_mm", length_mm), ("width_mm", width_mm), ("height_mm", height_mm)):
        if isinstance(v, bool) or not (isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number of mm >= 0 (a diameter); got {v!r}")
    return math.pi / 6.0 * float(length_mm) * float(width_mm) * float(height_mm)
