"""DICOM ultrasound files -> float32 gray frames in [0, 1], plus the few facts a measurement needs.

Scanners export DICOM, not PNG, so this module reads a Part-10 file (or its bytes) with pydicom and hands
back a `DicomScan`: the decoded frames, where a millimetre calibration may come from (the Sequence of
Ultrasound Regions, else Pixel Spacing), whether text is burned into the pixels, and the Patient ID for a
caller that wants a salted-hash key. The gray values end in `images.to_gray`, the project's one luminance
rule, so a scan gives the same numbers whether it arrives as DICOM or as a PNG export.

Privacy. A DICOM file carries everything PS3.15's Basic Confidentiality Profile lists (names, IDs, dates,
UIDs, institution, operator, device serial, accession number, private tags, overlays). This module reads
only an allow-list of tags (`_TAGS`: the image pixel module, calibration, burned-in annotation, Patient
ID), so the rest is never converted into values at all; pydicom's own warnings and log records (which
quote offending values verbatim, e.g. an invalid UID in the file meta) are silenced while a file is read;
and every error message is our own text naming the path the caller gave, never a value from the file nor
a pydicom exception message. `DicomScan.patient_id` is left out of the repr so logging a scan is safe.

Errors are `images.DataError` with the codes images.py uses: `unsupported_type` (not DICOM, no image,
a transfer syntax or colour model we cannot decode), `corrupt` (truncated or inconsistent), `too_large`
(over ``--max-pixels``, checked from the header before any pixel is decoded), `missing`, `unreadable`,
`empty`, and `invalid` for a frame index the file does not have.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hemaseg.data.pixels import MAX_PIXELS_DEFAULT, MAX_PIXELS_FLAG, DataError, is_dicom, to_gray
from hemaseg.extras import require
from hemaseg.spacing import Spacing, spacing_problem

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom")
_PREAMBLE = 128  # a Part-10 file starts with a 128-byte preamble, then b"DICM"

# The only tags ever read from a file (pydicom skips the rest without converting them, so names, dates,
# UIDs, private tags and overlays never become Python values here). Group 0002 (file meta) is always read
# by pydicom; of it we use only the transfer syntax and the SOP class.
_TAGS = (
    "SpecificCharacterSet",  # to decode Patient ID correctly
    "PatientID",  # kept only for the caller's salted-hash key
    "SequenceOfUltrasoundRegions",  # (0018,6011): the region calibration
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames",
    "Rows", "Columns", "PixelSpacing", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "BurnedInAnnotation",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "PixelData", "FloatPixelData", "DoubleFloatPixelData",
)

# What to install when pydicom knows a transfer syntax but no plugin for it is present (keyed by UID).
_LIBJPEG = "pip install pylibjpeg pylibjpeg-libjpeg, or python-gdcm"
_OPENJPEG = "pip install pylibjpeg pylibjpeg-openjpeg, or python-gdcm (or a Pillow built with OpenJPEG)"
_INSTALL = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG,  # JPEG Baseline (Pillow also decodes it)
    "1.2.840.10008.1.2.4.51": _LIBJPEG,  # JPEG Extended: Pillow decodes only its 8-bit form
    "1.2.840.10008.1.2.4.57": _LIBJPEG,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _LIBJPEG,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pip install pyjpegls, or pylibjpeg pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.81": "pip install pyjpegls, or pylibjpeg pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.90": _OPENJPEG,
    "1.2.840.10008.1.2.4.91": _OPENJPEG,
    "1.2.840.10008.1.2.4.201": "pip install pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.4.202": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pip install pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle",  # RLE: pydicom's own decoder normally
}
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_YBR_TO_RGB = ("YBR_FULL", "YBR_FULL_422")  # what pydicom's as_rgb converts
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")  # decoders return YBR_RCT/ICT as RGB
_PHOTOMETRICS = (*_MONOCHROME, "PALETTE COLOR", *_COLOUR)

CM = 3  # PhysicalUnitsX/YDirection code for cm (PS3.3 C.8.5.5.1.15)
SPATIAL_2D = 1  # RegionSpatialFormat code for a 2-D (tissue or flow) image
_SPATIAL_NAMES = {0: "none", 1: "2-D", 2: "M-mode", 3: "spectral Doppler", 4: "waveform", 5: "graphics"}
_UNIT_NAMES = {0: "none", 1: "percent", 2: "dB", 3: "cm", 4: "seconds", 5: "hertz", 6: "dB/s", 7: "cm/s",
               8: "cm2", 9: "cm2/s", 10: "cm3", 11: "cm3/s", 12: "degrees"}
_REGIONS_TAG = "(0018,6011)"
_PIXEL_SPACING_TAG = "(0028,0030)"


@dataclass(frozen=True)
class UltrasoundRegion:
    """One item of the Sequence of Ultrasound Regions (0018,6011): a rectangle of the image and how its
    pixels map to physical units. Bounds are inclusive pixel indices; `index` is the item's 0-based
    position in the sequence. Attributes a file lacks are read as -1 (bounds, codes) or NaN (deltas),
    which `calibrate` then refuses."""

    index: int
    x0: int  # RegionLocationMinX0
    y0: int  # RegionLocationMinY0
    x1: int  # RegionLocationMaxX1
    y1: int  # RegionLocationMaxY1
    spatial_format: int  # RegionSpatialFormat: 1 = 2-D image (the only kind that gives mm)
    units_x: int  # PhysicalUnitsXDirection: 3 = cm
    units_y: int  # PhysicalUnitsYDirection
    delta_x: float  # PhysicalDeltaX: physical units per pixel along x (columns)
    delta_y: float  # PhysicalDeltaY: along y (rows)

    def fits(self, shape: tuple[int, int]) -> bool:
        h, w = shape
        return 0 <= self.x0 <= self.x1 < w and 0 <= self.y0 <= self.y1 < h

    def contains(self, box: tuple[int, int, int, int]) -> bool:  # box: inclusive x0, y0, x1, y1
        return self.x0 <= box[0] and self.y0 <= box[1] and box[2] <= self.x1 and box[3] <= self.y1

    def overlaps(self, box: tuple[int, int, int, int]) -> bool:
        return self.x0 <= box[2] and box[0] <= self.x1 and self.y0 <= box[3] and box[1] <= self.y1

    @property
    def in_cm(self) -> bool:
        return self.units_x == CM and self.units_y == CM

    @property
    def delta_problem(self) -> str | None:
        """Why the deltas (cm, as mm) cannot calibrate, or None: finite, > 0 and plausible (`spacing`)."""
        return spacing_problem(self.delta_x * 10, self.delta_y * 10)

    @property
    def deltas_ok(self) -> bool:
        return self.delta_problem is None

    def same_calibration(self, other: UltrasoundRegion) -> bool:
        return (math.isclose(self.delta_x, other.delta_x, rel_tol=1e-6)
                and math.isclose(self.delta_y, other.delta_y, rel_tol=1e-6))

    def describe(self) -> str:
        return f"ultrasound region {self.index} (x {self.x0}..{self.x1}, y {self.y0}..{self.y1})"


@dataclass(frozen=True, eq=False)  # eq/hash by identity: comparing frame arrays field-wise would raise
class DicomScan:
    """What `read_dicom` keeps from a file: the frames and an allow-list of facts, nothing else."""

    frames: np.ndarray = field(repr=False)  # float32 (F, H, W) gray in [0, 1]: the frames read
    n_frames: int  # frames in the file
    frame_index: int | None  # which frame frames[0] is when one was asked for; None when all were read
    photometric: str  # PhotometricInterpretation as stored (before any colour conversion)
    transfer_syntax: str  # the transfer syntax's name, e.g. "RLE Lossless"
    regions: tuple[UltrasoundRegion, ...]
    pixel_spacing: Spacing | None  # from Pixel Spacing (0028,0030) only, never Imager Pixel Spacing
    burned_in_annotation: bool  # True unless (0028,0301) says exactly "NO": unknown counts as yes
    patient_id: str | None = field(repr=False)  # only for a caller's salted-hash key; never logged
    pixel_spacing_problem: str | None = None  # why a Pixel Spacing the file has cannot be used

    @property
    def gray(self) -> np.ndarray:
        """The first frame read, float32 HxW in [0, 1]."""
        return self.frames[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of every frame."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    def spacing_for(self, bbox: tuple[int, int, int, int] | None) -> tuple[Spacing | None, str | None]:
        """The calibration for a lesion whose bounding box is `bbox` (x, y, w, h pixels): see `calibrate`."""
        return calibrate(self.regions, self.pixel_spacing, bbox, self.shape, self.pixel_spacing_problem)


def calibrate(regions: Sequence[UltrasoundRegion], pixel_spacing: Spacing | None,
              bbox: tuple[int, int, int, int] | None, shape: tuple[int, int],
              pixel_spacing_problem: str | None = None) -> tuple[Spacing | None, str | None]:
    """Millimetres per pixel for a lesion: ``(Spacing, None)``, or ``(None, reason)`` when its figures
    must stay in pixels. `bbox` is the lesion's (x, y, w, h) in pixels, `shape` the image's (H, W).

    Rules, each chosen to refuse rather than guess, since a wrong mm figure is worse than none:

    - Regions come first. When the file has a Sequence of Ultrasound Regions, the calibration comes from
      it or not at all: Pixel Spacing (0028,0030) is used only when the sequence is absent or empty.
      Scanners that write both often fill Pixel Spacing with a whole-image figure that is wrong for a
      zoomed or dual view, so regions that cannot be used are a refusal, not a cue to fall back.
    - Every region must fit the image (0 <= x0 <= x1 < W, same for y). One that does not, of any kind,
      means the file was resized or cropped after acquisition and no region's delta fits the pixels.
    - With a bbox: the box must lie inside a region of RegionSpatialFormat 1 (2-D) whose units are cm
      along x and y (code 3) with finite deltas > 0; every 2-D region the box touches (nested colour-flow
      boxes, a neighbouring view) must be usable too and carry the same calibration, else the box spans
      regions of different calibration. Non-2-D regions (M-mode, Doppler, waveform) give no mm.
    - Without a bbox (the whole scan): all 2-D regions must be usable and agree (usually there is one);
      then that calibration is returned. Requiring the whole image to fit in one region would refuse
      nearly every real scan, whose region excludes the header and side bars.
    - mm = delta (cm) * 10, x and y kept separate. Imager Pixel Spacing (0018,1164) is never used: it is
      measured at the detector, not in the patient, and `read_dicom` does not even read it.
    """
    h, w = shape
    regions = tuple(regions)
    if not regions:
        if pixel_spacing is not None:
            return pixel_spacing, None
        if pixel_spacing_problem is not None:  # the file's own figure is wrong: no typed one replaces it
            return None, (f"the file's Pixel Spacing {_PIXEL_SPACING_TAG} cannot be used ({pixel_spacing_problem}), "
                          "and a typed spacing does not replace the file's own")
        return None, (f"the file has no calibration: no Sequence of Ultrasound Regions {_REGIONS_TAG} and no "
                      f"Pixel Spacing {_PIXEL_SPACING_TAG}")
    # Say why Pixel Spacing was passed over, so nobody thinks it was missed.
    tail = (f" (the file has ultrasound regions {_REGIONS_TAG}, so its Pixel Spacing {_PIXEL_SPACING_TAG} is "
            "not used instead)" if pixel_spacing is not None else "")

    for r in regions:
        if not r.fits((h, w)):
            return None, (f"{r.describe()} does not fit the {w}x{h} image: the file was resized or cropped "
                          "after acquisition, so its calibration no longer matches the pixels" + tail)

    if bbox is None:
        what = "the image"
        used = [r for r in regions if r.spatial_format == SPATIAL_2D]
        if not used:
            return None, (f"none of the file's {len(regions)} ultrasound region(s) is a 2-D image region "
                          "(RegionSpatialFormat 1)" + tail)
        chosen = used[0]
    else:
        x, y, bw, bh = (int(v) for v in bbox)
        if bw < 1 or bh < 1:
            raise ValueError(f"bounding box {tuple(bbox)} must have width and height >= 1 (x, y, w, h)")
        box = (x, y, x + bw - 1, y + bh - 1)
        what = f"the lesion's box (x {box[0]}..{box[2]}, y {box[1]}..{box[3]})"
        used = [r for r in regions if r.spatial_format == SPATIAL_2D and r.overlaps(box)]
        inside = [r for r in used if r.contains(box)]
        if not inside:
            if len(used) > 1:
                differ = any(not used[0].same_calibration(r) for r in used)
                kind = "regions of different calibration" if differ else "more than one region"
                return None, (f"{what} spans {kind}: ultrasound regions "
                              f"{', '.join(str(r.index) for r in used)}" + tail)
            if used:
                return None, f"{what} is not inside {used[0].describe()}: it reaches beyond the region" + tail
            other = [r for r in regions if r.overlaps(box)]
            if other:
                r = other[0]
                name = _SPATIAL_NAMES.get(r.spatial_format, "unknown")
                return None, (f"{what} lies in {r.describe()}, which is not a 2-D image region "
                              f"(RegionSpatialFormat {r.spatial_format}: {name}), so it has no mm scale"
                              + tail)
            return None, f"{what} lies in no ultrasound region" + tail
        chosen = inside[0]

    for r in used:
        if not r.in_cm:
            return None, (f"{r.describe()} is not calibrated in cm (PhysicalUnitsX/YDirection "
                          f"{r.units_x} = {_UNIT_NAMES.get(r.units_x, 'unknown')}, "
                          f"{r.units_y} = {_UNIT_NAMES.get(r.units_y, 'unknown')}; 3 = cm)" + tail)
        if not r.deltas_ok:
            return None, (f"{r.describe()} has an unusable PhysicalDeltaX/Y ({r.delta_x:g}, {r.delta_y:g} "
                          f"cm): {r.delta_problem}" + tail)
    for r in used:
        if not r.same_calibration(chosen):
            return None, (f"{what} spans regions of different calibration: ultrasound region {chosen.index} "
                          f"({chosen.delta_x * 10:g} x {chosen.delta_y * 10:g} mm/pixel) and {r.index} "
                          f"({r.delta_x * 10:g} x {r.delta_y * 10:g} mm/pixel)"
                          + ("; give the lesion's bounding box to choose one" if bbox is None else "") + tail)
    source = f"ultrasound region {chosen.index} {_REGIONS_TAG}"
    return Spacing(chosen.delta_x * 10.0, chosen.delta_y * 10.0, source), None  # cm -> mm


def read_dicom(source: str | os.PathLike | bytes, frame: int | None = 0,
               max_pixels: int | None = MAX_PIXELS_DEFAULT,
               name: str | os.PathLike | None = None) -> DicomScan:
    """Read a DICOM Part-10 file (a path or its bytes) into a `DicomScan`.

    `frame` picks one frame (0-based; negative indexes are refused, not counted from the end) or, when
    None, reads all. Gray is `to_gray` (ITU-R 601 luma) of the RGB for colour data: YBR_FULL/_422 are
    converted to RGB first (pydicom's `as_rgb`, asked for explicitly), PALETTE COLOR through its lookup
    table; monochrome is scaled by 2**BitsStored - 1 (offset by 2**(BitsStored-1) when signed) so a
    12-bit scan in 16-bit words spans [0, 1], and MONOCHROME1 is inverted so bright means echo. No
    Modality/VOI LUT or windowing is applied: ultrasound stores display values.

    Rows x Columns x (frames read) is checked against `max_pixels` before any pixel data is decoded.
    Raises `DataError` naming `name` (or the path, or "upload" for bytes); never a pydicom exception.
    """
    where = name if name is not None else ("upload" if isinstance(source, bytes) else source)
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, (int, np.integer))):
        raise TypeError(f"frame must be an int or None; got {type(frame).__name__}")
    with quiet():
        ds = _parse(source, where)
        return _scan(ds, where, None if frame is None else int(frame), max_pixels)


# --- reading ------------------------------------------------------------------------------------------

_HUSHED = contextvars.ContextVar("hemaseg_dicom_hushed", default=False)


class _HushWhileReading(logging.Filter):
    """Drops pydicom's log records while this thread is inside `read_dicom`: pydicom quotes offending
    values (an invalid UID, an over-long name) in its messages, and those are patient data."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _HUSHED.get()


_HUSH = _HushWhileReading()


@contextlib.contextmanager
def quiet(packages: tuple[str, ...] = ("pydicom",)) -> Iterator[None]:
    """Within: these packages' log records (and every warning) are dropped in this thread, because they
    quote header values. Import the packages first: their child loggers ("pydicom.pixels...") do not pass
    through the parent's filters, so each existing one gets the (permanent, flag-gated) filter."""
    loggers = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in packages]
    for n in [*packages, *loggers]:
        lg = logging.getLogger(n)
        if _HUSH not in lg.filters:
            lg.addFilter(_HUSH)
    token = _HUSHED.set(True)
    try:
        with warnings.catch_warnings():  # pydicom's warnings quote values too
            warnings.simplefilter("ignore")
            yield
    finally:
        _HUSHED.reset(token)


