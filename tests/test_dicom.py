"""hemaseg.data.dicom: decoding every supported layout, calibration rules and privacy, on tiny files built
here with pydicom (48x64 px, CPU, well under a second each)."""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import config as pydicom_config
from pydicom.dataset import FileDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from hemaseg.data import dicom
from hemaseg.data.dicom import (
    DICOM_SUFFIXES,
    DicomScan,
    UltrasoundRegion,
    calibrate,
    is_dicom,
    read_dicom,
)
from hemaseg.data.images import DataError, to_gray
from hemaseg.spacing import Spacing

from .dicom_files import (
    H,
    R,
    W,
    encapsulated,
    native,
    new_ds,
    pil_bytes,
    ramp,
    region,
    rgb_image,
    save,
    to_bytes,
)

LSB = 1 / 255


# --- recognising and decoding ------------------------------------------------------------------------------

def test_is_dicom_looks_at_the_preamble():
    assert is_dicom(b"\0" * 128 + b"DICM" + b"\2\0")
    assert not is_dicom(b"DICM" + b"\0" * 128)
    assert not is_dicom(b"\0" * 128 + b"DIC")
    assert not is_dicom(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    assert DICOM_SUFFIXES == (".dcm", ".dicom")


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                DeflatedExplicitVRLittleEndian])
def test_monochrome2_8bit_is_exact(tmp_path, ts):
    a = ramp()
    ds = native(a)
    ds.file_meta.TransferSyntaxUID = ts
    scan = read_dicom(save(ds, tmp_path))
    assert scan.frames.dtype == np.float32 and scan.frames.shape == (1, H, W)
    assert np.array_equal(scan.gray, to_gray(a))  # same numbers as a PNG of the same pixels
    assert scan.photometric == "MONOCHROME2" and scan.transfer_syntax == ts.name
    assert scan.n_frames == 1 and scan.frame_index == 0


def test_explicit_big_endian_16bit(tmp_path):
    a = ramp(12, np.uint16)
    ds = new_ds(ExplicitVRBigEndian)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = H, W, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = a.astype(">u2").tobytes()
    ds["PixelData"].VR = "OW"
    scan = read_dicom(save(ds, tmp_path))
    assert scan.transfer_syntax == "Explicit VR Big Endian"
    np.testing.assert_allclose(scan.gray, a / 4095, atol=1e-6)


def test_12bit_in_16bit_words_is_scaled_by_bits_stored(tmp_path):
    a = ramp(12, np.uint16)
    a[0, 0] = 4095
    scan = read_dicom(save(native(a, bits=12), tmp_path))
    np.testing.assert_allclose(scan.gray, a / 4095, atol=1e-6)
    assert scan.gray.max() == pytest.approx(1.0)  # not 4095/65535 = 0.06: the scan must not look dark
    assert to_gray(a).max() < 0.07  # what dividing by the word size would have given


def test_signed_12bit(tmp_path):
    a = (ramp(12, np.int16) - 2048).astype(np.int16)  # -2048..2047
    scan = read_dicom(save(native(a, bits=12), tmp_path))
    np.testing.assert_allclose(scan.gray, (a.astype(float) + 2048) / 4095, atol=1e-6)
    assert scan.gray.min() >= 0 and scan.gray.max() <= 1


def test_monochrome1_is_inverted(tmp_path):
    a = ramp()
    scan = read_dicom(save(native(a, "MONOCHROME1"), tmp_path))
    np.testing.assert_allclose(scan.gray, 1 - a / 255, atol=1e-6)  # bright = echo
    assert scan.photometric == "MONOCHROME1"


def test_rgb_native_matches_to_gray_exactly(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3)).astype(np.uint8)
    scan = read_dicom(save(native(rgb, "RGB"), tmp_path))
    assert np.array_equal(scan.gray, to_gray(rgb))
    assert np.array_equal(scan.gray, np.asarray(Image.fromarray(rgb).convert("L")) / np.float32(255))


