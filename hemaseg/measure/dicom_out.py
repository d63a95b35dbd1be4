"""Results a clinic can file: a DICOM Structured Report of the measurements and a DICOM Segmentation of the
mask, both derived from the source ultrasound file and built with highdicom.

- `write_sr`: a Comprehensive SR holding a TID 1500 Measurement Report. One image-level group (TID 1501)
  says how many lesions the scan has (0 included, so "looked and found none" is on file too); then one
  planar ROI group (TID 1410) per measured lesion, largest first like lesions.csv: its outline as a closed
  POLYLINE SCOORD on the source image (and frame, for a multi-frame file), a tracking identifier
  ("lesion N") and UID, and the figures in UCUM units: Area (SCT 42798000, mm2), Long axis (SCT
  103339001: the longest diameter, mm), Short axis (SCT 103340004: the diameter perpendicular to it, mm)
  and Height (DCM 121207, from the measurement CID 7469: hemaseg's thickness, the extent along the image
  rows, mm). The algorithm identification (TID 4019) names hemaseg, its version, the model, the pixel
  spacing with its source (e.g. "ultrasound region 0 (0018,6011)" or "--pixel-spacing") and any warning
  about a reported figure (a sector image's thickness, lesions beyond the measured largest). The document
  is UNVERIFIED and PRELIMINARY: an algorithm's output until a clinician signs it. Comprehensive SR, not
  Comprehensive 3D SR: every coordinate is 2-D, and it is the older class more archives and viewers take.
- `write_seg`: a BINARY Segmentation with one segment "Lesion" (SNOMED CT Morphologically abnormal
  structure / Lesion), AUTOMATIC, algorithm hemaseg + version + model, for a single-frame source only.
  It carries Pixel Measures only when the source has Pixel Spacing (highdicom copies it); a region
  calibration is not turned into one, since a whole-image Pixel Spacing is what `dicom.calibrate` refuses
  to trust on a zoomed or dual view.

Uncalibrated scans get no SR: `write_sr` refuses when the measurement has no millimetre spacing. An SR
measurement is a number with a unit that PACS and reporting systems take as physical and carry into
reports and trends; a length in pixels has no UCUM length unit, and hemaseg's rule is to refuse rather
than guess (a wrong mm figure is worse than none). The pixel figures stay in lesions.csv; a DICOM file
without any calibration can be given `--pixel-spacing` (the SR then names that source), while one whose
own calibration is unusable cannot. The SEG needs no calibration and is written either way.

No SEG for a multi-frame (cine) file: highdicom (0.28) places the frames of a multi-frame source through
its Frame of Reference and plane positions, which ultrasound lacks, and without them refuses any source
of more than one frame ("Only a single frame is supported when the source image has no Frame of
Reference UID"). The SR references the frame instead.

Privacy. Unlike `data.dicom.read_dicom`, which reads an allow-list of tags, this module reads the whole
header (never the pixels): derived objects carry the source's Patient and Study modules by design, that
is how a PACS files them with the scan. So these files hold names, IDs and dates, and belong only where
the scan itself may go. Error messages stay our own text naming the path (no header value, no
highdicom/pydicom message, which may quote one), and pydicom's and highdicom's log records and warnings
are silenced while a file is read or built (highdicom warns about, and older versions log, a Patient's
Name without a caret, quoting it).

Outlines. hemaseg's outline (`lesions.find_lesions`) runs through border pixel centres (x, y), 0-based;
DICOM image coordinates put the top-left corner of the top-left pixel at (0, 0), so a centre is
(x + 0.5, y + 0.5). The polyline is closed by repeating its first point. A lesion whose centre line
encloses no area (one or two pixels, a one-pixel-wide line) is outlined by the rectangle of pixel edges
around its bounding box instead, so that every ROI is a polygon with an inside.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from hemaseg import __version__
from hemaseg.data.dicom import element_value, frame_count, quiet
from hemaseg.data.images import DataError, is_dicom
from hemaseg.data.pixels import read_file
from hemaseg.extras import require
from hemaseg.io import atomic_write_bytes
from hemaseg.lesions import find_lesions
from hemaseg.measure.morphometry import NO_IMAGE, NO_SKIN_LINE, ImageMeasurement
from hemaseg.measure.scan import ScanMeasurement

log = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901  # derived series get high numbers so they sort after the scanner's own
SEG_SERIES_NUMBER = 9902
MANUFACTURER = "hemaseg"
_NOT_REPORTED = (NO_IMAGE, NO_SKIN_LINE)  # warnings about figures the SR does not carry (depths, echogenicity)
_PREAMBLE = 128
_LO_MAX = 64  # Long String (LO) values: Algorithm Name, Manufacturer's Model Name ...

# Attributes highdicom reads from the source with plain attribute access, so a file without them (an
# anonymiser may drop Type 2 attributes) would fail with AttributeError; they are set empty on a copy.
_TYPE2_DEFAULTS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                   "StudyDate", "StudyTime", "ReferringPhysicianName")
_REQUIRED = {"SOPClassUID": "SOP Class UID (0008,0016)", "SOPInstanceUID": "SOP Instance UID (0008,0018)",
             "StudyInstanceUID": "Study Instance UID (0020,000D)",
             "SeriesInstanceUID": "Series Instance UID (0020,000E)"}  # Type 1: what a derived object references


def write_sr(source: str | os.PathLike | bytes, mask: np.ndarray, measurement: ScanMeasurement | ImageMeasurement,
             out_path: str | os.PathLike, frame: int | None = None, *, model: str | None,
             name: str | os.PathLike | None = None, series_number: int = SR_SERIES_NUMBER, finding=None) -> Path:
    """Write the TID 1500 measurement report of `measurement` (from `measure_scan(decoded, mask)`) as a
    Comprehensive SR to `out_path`, atomically. See `build_sr`."""
    ds = build_sr(source, mask, measurement, frame, model=model, name=name, series_number=series_number,
                  finding=finding)
    return atomic_write_bytes(out_path, dicom_bytes(ds))


def write_seg(source: str | os.PathLike | bytes, mask: np.ndarray, out_path: str | os.PathLike,
              frame: int | None = None, *, model: str, name: str | os.PathLike | None = None,
              series_number: int = SEG_SERIES_NUMBER) -> Path:
    """Write `mask` as a DICOM Segmentation of `source` to `out_path`, atomically. See `build_seg`."""
    ds = build_seg(source, mask, frame, model=model, name=name, series_number=series_number)
    return atomic_write_bytes(out_path, dicom_bytes(ds))


def build_sr(source: str | os.PathLike | bytes, mask: np.ndarray,
             measurement: ScanMeasurement | ImageMeasurement, frame: int | None = None, *, model: str | None,
             name: str | os.PathLike | None = None, series_number: int = SR_SERIES_NUMBER, finding=None):
    """A highdicom `ComprehensiveSR` reporting `measurement` of the lesions of `mask` on `source`.

    `source` is the DICOM file (a path or its bytes) the mask was drawn on; `mask` bool HxW on its grid,
    the one `measurement` was computed from (a ScanMeasurement, or its `.measurement`); `frame` the 0-based
    frame of a multi-frame file (required there; None or 0 for a single-frame one); `model` a short name
    of the hemaseg model that drew the mask, recorded in the algorithm identification, or None when the
    mask came from elsewhere (`measure --masks`: the SR then says the outline was supplied, not drawn);
    `name` what error messages call the file (default: the path, or "upload" for bytes); `finding` the
    model's `inference.review.Finding` (lesion found or not, needs review, why), reported as qualitative
    evaluations of the scan group and the reason among the algorithm's parameters.

    Raises `DataError` (one line naming the file) when the file is not a DICOM image, lacks a UID the SR
    must reference, the mask does not fit it, the frame does not exist, or the scan has no mm calibration.
    """
    hd = _highdicom()

    where = _where(source, name)
    scan = measurement if isinstance(measurement, ScanMeasurement) else None
    m = scan.measurement if scan is not None else measurement
    with _hushed():
        ds = _read_source(source, where)
        mask = _check_mask(ds, mask, where)
        frame_numbers = _frame_numbers(ds, frame, where, "a DICOM SR")
        if m.spacing is None:
            why = scan.calibration_note if scan is not None and scan.calibration_note else "no calibration"
            raise DataError(where, f"a DICOM SR needs measurements in mm and this scan has none ({why}); its "
                                   "figures in pixels are in lesions.csv", "invalid")
        outlines = _outlines(mask, m, where)
        src = _with_type2(ds)
        report = _measurement_report(src, m, outlines, frame_numbers, model, finding)
        try:  # the only step that reads the header's patient and study values
            return hd.sr.ComprehensiveSR(
                evidence=[src], content=report[0], series_instance_uid=hd.UID(), series_number=series_number,
                sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
                series_description="hemaseg lesion measurements (unverified)",
                manufacturer_model_name=_lo(model) if model else "hemaseg", software_versions=__version__)
        except Exception as e:  # noqa: BLE001 - highdicom's messages may quote header values
            raise DataError(where, f"cannot build a DICOM SR from this file's header ({type(e).__name__} in "
                                   "highdicom): a patient or study attribute may be malformed", "invalid") from None


def _measurement_report(src, m: ImageMeasurement, outlines: list[np.ndarray], frame_numbers: list[int] | None,
                        model: str | None, finding=None):
    """The TID 1500 content tree: the scan group, then one planar ROI group per lesion (module docstring)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    params = [f"model: {_text(model)}" if model else "outline: supplied with the scan, not drawn by hemaseg"]
    sp = m.spacing
    params.append(f"pixel spacing: x {sp.x_mm:.6g} mm, y {sp.y_mm:.6g} mm per pixel, from {sp.source}")
    params += [f"note: {w}" for w in m.warnings if w not in _NOT_REPORTED]
    evaluations = []
    if finding is not None:  # the finding every surface shows: lesion or none, and whether to review it
        concept = hd.sr.CodedConcept
        yes, no = concept("373066001", "SCT", "Yes"), concept("373067005", "SCT", "No")
        params.append(f"review: {_text(finding.why)}")
        evaluations = [
            # no standard codes say "the model found a lesion" / "a clinician must review this": private ones
            # (coding scheme 99 + the maker's name), answered with SNOMED's Yes / No
            hd.sr.QualitativeEvaluation(concept("LESION", "99HEMASEG", "Lesion found"), yes if finding.found else no),
            hd.sr.QualitativeEvaluation(concept("REVIEW", "99HEMASEG", "Needs review"),
                                        yes if finding.needs_review else no)]
    algorithm = hd.sr.AlgorithmIdentification(name="hemaseg", version=__version__, parameters=params)

    def region_source():  # a content item may sit in one place of the tree only: one per use
        return hd.sr.SourceImageForRegion(src.SOPClassUID, src.SOPInstanceUID, frame_numbers)

    scan_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="scan"),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(src, frame_numbers)],
        algorithm_id=algorithm,
        measurements=[hd.sr.Measurement(name=codes.SCT.NumberOfLesions, value=int(m.n_lesions),
                                        unit=hd.sr.CodedConcept("1", "UCUM", "no units"))],
        qualitative_evaluations=evaluations or None,
    )
    groups = [scan_group]
    for les, points in zip(m.lesions, outlines):
        figures = [
            (codes.SCT.Area, les.area_mm2, codes.UCUM.SquareMillimeter),
            (codes.SCT.LongAxis, les.longest_diameter_mm, codes.UCUM.Millimeter),
            (codes.SCT.ShortAxis, les.perpendicular_diameter_mm, codes.UCUM.Millimeter),
            (codes.DCM.Height, les.thickness_mm, codes.UCUM.Millimeter),
        ]
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"lesion {les.label}"),
            referenced_region=hd.sr.ImageRegion(hd.sr.GraphicTypeValues.POLYLINE, points, region_source()),
            finding_type=codes.SCT.Lesion,
            finding_category=codes.SCT.MorphologicallyAbnormalStructure,
            algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=c, value=float(v), unit=u) for c, v, u in figures
                          if v is not None],
        ))
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_device_uid(model), name="hemaseg", manufacturer_name=MANUFACTURER,
        model_name=_lo(model) if model else None)
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device)),
        procedure_reported=hd.sr.CodedConcept("16310003", "SCT", "Diagnostic ultrasonography"),
        imaging_measurements=groups,
    )