def _parse(source: str | os.PathLike | bytes, where: str | os.PathLike):
    pydicom = require("pydicom", "reading DICOM scans")
    from pydicom.errors import InvalidDicomError

    if isinstance(source, bytes):
        if not source:
            raise DataError(where, "the file is empty", "empty")
        data = source
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError(where, "file does not exist", "missing") from None
        except IsADirectoryError:
            raise DataError(where, "is a folder, not a DICOM file", "unreadable") from None
        except OSError as e:
            problem = f"cannot read file: {e.strerror or type(e).__name__}"
            raise DataError(where, problem, "unreadable") from None
        if not data:
            raise DataError(where, "the file is empty", "empty")
    if not is_dicom(data[:_PREAMBLE + 4]):
        raise DataError(where, "not a DICOM file: no 'DICM' marker after the 128-byte preamble (a DICOM "
                               "Part-10 file is expected, recognised by its content, not its name)",
                        "unsupported_type")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), specific_tags=list(_TAGS))
    except InvalidDicomError:
        raise DataError(where, "cannot read DICOM: its header is damaged", "corrupt") from None
    except Exception as e:  # noqa: BLE001 - struct.error, EOFError, BytesLengthException... on broken files
        # pydicom's message may quote bytes of the file, so only the exception's type is named.
        raise DataError(where, f"cannot read DICOM: the file is damaged or incomplete ({type(e).__name__})",
                        "corrupt") from None
    return ds


