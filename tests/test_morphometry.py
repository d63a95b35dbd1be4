"""Morphometry against shapes with known answers, drawn in physical space (mm) and sampled at pixel centres.

A pixel centre (col, row) lies at (col * x_mm, row * y_mm); a pixel belongs to the shape when its centre
does. Lengths must come within one pixel (the larger pixel side) of the analytic value, areas and
perimeters within the relative tolerances stated beside each check.
"""

import json
import math

import numpy as np
import pytest

from hemaseg.spacing import Spacing
from hemaseg.lesions import find_lesions
from hemaseg.measure.morphometry import (
    NO_CALIBRATION,
    NO_IMAGE,
    NO_SKIN_LINE,
    SECTOR_THICKNESS,
    ellipsoid_volume_mm3,
    find_skin_line,
    measure_mask,
)

SPACINGS = [(0.1, 0.1), (0.1, 0.25), (0.3, 0.08)]  # square, tall and wide pixels (x_mm, y_mm)
FIELD_MM = 14.0  # every drawn scan spans 14 x 14 mm: at most 175 px along an axis


def _grid(sx: float, sy: float, field_mm: float = FIELD_MM) -> tuple[np.ndarray, np.ndarray]:
    """Physical (x, y) in mm of every pixel centre of a scan field_mm across."""
    rows, cols = int(round(field_mm / sy)), int(round(field_mm / sx))
    yy, xx = np.mgrid[:rows, :cols]
    return xx * sx, yy * sy


def _ellipse(sx, sy, cx, cy, a, b, angle_deg, field_mm=FIELD_MM):
    x, y = _grid(sx, sy, field_mm)
    t = math.radians(angle_deg)
    u = (x - cx) * math.cos(t) + (y - cy) * math.sin(t)
    v = -(x - cx) * math.sin(t) + (y - cy) * math.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def _rectangle(sx, sy, cx, cy, w, h, angle_deg):
    x, y = _grid(sx, sy)
    t = math.radians(angle_deg)
    u = (x - cx) * math.cos(t) + (y - cy) * math.sin(t)
    v = -(x - cx) * math.sin(t) + (y - cy) * math.cos(t)
    return (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)


def _ellipse_perimeter(a: float, b: float) -> float:
    h = ((a - b) / (a + b)) ** 2  # Ramanujan's second approximation: exact to ~1e-10 here
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def _only(mask, spacing, **kw):
    m = measure_mask(mask, spacing, **kw)
    assert m.n_lesions == 1, m.n_lesions
    return m.lesions[0]


# ------------------------------------------------------------------------------------- known shapes


@pytest.mark.parametrize("sx,sy", SPACINGS)
def test_disc(sx, sy):
    r = 4.0
    les = _only(_ellipse(sx, sy, 7.03, 6.96, r, r, 0.0), Spacing(sx, sy, "test"))
    px = max(sx, sy)
    assert les.area_mm2 == pytest.approx(math.pi * r * r, rel=0.02)
    assert abs(les.longest_diameter_mm - 2 * r) <= px
    assert abs(les.perpendicular_diameter_mm - 2 * r) <= px
    assert abs(les.thickness_mm - 2 * r) <= px
    assert les.perimeter_mm == pytest.approx(2 * math.pi * r, rel=0.02)
    assert les.circularity == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("sx,sy", SPACINGS)
@pytest.mark.parametrize("angle", [30.0, 118.0])
def test_ellipse_not_aligned_to_the_grid(sx, sy, angle):
    a, b = 5.0, 2.5
    les = _only(_ellipse(sx, sy, 7.02, 6.97, a, b, angle), Spacing(sx, sy, "test"))
    px = max(sx, sy)
    t = math.radians(angle)
    assert abs(les.longest_diameter_mm - 2 * a) <= px  # the major axis
    assert abs(les.perpendicular_diameter_mm - 2 * b) <= px  # the minor axis
    assert abs(les.thickness_mm - 2 * math.hypot(a * math.sin(t), b * math.cos(t))) <= px  # vertical extent
    assert les.area_mm2 == pytest.approx(math.pi * a * b, rel=0.02)
    assert les.perimeter_mm == pytest.approx(_ellipse_perimeter(a, b), rel=0.03)
    circularity = 4 * math.pi * math.pi * a * b / _ellipse_perimeter(a, b) ** 2  # 4 pi A / P^2 = 0.84
    assert les.circularity == pytest.approx(circularity, rel=0.04)
    # the diameter's ends lie on the major axis, a semi-axis from the centre
    (x0, y0), (x1, y1) = les.longest_diameter_ends
    mid = ((x0 + x1) / 2 * sx, (y0 + y1) / 2 * sy)
    assert math.dist(mid, (7.02, 6.97)) <= px
    direction = math.degrees(math.atan2((y1 - y0) * sy, (x1 - x0) * sx)) % 180
    assert min(abs(direction - angle), 180 - abs(direction - angle)) < 5


