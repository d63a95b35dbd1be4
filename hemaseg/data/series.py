"""A synthetic follow-up: one patient's infantile hemangioma scanned visit after visit, for `hemaseg track`.

`write_synthetic_series` writes what a clinic would export for one lesion: per visit a DICOM file per
plane (MONOCHROME2, a Sequence of Ultrasound Regions calibrating it at a known, anisotropic pixel
spacing, and a Patient ID that must never reach an output), the outline's mask PNG beside it, and the
`visits.csv` table `track` reads, with the true figures of every scan in extra columns.

The lesion is an axis-aligned ellipsoid under the skin with diameters L (along the limb: the width of
the longitudinal plane), W (across it: the width of the transverse plane) and H (depth: the height in
both planes), so each plane shows an ellipse and the true figures are exact: longest diameter = the
ellipse's width (every schedule keeps L and W above H), perpendicular diameter = thickness = H, volume =
pi/6 L W H. The ellipse is defined in millimetres and the mask is every pixel centre inside it, so
non-square pixels are part of the test. The tissue (skin, fat with septa, muscle, speckle) comes from
`synth.synth_scan` with no lesion; the lesion is drawn into it as a hypoechoic region that keeps the
tissue's speckle, with thin anechoic vascular channels, a soft margin and posterior enhancement below.

The default schedule grows from week 4 to week 16, when treatment (propranolol) starts, then involutes
to week 40; week 20 has a transverse scan only (no volume). Under the default `track` rules the visits
read: baseline, growth, growth, stable, stable, involution, involution, involution.
"""

from __future__ import annotations

import datetime
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from hemaseg.data.synth import SynthConfig, synth_scan
from hemaseg.extras import require
from hemaseg.io import atomic_write_bytes, save_png, write_csv

log = logging.getLogger(__name__)

TRANSVERSE, LONGITUDINAL = "transverse", "longitudinal"
SERIES_COLUMNS = ("patient", "lesion", "site", "date", "plane", "image", "mask", "birth_date",
                  "treatment_start", "true_longest_mm", "true_perpendicular_mm", "true_thickness_mm",
                  "true_volume_mm3")
# tissue only: no lesion of its own, a linear probe (rows are the beam axis), no bone
_TISSUE = SynthConfig(max_lesions=0, p_sector=0.0, p_bone=0.0)


@dataclass(frozen=True)
class SeriesVisit:
    """One visit of the synthetic lesion: age, the ellipsoid's diameters in mm, the planes scanned."""

    week: float  # age in weeks
    length_mm: float  # L: along the limb (the longitudinal plane's width)
    width_mm: float  # W: across it (the transverse plane's width)
    depth_mm: float  # H: into the skin (both planes' height)
    planes: tuple[str, ...] = (TRANSVERSE, LONGITUDINAL)


DEFAULT_SCHEDULE = (
    SeriesVisit(4, 6.0, 4.6, 2.4),
    SeriesVisit(8, 8.4, 6.2, 3.0),  # L +40 %, +2.4 mm: growth
    SeriesVisit(12, 11.0, 8.0, 3.8),  # L +31 %, +2.6 mm: growth
    SeriesVisit(16, 12.0, 8.8, 4.2),  # +9 %: stable; treatment starts this day
    SeriesVisit(20, 11.2, 8.2, 4.0, (TRANSVERSE,)),  # one plane, no volume; W -7 %: stable
    SeriesVisit(26, 8.0, 6.0, 3.0),  # L -33 % from its largest: involution
    SeriesVisit(32, 6.6, 5.0, 2.6),
    SeriesVisit(40, 5.0, 3.8, 2.0),
)
DEFAULT_TREATMENT_WEEK = 16.0