def _scan(ds, where: str | os.PathLike, frame: int | None, max_pixels: int | None) -> DicomScan:
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    ts_value = element_value(meta, "TransferSyntaxUID") if meta is not None else None
    if not ts_value:
        raise DataError(where, "cannot read DICOM: the file meta has no transfer syntax (0002,0010); the "
                               "file is cut short or damaged", "corrupt")
    ts = UID(str(ts_value))
    if "PixelData" not in ds:
        raise _no_pixels(ds, meta, where)

    rows, cols = _int_attr(ds, "Rows", "(0028,0010)", where), _int_attr(ds, "Columns", "(0028,0011)", where)
    bits_alloc = _int_attr(ds, "BitsAllocated", "(0028,0100)", where)
    bits_stored = _int_attr(ds, "BitsStored", "(0028,0101)", where)
    spp = _int_attr(ds, "SamplesPerPixel", "(0028,0002)", where)
    signed = _int_attr(ds, "PixelRepresentation", "(0028,0103)", where) == 1
    photometric = str(element_value(ds, "PhotometricInterpretation") or "").strip()
    n_frames = frame_count(ds, where)
    if rows < 1 or cols < 1 or not 1 <= bits_stored <= bits_alloc <= 32:
        raise DataError(where, f"inconsistent image header: {cols}x{rows} pixels, {bits_stored} of "
                               f"{bits_alloc} bits", "corrupt")
    if photometric not in _PHOTOMETRICS:
        raise DataError(where, f"photometric interpretation {photometric or '(none)'} is not supported "
                               f"(read: {', '.join(_PHOTOMETRICS)})", "unsupported_type")

    decoder = _decoder(ts, where, bits_stored, spp)
    if frame is not None and not 0 <= frame < n_frames:
        raise DataError(where, f"frame {frame} does not exist: the file has {n_frames} frame(s), numbered "
                               f"0..{n_frames - 1}", "invalid")
    n_read = n_frames if frame is None else 1
    if max_pixels is not None and rows * cols * n_read > max_pixels:
        per = f" x {n_read} frames" if n_read > 1 else ""
        raise DataError(where, f"{cols}x{rows}{per} = {rows * cols * n_read:,} pixels exceeds the limit of "
                               f"{max_pixels:,} (raise {MAX_PIXELS_FLAG} if this image is genuine)",
                        "too_large")
    if not ts.is_encapsulated:
        _check_length(ds, where, n_frames)

    frames = _decode(ds, decoder, ts, where, frame, photometric, bits_stored, signed, (rows, cols))
    log.debug("%s: DICOM %s, %s, %d of %d frame(s) %dx%d", where, ts.name, photometric, len(frames),
              n_frames, cols, rows)
    pixel_spacing, spacing_problem_ = _pixel_spacing(ds, where)
    return DicomScan(
        frames=frames,
        n_frames=n_frames,
        frame_index=frame,
        photometric=photometric,
        transfer_syntax=ts.name,
        regions=_regions(ds, where),
        pixel_spacing=pixel_spacing,
        burned_in_annotation=element_value(ds, "BurnedInAnnotation") != "NO",
        patient_id=_patient_id(ds),
        pixel_spacing_problem=spacing_problem_,
    )