@pytest.mark.parametrize("sx,sy", SPACINGS)
def test_rotated_rectangle(sx, sy):
    w, h, angle = 8.0, 4.0, 25.0
    les = _only(_rectangle(sx, sy, 7.01, 6.98, w, h, angle), Spacing(sx, sy, "test"))
    px = max(sx, sy)
    t = math.radians(angle)
    assert abs(les.longest_diameter_mm - math.hypot(w, h)) <= px  # the diagonal
    # its vertical extent: rows whose centres miss a sharp corner's tip are lost, so at some positions
    # a rectangle reads up to ~1.3 px thin (rounded lesions stay within a pixel)
    assert abs(les.thickness_mm - (w * math.sin(t) + h * math.cos(t))) <= 1.5 * px
    assert les.area_mm2 == pytest.approx(w * h, rel=0.02)
    assert les.perimeter_mm == pytest.approx(2 * (w + h), rel=0.04)  # corners read a little short
    # across the diagonal a rectangle is 2wh/d wide; ill-conditioned (the width changes fast with the
    # diagonal's direction), so only within two pixels
    assert abs(les.perpendicular_diameter_mm - 2 * w * h / math.hypot(w, h)) <= 2 * px


def test_exact_values_on_a_line_and_a_pixel():
    """Hand-computed: the half-way outline of a 10-pixel row runs from the first pixel's outer edge to the
    last one's, and one pixel is one pixel across."""
    m = np.zeros((5, 14), bool)
    m[2, 2:12] = True
    les = _only(m, Spacing(0.3, 0.08, "test"))
    assert les.longest_diameter_mm == pytest.approx(3.0)
    assert les.perpendicular_diameter_mm == pytest.approx(0.08)
    assert les.thickness_px == 1 and les.thickness_mm == pytest.approx(0.08)
    assert les.area_px == 10 and les.area_mm2 == pytest.approx(10 * 0.3 * 0.08)
    assert les.longest_diameter_ends == ((1.5, 2.0), (11.5, 2.0))
    dot = np.zeros((4, 4), bool)
    dot[1, 2] = True
    one = _only(dot, None)
    assert one.longest_diameter_px == pytest.approx(1.0)
    assert one.perpendicular_diameter_px == pytest.approx(1.0)
    assert one.area_px == 1 and one.thickness_px == 1 and 0 < one.circularity <= 1


def test_a_hole_counts_out_of_the_area_but_not_in_the_outline():
    sx = sy = 0.1
    disc = _ellipse(sx, sy, 7.03, 6.96, 4.0, 4.0, 0.0)
    ring = disc & ~_ellipse(sx, sy, 7.03, 6.96, 1.5, 1.5, 0.0)
    full, holed = _only(disc, Spacing(sx, sy, "t")), _only(ring, Spacing(sx, sy, "t"))
    assert holed.area_px == int(ring.sum()) < full.area_px
    assert holed.perimeter_mm == pytest.approx(full.perimeter_mm)
    assert holed.longest_diameter_mm == pytest.approx(full.longest_diameter_mm)
    assert holed.circularity == pytest.approx(full.circularity)


# ------------------------------------------------------------------------------------ lesions, units


def test_lesions_are_ordered_and_labelled_as_find_lesions():
    m = np.zeros((60, 80), bool)
    m[5:9, 5:9] = True  # 16 px, first in scan order
    m[20:40, 30:60] = True  # 600 px
    m[45:52, 10:20] = True  # 70 px
    m[50, 70] = m[51, 71] = True  # touching at a corner: one 2-px lesion (8-connectivity)
    result = measure_mask(m, Spacing(0.1, 0.2, "test"))
    n, lesions = find_lesions(m)
    assert result.n_lesions == n == 4
    assert [les.label for les in result.lesions] == [1, 2, 3, 4]
    assert [les.area_px for les in result.lesions] == [les.area_px for les in lesions] == [600, 70, 16, 2]
    assert [les.bbox for les in result.lesions] == [les.bbox for les in lesions]
    assert result.total_area_px == 688 and result.total_area_mm2 == pytest.approx(688 * 0.02)
    assert result.longest_diameter_mm == result.lesions[0].longest_diameter_mm
    assert result.perpendicular_diameter_mm == result.lesions[0].perpendicular_diameter_mm
    capped = measure_mask(m, max_lesions=2)
    assert capped.n_lesions == 4 and len(capped.lesions) == 2 and capped.total_area_px == 688
    assert any("largest 2 of 4" in w for w in capped.warnings)