def build_seg(source: str | os.PathLike | bytes, mask: np.ndarray, frame: int | None = None, *, model: str,
              name: str | os.PathLike | None = None, series_number: int = SEG_SERIES_NUMBER):
    """A highdicom BINARY `Segmentation` of `mask` (bool HxW, the source's Rows x Columns) on `source`, a
    single-frame DICOM image (a path or its bytes). One segment, "Lesion", holds every lesion; an empty
    mask gives an empty frame (a SEG that says nothing was found). `frame` may be None or 0. `model` names
    the hemaseg model that drew the mask: the segment is AUTOMATIC, so a SEG is only for hemaseg's own
    masks (one drawn by hand would be MANUAL, and hemaseg cannot tell who drew a mask it is given).

    Raises `DataError` for a multi-frame source (see the module docstring), a mask of another size, or a
    file that is not a DICOM image or lacks a UID the SEG must reference.
    """
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    where = _where(source, name)
    with _hushed():
        ds = _read_source(source, where)
        n = frame_count(ds, where)
        if n > 1:
            raise DataError(where, f"a DICOM SEG needs a single-frame source; this file has {n} frames (the "
                                   "DICOM SR references the frame instead)", "invalid")
        _frame_numbers(ds, frame, where, "a DICOM SEG")
        mask = _check_mask(ds, mask, where)
        src = _with_type2(ds)
        segment = hd.seg.SegmentDescription(
            segment_number=1, segment_label="Lesion",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="hemaseg", family=codes.DCM.ArtificialIntelligence, version=__version__,
                parameters={"model": _text(model)}),
        )
        try:  # the only step that reads the header's patient and study values
            return hd.seg.Segmentation(
                source_images=[src], pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=series_number,
                sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
                manufacturer_model_name=_lo(model) if model else "hemaseg", software_versions=__version__,
                device_serial_number="0",  # Type 1 in Enhanced General Equipment; software has none
                content_label="LESION", content_description="hemaseg lesion segmentation (unverified)",
                series_description="hemaseg lesion segmentation (unverified)",
                omit_empty_frames=False,  # one frame, kept even when empty: "no lesion" is a result too
            )
        except Exception as e:  # noqa: BLE001 - highdicom's messages may quote header values
            raise DataError(where, f"cannot build a DICOM SEG from this file's header ({type(e).__name__} in "
                                   "highdicom): a patient or study attribute may be malformed", "invalid") from None


