"""The one decoder: a scan file, uploaded bytes or an array -> float32 gray HxW in [0, 1].

PNG, JPEG, BMP and TIFF decode through PIL; DICOM (recognised by its Part-10 preamble, whatever the
file is called) through `data.dicom`, which also keeps the file's calibration for measurements.

`hemaseg check/train/evaluate/predict` read files through `read_image`, the service reads uploads through
`decode_image`, and the Python API converts arrays through `to_gray`; all three end in `to_gray`, so a scan
gets the same numbers however it arrives. Every failure is a `DataError` naming the source, with a `code`
the service maps to an HTTP status (`too_large` 413, `unsupported_type` 415, the rest 422).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from hemaseg.data.pixels import (  # noqa: F401 - re-exported: this is where callers find the decoder's parts
    DICOM_HEAD_BYTES,
    MAX_PIXELS_DEFAULT,
    MAX_PIXELS_FLAG,
    DataError,
    is_dicom,
    to_gray,
)

if TYPE_CHECKING:
    from hemaseg.data.dicom import DicomScan

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # decoders PIL may try, chosen by the content's magic bytes
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_VIA_RGB = ("P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr")


@dataclass(frozen=True)
class Decoded:
    gray: np.ndarray  # float32 HxW in [0, 1]
    format: str  # PNG, JPEG, BMP, TIFF or DICOM
    mode: str  # the PIL mode it was stored in (DICOM: its photometric interpretation)
    dicom: "DicomScan | None" = None  # a DICOM file's frames and calibration facts (data.dicom)


def open_image(source: str | os.PathLike | bytes, max_pixels: int | None = MAX_PIXELS_DEFAULT,
               name: str | os.PathLike | None = None) -> Image.Image:
    """Open and decode one frame of a file or of bytes, recognised by content (never by name), refusing
    oversized images from the header before any pixel is decoded. The caller closes the image."""
    where = name if name is not None else ("upload" if isinstance(source, bytes) else source)
    if isinstance(source, bytes) and not source:
        raise DataError(where, "the file is empty", "empty")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces PIL's global warning threshold.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=IMAGE_FORMATS)
    except FileNotFoundError:
        raise DataError(where, "file does not exist", "missing") from None
    except IsADirectoryError:
        raise DataError(where, "is a folder, not an image file", "unreadable") from None
    except Image.DecompressionBombError:
        raise DataError(where, f"image too large: its pixel count exceeds the limit (raise {MAX_PIXELS_FLAG} if "
                               "this image is genuine)", "too_large") from None
    except UnidentifiedImageError:
        head = source[:8] if isinstance(source, bytes) else read_head(source)
        if head.startswith(_SIGNATURES):  # the right kind of file, but too broken for PIL to open
            raise DataError(where, "cannot read image: the file is damaged or incomplete", "corrupt") from None
        raise DataError(where, "cannot read image: not a PNG, JPEG, BMP, TIFF or DICOM (recognised by its "
                               "content, not its name)", "unsupported_type") from None
    except OSError as e:
        raise DataError(where, f"cannot read image: {e.strerror or e}", "unreadable") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for malformed headers
        raise DataError(where, f"cannot read image: {e}", "corrupt") from None
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        im.close()
        raise DataError(where, f"{width}x{height} = {width * height:,} pixels exceeds the limit of "
                               f"{max_pixels:,} (raise {MAX_PIXELS_FLAG} if this image is genuine)", "too_large")
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 - truncated files raise OSError, broken chunks SyntaxError etc.
        im.close()
        raise DataError(where, f"cannot read image: the file is damaged or incomplete ({e})", "corrupt") from None
    return im


def read_head(path: str | os.PathLike, n: int = 8) -> bytes:
    """A file's first `n` bytes (b"" when it cannot be read: the decoder then says why)."""
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def pil_to_gray(im: Image.Image, where: str | os.PathLike = "image") -> np.ndarray:
    """A decoded PIL image of any mode -> float32 HxW in [0, 1] (through `to_gray`)."""
    mode = im.mode
    if mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            return a.astype(np.float32)
        if mode == "I" and lo >= 0 and hi <= 65535:  # 16-bit data held in a 32-bit int image
            return to_gray(a.astype(np.uint16))
        log.warning("%s: mode %s values span [%g, %g]; scaling min-max to [0, 1]", where, mode, lo, hi)
        return np.zeros(a.shape, np.float32) if hi <= lo else ((a - lo) / (hi - lo)).astype(np.float32)
    if mode in ("1", "L") or mode.startswith("I;16"):
        return to_gray(np.asarray(im))
    if mode in ("LA", "La"):
        return to_gray(np.asarray(im)[..., 0])
    if mode not in _VIA_RGB:  # LAB, HSV ...: not a colour image whose luminance means brightness
        raise DataError(where, f"cannot convert image mode {mode} to gray; save it as 8-bit gray or RGB",
                        "unsupported_mode")
    return to_gray(np.asarray(im.convert("RGB")))  # alpha is ignored, palettes are looked up


def decode_image(source: str | os.PathLike | bytes, max_pixels: int | None = MAX_PIXELS_DEFAULT,
                 name: str | os.PathLike | None = None, frame: int = 0) -> Decoded:
    """A file or bytes -> Decoded(gray, format, mode[, dicom]); DataError naming `name` (or the path) if
    not. `frame` picks the frame of a multi-frame DICOM (cine) file; other formats have one."""
    where = name if name is not None else ("upload" if isinstance(source, bytes) else source)
    head = source[:DICOM_HEAD_BYTES] if isinstance(source, bytes) else read_head(source, DICOM_HEAD_BYTES)
    if is_dicom(head):
        from hemaseg.data.dicom import read_dicom

        scan = read_dicom(source, frame, max_pixels, name)
        return Decoded(scan.gray, "DICOM", scan.photometric, scan)
    with open_image(source, max_pixels, name) as im:
        try:
            gray = pil_to_gray(im, where)
        except ValueError as e:
            if isinstance(e, DataError):
                raise
            raise DataError(where, str(e), "corrupt") from None
        if gray.size and not np.isfinite(gray).all():
            raise DataError(where, "the image holds NaN or infinite pixel values", "corrupt")
        return Decoded(gray, str(im.format), im.mode)


def read_image(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """Read a scan as float32 HxW in [0, 1].

    8-bit is divided by 255, 16-bit by 65535 (32-bit int images holding 16-bit values too), float images
    in [0, 1] kept; other ranges are min-max scaled. Colour, palette and alpha images become luminance
    gray. Raises :class:`DataError` naming the file when it is unreadable, truncated, or larger than
    ``max_pixels`` (checked from the header before decoding).
    """
    return decode_image(Path(path), max_pixels).gray
