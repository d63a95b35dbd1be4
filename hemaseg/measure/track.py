"""`hemaseg track TABLE --out DIR`: lesions followed visit after visit. How big is each, how thick, and is
it growing or involuting under treatment (propranolol, for an infantile hemangioma)?

The table (CSV, one row per scan) names each lesion by the user's own identity, (patient, lesion label,
site), never by where it lies in the image; a visit is that lesion on one date (or at one age), possibly
in two planes. Columns: `patient`, `lesion`, `site`, `image` and `date` (YYYY-MM-DD) or `age_weeks` are
required; `plane` (transverse / longitudinal, or any name), `mask` (else the scan is segmented with the
given predictor), `pixel_spacing` (MM or X,Y, for scans without their own calibration), `birth_date`
(turns dates into ages) and `treatment_start` (a date or an age in weeks, marked on the curves) are
optional; other columns are ignored. Paths are relative to the table's folder. A row that cannot be used
is one line of errors.csv naming its CSV line; the others are tracked.

Each scan is measured by `scan.measure_scan`, with its calibration rules; the tracked lesion is the
largest lesion of the mask (a warning says so when there are several). Per visit:

- the diameters are those of the scan (plane) whose longest diameter is the largest: the lesion's largest
  section seen that day; the perpendicular diameter and the area come from that same scan, the thickness
  is the largest over the visit's planes. Only scans measured in mm count.
- the volume is pi/6 L W H (`morphometry.ellipsoid_volume_mm3`) only when the visit has a transverse and a
  longitudinal scan in mm: L = the longitudinal scan's longest diameter, W = the transverse scan's longest
  diameter, H = the larger of the two thicknesses (extent along the beam). One plane gives no volume.
- a comparison with an earlier visit uses the planes both visits have in mm (the largest section among
  those), so a visit scanned in one plane is compared with that plane of the others, never with a section
  it does not have. "Previous" is the latest earlier visit sharing a plane; "baseline" the first; the
  "smallest so far" and the "largest so far" are the earlier visits this one is largest / smallest
  against, in their shared planes.

Status, by `TrackRules` (printed on every page, in rules.txt and by the CLI; see `TrackRules.describe`).
Involution is measured from the largest the lesion has been by default: under propranolol a hemangioma
shrinks a little at every visit, and a rule against the previous visit alone would never call a steady
involution; growth is always against the previous visit, and wins, so a rebound after treatment stops is
called growth even while the lesion is still well below its peak. A visit whose scans are in pixels only
is "not measurable in mm" and is never a reference: pixels are not compared across visits, whose zoom and
depth settings differ.

Privacy: outputs name a patient by a salted key, `p` + 12 hex digits of HMAC-SHA256(salt, patient ID),
unless `raw_patient_id`. The salt is the caller's, or one generated once and kept beside the visits
table as hemaseg-salt.txt (so every run on that table, into any output folder, gives the same keys;
whoever has the salt and a guess of an ID can check the guess, so share the pages, not the salt). No output holds a file path (a row is named by its CSV line), and nothing from a
DICOM header beyond what `measure_scan` reports. Dates are written as given.

Outputs (all written atomically): visits.csv (a row per lesion per visit), scans.csv (a row per scan
measured), errors.csv (only when rows failed), rules.txt, curves/KEY_LESION_SITE.png (diameters and volume
against age in weeks, or date without a birth date, treatment start marked) and patients/KEY.html (one
self-contained page per patient: curves, table, outlined thumbnails, calibration, warnings, the rules).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import functools
import hashlib
import hmac
import html
import inspect
import logging
import math
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from hemaseg.config import ConfigError
from hemaseg.data.dataset import read_mask
from hemaseg.data.images import MAX_PIXELS_DEFAULT, DataError, decode_image
from hemaseg.render import REPORT_CSS, figure_png, img_tag, new_figure, overlay_contours
from hemaseg.io import atomic_write_bytes, atomic_write_text, png_bytes, remove_stale_temps, write_csv
from hemaseg.spacing import Spacing, parse_pixel_spacing
from hemaseg.lesions import label_lesions
from hemaseg.measure.morphometry import NO_IMAGE, NO_SKIN_LINE, LesionMeasurement, ellipsoid_volume_mm3
from hemaseg.measure.scan import ScanMeasurement, measure_scan

log = logging.getLogger(__name__)


class Predictor(Protocol):
    """What track needs of a model (a `hemaseg.load_model(...)` result): gray HxW -> a result with `.mask`."""

    def predict(self, image: np.ndarray): ...


REQUIRED_COLUMNS = ("patient", "lesion", "site", "image")
TIME_COLUMNS = ("date", "age_weeks")  # at least one of them
OPTIONAL_COLUMNS = ("plane", "mask", "pixel_spacing", "birth_date", "treatment_start")
TRANSVERSE, LONGITUDINAL = "transverse", "longitudinal"
# what a `plane` cell may say for the two orthogonal planes a volume needs (case-insensitive)
PLANE_ALIASES = {"transverse": TRANSVERSE, "trans": TRANSVERSE, "tr": TRANSVERSE, "axial": TRANSVERSE,
                 "longitudinal": LONGITUDINAL, "long": LONGITUDINAL, "sagittal": LONGITUDINAL,
                 "sag": LONGITUDINAL}
STATUSES = ("baseline", "growth", "stable", "involution", "not measurable in mm", "no lesion in the mask")
REFERENCES = ("largest", "previous")
SALT_FILE = "hemaseg-salt.txt"  # beside the visits table: the same patient gets the same key in every --out
ERROR_COLUMNS = ("line", "problem")
_CHANGES = tuple(f"{metric}_change_{ref}_{unit}"
                 for metric, size_unit in (("longest", "mm"), ("perpendicular", "mm"), ("volume", "mm3"))
                 for ref in ("previous", "baseline", "smallest") for unit in (size_unit, "pct"))
VISIT_COLUMNS = ("patient_key", "lesion", "site", "date", "age_weeks", "planes", "csv_lines",
                 "longest_diameter_mm", "perpendicular_diameter_mm", "section_plane", "thickness_mm",
                 "area_mm2", "volume_mm3", *_CHANGES, "status", "status_reason", "provisional", "needs_review",
                 "spacing_source", "warnings")
SCAN_COLUMNS = ("line", "patient_key", "lesion", "site", "date", "age_weeks", "plane", "outline", "n_lesions",
                "longest_diameter_mm", "perpendicular_diameter_mm", "thickness_mm", "area_mm2",
                "longest_diameter_px", "perpendicular_diameter_px", "thickness_px", "area_px",
                "bbox_x", "bbox_y", "bbox_w", "bbox_h", "spacing_x_mm", "spacing_y_mm", "spacing_source",
                "calibration_note", "finding", "needs_review", "review_reason", "warnings")
# morphometry warnings about figures track does not report (depths below the skin, echogenicity)
_IRRELEVANT = (NO_SKIN_LINE, NO_IMAGE)
VOLUME_TEXT = ("Volume = π/6 · L · W · H: L the longitudinal scan's longest diameter, W the transverse "
               "scan's, H the larger of their thicknesses; only at visits with both planes in mm.")
_EPS = 1e-9  # a change exactly at a threshold counts, whatever the floating point says
_THUMB_PX = 220  # longer side of a thumbnail on the page


# ------------------------------------------------------------------------------------------------ rules


@dataclass(frozen=True)
class TrackRules:
    """When a visit is growth, involution or stable. Validated: a bad value raises ConfigError naming the
    field, which the CLI shows as its flag (--growth-pct ...)."""

    growth_pct: float = 20.0  # growth: longest or perpendicular diameter up by >= this % ...
    growth_mm: float = 2.0  # ... and by >= this many mm, since the previous visit
    involution_pct: float = 30.0  # involution: longest diameter down by >= this % from the reference ...
    volume_ratio: float = 0.75  # ... or volume < this x the reference volume (two planes); 0 turns it off
    involution_reference: str = "largest"  # the reference: the largest earlier visit, or the previous one

    def __post_init__(self):
        for key in ("growth_pct", "growth_mm", "involution_pct", "volume_ratio"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(key, f"must be a finite number >= 0; got {v!r}")
        if not 0 < self.involution_pct < 100:
            raise ConfigError("involution_pct", f"must be between 0 and 100 (a % decrease); got "
                                                f"{self.involution_pct!r}")
        if self.volume_ratio > 1:
            raise ConfigError("volume_ratio", f"must be in [0, 1] (0 turns the volume rule off); got "
                                              f"{self.volume_ratio!r}")
        if self.growth_pct == 0 and self.growth_mm == 0:
            raise ConfigError("growth_pct", "and growth_mm are both 0: every visit that does not shrink "
                                            "would be growth")
        if self.involution_reference not in REFERENCES:
            raise ConfigError("involution_reference", f"must be one of {', '.join(REFERENCES)}; got "
                                                      f"{self.involution_reference!r}")

    @property
    def from_largest(self) -> bool:
        return self.involution_reference == "largest"

    def describe(self) -> list[str]:
        """The rules in words, one line each: what every report prints."""
        ref = "the largest it has been at any earlier visit" if self.from_largest else "the previous visit"
        vol_ref = "the largest earlier volume" if self.from_largest else "the previous volume"
        volume = (f", or its volume is below {self.volume_ratio:g} x {vol_ref} (visits with a transverse and "
                  "a longitudinal scan only)" if self.volume_ratio > 0 else " (the volume rule is off)")
        return [
            ("Each visit is compared with earlier visits of the same lesion (patient, lesion, site) measured "
             "in mm, in the planes both visits have."),
            "baseline: the lesion's first visit measured in mm.",
            (f"growth: the longest or the perpendicular diameter is up by at least {self.growth_pct:g} % and "
             f"at least {self.growth_mm:g} mm since the previous visit."),
            (f"involution (when not growth): the longest diameter is down by at least "
             f"{self.involution_pct:g} % from {ref}{volume}."),
            "stable: neither.",
            ("not measurable in mm: no scan of the visit is calibrated; pixels are never compared across "
             "visits."),
            "no lesion in the mask: the calibrated scans' masks are empty.",
        ]


# ------------------------------------------------------------------------------------------------ table


@dataclass(frozen=True)
class TableRow:
    """One usable row of the table, as parsed; `line` is its line in the CSV file (the header is line 1)."""

    line: int
    patient: str
    lesion: str
    site: str
    date: datetime.date | None
    age_weeks: float | None
    plane: str  # as given, lower case ("" when not given)
    image: Path
    mask: Path | None
    pixel_spacing: Spacing | None
    birth_date: datetime.date | None = None
    treatment_start: datetime.date | float | None = None  # a date, or an age in weeks

    @property
    def lesion_id(self) -> tuple[str, str, str]:
        return self.patient, self.lesion, self.site

    @property
    def orientation(self) -> str | None:
        """TRANSVERSE, LONGITUDINAL or None for any other plane name."""
        return PLANE_ALIASES.get(self.plane)


class RowError(ValueError):
    """A table row that cannot be tracked: `str(e)` is `line N: problem`. `patient` is the row's raw
    patient ID when it has one (for the patient's page; never written)."""

    def __init__(self, line: int, problem: str, patient: str | None = None):
        self.line, self.problem, self.patient = line, problem, patient
        super().__init__(f"line {line}: {problem}")


_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


MAX_AGE_WEEKS = 1100  # 21 years: past any age at which a patient is followed for a childhood lesion


def _parse_date(text: str, column: str, past: bool = False) -> datetime.date:
    """A YYYY-MM-DD date; with `past`, one that is not after today (a visit or a birth has happened)."""
    if _ISO_DATE.match(text):
        try:
            date = datetime.date.fromisoformat(text)
        except ValueError:
            pass
        else:
            if past and date > datetime.date.today():
                raise ValueError(f"{column} {text} is in the future")
            return date
    raise ValueError(f"{column} {text!r} is not a date written YYYY-MM-DD")


def _parse_weeks(text: str, column: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{column} {text!r} is not a number of weeks") from None
    if not (math.isfinite(v) and 0 <= v <= MAX_AGE_WEEKS):
        raise ValueError(f"{column} {text!r} must be a number of weeks from 0 to {MAX_AGE_WEEKS:,}")
    return v


def _parse_row(cells: dict[str, str], line: int, base: Path) -> TableRow:
    def get(key: str) -> str:
        return (cells.get(key) or "").strip()

    try:
        for k in REQUIRED_COLUMNS:
            if not get(k):
                raise ValueError(f"the {k} cell is empty")
        date = _parse_date(get("date"), "date", past=True) if get("date") else None
        age = _parse_weeks(get("age_weeks"), "age_weeks") if get("age_weeks") else None
        if date is None and age is None:
            raise ValueError("no date and no age_weeks: give one of them")
        birth = _parse_date(get("birth_date"), "birth_date", past=True) if get("birth_date") else None
        treat = get("treatment_start")
        treatment = None
        if treat:  # a date has dashes; an age in weeks is a plain number
            parse = _parse_date if "-" in treat else _parse_weeks
            treatment = parse(treat, "treatment_start")
        spacing = None
        if get("pixel_spacing"):
            spacing = parse_pixel_spacing(get("pixel_spacing"), source="pixel_spacing column")
        mask = base / get("mask") if get("mask") else None
        return TableRow(line, get("patient"), get("lesion"), get("site"), date, age, get("plane").lower(),
                        base / get("image"), mask, spacing, birth, treatment)
    except ValueError as e:
        raise RowError(line, str(e), get("patient") or None) from None


def read_table(path: str | os.PathLike) -> tuple[list[TableRow], list[RowError]]:
    """The usable rows of a track table and a RowError per row that is not (missing cells, bad dates ...).

    A missing required column, an empty file or one that is not UTF-8 CSV raises ValueError naming the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such table (a CSV file)")
    rows, errors = [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: the table is empty; its first line must name the columns")
            names = [h.strip().lower() for h in header]
            dupes = sorted({n for n in names if n and names.count(n) > 1})
            if dupes:
                raise ValueError(f"{path}: column(s) {', '.join(dupes)} appear more than once")
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if not any(c in names for c in TIME_COLUMNS):
                missing.append("date or age_weeks")
            if missing:
                found = ", ".join(n for n in names if n)
                raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; a track table needs "
                                 f"patient, lesion, site, image and date or age_weeks (found: {found})")
            for cells in reader:
                line = reader.line_num  # the record's last physical line (a quoted cell may span lines)
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) > len(names):
                    errors.append(RowError(line, f"{len(cells)} cells but the header names {len(names)} "
                                                 "columns"))
                    continue
                try:
                    rows.append(_parse_row(dict(zip(names, cells)), line, path.parent))
                except RowError as e:
                    errors.append(e)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file; save the table as CSV (UTF-8)") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV file ({e})") from None
    return rows, errors


def _patient_facts(rows: list[TableRow], errors: list[RowError]) -> list[TableRow]:
    """Give every row its patient's birth_date and treatment_start (the first given), refusing rows that
    say otherwise, then fill age_weeks from date and birth_date."""
    kept, facts = [], {}
    for row in rows:
        known = facts.setdefault(row.patient, {})
        try:
            for key in ("birth_date", "treatment_start"):
                value = getattr(row, key)
                if value is not None:
                    first, first_line = known.setdefault(key, (value, row.line))
                    if first != value:
                        raise ValueError(f"{key} {value} differs from {first} given for this patient on line "
                                         f"{first_line}")
        except ValueError as e:
            errors.append(RowError(row.line, str(e), row.patient))
            continue
        kept.append(row)
    out = []
    for row in kept:
        known = facts[row.patient]
        birth = known.get("birth_date", (None,))[0]
        row = dataclasses.replace(row, birth_date=birth,
                                  treatment_start=known.get("treatment_start", (None,))[0])
        if row.date is not None and birth is not None:
            if row.date < birth:
                errors.append(RowError(row.line, f"date {row.date} is before the birth_date {birth}",
                                       row.patient))
                continue
            age = (row.date - birth).days / 7.0
            if age > MAX_AGE_WEEKS:
                errors.append(RowError(row.line, f"date {row.date} is {age:,.0f} weeks after the birth_date {birth}, "
                                                 f"beyond {MAX_AGE_WEEKS:,} weeks", row.patient))
                continue
            if row.age_weeks is not None and abs(row.age_weeks - age) > 0.5:
                problem = (f"age_weeks {row.age_weeks:g} does not match date {row.date} and birth_date "
                           f"{birth} ({age:.1f} weeks)")
                errors.append(RowError(row.line, problem, row.patient))
                continue
            row = dataclasses.replace(row, age_weeks=age if row.age_weeks is None else row.age_weeks)
        out.append(row)
    return out


def _group(rows: list[TableRow], errors: list[RowError]) -> dict[tuple, tuple[str, list[list[TableRow]]]]:
    """lesion id -> (axis, its visits in time order, each a list of rows). The axis is "age" when every row
    of the lesion has an age in weeks, else "date"; rows that cannot be placed on it are errors, and so is
    a second row of the same lesion, visit and plane."""
    by_lesion: dict[tuple, list[TableRow]] = {}
    for row in rows:
        by_lesion.setdefault(row.lesion_id, []).append(row)
    out = {}
    for lid, lrows in by_lesion.items():
        axis = "age" if all(r.age_weeks is not None for r in lrows) else "date"
        if axis == "date":
            for r in lrows:
                if r.date is None:
                    problem = ("age_weeks without a date, while other visits of this lesion have dates and "
                               "no birth_date turns them into ages: give the date, or the patient's "
                               "birth_date")
                    errors.append(RowError(r.line, problem, r.patient))
            lrows = [r for r in lrows if r.date is not None]
        visits: dict = {}
        for r in lrows:
            same = visits.setdefault(round(r.age_weeks, 4) if axis == "age" else r.date, [])
            twin = next((o for o in same if o.plane == r.plane), None)
            if twin is not None:
                errors.append(RowError(r.line, f"the same lesion, visit and plane ({r.plane or 'not given'}) "
                                               f"as line {twin.line}", r.patient))
                continue
            same.append(r)
        out[lid] = (axis, [visits[k] for k in sorted(visits)])
    return out


# ------------------------------------------------------------------------------------------ measurement


@dataclass
class _Scan:
    """One row measured."""

    row: TableRow
    outline: str  # "mask" (the table's) or "model" (segmented here)
    measured: ScanMeasurement
    lesion: LesionMeasurement | None  # the tracked lesion: the mask's largest
    thumbnail: bytes | None  # PNG of the lesion's surroundings with its outline (the whole scan when empty)
    warnings: list[str]
    finding: object | None = None  # the model's `inference.review.Finding` (None: the table's own mask)

    @property
    def flagged(self) -> bool:
        """The model's outline (or its 'no lesion') needs a clinician's review."""
        return bool(getattr(self.finding, "needs_review", False))

    @property
    def spacing(self) -> Spacing | None:
        return self.measured.measurement.spacing

    @property
    def in_mm(self) -> bool:
        """Measured in mm with a lesion: a scan that can be compared."""
        return self.spacing is not None and self.lesion is not None

    @property
    def longest(self) -> float:
        return self.lesion.longest_diameter_mm

    @property
    def perpendicular(self) -> float:
        return self.lesion.perpendicular_diameter_mm


def _thumbnail(gray: np.ndarray, lesion_mask: np.ndarray, bbox: tuple[int, int, int, int],
               spacing: Spacing | None) -> bytes:
    """PNG of the lesion's box plus a margin at its physical aspect ratio (square pixels without a
    spacing), its outline in yellow, _THUMB_PX on the longer side."""
    h, w = gray.shape
    x, y, bw, bh = bbox
    margin = max(8, round(0.3 * max(bw, bh)))
    x0, y0 = max(0, x - margin), max(0, y - margin)
    x1, y1 = min(w, x + bw + margin), min(h, y + bh + margin)
    sx, sy = (1.0, 1.0) if spacing is None else (spacing.x_mm, spacing.y_mm)
    cw, ch = (x1 - x0) * sx, (y1 - y0) * sy
    scale = _THUMB_PX / max(cw, ch)
    size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    crop = np.clip(np.round(gray[y0:y1, x0:x1] * 255), 0, 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR))
    outline = Image.fromarray(lesion_mask[y0:y1, x0:x1].astype(np.uint8) * 255)
    outline = np.asarray(outline.resize(size, Image.Resampling.NEAREST)) > 0
    return png_bytes(overlay_contours(img, pred=outline, thickness=2))


def _measure(row: TableRow, predictor: Predictor | None, mask_threshold: float | None,
             max_pixels: int | None) -> _Scan:
    """Decode, outline (the row's mask, else the predictor) and measure one row; RowError if it cannot be.
    Problems name the column, not the file: a path may hold the patient's ID."""
    if row.mask is None and predictor is None:
        raise RowError(row.line, "no mask given and no model to segment the scan: fill the mask column or "
                                 "give --model RUN", row.patient)
    try:
        decoded = decode_image(row.image, max_pixels)
    except DataError as e:
        raise RowError(row.line, f"image: {e.problem}", row.patient) from None
    if row.mask is not None:
        try:
            mask = read_mask(row.mask, mask_threshold, max_pixels)
        except DataError as e:
            raise RowError(row.line, f"mask: {e.problem}", row.patient) from None
        if mask.shape != decoded.gray.shape:
            (mh, mw), (ih, iw) = mask.shape, decoded.gray.shape
            raise RowError(row.line, f"mask size {mw}x{mh} does not match its scan's {iw}x{ih}", row.patient)
        outline, finding = "mask", None
    else:
        pred = predictor.predict(decoded.gray)
        mask, outline, finding = pred.mask, "model", getattr(pred, "finding", None)
    measured = measure_scan(decoded, mask, row.pixel_spacing)
    m = measured.measurement
    warnings = [w for w in m.warnings if w not in _IRRELEVANT]
    if measured.calibration_note:
        warnings.append(measured.calibration_note)
    if m.n_lesions > 1:
        warnings.append(f"the mask holds {m.n_lesions} lesions: the largest is the one tracked")
    lesion, thumbnail = (m.lesions[0], None) if m.lesions else (None, None)
    if lesion is not None:
        labels, _ = label_lesions(mask)
        # the largest component; argmax takes the first of equal areas, as measure_mask's stable sort does
        largest = labels == int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        thumbnail = _thumbnail(decoded.gray, largest, lesion.bbox, m.spacing)
    else:  # the whole scan, so an empty visit can be looked at too
        thumbnail = _thumbnail(decoded.gray, mask, (0, 0, mask.shape[1], mask.shape[0]), m.spacing)
    if finding is not None and finding.needs_review:
        warnings.append(f"{finding.text}: {finding.why}")
    if measured.burned_in_annotation:
        warnings.append("the DICOM file does not say its pixels are free of burned-in text "
                        "(BurnedInAnnotation is not NO): check the thumbnail before sharing the page")
    if decoded.dicom is not None and decoded.dicom.n_frames > 1:
        warnings.append(f"cine DICOM: its first frame of {decoded.dicom.n_frames} was measured")
    return _Scan(row, outline, measured, lesion, thumbnail, warnings, finding)


# --------------------------------------------------------------------------------------------- visits


@dataclass
class _Visit:
    """One lesion on one day: its scans and what was made of them."""

    scans: list[_Scan]
    volume: float | None = None
    status: str = ""
    reason: str = ""
    changes: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    provisional: bool = False  # the status rests on an outline flagged for review

    @property
    def flagged(self) -> bool:
        return any(s.flagged for s in self.scans)

    @property
    def row(self) -> TableRow:
        return self.scans[0].row

    @property
    def mm_planes(self) -> set[str]:
        return {s.row.plane for s in self.scans if s.in_mm}

    def section(self, planes: set[str] | None = None) -> _Scan | None:
        """The scan in mm (in `planes`, when given) with the largest longest diameter."""
        found = [s for s in self.scans if s.in_mm and (planes is None or s.row.plane in planes)]
        return max(found, key=lambda s: s.longest, default=None)

    def thickness(self) -> float | None:
        return max((s.lesion.thickness_mm for s in self.scans if s.in_mm), default=None)


def _volume(visit: _Visit) -> float | None:
    """pi/6 L W H from the visit's transverse (W) and longitudinal (L) scans in mm; H the larger thickness."""
    by = {}
    for s in visit.scans:
        if s.in_mm and s.row.orientation is not None:
            by.setdefault(s.row.orientation, s)
    if TRANSVERSE not in by or LONGITUDINAL not in by:
        return None
    t, lo = by[TRANSVERSE], by[LONGITUDINAL]
    return ellipsoid_volume_mm3(lo.longest, t.longest, max(t.lesion.thickness_mm, lo.lesion.thickness_mm))


def _when(visit: _Visit, axis: str) -> str:
    """The visit's time on the lesion's axis, with the other one beside it when the table gives it."""
    r = visit.row
    age = None if r.age_weeks is None else f"week {r.age_weeks:.1f}"
    date = None if r.date is None else str(r.date)
    first, second = (age, date) if axis == "age" else (date, age)
    return f"{first} ({second})" if second else str(first)


def _planes(planes: set[str]) -> str:
    return ", ".join(sorted(planes)) or "(plane not given)"


def _pct(now: float, ref: float) -> float:
    return (now - ref) / ref * 100.0


def _pairs(cur: _Visit, earlier: Sequence[_Visit], metric: str) -> list[tuple[_Visit, float, float]]:
    """(earlier visit, its value, this visit's value) over the earlier visits sharing a plane in mm, in time
    order; both values from the largest section among the shared planes."""
    out = []
    for e in earlier:
        common = cur.mm_planes & e.mm_planes
        if common:
            out.append((e, getattr(e.section(common), metric), getattr(cur.section(common), metric)))
    return out


def _changes(v: _Visit, done: list[_Visit]) -> None:
    """Changes since the previous visit, the baseline and the smallest so far, in mm (or mm3) and %."""
    for metric in ("longest", "perpendicular"):
        pairs = _pairs(v, done, metric)
        if pairs:
            smallest = max(pairs, key=lambda p: p[2] / p[1])  # what this visit is largest against
            refs = {"previous": pairs[-1], "baseline": pairs[0], "smallest": smallest}
            for ref, (_, was, now) in refs.items():
                v.changes[f"{metric}_change_{ref}_mm"] = now - was
                v.changes[f"{metric}_change_{ref}_pct"] = _pct(now, was)
    earlier = [e for e in done if e.volume is not None]
    if v.volume is not None and earlier:
        smallest = min(earlier, key=lambda e: e.volume)
        for ref, e in (("previous", earlier[-1]), ("baseline", earlier[0]), ("smallest", smallest)):
            v.changes[f"volume_change_{ref}_mm3"] = v.volume - e.volume
            v.changes[f"volume_change_{ref}_pct"] = _pct(v.volume, e.volume)


def _status(v: _Visit, done: list[_Visit], rules: TrackRules, axis: str) -> tuple[str, str]:
    """(status, why) of a visit measured in mm, given the earlier visits measured in mm."""
    longest = _pairs(v, done, "longest")
    if not longest:
        if not done:
            return "baseline", "first visit measured in mm"
        return "baseline", (f"first visit measured in mm in plane(s) {_planes(v.mm_planes)}: no earlier "
                            "visit shares a plane with it")
    prev = longest[-1][0]
    if prev.mm_planes != v.mm_planes:
        v.warnings.append(f"compared with the previous visit ({_when(prev, axis)}) in plane(s) "
                          f"{_planes(prev.mm_planes & v.mm_planes)} only: the two visits were not measured "
                          "in the same planes")
    grew = []
    for metric, pairs in (("longest", longest), ("perpendicular", _pairs(v, done, "perpendicular"))):
        _, was, now = pairs[-1]
        if now - was >= rules.growth_mm - _EPS and _pct(now, was) >= rules.growth_pct - _EPS:
            grew.append(f"{metric} diameter {now - was:+.1f} mm ({_pct(now, was):+.0f} %) since "
                        f"{_when(prev, axis)}")
    if grew:
        return "growth", "; ".join(grew)

    shrank = []
    # the reference: the earlier visit this one is smallest against (largest), or the previous one
    ref, was, now = max(longest, key=lambda p: p[1] / p[2]) if rules.from_largest else longest[-1]
    where = "its largest" if rules.from_largest else "the previous visit"
    if -_pct(now, was) >= rules.involution_pct - _EPS:
        shrank.append(f"longest diameter {now - was:+.1f} mm ({_pct(now, was):+.0f} %) from {where}, "
                      f"{was:.1f} mm at {_when(ref, axis)}")
    with_volume = [e for e in done if e.volume is not None]
    if v.volume is not None and with_volume and rules.volume_ratio > 0:
        e = max(with_volume, key=lambda e: e.volume) if rules.from_largest else with_volume[-1]
        ratio = v.volume / e.volume
        if ratio < rules.volume_ratio:
            shrank.append(f"volume {ratio:.2f} x {'its largest' if rules.from_largest else 'the previous'}, "
                          f"{e.volume:.0f} mm3 at {_when(e, axis)}")
    if shrank:
        return "involution", "; ".join(shrank)

    _, pw, pn = longest[-1]
    why = f"longest diameter {pn - pw:+.1f} mm ({_pct(pn, pw):+.0f} %) since {_when(prev, axis)}"
    if rules.from_largest and ref is not prev:
        why += f", {_pct(now, was):+.0f} % from its largest ({_when(ref, axis)})"
    return "stable", why


def _assess(visits: list[_Visit], rules: TrackRules, axis: str) -> None:
    """Fill volume, changes, status and reason of one lesion's visits (in time order)."""
    done: list[_Visit] = []  # earlier visits measured in mm: the only references
    for v in visits:
        v.volume = _volume(v)
        if not v.mm_planes:
            v.provisional = v.flagged
            if any(s.spacing is not None for s in v.scans):
                v.status = "no lesion in the mask"
                v.reason = ("the model found no lesion on this visit's calibrated scans: review them" if
                            any(s.outline == "model" for s in v.scans) else
                            "the masks of this visit's calibrated scans are empty")
            else:
                v.status = "not measurable in mm"
                v.reason = "no scan of this visit is calibrated: its figures are in pixels, never compared"
            continue
        if v.volume is None and len({s.row.plane for s in v.scans}) > 1:
            v.warnings.append("no volume: it needs a transverse and a longitudinal scan, both in mm with a "
                              "lesion")
        _changes(v, done)
        v.status, v.reason = _status(v, done, rules, axis)
        v.provisional = v.flagged or (bool(done) and done[-1].flagged)
        if v.provisional:
            v.reason += ("; provisional: " + ("this visit's outline" if v.flagged else "the previous visit's outline")
                         + " is flagged for review")
        done.append(v)


# ------------------------------------------------------------------------------------------- identity


def patient_key(patient_id: str, salt: str) -> str:
    """The salted key outputs use for a patient: 'p' + 12 hex digits of HMAC-SHA256(salt, patient_id)."""
    return "p" + hmac.new(salt.encode(), patient_id.encode(), hashlib.sha256).hexdigest()[:12]


def _resolve_salt(data_dir: Path, salt: str | None, out: Path | None = None) -> tuple[str, Path | None]:
    """(salt, where it is kept): the caller's (it wins and is never written: theirs to keep), else the one
    kept beside the visits table (DATA_DIR/hemaseg-salt.txt, so every output folder made from that table
    names a patient alike), else one an earlier version kept in OUT/salt.txt (copied beside the table),
    else a new one kept there."""
    if salt is not None:
        if not salt.strip():
            raise ConfigError("salt", "must not be empty")
        return salt, None
    path = data_dir / SALT_FILE
    stored = path.read_text().strip() if path.is_file() else None
    legacy = out / "salt.txt" if out is not None else None
    if not stored and legacy is not None and legacy.is_file():
        stored = legacy.read_text().strip() or None
        if stored:
            atomic_write_text(path, stored + "\n")
    if stored:
        return stored, path
    new = secrets.token_hex(16)
    atomic_write_text(path, new + "\n")
    return new, path


def _slug(text: str) -> str:
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x")[:60]


# ----------------------------------------------------------------------------------------------- result


@dataclass
class TrackResult:
    out_dir: Path
    visits: list[dict] = field(default_factory=list)  # rows of visits.csv, by patient, lesion and time
    scans: list[dict] = field(default_factory=list)  # rows of scans.csv, in table order
    errors: list[dict] = field(default_factory=list)  # rows of errors.csv: line, problem
    pages: list[Path] = field(default_factory=list)  # patients/KEY.html
    curves: list[Path] = field(default_factory=list)  # curves/KEY_LESION_SITE.png, one per lesion
    salt_file: Path | None = None  # where the salt is kept (beside the table); None with a caller's salt or raw IDs
    index: Path | None = None  # index.html: every patient and lesion with its latest status
    rules: TrackRules = field(default_factory=TrackRules)


def _r(v, digits: int = 3):
    return None if v is None else round(float(v), digits)


def _join(items: Sequence[str]) -> str:
    return " | ".join(dict.fromkeys(i for i in items if i))


def _scan_row(s: _Scan, key: str) -> dict:
    r, m, les, sp = s.row, s.measured.measurement, s.lesion, s.spacing
    d = dict.fromkeys(SCAN_COLUMNS)
    d |= {"line": r.line, "patient_key": key, "lesion": r.lesion, "site": r.site, "date": r.date,
          "age_weeks": _r(r.age_weeks, 2), "plane": r.plane, "outline": s.outline, "n_lesions": m.n_lesions,
          "calibration_note": s.measured.calibration_note, "warnings": _join(s.warnings),
          "needs_review": s.flagged if s.finding is not None else None,
          "finding": getattr(s.finding, "text", None), "review_reason": getattr(s.finding, "why", None)}
    if sp is not None:
        d |= {"spacing_x_mm": sp.x_mm, "spacing_y_mm": sp.y_mm, "spacing_source": sp.source}
    if les is not None:
        x, y, w, h = les.bbox
        d |= {"longest_diameter_mm": _r(les.longest_diameter_mm),
              "perpendicular_diameter_mm": _r(les.perpendicular_diameter_mm),
              "thickness_mm": _r(les.thickness_mm), "area_mm2": _r(les.area_mm2),
              "longest_diameter_px": _r(les.longest_diameter_px),
              "perpendicular_diameter_px": _r(les.perpendicular_diameter_px),
              "thickness_px": les.thickness_px, "area_px": les.area_px,
              "bbox_x": x, "bbox_y": y, "bbox_w": w, "bbox_h": h}
    return d


def _visit_row(v: _Visit, key: str) -> dict:
    r, sec, several = v.row, v.section(), len(v.scans) > 1
    spacing = [f"{s.row.plane + ': ' if several else ''}{s.spacing.x_mm:g} x {s.spacing.y_mm:g} mm, "
               f"{s.spacing.source}" for s in v.scans if s.spacing is not None]
    warnings = v.warnings + [f"{s.row.plane}: {w}" if several else w for s in v.scans for w in s.warnings]
    d = dict.fromkeys(VISIT_COLUMNS)
    d |= {"patient_key": key, "lesion": r.lesion, "site": r.site, "date": r.date,
          "age_weeks": _r(r.age_weeks, 2), "planes": "+".join(s.row.plane or "(not given)" for s in v.scans),
          "csv_lines": " ".join(str(n) for n in sorted(s.row.line for s in v.scans)),
          "thickness_mm": _r(v.thickness()), "volume_mm3": _r(v.volume, 1), "status": v.status,
          "status_reason": v.reason, "provisional": v.provisional, "needs_review": v.flagged,
          "spacing_source": _join(spacing), "warnings": _join(warnings)}
    if sec is not None:
        d |= {"longest_diameter_mm": _r(sec.longest), "perpendicular_diameter_mm": _r(sec.perpendicular),
              "section_plane": sec.row.plane, "area_mm2": _r(sec.lesion.area_mm2)}
    for k, val in v.changes.items():
        d[k] = _r(val, 1 if k.endswith(("pct", "mm3")) else 3)
    return d


# ------------------------------------------------------------------------------------------ the curves


def _x(visit: _Visit, axis: str):
    return visit.row.age_weeks if axis == "age" else visit.row.date


def _treatment_x(row: TableRow, axis: str):
    """(where treatment starts on the lesion's axis, None) or (None, why it cannot be placed)."""
    t, birth = row.treatment_start, row.birth_date
    if t is None:
        return None, None
    if axis == "age":
        if isinstance(t, float):
            return t, None
        if birth is not None:
            return (t - birth).days / 7.0, None
        return None, "treatment_start is a date but there is no birth_date to place it on the age axis"
    if isinstance(t, datetime.date):
        return t, None
    if birth is not None:
        return birth + datetime.timedelta(weeks=t), None
    return None, "treatment_start is an age in weeks but there is no birth_date to place it among the dates"


def _curve_png(visits: list[_Visit], axis: str, title: str) -> bytes:
    """Longest (solid) and perpendicular (dashed) diameter per plane in mm, volume (dotted, right axis)
    when any visit has one, against age in weeks or date; treatment start as a red vertical line."""
    fig = new_figure((6.4, 4.6))
    ax = fig.add_subplot()
    planes = sorted({s.row.plane for v in visits for s in v.scans if s.in_mm})
    colours = ["tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:cyan"]
    for i, plane in enumerate(planes):
        pts = [(_x(v, axis), s) for v in visits for s in v.scans if s.in_mm and s.row.plane == plane]
        name = f" ({plane})" if len(planes) > 1 and plane else ""
        colour = colours[i % len(colours)]
        xs = [p[0] for p in pts]
        ax.plot(xs, [p[1].longest for p in pts], "-o", color=colour, ms=4, label=f"longest diameter{name}")
        ax.plot(xs, [p[1].perpendicular for p in pts], "--s", color=colour, ms=3,
                label=f"perpendicular diameter{name}")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("diameter (mm)")
    ax.set_xlabel("age (weeks)" if axis == "age" else "visit date")
    handles, labels = ax.get_legend_handles_labels()
    vol = [(_x(v, axis), v.volume) for v in visits if v.volume is not None]
    if vol:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in vol], [p[1] for p in vol], ":^", color="black", ms=4,
                 label="volume (two planes)")
        ax2.set_ylabel("volume (mm³)")
        ax2.set_ylim(bottom=0)
        more_handles, more_labels = ax2.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    tx, _ = _treatment_x(visits[0].row, axis)
    if tx is not None:
        handles.append(ax.axvline(tx, color="tab:red", ls="-.", lw=1.2))
        labels.append("treatment start")
    if not planes:
        ax.text(0.5, 0.5, "no visit measured in mm", ha="center", va="center", transform=ax.transAxes)
    if handles:  # below the axes: inside, it hides the points that matter most (the peak)
        ax.legend(handles, labels, frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=2)
    ax.set_title(title, fontsize=11)
    if axis == "date":
        fig.autofmt_xdate()
    fig.tight_layout()
    return figure_png(fig)