def test_ybr_full_native_is_converted_to_rgb_before_gray(tmp_path):
    rgb = rgb_image()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    scan = read_dicom(save(native(ybr, "YBR_FULL"), tmp_path))
    assert scan.photometric == "YBR_FULL"  # as stored
    assert np.abs(scan.gray - to_gray(rgb)).max() <= 2 * LSB  # 8-bit YBR round trip rounds by a level or so
    assert np.abs(to_gray(ybr) - to_gray(rgb)).max() > 40 * LSB  # raw YBR read as RGB: the bug this guards


def test_ybr_full_422_jpeg_baseline(tmp_path):
    rgb = rgb_image(1)
    jpeg = pil_bytes(Image.fromarray(rgb), "JPEG", quality=95, subsampling=1)  # 4:2:2, as YBR_FULL_422 says
    scan = read_dicom(save(encapsulated([jpeg], JPEGBaseline8Bit, "YBR_FULL_422", 3), tmp_path))
    assert scan.photometric == "YBR_FULL_422" and scan.transfer_syntax == "JPEG Baseline (Process 1)"
    pil_gray = to_gray(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))  # libjpeg's own YCbCr->RGB
    assert np.abs(scan.gray - pil_gray).max() <= 3 * LSB
    assert np.abs(scan.gray - to_gray(rgb)).mean() <= 2 * LSB  # lossy: loose bound against the source
    raw = np.asarray(Image.open(io.BytesIO(jpeg)).convert("YCbCr"))
    assert np.abs(to_gray(raw) - to_gray(rgb)).max() > 40 * LSB


def test_palette_color_applies_the_lut(tmp_path):
    idx = (np.arange(H * W).reshape(H, W) % 256).astype(np.uint8)
    levels = np.arange(256)
    lut = np.stack([levels * 257, (255 - levels) * 257, (levels * 3 % 256) * 257]).astype(np.uint16)  # 16-bit
    ds = native(idx, "PALETTE COLOR", 8)
    for i, c in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{c}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{c}PaletteColorLookupTableData", lut[i].astype("<u2").tobytes())
    scan = read_dicom(save(ds, tmp_path))
    expected = to_gray(np.moveaxis(lut, 0, -1)[idx])
    assert np.abs(scan.gray - expected).max() <= LSB
    assert np.abs(scan.gray - idx / 255).max() > 0.2  # the indices themselves are not the image
    assert scan.photometric == "PALETTE COLOR"


def test_rle_lossless_gray_and_rgb(tmp_path):
    a = ramp(12, np.uint16)
    ds = native(a, bits=12)
    ds.compress(RLELossless)
    scan = read_dicom(save(ds, tmp_path))
    assert scan.transfer_syntax == "RLE Lossless"
    np.testing.assert_allclose(scan.gray, a / 4095, atol=1e-6)
    rgb = rgb_image()
    ds = native(rgb, "RGB")
    ds.compress(RLELossless)
    assert np.array_equal(read_dicom(to_bytes(ds)).gray, to_gray(rgb))


def test_jpeg_ls_lossless_12bit(tmp_path):
    a = ramp(12, np.uint16)
    ds = native(a, bits=12)
    ds.compress(JPEGLSLossless)
    scan = read_dicom(save(ds, tmp_path))
    assert scan.transfer_syntax == JPEGLSLossless.name
    np.testing.assert_allclose(scan.gray, a / 4095, atol=1e-6)


def test_jpeg_2000_lossless_gray_and_rgb(tmp_path):
    a = ramp()
    j2k = pil_bytes(Image.fromarray(a), "JPEG2000", irreversible=False, no_jp2=True)
    scan = read_dicom(save(encapsulated([j2k], JPEG2000Lossless, "MONOCHROME2", 1), tmp_path))
    assert scan.transfer_syntax == JPEG2000Lossless.name
    assert np.abs(scan.gray - a / 255).max() <= LSB
    rgb = rgb_image()
    j2k = pil_bytes(Image.fromarray(rgb), "JPEG2000", irreversible=False, no_jp2=True, mct=1)
    scan = read_dicom(to_bytes(encapsulated([j2k], JPEG2000Lossless, "YBR_RCT", 3)))
    assert np.abs(scan.gray - to_gray(rgb)).max() <= LSB