def dicom_outputs(source: str | os.PathLike, mask: np.ndarray, measured: ScanMeasurement, frame: int | None,
                  stem: str | os.PathLike, *, sr: bool, seg: bool, model: str | None,
                  finding=None) -> tuple[dict[Path, bytes], list[str]]:
    """For one DICOM scan's outputs (`stem` = out_dir / NAME): the bytes of NAME_sr.dcm and NAME_seg.dcm
    asked for, keyed by path (to write with the scan's other outputs, whole or not at all), and a line
    for each one that cannot be made (an uncalibrated scan's SR, a cine's SEG: the DataError's text).
    Those are notes, not failures: the scan's mask, overlay and CSV rows are still good."""
    stem = Path(stem)
    files: dict[Path, bytes] = {}
    skipped: list[str] = []
    if sr:
        try:
            files[stem.with_name(f"{stem.name}_sr.dcm")] = dicom_bytes(
                build_sr(source, mask, measured, frame, model=model, finding=finding))
        except DataError as e:
            skipped.append(str(e))
    if seg:
        try:
            files[stem.with_name(f"{stem.name}_seg.dcm")] = dicom_bytes(build_seg(source, mask, frame, model=model))
        except DataError as e:
            skipped.append(str(e))
    return files, skipped


def dicom_bytes(ds) -> bytes:
    """A pydicom/highdicom dataset as Part-10 file bytes (for `atomic_write_bytes` or an HTTP reply)."""
    import pydicom

    buf = io.BytesIO()
    with _hushed():
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# --- the source file -----------------------------------------------------------------------------------