# -------------------------------------------------------------------------------------------- the page

_PAGE_CSS = REPORT_CSS + """
.lesion>figure{max-width:680px}.cases figure{max-width:250px}
.status-growth{color:#b00020;font-weight:600}.status-involution{color:#0a6b2d;font-weight:600}
table.visits{font-size:.88em}table.visits td,table.visits th{padding:3px 6px}
table.visits td.num,td.status{white-space:nowrap}table.visits td.why{min-width:15em}
.scroll{overflow-x:auto;max-width:100%}
table.visits th:first-child,table.visits td:first-child{position:sticky;left:0;background:#fff;z-index:1}
table.visits thead th:first-child{background:#f3f4f6}
figure.flagged img{border:3px solid #e07b00}"""


def _fmt(v, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _change(v: _Visit, metric: str, ref: str, unit: str) -> str:
    a, p = v.changes.get(f"{metric}_change_{ref}_{unit}"), v.changes.get(f"{metric}_change_{ref}_pct")
    return "–" if a is None else f"{a:+.{0 if unit == 'mm3' else 1}f} ({p:+.0f} %)"


def _scan_html(v: _Visit, s: _Scan, axis: str) -> tuple[str, str]:
    """(the thumbnail's figure, or "", the scan's calibration and warnings as a list item)."""
    esc = html.escape
    plane = s.row.plane or "plane not given"
    what = f"{_when(v, axis)} · {plane} · {v.status}"
    if s.lesion is None:
        size = "no lesion found — review" if s.outline == "model" else "no lesion in the mask"
    elif s.spacing is not None:
        size = f"{s.longest:.1f} × {s.perpendicular:.1f} mm, thickness {s.lesion.thickness_mm:.1f} mm"
    else:
        size = (f"{s.lesion.longest_diameter_px:.0f} × {s.lesion.perpendicular_diameter_px:.0f} px "
                "(not calibrated)")
    figure = ""
    if s.thumbnail is not None:
        outline = "outline: the table's mask" if s.outline == "mask" else "outline: the model's"
        review = (f'<br><span class="tag review">⚠ review</span>{esc(s.finding.why)}' if s.flagged else "")
        figure = (f'<figure class="{"flagged" if s.flagged else ""}">'
                  f"{img_tag(s.thumbnail, f'{what}: the lesion with its outline in yellow; {size}')}"
                  f"<figcaption><strong>{esc(what)}</strong><br>{esc(size)}{review}<br>"
                  f'<span class="muted">{esc(outline)}; CSV line {s.row.line}</span></figcaption></figure>')
    cal = (f"{s.spacing.x_mm:g} × {s.spacing.y_mm:g} mm/pixel from {s.spacing.source}" if s.spacing
           else f"in pixels: {s.measured.calibration_note or 'no calibration'}")
    warnings = "".join(f"<br>⚠ {esc(w)}" for w in s.warnings if w != s.measured.calibration_note)
    return figure, (f"<li><strong>{esc(_when(v, axis))}, {esc(plane)}</strong> (CSV line {s.row.line}): "
                    f"{esc(cal)}{warnings}</li>")


def _lesion_html(lesion: str, site: str, visits: list[_Visit], axis: str, curve: bytes) -> str:
    esc = html.escape
    head = ("<th>visit</th><th>planes</th><th>longest mm</th><th>perpendicular mm</th><th>thickness mm</th>"
            "<th>area mm²</th><th>volume mm³</th><th>longest: since previous</th><th>since baseline</th>"
            "<th>since smallest</th><th>volume: since previous</th><th>status</th><th>why</th>")
    body, figs, notes = [], [], []
    for v in visits:
        sec = v.section()
        planes = "<br>".join(esc(s.row.plane or "(not given)") for s in v.scans)
        nums = [_fmt(sec and sec.longest), _fmt(sec and sec.perpendicular), _fmt(v.thickness()),
                _fmt(sec and sec.lesion.area_mm2), _fmt(v.volume, 0), _change(v, "longest", "previous", "mm"),
                _change(v, "longest", "baseline", "mm"), _change(v, "longest", "smallest", "mm"),
                _change(v, "volume", "previous", "mm3")]
        body.append(f"<tr><td>{esc(_when(v, axis))}</td><td>{planes}</td>"
                    + "".join(f'<td class="num">{esc(c)}</td>' for c in nums)
                    + f'<td class="status status-{v.status.split()[0]}">{esc(v.status)}'
                    + (' <span class="tag review">provisional</span>' if v.provisional else "")
                    + (' <span class="tag review">⚠ review</span>' if v.flagged else "") + "</td>"
                    f'<td class="why">{esc(v.reason)}</td></tr>')
        for s in v.scans:
            figure, note = _scan_html(v, s, axis)
            figs.append(figure)
            notes.append(note)
        notes += [f"<li><strong>{esc(_when(v, axis))}</strong>: ⚠ {esc(w)}</li>" for w in v.warnings]
    n_px = sum(v.status == "not measurable in mm" for v in visits)
    _, treatment_note = _treatment_x(visits[0].row, axis)
    caption = ("Longest (solid) and perpendicular (dashed) diameter per plane; volume (dotted, right axis) "
               "at visits with two orthogonal planes; treatment start in red."
               + (f" {n_px} visit(s) in pixels only are not plotted." if n_px else "")
               + (f" Treatment start not marked: {treatment_note}." if treatment_note else ""))
    return (f'<section class="lesion"><h2>Lesion {esc(lesion)} — {esc(site)}</h2>'
            f"<figure>{img_tag(curve, f'Growth curve of lesion {lesion} ({site})')}"
            f"<figcaption>{esc(caption)}</figcaption></figure>"
            f'<div class="scroll"><table class="visits"><caption>Visits</caption><thead><tr>{head}</tr>'
            "</thead><tbody>" + "".join(body) + "</tbody></table></div>"
            + '<h3>Outlines</h3><div class="cases">' + "".join(figs) + "</div>"
            + "<h3>Calibration and warnings</h3><ul>" + "".join(notes) + "</ul></section>")


def _page(key: str, raw: bool, lesions: list[tuple], rules: TrackRules, errors: list[str]) -> str:
    """One patient's self-contained page: no scripts, no links, every image inline."""
    from hemaseg import __version__

    esc = html.escape
    who = ("the patient ID as given (raw IDs were asked for)" if raw
           else "a salted key of the patient ID (the ID itself is in no output)")
    parts = [f"<header><h1>Lesion follow-up: patient {esc(key)}</h1>",
             (f'<p class="muted">Patient named by {esc(who)}. Measured by hemaseg {esc(__version__)}: '
              "decision support, not a diagnosis; check every outline. An outline (or a 'no lesion found') "
              "the model's confidence puts in doubt is marked ⚠ review with its reason, and a status that "
              "rests on it is provisional.</p></header><main>"),
             ('<section id="rules"><h2>Status rules</h2><div class="rule"><ul>'
              + "".join(f"<li>{esc(line)}</li>" for line in rules.describe()) + "</ul></div>"
              + f'<p class="muted">{esc(VOLUME_TEXT)}</p></section>')]
    parts += [_lesion_html(*lesion) for lesion in lesions]
    if errors:
        parts.append('<section id="errors"><h2>Rows not tracked</h2><ul>'
                     + "".join(f"<li>{esc(e)}</li>" for e in errors) + "</ul></section>")
    parts.append("</main>")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Lesion follow-up: {esc(key)}</title><style>{_PAGE_CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


# -------------------------------------------------------------------------------------------- track


def _index(entries: list[tuple[str, str, list[tuple[str, str, _Visit, str, int]]]], raw: bool) -> str:
    """OUT/index.html: every patient (key, page) and lesion with its latest visit, status and flags."""
    esc = html.escape
    rows = []
    for key, page, lesions in entries:
        for lesion, site, last, axis, n_flagged in lesions:
            flags = (' <span class="tag review">provisional</span>' if last.provisional else "") + (
                f' <span class="tag review">⚠ {n_flagged} visit(s) to review</span>' if n_flagged else "")
            rows.append(f'<tr><td><a href="patients/{esc(page)}">{esc(key)}</a></td><td>{esc(lesion)}</td>'
                        f"<td>{esc(site)}</td><td>{esc(_when(last, axis))}</td>"
                        f'<td class="status status-{last.status.split()[0]}">{esc(last.status)}{flags}</td></tr>')
    who = "patient ID" if raw else "patient key"
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>Lesion follow-up: all patients</title><style>{_PAGE_CSS}</style></head>\n<body>\n"
            "<header><h1>Lesion follow-up: all patients</h1><p class=\"muted\">The latest visit of every lesion. "
            "Decision support, not a diagnosis.</p></header><main><div class=\"scroll\"><table class=\"visits\">"
            f"<thead><tr><th>{who}</th><th>lesion</th><th>site</th><th>latest visit</th><th>status</th></tr></thead>"
            "<tbody>" + "".join(rows) + "</tbody></table></div></main>\n</body></html>\n")


def _clean(folder: Path, keep: set[Path], pattern: str) -> None:
    """Remove what an earlier run wrote into our own subfolder and this one did not (a patient since
    dropped from the table)."""
    if folder.is_dir():
        for p in folder.glob(pattern):
            if p not in keep and p.is_file():
                p.unlink()


def _removes_its_files_on_failure(fn):
    """A track that fails (a full disk, Ctrl-C) removes every file and folder it created in `out_dir`: no salt,
    curve or empty patients/ folder is left without the tables that explain it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = Path(inspect.signature(fn).bind(*args, **kwargs).arguments["out_dir"])
        before = {out, *out.rglob("*")} if out.is_dir() else set()
        try:
            return fn(*args, **kwargs)
        except BaseException:
            new = {out, *out.rglob("*")} - before if out.is_dir() else set()
            for p in sorted(new, key=lambda p: len(p.parts), reverse=True):  # files before their folders
                if p.is_dir() and not p.is_symlink():
                    if not any(p.iterdir()):
                        p.rmdir()
                else:
                    p.unlink(missing_ok=True)
            raise
    return wrapper


@_removes_its_files_on_failure
def track(table_csv: str | os.PathLike, out_dir: str | os.PathLike, predictor: Predictor | None = None,
          rules: TrackRules = TrackRules(), salt: str | None = None, raw_patient_id: bool = False, *,
          mask_threshold: float | None = None, max_pixels: int | None = MAX_PIXELS_DEFAULT) -> TrackResult:
    """Follow every lesion of `table_csv` (see the module docstring) and write the outputs into `out_dir`.

    `predictor` (anything with `.predict(gray) -> .mask`, e.g. `load_model(run)`) segments the rows
    without a mask; without one such rows are errors. `salt`: the key's salt (None: OUT/salt.txt, created
    once). `raw_patient_id`: name patients by their ID instead of a key. `mask_threshold` and `max_pixels`
    as for `hemaseg measure`. Bad rows become `errors` (and errors.csv); a table without the required
    columns raises ValueError before anything is written.
    """
    if not isinstance(rules, TrackRules):
        raise TypeError(f"rules must be a TrackRules; got {type(rules).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out is a file, not a folder")
    rows, errors = read_table(table_csv)  # a wrong table leaves no folder behind
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "patients", out / "curves"):
        remove_stale_temps(folder)
    result = TrackResult(out_dir=out, rules=rules)
    patients = list(dict.fromkeys([r.patient for r in rows] + [e.patient for e in errors if e.patient]))
    if raw_patient_id:
        keys = {p: p for p in patients}
    else:
        secret, result.salt_file = _resolve_salt(Path(table_csv).resolve().parent, salt, out)
        keys = {p: patient_key(p, secret) for p in patients}
    # a message that quotes a patient's ID (a path named after the patient) shows the key instead; IDs
    # shorter than 4 characters would also match inside line numbers and figures
    ids = [] if raw_patient_id else sorted((p for p in patients if len(p) >= 4), key=len, reverse=True)

    def redact(text: str) -> str:
        for p in ids:
            text = text.replace(p, keys[p])
        return text

    grouped = _group(_patient_facts(rows, errors), errors)
    scans: dict[int, _Scan] = {}
    for _, visits in grouped.values():
        for row in (row for visit in visits for row in visit):
            try:
                scans[row.line] = _measure(row, predictor, mask_threshold, max_pixels)
            except RowError as e:
                errors.append(e)
    errors.sort(key=lambda e: e.line)
    for e in errors:
        log.warning("%s: skipped %s", Path(table_csv).name, redact(str(e)))

    per_patient: dict[str, list] = {}
    for (patient, lesion, site), (axis, visit_rows) in grouped.items():
        visits = [_Visit(sorted((scans[r.line] for r in v if r.line in scans),
                                key=lambda s: (s.row.plane, s.row.line))) for v in visit_rows]
        visits = [v for v in visits if v.scans]
        if visits:
            _assess(visits, rules, axis)
            for v in visits:
                v.warnings = [redact(w) for w in v.warnings]
                for s in v.scans:
                    s.warnings = [redact(w) for w in s.warnings]
            per_patient.setdefault(patient, []).append((lesion, site, visits, axis))

    pages, curves, names = set(), set(), set()
    index_entries: list[tuple] = []
    for patient, lesions in per_patient.items():
        key = keys[patient]
        name = _slug(key)
        while name in names:  # two raw IDs that differ only in characters a file name cannot hold
            name += "_"
        names.add(name)
        page_lesions = []
        lesions = sorted(lesions, key=lambda t: (t[0], t[1]))
        index_entries.append((key, f"{name}.html", [(lesion, site, visits[-1], axis, sum(v.flagged for v in visits))
                                                    for lesion, site, visits, axis in lesions]))
        for lesion, site, visits, axis in lesions:
            curve = _curve_png(visits, axis, f"Lesion {lesion} ({site})")
            stem = f"{name}_{_slug(lesion)}_{_slug(site)}"
            path, n = out / "curves" / f"{stem}.png", 1
            while path in curves:
                n += 1
                path = out / "curves" / f"{stem}_{n}.png"
            atomic_write_bytes(path, curve)
            curves.add(path)
            result.curves.append(path)
            page_lesions.append((lesion, site, visits, axis, curve))
            result.visits += [_visit_row(v, key) for v in visits]
        page = out / "patients" / f"{name}.html"
        mine = [redact(str(e)) for e in errors if e.patient == patient]
        atomic_write_text(page, _page(key, raw_patient_id, page_lesions, rules, mine))
        pages.add(page)
        result.pages.append(page)

    result.scans = [_scan_row(s, keys[s.row.patient]) for _, s in sorted(scans.items())]
    result.errors = [{"line": e.line, "problem": redact(e.problem)} for e in errors]
    result.index = atomic_write_text(out / "index.html", _index(index_entries, raw_patient_id))
    write_csv(out / "visits.csv", result.visits, VISIT_COLUMNS)
    write_csv(out / "scans.csv", result.scans, SCAN_COLUMNS)
    atomic_write_text(out / "rules.txt", "\n".join([*rules.describe(), VOLUME_TEXT]) + "\n")
    if result.errors:
        write_csv(out / "errors.csv", result.errors, ERROR_COLUMNS)
    elif (out / "errors.csv").is_file():
        (out / "errors.csv").unlink()  # a rerun that succeeded leaves no stale error list
    _clean(out / "patients", pages, "*.html")
    _clean(out / "curves", curves, "*.png")
    log.debug("tracked %d lesion(s) of %d patient(s) over %d visit(s); %d row(s) skipped", len(result.curves),
             len(per_patient), len(result.visits), len(result.errors))
    return result