def test_jpeg_extended_8bit_reads_through_pillow(tmp_path):
    a = ramp()
    jpeg = pil_bytes(Image.fromarray(a), "JPEG", quality=95)  # a baseline stream is valid JPEG Extended
    scan = read_dicom(save(encapsulated([jpeg], JPEGExtended12Bit, "MONOCHROME2", 1), tmp_path))
    assert np.abs(scan.gray - a / 255).mean() <= 3 * LSB


@pytest.mark.parametrize("ts, stored, names", [
    (JPEGLosslessSV1, 8, ("JPEG Lossless", "pylibjpeg-libjpeg", "python-gdcm")),
    (JPEGExtended12Bit, 12, ("JPEG Extended", "12-bit", "pylibjpeg-libjpeg")),
    ("1.2.840.10008.1.2.4.100", 8, ("MPEG2", "video")),
    ("1.2.3.4.5.6.7", 8, ("unknown",)),
])
def test_unsupported_transfer_syntax_names_it_and_the_decoder(tmp_path, ts, stored, names):
    bits = 16 if stored > 8 else 8
    ds = encapsulated([b"\xff\xd8\xff\xd9"], ts, "MONOCHROME2", 1, bits=bits, stored=stored)
    path = save(ds, tmp_path)
    with pytest.raises(DataError) as e:
        read_dicom(path)
    assert e.value.code == "unsupported_type"
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    for n in names:
        assert n in str(e.value)


# --- frames -------------------------------------------------------------------------------------------------