def _highdicom():
    return require("highdicom", "DICOM SR and SEG output")


def _where(source, name) -> str | os.PathLike:
    return name if name is not None else ("upload" if isinstance(source, bytes) else source)


@contextlib.contextmanager
def _hushed() -> Iterator[None]:
    """`data.dicom`'s quiet reading (pydicom's records and all warnings dropped) extended to highdicom's
    loggers, which quote header values too (older versions log a Patient's Name they find unusual)."""
    _highdicom()  # imported first: that creates its loggers, so the filter below reaches them

    with quiet(("pydicom", "highdicom")):
        yield


def _read_source(source: str | os.PathLike | bytes, where):
    """The whole header of a DICOM image (pixels not read), or DataError."""
    import pydicom

    if isinstance(source, bytes):
        data = source
    else:
        data = read_file(source, where)
    if not is_dicom(data[:_PREAMBLE + 4]):
        raise DataError(where, "a DICOM SR or SEG is derived from a DICOM source, and this is not a DICOM file "
                               "(no 'DICM' marker after the 128-byte preamble)", "unsupported_type")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as e:  # noqa: BLE001 - pydicom's message may quote bytes of the file
        raise DataError(where, f"cannot read DICOM: the header is damaged ({type(e).__name__})", "corrupt") from None
    for keyword, label in _REQUIRED.items():
        if not str(element_value(ds, keyword) or "").strip():
            raise DataError(where, f"has no {label}, which a derived DICOM object must "
                                   "reference (an anonymiser may have removed it)", "invalid")
    if element_value(ds, "Rows") is None or element_value(ds, "Columns") is None:
        raise DataError(where, "is not a DICOM image (no Rows/Columns): nothing to derive an SR or SEG from",
                        "unsupported_type")
    return ds