def test_without_calibration_mm_fields_are_none_and_px_filled():
    m = _ellipse(0.1, 0.1, 7.0, 7.0, 3.0, 2.0, 40.0)
    result = measure_mask(m)
    les = result.lesions[0]
    assert NO_CALIBRATION in result.warnings and result.spacing is None
    mm_fields = [k for k in les.to_dict() if k.endswith("_mm") or k.endswith("_mm2")]
    assert len(mm_fields) == 7 and all(getattr(les, k) is None for k in mm_fields)
    assert result.total_area_mm2 is None and result.longest_diameter_mm is None
    assert les.area_px == int(m.sum()) and les.longest_diameter_px > 0 and les.perimeter_px > 0
    # px fields are the same measurement on unit pixels, whatever the spacing: with 1 mm pixels they agree
    unit = measure_mask(m, Spacing(1.0, 1.0, "test")).lesions[0]
    assert unit.longest_diameter_mm == pytest.approx(les.longest_diameter_px)
    assert unit.perimeter_mm == pytest.approx(les.perimeter_px)
    tall = measure_mask(m, Spacing(0.1, 0.25, "test")).lesions[0]
    assert tall.longest_diameter_px == les.longest_diameter_px and NO_CALIBRATION not in measure_mask(
        m, Spacing(0.1, 0.25, "test")).warnings


def test_sector_flag_warns_about_thickness():
    m = _ellipse(0.1, 0.1, 7.0, 7.0, 3.0, 2.0, 0.0)
    assert SECTOR_THICKNESS in measure_mask(m, Spacing(0.1, 0.1, "t"), sector=True).warnings
    assert SECTOR_THICKNESS not in measure_mask(m, Spacing(0.1, 0.1, "t")).warnings


def test_empty_mask():
    empty = np.zeros((40, 50), bool)
    with_image = measure_mask(empty, Spacing(0.1, 0.1, "t"), image=np.full((40, 50), 90))
    for result in (measure_mask(empty), with_image):
        assert result.n_lesions == 0 and result.lesions == () and result.total_area_px == 0
        assert result.longest_diameter_px is None and result.perpendicular_diameter_mm is None
        json.dumps(result.to_dict())


def test_to_dict_is_json_and_carries_the_spacing_source():
    m = _ellipse(0.1, 0.2, 7.0, 7.0, 3.0, 2.0, 20.0)
    d = measure_mask(m, Spacing(0.1, 0.2, "ultrasound region 0 (0018,6011)")).to_dict()
    assert json.loads(json.dumps(d))["spacing"] == {"x_mm": 0.1, "y_mm": 0.2,
                                                    "source": "ultrasound region 0 (0018,6011)"}
    assert d["lesions"][0]["label"] == 1 and len(d["lesions"][0]["bbox"]) == 4


def test_bad_inputs_say_what_to_do():
    m = np.zeros((20, 30), bool)
    with pytest.raises(ValueError, match="resize the mask"):
        measure_mask(m, image=np.zeros((30, 20)))
    with pytest.raises(ValueError, match="HxW"):
        measure_mask(np.zeros((2, 20, 30), bool))


# ------------------------------------------------------------------------------- skin line and depth


def _scan(rng, rows=120, cols=140, skin=None, tissue=110.0):
    """Dark gel above a bright skin echo (2 rows from `skin[col]`), speckled tissue below; uint8."""
    skin = np.full(cols, 20) if skin is None else skin
    y = np.arange(rows)[:, None]
    img = rng.rayleigh(tissue / 1.25, (rows, cols))  # speckle: Rayleigh amplitude, mean = tissue
    img = np.where(y < skin[None, :], rng.normal(8.0, 3.0, (rows, cols)), img)
    img = np.where((y >= skin[None, :]) & (y < skin[None, :] + 2), 230.0, img)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_skin_line_and_depths():
    rng = np.random.default_rng(0)
    image = _scan(rng)
    assert find_skin_line(image) == 20
    mask = np.zeros(image.shape, bool)
    mask[45:71, 40:90] = True  # rows 45..70
    result = measure_mask(mask, Spacing(0.1, 0.2, "test"), image=image)
    les = result.lesions[0]
    assert result.skin_line_row == 20 and les.skin_line_row == 20 and NO_SKIN_LINE not in result.warnings
    assert (les.depth_top_px, les.depth_bottom_px) == (25, 51)
    assert les.depth_top_mm == pytest.approx(5.0) and les.depth_bottom_mm == pytest.approx(10.2)
    assert les.depth_bottom_mm - les.depth_top_mm == pytest.approx(les.thickness_mm)
    assert find_skin_line(np.dstack([image] * 3)) == 20  # an RGB scan reads the same