def _lesion_scan(rng: np.random.Generator, shape: tuple[int, int], spacing: tuple[float, float],
                 width_mm: float, depth_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 HxW scan, bool HxW mask) of tissue with an ellipse `width_mm` wide and `depth_mm` deep.

    The ellipse is axis-aligned in physical space: pixel centre (col, row) lies at (col * x_mm, row * y_mm);
    the mask holds the pixel centres strictly inside it.
    """
    h, w = shape
    sx, sy = spacing
    image, _ = synth_scan(rng, shape, _TISSUE)
    a, b = width_mm / 2.0 / sx, depth_mm / 2.0 / sy  # semi-axes in px along x and y
    if 2 * a + 8 > w or 2 * b + 0.3 * h > h:
        raise ValueError(f"a {width_mm} x {depth_mm} mm lesion does not fit a {w}x{h} scan at {sx} x {sy} "
                         "mm/pixel")
    cx = (w - 1) / 2.0 + rng.uniform(-0.5, 0.5) * min(w - 2 * a - 8, 0.2 * w)
    cy = 0.22 * h + b + rng.uniform(0.0, 0.05 * h)  # below the skin and dermis
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    level = np.hypot((xx - cx) / a, (yy - cy) / b)  # < 1 inside, 1 on the margin
    mask = level < 1.0

    display = image.astype(np.float64) / 255.0
    inside = np.clip((1.0 - level) * math.sqrt(a * b) / 1.5 + 0.5, 0.0, 1.0)  # ~1.5 px soft margin
    field = ndimage.gaussian_filter(rng.standard_normal(shape), max(2.0, 0.25 * b))
    field /= field.std() or 1.0
    channels = np.exp(-((field / 0.12) ** 2)) * (level < 0.85)  # anechoic vessels, inside only
    darker = rng.uniform(0.3, 0.45) * (1.0 - 0.8 * channels)
    display *= 1.0 - inside * (1.0 - darker)
    below = (np.cumsum(mask, axis=0) > 0) & ~mask  # the columns under the lesion: posterior enhancement
    columns = ndimage.gaussian_filter1d(mask.any(axis=0).astype(np.float64), 3.0)
    display *= 1.0 + 0.25 * below * columns[None, :]
    return np.round(np.clip(display, 0.0, 1.0) * 255.0).astype(np.uint8), mask


def _dicom_bytes(pixels: np.ndarray, spacing: tuple[float, float], patient_id: str, uid_seed: str,
                 study_seed: str) -> bytes:
    """A Part-10 ultrasound file: 8-bit MONOCHROME2 pixels, one 2-D ultrasound region over the whole image
    calibrated in cm at `spacing` (x, y mm), BurnedInAnnotation NO, `patient_id` as Patient ID, and seeded
    study / series / instance UIDs (a visit is one study), so `--dicom-sr` / `--dicom-seg` can reference it."""
    pydicom = require("pydicom", "a synthetic DICOM series")
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    uid = generate_uid(entropy_srcs=[uid_seed])  # same seed, same bytes
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = uid
    ds.Modality = "US"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[study_seed])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.PatientID = patient_id
    ds.BurnedInAnnotation = "NO"
    ds.set_pixel_data(pixels, "MONOCHROME2", 8, generate_instance_uid=False)  # keep the seeded UID
    region = Dataset()
    region.RegionSpatialFormat = 1  # 2-D image
    region.RegionDataType = 1  # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = pixels.shape[1] - 1, pixels.shape[0] - 1
    region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = 3, 3  # cm
    region.PhysicalDeltaX, region.PhysicalDeltaY = spacing[0] / 10.0, spacing[1] / 10.0
    ds.SequenceOfUltrasoundRegions = Sequence([region])
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_synthetic_series(
    out_dir: str | Path,
    seed: int = 0,
    *,
    patient: str = "HEM-2024-0042",
    lesion: str = "1",
    site: str = "left forearm",
    birth_date: datetime.date = datetime.date(2024, 1, 8),
    schedule: tuple[SeriesVisit, ...] = DEFAULT_SCHEDULE,
    treatment_week: float | None = DEFAULT_TREATMENT_WEEK,
    size: tuple[int, int] = (192, 224),
    spacing: tuple[float, float] = (0.08, 0.1),
) -> Path:
    """Write one patient's follow-up into `out_dir`; returns the path of its `visits.csv`.

    Per visit i (from 1) and plane P: `scans/visitII_P.dcm` (a `size` = (height, width) px scan calibrated by
    an ultrasound region at `spacing` = (x, y) mm/pixel, Patient ID `patient`) and `masks/visitII_P.png`
    (0/255): the layout `hemaseg measure --masks OUT/masks OUT/scans` and `predict ... OUT/scans` expect. `visits.csv` has the columns `track` reads (patient, lesion, site, date, plane, image, mask,
    birth_date, treatment_start as a date) and the truth of each scan: true_longest_mm (the ellipse's
    width), true_perpendicular_mm and true_thickness_mm (its height) and, on both rows of a visit with a
    transverse and a longitudinal plane, true_volume_mm3 = pi/6 L W H. Visit dates are `birth_date` +
    `week` weeks. Scan (i, P) uses np.random.default_rng([seed, i, p]), so the same seed gives the same
    files, byte for byte.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sx, sy = spacing
    if not (sx > 0 and sy > 0):
        raise ValueError(f"spacing must be two mm per pixel > 0 (x, y); got {spacing!r}")
    treatment = ("" if treatment_week is None
                 else (birth_date + datetime.timedelta(weeks=treatment_week)).isoformat())
    rows = []
    for i, visit in enumerate(schedule, start=1):
        if min(visit.length_mm, visit.width_mm) <= visit.depth_mm:
            raise ValueError(f"visit {i}: the lesion must be wider (L {visit.length_mm}, W {visit.width_mm} "
                             f"mm) than deep (H {visit.depth_mm} mm), so that its longest diameter is its "
                             "width")
        day = birth_date + datetime.timedelta(weeks=visit.week)
        both = TRANSVERSE in visit.planes and LONGITUDINAL in visit.planes
        volume = math.pi / 6.0 * visit.length_mm * visit.width_mm * visit.depth_mm if both else None
        for p, plane in enumerate(visit.planes):
            if plane not in (TRANSVERSE, LONGITUDINAL):
                raise ValueError(f"visit {i}: plane {plane!r} is not {TRANSVERSE!r} or {LONGITUDINAL!r}")
            width = visit.width_mm if plane == TRANSVERSE else visit.length_mm
            rng = np.random.default_rng([seed, i, p])
            image, mask = _lesion_scan(rng, size, spacing, width, visit.depth_mm)
            name = f"visit{i:02d}_{plane}"
            dicom = _dicom_bytes(image, spacing, patient, f"hemaseg-series-{seed}-{name}",
                                 f"hemaseg-series-{seed}-visit{i:02d}")
            atomic_write_bytes(out / "scans" / f"{name}.dcm", dicom, fsync=False)
            save_png(out / "masks" / f"{name}.png", mask.astype(np.uint8) * 255, fsync=False)
            rows.append({"patient": patient, "lesion": lesion, "site": site, "date": day.isoformat(),
                         "plane": plane, "image": f"scans/{name}.dcm", "mask": f"masks/{name}.png",
                         "birth_date": birth_date.isoformat(), "treatment_start": treatment,
                         "true_longest_mm": width, "true_perpendicular_mm": visit.depth_mm,
                         "true_thickness_mm": visit.depth_mm,
                         "true_volume_mm3": None if volume is None else round(volume, 3)})
    table = write_csv(out / "visits.csv", rows, SERIES_COLUMNS)
    log.debug("wrote a synthetic follow-up of %d visits (%d scans) to %s", len(schedule), len(rows), out)
    return table