def _frame_numbers(ds, frame: int | None, where, what: str) -> list[int] | None:
    """The 1-based Referenced Frame Number list for a 0-based `frame`, or None for a single-frame IOD."""
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, (int, np.integer))):
        raise TypeError(f"frame must be an int or None; got {type(frame).__name__}")
    n = frame_count(ds, where)
    if frame is not None and not 0 <= frame < n:
        raise DataError(where, f"frame {frame} does not exist: the file has {n} frame(s), numbered 0..{n - 1}",
                        "invalid")
    if n > 1 and frame is None:
        raise DataError(where, f"has {n} frames: {what} must say which one the mask was drawn on (frame, "
                               "from 0)", "invalid")
    if "NumberOfFrames" not in ds:  # a single-frame IOD: frames are not referenced
        return None
    return [int(frame or 0) + 1]


def _check_mask(ds, mask: np.ndarray, where) -> np.ndarray:
    mask = np.asarray(mask)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if mask.shape != (rows, cols):
        shape = "x".join(str(s) for s in mask.shape[::-1])
        raise DataError(where, f"the mask is {shape} pixels but the DICOM image is {cols}x{rows}: a DICOM SR or "
                               "SEG needs the mask on the source's own pixel grid", "invalid")
    return mask.astype(bool, copy=False)


def _with_type2(ds):
    """A copy of the header with the Type 2 attributes highdicom reads present (empty where missing) and a
    Patient's Sex outside M/F/O emptied (highdicom refuses it, quoting it)."""
    src = copy.deepcopy(ds)
    for keyword in _TYPE2_DEFAULTS:
        if keyword not in src:
            setattr(src, keyword, None)
    if str(element_value(src, "PatientSex") or "") not in ("", "M", "F", "O"):
        log.warning("Patient's Sex (0010,0040) is not M, F or O; left empty in the derived DICOM object")
        src.PatientSex = None
    return src


# --- content ---------------------------------------------------------------------------------------------


def _outlines(mask: np.ndarray, m: ImageMeasurement, where) -> list[np.ndarray]:
    """Each measured lesion's closed outline in DICOM image coordinates (column, row), float (k, 2),
    checked to be the lesion `m` measured (same order, box and area), so a mismatched mask is refused."""
    n, lesions = find_lesions(mask, max_lesions=len(m.lesions))
    same = n == m.n_lesions and len(lesions) == len(m.lesions) and all(
        a.bbox == tuple(b.bbox) and a.area_px == b.area_px for a, b in zip(lesions, m.lesions))
    if not same:
        raise DataError(where, "the measurement does not belong to this mask (its lesions differ): pass "
                               "measure_scan(decoded, mask) of the same mask", "invalid")
    out = []
    for les in lesions:
        pts = np.asarray(les.contour, float) + 0.5  # pixel centre -> DICOM image coordinates
        if _polygon_area(pts) == 0:  # one or two pixels, or a one-pixel-wide line: the pixel edges around it
            x, y, w, h = les.bbox
            pts = np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], float)
        out.append(np.vstack([pts, pts[:1]]))  # closed: the first point repeated
    return out


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def _text(value: str) -> str:
    """Free text for LT/UT values: no control characters (a model name could come from a file name)."""
    return "".join(ch if ch.isprintable() else " " for ch in str(value)).strip()


def _lo(value: str) -> str:
    """A Long String (LO) value: at most 64 characters, no backslash (the DICOM value separator)."""
    return _text(value).replace("\\", "/")[:_LO_MAX]


def _device_uid(model: str | None) -> str:
    """A stable Device Observer UID for this hemaseg version and model (the same device every time)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["hemaseg", __version__, str(model or "")]))