def test_depth_uses_the_skin_line_above_the_lesion():
    rng = np.random.default_rng(1)
    cols = 160
    skin = 15 + np.arange(cols) // 8  # a tilted probe: row 15 on the left, 34 on the right
    image = _scan(rng, rows=130, cols=cols, skin=skin)
    mask = np.zeros(image.shape, bool)
    mask[70:90, 120:150] = True
    les = measure_mask(mask, None, image=image).lesions[0]
    local = int(np.median(skin[120:150]))
    assert abs(les.skin_line_row - local) <= 1 and abs(les.depth_top_px - (70 - local)) <= 1
    assert find_skin_line(image) != les.skin_line_row  # the scan-wide median sits elsewhere


@pytest.mark.parametrize("kind", ["uniform", "noise", "contact"])
def test_no_skin_line(kind):
    rng = np.random.default_rng(2)
    if kind == "uniform":
        image = np.full((100, 120), 128, np.uint8)
    elif kind == "noise":
        image = rng.uniform(0, 255, (100, 120)).astype(np.uint8)
    else:  # probe on the skin: bright dermis from the top, dark fat, a bright fascia that is not the skin
        image = np.full((100, 120), 40.0)
        image[:12], image[50:53] = 200.0, 220.0
        image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255)
    assert find_skin_line(image) is None
    mask = np.zeros(image.shape, bool)
    mask[60:80, 40:70] = True
    result = measure_mask(mask, Spacing(0.1, 0.1, "t"), image=image)
    les = result.lesions[0]
    assert result.skin_line_row is None and NO_SKIN_LINE in result.warnings
    assert les.depth_top_mm is None and les.depth_bottom_px is None and les.skin_line_row is None


# ------------------------------------------------------------------------------------- echogenicity


def test_echogenicity_of_a_dark_lesion_in_bright_tissue():
    rng = np.random.default_rng(3)
    sx, sy = 0.1, 0.2
    mask = _ellipse(sx, sy, 7.0, 12.0, 2.0, 1.5, 10.0, field_mm=20.0)  # 100 rows x 200 cols
    image = rng.normal(150.0, 10.0, mask.shape)
    image[mask] = rng.normal(50.0, 10.0, int(mask.sum()))
    les = _only(mask, Spacing(sx, sy, "t"), image=image)
    assert les.echogenicity_ratio == pytest.approx(50 / 150, rel=0.03)
    # neither a bright second lesion inside the band nor a black letterbox at the border changes it
    other = np.zeros_like(mask)
    other[55:65, 100:108] = True  # within 2 mm of the first lesion, not touching it
    image[other] = 250.0
    image[:, :30] = 0.0
    result = measure_mask(mask | other, Spacing(sx, sy, "t"), image=image)
    assert result.n_lesions == 2
    assert result.lesions[0].echogenicity_ratio == pytest.approx(50 / 150, rel=0.03)
    assert result.lesions[1].echogenicity_ratio > 1.0  # hyperechoic
    no_image = measure_mask(mask, Spacing(sx, sy, "t"))
    assert no_image.lesions[0].echogenicity_ratio is None and NO_IMAGE in no_image.warnings


def test_echogenicity_band_leaves_out_the_gel_above_the_skin():
    rng = np.random.default_rng(4)
    image = _scan(rng, tissue=120.0).astype(float)
    mask = np.zeros(image.shape, bool)
    mask[22:38, 50:80] = True  # just under the skin line at row 20: a 10 px band reaches 8 rows of gel
    image[mask] = 40.0
    les = measure_mask(mask, None, image=image, ring_px=10).lesions[0]
    # tissue (mean 120) and the brighter skin echo only: at most 40/120; with the gel (~8, a third of the
    # band) it would read about 0.43
    assert 0.2 < les.echogenicity_ratio < 40.0 / 120.0 * 1.05


# ------------------------------------------------------------------------------------------- volume


def test_ellipsoid_volume():
    assert ellipsoid_volume_mm3(2.0, 2.0, 2.0) == pytest.approx(4 / 3 * math.pi)  # unit sphere
    assert ellipsoid_volume_mm3(10.0, 6.0, 3.0) == pytest.approx(math.pi / 6 * 180.0)
    assert ellipsoid_volume_mm3(0.0, 6.0, 3.0) == 0.0
    for bad in (-1.0, math.nan, math.inf, None, "3"):
        with pytest.raises(ValueError, match="length_mm"):
            ellipsoid_volume_mm3(bad, 1.0, 1.0)