def frames3() -> np.ndarray:
    return np.stack([ramp() // (k + 1) for k in range(3)]).astype(np.uint8)


@pytest.mark.parametrize("rle", [False, True])
def test_multiframe_one_frame_or_all(tmp_path, rle):
    f = frames3()
    ds = native(f)
    if rle:
        ds.compress(RLELossless)
    path = save(ds, tmp_path)
    one = read_dicom(path, frame=2)
    assert one.frames.shape == (1, H, W) and one.n_frames == 3 and one.frame_index == 2
    assert np.array_equal(one.gray, to_gray(f[2]))
    every = read_dicom(path, frame=None)
    assert every.frames.shape == (3, H, W) and every.frame_index is None
    for k in range(3):
        assert np.array_equal(every.frames[k], to_gray(f[k]))


def test_single_frame_file_read_whole_is_one_frame(tmp_path):
    scan = read_dicom(save(native(ramp()), tmp_path), frame=None)
    assert scan.frames.shape == (1, H, W) and scan.n_frames == 1


@pytest.mark.parametrize("frame", [3, -1, 99])
def test_bad_frame_index_names_the_file_and_the_count(tmp_path, frame):
    path = save(native(frames3()), tmp_path)
    with pytest.raises(DataError) as e:
        read_dicom(path, frame=frame)
    assert str(e.value).startswith(f"{path}: ") and f"frame {frame}" in str(e.value)
    assert "3 frame(s)" in str(e.value)


def test_frame_must_be_an_int(tmp_path):
    with pytest.raises(TypeError):
        read_dicom(save(native(ramp()), tmp_path), frame=1.0)


# --- refusing -----------------------------------------------------------------------------------------------

def test_too_many_pixels_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    ds = native(ramp())
    ds.Rows, ds.Columns = 60000, 60000  # header claims 3.6 GP; the data is tiny
    path = save(ds, tmp_path)

    def boom(*a, **k):
        raise AssertionError("decoded before the pixel budget was checked")

    monkeypatch.setattr(dicom, "_decode", boom)
    with pytest.raises(DataError) as e:
        read_dicom(path)
    assert e.value.code == "too_large" and "--max-pixels" in str(e.value) and str(path) in str(e.value)


def test_pixel_budget_counts_the_frames_read(tmp_path):
    path = save(native(frames3()), tmp_path)
    assert read_dicom(path, frame=1, max_pixels=2 * H * W).frames.shape == (1, H, W)
    with pytest.raises(DataError) as e:
        read_dicom(path, frame=None, max_pixels=2 * H * W)
    assert e.value.code == "too_large" and "x 3 frames" in str(e.value)
    assert read_dicom(path, frame=None, max_pixels=None).frames.shape == (3, H, W)


@pytest.mark.parametrize("compress", [None, RLELossless, JPEGLSLossless])
def test_truncated_file_is_corrupt(tmp_path, compress):
    ds = native(ramp())
    if compress:
        ds.compress(compress)
    data = to_bytes(ds)
    for cut in (len(data) - 300, 200, 140):  # inside the pixel data, the file meta, the meta's first element
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        with pytest.raises(DataError) as e:
            read_dicom(path)
        assert e.value.code == "corrupt", (cut, str(e.value))
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_not_dicom_empty_missing_and_folder(tmp_path):
    png = pil_bytes(Image.fromarray(ramp()), "PNG")
    with pytest.raises(DataError) as e:
        read_dicom(png, name="scan.dcm")
    assert e.value.code == "unsupported_type" and str(e.value).startswith("scan.dcm: not a DICOM file")
    with pytest.raises(DataError) as e:
        read_dicom(b"")
    assert e.value.code == "empty" and str(e.value).startswith("upload: ")
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_dicom(tmp_path / "empty.dcm")
    with pytest.raises(DataError) as e:
        read_dicom(tmp_path / "nope.dcm")
    assert e.value.code == "missing"
    with pytest.raises(DataError) as e:
        read_dicom(tmp_path)
    assert e.value.code == "unreadable"


def test_no_pixel_data(tmp_path):
    sr = new_ds(sop="1.2.840.10008.5.1.4.1.1.88.33")  # Comprehensive SR: a report, not an image
    with pytest.raises(DataError) as e:
        read_dicom(save(sr, tmp_path, "sr.dcm"))
    assert e.value.code == "unsupported_type" and "no pixel data" in str(e.value)
    with pytest.raises(DataError) as e:  # an image object without its pixels: cut short
        read_dicom(save(new_ds(), tmp_path, "img.dcm"))
    assert e.value.code == "corrupt"


def test_unsupported_photometric(tmp_path):
    ds = native(ramp())
    ds.PhotometricInterpretation = "HSV"
    with pytest.raises(DataError) as e:
        read_dicom(save(ds, tmp_path))
    assert e.value.code == "unsupported_type" and "HSV" in str(e.value)


def test_bytes_source_and_name(tmp_path):
    data = to_bytes(native(ramp()))
    assert np.array_equal(read_dicom(data).gray, to_gray(ramp()))
    with pytest.raises(DataError) as e:
        read_dicom(data[:-300], name="upload.dcm")
    assert str(e.value).startswith("upload.dcm: ")


# --- calibration --------------------------------------------------------------------------------------------

def test_one_region_gives_mm_per_pixel_x_and_y_apart(tmp_path):
    ds = native(ramp())
    ds.SequenceOfUltrasoundRegions = [region(x0=2, y0=3, x1=60, y1=45, dx=0.01, dy=0.025)]
    scan = read_dicom(save(ds, tmp_path))
    assert scan.regions == (UltrasoundRegion(0, 2, 3, 60, 45, 1, 3, 3, 0.01, 0.025),)
    sp, why = scan.spacing_for((10, 10, 20, 15))
    assert why is None and sp == Spacing(0.1, 0.25, "ultrasound region 0 (0018,6011)")
    assert scan.spacing_for(None) == (sp, None)  # one calibrated region: the whole scan uses it
    sp, why = scan.spacing_for((0, 0, 10, 10))  # starts above/left of the region
    assert sp is None and "not inside ultrasound region 0" in why


def test_two_regions_of_different_calibration():
    a = R(0, 0, 0, 31, H - 1, dx=0.01, dy=0.01)
    b = R(1, 32, 0, W - 1, H - 1, dx=0.02, dy=0.02)
    sp, why = calibrate([a, b], None, (34, 5, 10, 10), (H, W))  # inside b only
    assert why is None and (sp.x_mm, sp.y_mm) == (pytest.approx(0.2), pytest.approx(0.2))
    assert sp.source == "ultrasound region 1 (0018,6011)"
    sp, why = calibrate([a, b], None, (25, 5, 10, 10), (H, W))  # across both
    assert sp is None and "different calibration" in why and "0, 1" in why
    sp, why = calibrate([a, b], None, None, (H, W))
    assert sp is None and "different calibration" in why


def test_nested_regions_must_agree():
    outer = R(0, dx=0.01, dy=0.01)
    inner_same = R(1, 10, 10, 40, 40, dx=0.01, dy=0.01)  # e.g. a colour-flow box with the B-mode scale
    inner_zoom = R(1, 10, 10, 40, 40, dx=0.005, dy=0.005)
    assert calibrate([outer, inner_same], None, (12, 12, 5, 5), (H, W))[0].x_mm == pytest.approx(0.1)
    sp, why = calibrate([outer, inner_zoom], None, (12, 12, 5, 5), (H, W))
    assert sp is None and "different calibration" in why
    assert calibrate([outer, inner_zoom], None, (45, 42, 4, 4), (H, W))[0] is not None  # outside the inset


def test_box_in_no_region():
    sp, why = calibrate([R(0, 0, 0, 20, 20)], None, (40, 30, 5, 5), (H, W))
    assert sp is None and "lies in no ultrasound region" in why


@pytest.mark.parametrize("bad", [{"x1": W}, {"y1": H}, {"x0": -1}, {"x0": 30, "x1": 20}])
def test_region_outside_the_image_means_resized(bad):
    sp, why = calibrate([R(0, **bad)], None, (1, 1, 4, 4), (H, W))
    assert sp is None and "does not fit the 64x48 image" in why and "resized or cropped" in why


@pytest.mark.parametrize("dx, dy", [(0.0, 0.01), (0.01, -0.02), (math.nan, 0.01), (0.01, math.inf)])
def test_bad_delta_refused(dx, dy):
    sp, why = calibrate([R(dx=dx, dy=dy)], None, (1, 1, 4, 4), (H, W))
    assert sp is None and "PhysicalDeltaX/Y" in why


def test_bad_delta_in_file_refused(tmp_path):
    ds = native(ramp())
    ds.SequenceOfUltrasoundRegions = [region(dx=0.0)]
    assert read_dicom(save(ds, tmp_path)).spacing_for(None)[0] is None


@pytest.mark.parametrize("ux, uy", [(0, 0), (3, 4), (7, 3)])
def test_wrong_units_refused(ux, uy):
    sp, why = calibrate([R(ux=ux, uy=uy)], None, (1, 1, 4, 4), (H, W))
    assert sp is None and "not calibrated in cm" in why


@pytest.mark.parametrize("fmt", [0, 2, 3, 4])
def test_non_2d_region_refused(fmt):
    sp, why = calibrate([R(fmt=fmt)], None, (1, 1, 4, 4), (H, W))
    assert sp is None and "not a 2-D image region" in why
    sp, why = calibrate([R(fmt=fmt)], None, None, (H, W))
    assert sp is None and "2-D" in why


def test_pixel_spacing_fallback_is_row_then_column(tmp_path):
    ds = native(ramp())
    ds.PixelSpacing = [0.2, 0.1]  # DICOM order: row spacing (y), column spacing (x)
    scan = read_dicom(save(ds, tmp_path))
    assert scan.pixel_spacing == Spacing(x_mm=0.1, y_mm=0.2, source="pixel spacing (0028,0030)")
    assert scan.spacing_for((1, 1, 5, 5)) == (scan.pixel_spacing, None)
    assert scan.spacing_for(None) == (scan.pixel_spacing, None)


def test_imager_pixel_spacing_is_ignored(tmp_path):
    ds = native(ramp())
    ds.ImagerPixelSpacing = [0.3, 0.3]
    scan = read_dicom(save(ds, tmp_path))
    assert scan.pixel_spacing is None
    sp, why = scan.spacing_for(None)
    assert sp is None and "no calibration" in why


def test_unusable_regions_do_not_fall_back_to_pixel_spacing(tmp_path):
    ds = native(ramp())
    ds.PixelSpacing = [0.2, 0.1]
    ds.SequenceOfUltrasoundRegions = [region(ux=0, uy=0)]
    scan = read_dicom(save(ds, tmp_path))
    sp, why = scan.spacing_for((1, 1, 5, 5))
    assert sp is None and "not calibrated in cm" in why and "Pixel Spacing (0028,0030) is not used" in why
    ds.SequenceOfUltrasoundRegions = [region(dx=0.005, dy=0.005)]  # usable regions win over Pixel Spacing
    sp, why = read_dicom(to_bytes(ds)).spacing_for((1, 1, 5, 5))
    assert sp.source.startswith("ultrasound region 0") and sp.x_mm == pytest.approx(0.05)


def test_invalid_pixel_spacing_is_dropped(tmp_path, caplog):
    ds = native(ramp())
    ds.PixelSpacing = [0.0, 0.1]
    with caplog.at_level(logging.WARNING, logger="hemaseg.data.dicom"):
        assert read_dicom(save(ds, tmp_path)).pixel_spacing is None
    assert "ignoring Pixel Spacing" in caplog.text


def test_region_missing_attributes_cannot_calibrate(tmp_path):
    ds = native(ramp())
    item = region()
    del item.PhysicalDeltaY
    ds.SequenceOfUltrasoundRegions = [item]
    scan = read_dicom(save(ds, tmp_path))
    assert math.isnan(scan.regions[0].delta_y)
    assert scan.spacing_for(None)[0] is None


def test_empty_bbox_is_a_caller_error():
    with pytest.raises(ValueError):
        calibrate([R()], None, (1, 1, 0, 5), (H, W))


@pytest.mark.parametrize("example", ["ybr_color", "palette_color"])
def test_pydicoms_bundled_examples_were_resized(example):
    """pydicom's own US examples were shrunk after export: their regions lie outside the pixels."""
    from pydicom import examples
    from pydicom.encaps import generate_frames
    from pydicom.pixels import apply_color_lut

    path = examples.get_path(example)
    scan = read_dicom(path)
    ds = pydicom.dcmread(path)
    if example == "ybr_color":  # 30 JPEG frames: the first, decoded by libjpeg independently of pydicom
        assert scan.n_frames == 30 and scan.frames.shape == (1, 240, 320)
        jpeg = next(generate_frames(ds.PixelData, number_of_frames=30))
        expected = to_gray(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
        assert np.abs(scan.gray - expected).max() <= 3 * LSB
    else:
        assert scan.frames.shape == (1, 350, 800)
        assert np.abs(scan.gray - to_gray(apply_color_lut(ds.pixel_array, ds))).max() <= LSB
    assert scan.gray.max() > 0.5 and scan.regions
    sp, why = scan.spacing_for(None)
    assert sp is None and "resized or cropped" in why
    sp, why = scan.spacing_for((10, 10, 20, 20))
    assert sp is None and "does not fit" in why


# --- burned-in annotation and privacy -----------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [(None, True), ("NO", False), ("YES", True)])
def test_burned_in_annotation_unknown_counts_as_yes(tmp_path, value, expected):
    ds = native(ramp())
    if value is not None:
        ds.BurnedInAnnotation = value
    assert read_dicom(save(ds, tmp_path)).burned_in_annotation is expected


MARKERS = {
    "PatientName": "ZQNAMEZQ^ZQGIVENZQ",
    "PatientBirthDate": "19020304",
    "AccessionNumber": "ZQACCZQ",
    "InstitutionName": "ZQINSTZQ",
    "InstitutionAddress": "ZQADDRZQ",
    "OperatorsName": "ZQOPZQ",
    "ReferringPhysicianName": "ZQDOCZQ",
    "DeviceSerialNumber": "ZQSERIALZQ",
    "StationName": "ZQSTATIONZQ",
    "StudyDate": "19030405",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.7771117",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.7772227",
    "OtherPatientIDs": "ZQOTHERIDZQ",
}
PATIENT_ID = "ZQPIDZQ"


def seeded(tmp_path: Path) -> FileDataset:
    ds = native(frames3())
    ds.SequenceOfUltrasoundRegions = [region()]
    for k, v in MARKERS.items():
        setattr(ds, k, v)
    ds.PatientID = PATIENT_ID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.7773337"
    block = ds.private_block(0x0009, "ZQCREATORZQ", create=True)
    block.add_new(0x01, "LO", "ZQPRIVATEZQ")
    ds.add_new(0x60000022, "LO", "ZQOVERLAYZQ")  # Overlay Description
    with pydicom_config.disable_value_validation():  # invalid values make pydicom quote them in warnings
        ds.file_meta.SourceApplicationEntityTitle = "ZQAETITLEZQ"
        ds.file_meta.ImplementationVersionName = "ZQIMPLZQ"
        del ds.file_meta.MediaStorageSOPInstanceUID  # an existing element keeps its validation mode
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.ZQMETAUIDZQ"
        ds.PatientAge = "ZQAGEZQ"
    return ds


def all_markers() -> list[str]:
    return [*MARKERS.values(), "ZQNAMEZQ", "ZQGIVENZQ", "7773337", "ZQCREATORZQ", "ZQPRIVATEZQ",
            "ZQOVERLAYZQ",
            "ZQAETITLEZQ", "ZQIMPLZQ", "ZQMETAUIDZQ", "ZQAGEZQ", PATIENT_ID]


def test_no_identifying_value_leaves_the_module(tmp_path, caplog, monkeypatch):
    ds = seeded(tmp_path)
    with pydicom_config.disable_value_validation():
        good = to_bytes(ds)
    path = tmp_path / "seeded.dcm"
    path.write_bytes(good)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(good[:-500])
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1  # a syntax with no decoder installed here
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"] * 3)
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    unsupported = tmp_path / "unsupported.dcm"
    with pydicom_config.disable_value_validation():
        unsupported.write_bytes(to_bytes(ds))
    caplog.clear()  # building the files made pydicom warn (in this test, not in the module)

    # pydicom's debug mode logs every element it reads, values included: the worst case for leaks.
    pd_logger = logging.getLogger("pydicom")
    monkeypatch.setattr(pydicom_config, "debugging", True)
    monkeypatch.setattr(pd_logger, "level", logging.DEBUG)
    messages = []
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan = read_dicom(path, frame=None)
        read_dicom(good, frame=1)
        for bad, frame in ((broken, 0), (path, 7), (unsupported, 0)):
            with pytest.raises(DataError) as e:
                read_dicom(bad, frame=frame)
            messages.append(str(e.value))
        with pytest.raises(DataError) as e:
            read_dicom(good[:-500])
        messages.append(str(e.value))
    assert "cut short" in messages[0] and "frame 7" in messages[1] and "pylibjpeg" in messages[2]

    assert scan.patient_id == PATIENT_ID  # kept for a salted hash...
    assert PATIENT_ID not in repr(scan)  # ...but a logged scan does not show it
    kept = repr({f.name: getattr(scan, f.name) for f in fields(DicomScan)
                 if f.name not in ("patient_id", "frames")})
    texts = {"repr": repr(scan) + kept, "errors": "\n".join(messages), "log": caplog.text,
             "records": "\n".join(r.getMessage() for r in caplog.records),
             "warnings": "\n".join(str(w.message) for w in caught)}
    for marker in all_markers():
        for where, text in texts.items():
            assert marker not in text, f"{marker!r} leaked into {where}"
    assert any(r.name == "hemaseg.data.dicom" for r in caplog.records)  # our own debug line was captured

    # The hush is scoped to reading: pydicom logs normally again afterwards.
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        pydicom.dcmread(path, force=True)
    assert any(r.name.startswith("pydicom") for r in caplog.records)
