"""What every decoder shares: the error a bad file raises, the gray conversion, the pixel limit, and
how a DICOM file is recognised. Kept apart from `images` (PIL formats + the dispatch) so `dicom` can use
them without an import cycle."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hemaseg.config import DataConfig

MAX_PIXELS_DEFAULT = DataConfig.max_pixels  # decompression-bomb guard: 50 MP is far beyond ultrasound
MAX_PIXELS_FLAG = "--max-pixels"  # every command that reads images has it; errors name it


class DataError(ValueError):
    """One-line, user-facing problem naming the file: ``str(e) == f"{path}: {problem}"``.

    `code` says what kind of problem it is (for the service's status codes and for errors.csv)."""

    def __init__(self, path: str | os.PathLike, problem: str, code: str = "invalid"):
        self.path = Path(path)
        self.problem = problem
        self.code = code
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # the default pickling would call __init__ with one argument (DataLoader workers)
        return (type(self), (self.path, self.problem, self.code))


def to_gray(image: np.ndarray) -> np.ndarray:
    """Any HxW or HxWxC (C in 1, 3, 4) array -> float32 HxW in [0, 1]: integers scaled by their dtype's
    range, RGB(A) by ITU-R 601 luminance (alpha ignored), bool as 0/1, floats above 1 by their maximum."""
    a = np.asarray(image)
    dtype = a.dtype
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        a = a[..., 0] if a.shape[-1] == 1 else _luma(a[..., :3])
        if dtype.kind in "ui":
            a = a / np.iinfo(dtype).max
    elif a.ndim != 2:
        raise ValueError(f"expected an HxW or HxWxC image with C in 1, 3, 4; got shape {a.shape}")
    elif a.dtype.kind in "ui":
        a = a / np.iinfo(a.dtype).max
    a = a.astype(np.float32)
    if a.size and not np.isfinite(a).all():
        raise ValueError("the image holds NaN or infinite values")
    peak = float(a.max()) if a.size else 0.0
    return a / peak if peak > 1 else a


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma. 8-bit input is rounded exactly as PIL's convert("L") does (16-bit fixed point),
    so an RGB scan gives the same gray whether it arrives as a file or as an array."""
    if rgb.dtype == np.uint8:
        r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


DICOM_HEAD_BYTES = 132  # a DICOM Part-10 file: 128-byte preamble, then b"DICM"


def is_dicom(head: bytes) -> bool:
    """True when `head` (a file's first 132+ bytes) has b"DICM" after the 128-byte Part-10 preamble.
    Checked here so PNG-only work never imports pydicom."""
    return len(head) >= DICOM_HEAD_BYTES and head[DICOM_HEAD_BYTES - 4:DICOM_HEAD_BYTES] == b"DICM"


def read_file(path: str | os.PathLike, name: str | os.PathLike | None = None) -> bytes:
    """A file's bytes, or a DataError naming it (`name`, else the path): missing, a folder, unreadable."""
    where = name if name is not None else path
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(where, "file does not exist", "missing") from None
    except IsADirectoryError:
        raise DataError(where, "is a folder, not a file", "unreadable") from None
    except OSError as e:
        raise DataError(where, f"cannot read: {e.strerror or type(e).__name__}", "unreadable") from None
