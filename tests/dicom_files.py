"""Tiny DICOM files built with pydicom for the tests (48x64 px unless asked otherwise): uncompressed,
encapsulated codestreams, ultrasound regions."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from hemaseg.data.dicom import UltrasoundRegion

H, W = 48, 64


def new_ds(ts=ExplicitVRLittleEndian, sop=UltrasoundImageStorage) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    return ds


def native(arr: np.ndarray, pi: str = "MONOCHROME2", bits: int | None = None, **attrs) -> FileDataset:
    """An uncompressed (explicit little endian) dataset holding `arr` (HxW, FxHxW or HxWx3)."""
    ds = new_ds()
    ds.set_pixel_data(arr, pi, bits or arr.dtype.itemsize * 8)
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def encapsulated(frames: list[bytes], ts, pi: str, spp: int, bits: int = 8, stored: int | None = None,
                 rows: int = H, cols: int = W) -> FileDataset:
    """A dataset whose Pixel Data is `frames`, codestreams encoded elsewhere (PIL)."""
    ds = new_ds(ts, UltrasoundMultiFrameImageStorage if len(frames) > 1 else UltrasoundImageStorage)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = spp
    ds.PhotometricInterpretation = pi
    if spp > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits
    ds.BitsStored = stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


def to_bytes(ds: FileDataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def save(ds: FileDataset, tmp_path: Path, name: str = "scan.dcm") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_bytes(ds))
    return path


def rgb_image(seed: int = 0) -> np.ndarray:
    """Smooth, saturated colour (so JPEG stays close and raw YBR-as-RGB would be far off)."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    r = 127 + 120 * np.sin(xx / 9 + seed)
    g = 127 + 120 * np.cos(yy / 7)
    b = 127 + 120 * np.sin((xx + yy) / 13)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def ramp(bits: int = 8, dtype=np.uint8) -> np.ndarray:
    return (np.arange(H * W).reshape(H, W) * 7 % (2 ** bits)).astype(dtype)


def pil_bytes(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def region(**kw) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat = kw.get("fmt", 1)
    item.RegionDataType = 1
    item.RegionFlags = 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = kw.get("x0", 0), kw.get("y0", 0)
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = kw.get("x1", W - 1), kw.get("y1", H - 1)
    item.PhysicalUnitsXDirection, item.PhysicalUnitsYDirection = kw.get("ux", 3), kw.get("uy", 3)
    item.PhysicalDeltaX, item.PhysicalDeltaY = kw.get("dx", 0.01), kw.get("dy", 0.02)
    return item


def R(index=0, x0=0, y0=0, x1=W - 1, y1=H - 1, fmt=1, ux=3, uy=3, dx=0.01, dy=0.02) -> UltrasoundRegion:
    return UltrasoundRegion(index, x0, y0, x1, y1, fmt, ux, uy, dx, dy)