def element_value(ds, keyword: str):
    """An element's value, or None when absent or unconvertible (its value never reaches a message)."""
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed value raises in conversion; treat it as absent
        return None


def _int_attr(ds, keyword: str, tag: str, where) -> int:
    value = element_value(ds, keyword)
    try:
        return int(value)
    except (TypeError, ValueError):
        problem = f"cannot read DICOM: {tag} {keyword} is missing or not a number"
        raise DataError(where, problem, "corrupt") from None


def frame_count(ds, where) -> int:
    value = element_value(ds, "NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        n = int(value)
    except (TypeError, ValueError):
        problem = "cannot read DICOM: (0028,0008) NumberOfFrames is not a number"
        raise DataError(where, problem, "corrupt") from None
    if n < 1:
        raise DataError(where, f"cannot read DICOM: (0028,0008) NumberOfFrames is {n}", "corrupt")
    return n


def _no_pixels(ds, meta, where) -> DataError:
    """An image object without pixel data is a cut-short file; anything else is not an image at all."""
    from pydicom.uid import UID

    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        return DataError(where, "holds float pixel data (parametric maps), not an ultrasound image",
                         "unsupported_type")
    sop = element_value(meta, "MediaStorageSOPClassUID")
    kind = UID(str(sop)).name if sop else ""
    if kind and "Image" in kind:
        return DataError(where, f"no pixel data (7FE0,0010) in an image object ({kind}): the file is cut "
                                "short or damaged", "corrupt")
    # A standard SOP class has a name; a private one would print as its UID, so it is not named.
    what = f"a {kind} object" if kind and not kind[0].isdigit() else "not an image object"
    return DataError(where, f"has no pixel data (7FE0,0010): {what} (e.g. a report or DICOMDIR), not an "
                            "image", "unsupported_type")


def _decoder(ts, where, bits_stored: int, spp: int):
    """pydicom's decoder for `ts`, or DataError("unsupported_type") naming the syntax and what to install.
    Any syntax pydicom can decode with an installed plugin is read, so that installing the package an
    error names does make the file readable."""
    from pydicom.pixels import get_decoder

    label = ts.name if ts.is_transfer_syntax else "unknown"
    try:
        decoder = get_decoder(ts)
    except Exception:  # noqa: BLE001 - NotImplementedError for syntaxes pydicom has no decoder for
        video = "MPEG" in label or "HEVC" in label
        hint = ("it is video: export the frames as images or as uncompressed DICOM" if video else
                "convert it to an uncompressed, RLE, JPEG, JPEG-LS or JPEG 2000 transfer syntax")
        _raise(where, f"transfer syntax {label} cannot be decoded (pydicom has no decoder for it): {hint}")
    hint = _INSTALL.get(str(ts)) or "; ".join(decoder.missing_dependencies) or "a pydicom pixel-data plugin"
    if not decoder.is_available:
        _raise(where, f"{label} needs a decoder: {hint}")
    plugins = set(decoder.available_plugins)
    # Known limits of the Pillow plugin, caught here instead of as an opaque decoding failure.
    if plugins <= {"pillow"}:
        if str(ts) == "1.2.840.10008.1.2.4.51" and bits_stored > 8:
            _raise(where, f"{label} with {bits_stored}-bit samples needs a decoder (Pillow reads only "
                          f"8-bit): {hint}")
        if str(ts) in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91") and spp > 1 and bits_stored > 8:
            _raise(where, f"{label} colour with {bits_stored}-bit samples needs a decoder (Pillow reads only "
                          f"8-bit colour): {hint}")
    return decoder


def _raise(where, problem: str):
    raise DataError(where, problem, "unsupported_type")


def _check_length(ds, where, n_frames: int) -> None:
    """Native pixel data shorter than its header promises: a cut-short file (said plainly, not as a
    decoding failure)."""
    from pydicom.pixels.utils import get_expected_length

    try:
        expected = get_expected_length(ds, "bytes")
        actual = len(ds.PixelData)
    except Exception:  # noqa: BLE001 - left to the decoder, which reports it as corrupt
        return
    if actual < expected:
        raise DataError(where, f"the pixel data is incomplete ({actual:,} of {expected:,} bytes for "
                               f"{n_frames} frame(s)): the file is cut short or damaged", "corrupt")


def _decode(ds, decoder, ts, where, frame: int | None, photometric: str, bits_stored: int, signed: bool,
            hw: tuple[int, int]) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, convert_color_space

    try:
        # raw=False, as_rgb=True are pydicom 3's defaults, spelled out because the gray depends on them:
        # YBR_FULL and YBR_FULL_422 come back as RGB (a raw Y/Cb/Cr triple read as RGB is far off).
        arr, info = decoder.as_array(ds, index=frame, raw=False, as_rgb=True)
    except Exception as e:  # noqa: BLE001 - plugins raise anything; their messages are not ours to show
        raise DataError(where, f"cannot decode the {ts.name} pixel data: it is damaged or incomplete "
                               f"({type(e).__name__})", "corrupt") from None
    pi = str(info.get("photometric_interpretation", photometric))
    spp = int(info.get("samples_per_pixel", 3 if pi in _COLOUR else 1))
    h, w = hw
    arr = arr.reshape((-1, h, w) if spp == 1 else (-1, h, w, spp))  # (F, H, W[, 3])

    if pi in _YBR_TO_RGB:  # a plugin that left YBR alone: convert here so gray never sees raw YBR
        arr = convert_color_space(arr, pi, "RGB")
        pi = "RGB"
    if pi == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)  # uint8 or uint16 by the LUT's entry size
        except Exception as e:  # noqa: BLE001
            raise DataError(where, "its palette colour lookup table (0028,1101-1203) is missing or damaged "
                                   f"({type(e).__name__})", "corrupt") from None
        gray = np.stack([to_gray(f) for f in rgb])
    elif pi in _MONOCHROME and spp == 1:
        gray = _scale(arr, bits_stored, signed)
        if pi == "MONOCHROME1":  # MONOCHROME1 stores echo as dark; invert so bright = echo everywhere
            gray = 1.0 - gray
        gray = np.stack([to_gray(f) for f in gray])
    elif pi in _COLOUR and spp == 3:
        if arr.dtype == np.uint8 and bits_stored == 8:
            gray = np.stack([to_gray(f) for f in arr])  # rounds exactly as PIL does for an RGB PNG
        else:
            gray = np.stack([to_gray(f) for f in _scale(arr, bits_stored, signed)])
    else:
        raise DataError(where, f"photometric interpretation {pi} with {spp} sample(s) per pixel is not "
                               "supported", "unsupported_type")
    gray = np.clip(gray.astype(np.float32, copy=False), 0.0, 1.0)
    if not np.isfinite(gray).all():
        raise DataError(where, "the image holds NaN or infinite pixel values", "corrupt")
    return gray


def _scale(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Stored integers -> float64 in [0, 1] by the BitsStored range (not the word size), so 12 bits in
    16-bit words reach 1.0; signed values are shifted up by half the range first."""
    a = arr.astype(np.float64)
    if signed:
        a += 2.0 ** (bits_stored - 1)
    return np.clip(a / (2.0 ** bits_stored - 1), 0.0, 1.0)


def _regions(ds, where) -> tuple[UltrasoundRegion, ...]:
    seq = element_value(ds, "SequenceOfUltrasoundRegions")
    out = []
    for i, item in enumerate(seq or ()):
        missing: list[str] = []

        def num(keyword: str, cast: type, default: float, item=item, missing=missing):
            try:
                return cast(element_value(item, keyword))  # NaN or inf deltas are kept: calibrate refuses them
            except (TypeError, ValueError):
                missing.append(keyword)
                return default

        region = UltrasoundRegion(
            index=i,
            x0=num("RegionLocationMinX0", int, -1), y0=num("RegionLocationMinY0", int, -1),
            x1=num("RegionLocationMaxX1", int, -1), y1=num("RegionLocationMaxY1", int, -1),
            spatial_format=num("RegionSpatialFormat", int, -1),
            units_x=num("PhysicalUnitsXDirection", int, -1), units_y=num("PhysicalUnitsYDirection", int, -1),
            delta_x=num("PhysicalDeltaX", float, math.nan), delta_y=num("PhysicalDeltaY", float, math.nan),
        )
        if missing:
            log.warning("%s: ultrasound region %d lacks %s; it cannot calibrate", where, i,
                        ", ".join(missing))
        out.append(region)
    return tuple(out)


def _pixel_spacing(ds, where) -> tuple[Spacing | None, str | None]:
    """(Spacing, None) from Pixel Spacing (0028,0030), [row spacing, column spacing] = [y, x] in mm;
    (None, None) when the file has none; (None, why) when it has one that cannot be used."""
    value = element_value(ds, "PixelSpacing")
    if value is None or value == "":
        return None, None
    try:
        y_mm, x_mm = (float(v) for v in value)
    except (TypeError, ValueError):
        problem = "not two numbers of mm"
    else:
        problem = spacing_problem(x_mm, y_mm)
    if problem is None:
        return Spacing(x_mm=x_mm, y_mm=y_mm, source=f"pixel spacing {_PIXEL_SPACING_TAG}"), None
    log.warning("%s: ignoring Pixel Spacing %s: %s", where, _PIXEL_SPACING_TAG, problem)
    return None, problem


def _patient_id(ds) -> str | None:
    value = element_value(ds, "PatientID")
    text = str(value).strip() if value is not None else ""
    return text or None


def neutral_name(stem: str, gray: np.ndarray, source: Path | None = None, is_dicom: bool = False) -> str:
    """The dataset name of a scan: its file stem, or for a DICOM file whose stem holds its Patient ID, a
    part of its Patient Name or a UID (files named after their SOP Instance UID),
    `scan-<first 12 hex of the pixels' SHA-256>`."""
    if is_dicom and source is not None:
        low = stem.lower()
        if _UID_LIKE.search(stem) or any(w in low for w in _patient_words(source)):
            return "scan-" + hashlib.sha256(np.ascontiguousarray(gray).tobytes()).hexdigest()[:12]
    return stem


_UID_LIKE = re.compile(r"\d+(\.\d+){3,}")  # 1.2.840.113619...: a DICOM UID in a file name


def _patient_words(path: Path) -> set[str]:
    """Lower-cased Patient ID and the parts of Patient Name (3+ characters) of a DICOM file, read only to
    compare with its file name. Nothing read here is returned to a caller that stores it."""
    try:
        import pydicom

        with quiet():
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True,
                                 specific_tags=["SpecificCharacterSet", "PatientID", "PatientName"])
            values = [element_value(ds, "PatientID"), element_value(ds, "PatientName")]
    except Exception:  # noqa: BLE001 - unreadable header: the scan decoded, so treat the name as neutral
        return set()
    words = set()
    for v in values:
        text = str(v or "").strip().lower()
        if len(text) >= 3:
            words.add(text)
        words.update(p for p in re.split(r"[\^\s,._-]+", text) if len(p) >= 3)
    return words
