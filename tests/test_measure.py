"""Scans in, millimetres out: which calibration predict, measure and serve trust (DICOM regions, Pixel
Spacing, --pixel-spacing, or refusal), DICOM through every command, and no DICOM identifier in any output."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from hemaseg.cli import main
from hemaseg.data.dataset import check_dataset, load_dataset
from hemaseg.data.images import decode_image
from hemaseg.spacing import Spacing, parse_pixel_spacing
from hemaseg.measure.scan import choose_spacing, looks_like_sector, measure_scan

from .dicom_files import H, W, encapsulated, native, pil_bytes, region, save, to_bytes

CX, CY, RADIUS = 20, 24, 9  # a disc in pixel units: on 0.1 x 0.2 mm pixels an ellipse 1.8 mm wide, 3.6 mm tall


def disc_mask(cx: float = CX, cy: float = CY, r: float = RADIUS, shape=(H, W)) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2


def scan_pixels(mask: np.ndarray) -> np.ndarray:
    """Speckle-ish tissue at ~170 with a dark lesion at ~60 where `mask` is set."""
    rng = np.random.default_rng(0)
    image = np.clip(170 + 20 * rng.standard_normal(mask.shape), 0, 255)
    image[mask] = 60
    return image.astype(np.uint8)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_case(folder: Path, name: str, mask: np.ndarray, dicom_ds=None) -> Path:
    """NAME.png (or NAME.dcm from `dicom_ds`) in folder/scans and its mask in folder/masks."""
    (folder / "scans").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{name}.png")
    if dicom_ds is None:
        path = folder / "scans" / f"{name}.png"
        Image.fromarray(scan_pixels(mask)).save(path)
        return path
    return save(dicom_ds, folder / "scans", f"{name}.dcm")


def dicom_scan(mask: np.ndarray, regions=(), pixel_spacing=None, **attrs):
    ds = native(scan_pixels(mask), **attrs)
    if regions:
        ds.SequenceOfUltrasoundRegions = list(regions)
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    return ds


def measure_cli(tmp_path: Path, *extra: str) -> tuple[int, list[dict], list[dict]]:
    out = tmp_path / "out"
    code = main(["-q", "measure", "--masks", str(tmp_path / "masks"), str(tmp_path / "scans"), "--out", str(out),
                 *extra])
    return code, read_csv(out / "measurements.csv"), read_csv(out / "lesions.csv")


# --- calibration rules ------------------------------------------------------------------------------------


def test_pixel_spacing_is_parsed_as_x_then_y_and_bad_values_say_how_to_write_it():
    assert parse_pixel_spacing("0.1") == Spacing(0.1, 0.1, "--pixel-spacing")
    assert parse_pixel_spacing("0.1, 0.2") == Spacing(0.1, 0.2, "--pixel-spacing")
    for bad in ("abc", "0.1,0.2,0.3", "0", "-1", "nan", "inf"):
        with pytest.raises(ValueError):
            parse_pixel_spacing(bad)
    with pytest.raises(SystemExit) as exit_:  # a usage error, before anything is read or written
        main(["measure", "--masks", ".", "x.png", "--out", "o", "--pixel-spacing", "0.1;0.2"])
    assert exit_.value.code == 2


def test_png_masks_are_measured_in_mm_with_the_spacing_given_and_in_pixels_without(tmp_path):
    mask = disc_mask()
    write_case(tmp_path, "a", mask)
    code, images, lesions = measure_cli(tmp_path, "--pixel-spacing", "0.1,0.2")
    assert code == 0 and len(images) == 1 and len(lesions) == 1
    row, les = images[0], lesions[0]
    assert row["spacing_source"] == "--pixel-spacing" and float(row["spacing_x_mm"]) == 0.1
    assert math.isclose(float(row["area_mm2"]), mask.sum() * 0.02, rel_tol=1e-6)  # area is exact: pixels x area
    # the disc of radius 9 px is an ellipse of semi-axes 0.9 x 1.8 mm: within one pixel's size (0.2 mm)
    assert abs(float(les["longest_diameter_mm"]) - 2 * RADIUS * 0.2) <= 0.2
    assert abs(float(les["perpendicular_diameter_mm"]) - 2 * RADIUS * 0.1) <= 0.2
    assert abs(float(les["thickness_mm"]) - (2 * RADIUS + 1) * 0.2) <= 0.2
    assert float(les["echogenicity_ratio"]) < 0.5  # a dark lesion (60) in bright tissue (170)

    code, images, lesions = measure_cli(tmp_path)
    assert code == 0 and images[0]["area_mm2"] == "" and images[0]["spacing_source"] == ""
    assert "--pixel-spacing" in images[0]["calibration_note"]
    assert int(lesions[0]["area_px"]) == mask.sum() and lesions[0]["area_mm2"] == ""


def test_a_dicom_region_calibrates_and_beats_a_typed_spacing(tmp_path):
    mask = disc_mask()
    write_case(tmp_path, "r", mask, dicom_scan(mask, [region(dx=0.01, dy=0.02)]))  # cm: 0.1 x 0.2 mm
    code, images, lesions = measure_cli(tmp_path, "--pixel-spacing", "0.5")
    assert code == 0
    row = images[0]
    assert row["spacing_source"] == "ultrasound region 0 (0018,6011)"
    assert (float(row["spacing_x_mm"]), float(row["spacing_y_mm"])) == pytest.approx((0.1, 0.2))
    assert math.isclose(float(row["area_mm2"]), mask.sum() * 0.02, rel_tol=1e-6)


def test_pixel_spacing_attribute_is_rows_then_columns(tmp_path):
    mask = disc_mask()
    write_case(tmp_path, "p", mask, dicom_scan(mask, pixel_spacing=[0.2, 0.1]))  # (0028,0030) = [y, x]
    _, images, _ = measure_cli(tmp_path)
    assert images[0]["spacing_source"] == "pixel spacing (0028,0030)"
    assert (float(images[0]["spacing_x_mm"]), float(images[0]["spacing_y_mm"])) == pytest.approx((0.1, 0.2))


def test_a_region_outside_the_image_keeps_pixels_and_says_why_even_with_a_typed_spacing(tmp_path):
    mask = disc_mask()
    write_case(tmp_path, "o", mask, dicom_scan(mask, [region(x1=W + 40)]))  # the file was resized or cropped
    code, images, lesions = measure_cli(tmp_path, "--pixel-spacing", "0.1")
    assert code == 0 and images[0]["spacing_source"] == "" and images[0]["area_mm2"] == ""
    assert "outside" in images[0]["calibration_note"] or "resized" in images[0]["calibration_note"]
    assert int(lesions[0]["area_px"]) == mask.sum()


def test_two_regions_of_different_scale_calibrate_a_lesion_inside_one_and_refuse_one_across(tmp_path):
    regions = [region(x0=0, x1=31, dx=0.01, dy=0.01), region(x0=32, x1=W - 1, dx=0.02, dy=0.02)]
    inside, across = disc_mask(cx=14, r=6), disc_mask(cx=32, r=6)
    for name, mask in (("inside", inside), ("across", across)):
        write_case(tmp_path, name, mask, dicom_scan(mask, regions))
    _, images, _ = measure_cli(tmp_path)
    by_name = {Path(r["image"]).stem: r for r in images}
    assert by_name["inside"]["spacing_source"] == "ultrasound region 0 (0018,6011)"
    assert float(by_name["inside"]["spacing_x_mm"]) == pytest.approx(0.1)
    assert by_name["across"]["spacing_source"] == "" and by_name["across"]["calibration_note"]


def test_choose_spacing_uses_the_typed_spacing_only_for_files_without_calibration():
    mask = disc_mask()
    png = decode_image(pil_bytes(Image.fromarray(scan_pixels(mask)), "PNG"))
    typed = Spacing(0.3, 0.3, "--pixel-spacing")
    assert choose_spacing(png, mask, typed) == (typed, None)
    bare = decode_image(to_bytes(dicom_scan(mask)))
    assert choose_spacing(bare, mask, typed) == (typed, None)
    spacing, note = choose_spacing(bare, mask, None)
    assert spacing is None and "no calibration" in note


def test_sector_scans_are_recognised_and_their_thickness_is_flagged():
    yy, xx = np.mgrid[0:96, 0:128]
    fan = (np.abs(xx - 64) <= 10 + yy * 0.8).astype(np.float32) * 0.6  # widens with depth
    assert looks_like_sector(fan) and not looks_like_sector(np.full((96, 128), 0.6, np.float32))
    mask = np.zeros((96, 128), bool)
    mask[50:60, 60:70] = True
    decoded = decode_image(pil_bytes(Image.fromarray((fan * 255).astype(np.uint8)), "PNG"))
    m = measure_scan(decoded, mask, Spacing(0.1, 0.1, "test"))
    assert any("sector" in w for w in m.measurement.warnings)


# --- DICOM through every command ------------------------------------------------------------------------


def compressed_variants(mask: np.ndarray) -> dict:
    gray = scan_pixels(mask)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rle = native(gray)
    rle.compress(RLELossless)
    jls = native(gray)
    jls.compress(JPEGLSLossless)
    ybr = encapsulated([pil_bytes(Image.fromarray(rgb), "JPEG", quality=95, subsampling=1)], JPEGBaseline8Bit,
                       "YBR_FULL_422", 3)
    cine = native(np.stack([gray, gray[:, ::-1], gray]))
    return {"rle": rle, "jpegls": jls, "ybr": ybr, "rgb": native(rgb, "RGB"), "cine": cine}


def test_predict_reads_compressed_colour_and_multiframe_dicom_and_writes_every_frame(tiny_run, tmp_path):
    mask = disc_mask()
    for name, ds in compressed_variants(mask).items():
        save(ds, tmp_path / "in", f"{name}.dcm")
    out = tmp_path / "pred"
    assert main(["-q", "predict", str(tiny_run), str(tmp_path / "in"), "--out", str(out), "--frame", "all"]) == 0
    rows = read_csv(out / "predictions.csv")
    frames = sorted((Path(r["image"]).stem, r["frame"]) for r in rows)
    assert frames == [("cine", "0"), ("cine", "1"), ("cine", "2"), ("jpegls", "0"), ("rgb", "0"), ("rle", "0"),
                      ("ybr", "0")]
    for stem in ("rle", "jpegls", "ybr", "rgb", "cine_frame000", "cine_frame002"):
        assert np.asarray(Image.open(out / f"{stem}_mask.png")).shape == (H, W)
    assert all(r["calibration_note"] for r in rows)  # no calibration in these files: pixels, and why
    out1 = tmp_path / "pred1"
    assert main(["-q", "predict", str(tiny_run), str(tmp_path / "in" / "cine.dcm"), "--out", str(out1),
                 "--frame", "1"]) == 0
    assert [r["frame"] for r in read_csv(out1 / "predictions.csv")] == ["1"]
    assert main(["-q", "predict", str(tiny_run), str(tmp_path / "in" / "cine.dcm"), "--out", str(tmp_path / "p3"),
                 "--frame", "7"]) == 1  # the file has 3 frames: listed in errors.csv
    assert "frame" in read_csv(tmp_path / "p3" / "errors.csv")[0]["problem"]


def test_check_and_training_data_accept_dicom_scans(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        mask = disc_mask(cx=20 + 5 * i)
        save(dicom_scan(mask, [region()]), root / "images", f"s{i}.dcm")
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"s{i}.png")
    report = check_dataset(root)
    assert report.n_pairs == 3 and not report.problems
    loaded = load_dataset(root)
    assert sorted(loaded.shapes) == ["s0", "s1", "s2"] and loaded.shapes["s0"] == (H, W)


def test_serve_measures_dicom_uploads_in_mm_and_pngs_with_a_spacing_parameter(tiny_run):
    from fastapi.testclient import TestClient

    from hemaseg.inference.predictor import load_model
    from hemaseg.serve import Settings, create_app

    mask = disc_mask()
    app = create_app(load_model(tiny_run, device="cpu"), Settings(allowed_hosts=("testserver",)))
    with TestClient(app) as client:
        def post(data: bytes, **params):
            return client.post("/v1/segment", params=params, files={"file": ("x", data, "application/dicom")})

        body = post(to_bytes(dicom_scan(mask, [region(dx=0.01, dy=0.02)]))).json()
        assert body["image"]["format"] == "DICOM"
        assert body["measurements"]["spacing"] == {"x_mm": 0.1, "y_mm": 0.2,
                                                   "source": "ultrasound region 0 (0018,6011)"}
        png = pil_bytes(Image.fromarray(scan_pixels(mask)), "PNG")
        m = post(png, pixel_spacing="0.25").json()["measurements"]
        assert m["spacing"]["source"] == "pixel_spacing parameter" and m["spacing"]["x_mm"] == 0.25
        assert post(png).json()["measurements"]["spacing"] is None
        bad = post(png, pixel_spacing="wide")
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_pixel_spacing"


# --- privacy ----------------------------------------------------------------------------------------------

# Attributes of PS3.15's Basic Confidentiality Profile, each seeded with a marker no output may contain
# (each holds a character base64 never writes, or is long enough not to occur in a PNG by chance)
PS315 = {
    "PatientName": "Zyxwq^Qwvzx", "PatientID": "PID-4711", "PatientBirthDate": "20240102", "AccessionNumber": "ACC-99",
    "InstitutionName": "St Elsewhere", "InstitutionAddress": "1 Secret Road", "ReferringPhysicianName": "Dr^Who",
    "OperatorsName": "Op^Erator", "PerformingPhysicianName": "Dr^Strange", "DeviceSerialNumber": "SN-31337",
    "StationName": "STATION-42", "StudyDate": "20251231", "StudyID": "STUDY-77", "StudyDescription": "left-cheek",
    "SeriesDescription": "visit-3", "OtherPatientIDs": "OTHER-55", "PatientAddress": "2 Hidden Lane",
}


def seeded_dicom(mask: np.ndarray):
    ds = dicom_scan(mask, [region()])
    for keyword, value in PS315.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9999.424242"
    ds.add_new(0x00990010, "LO", "ACME")  # a private creator and its element
    ds.add_new(0x00991010, "LO", "PRIVATE-MARK")
    return ds


def test_no_dicom_identifier_reaches_any_output_or_log(tiny_run, tmp_path, caplog):
    from fastapi.testclient import TestClient

    from hemaseg.inference.predictor import load_model
    from hemaseg.serve import Settings, create_app

    mask = disc_mask()
    ds = seeded_dicom(mask)
    path = write_case(tmp_path, "case", mask, ds)
    broken = tmp_path / "scans" / "broken.dcm"
    broken.write_bytes(path.read_bytes()[:-500])  # a truncated copy: its error message must be clean too
    texts = []
    with caplog.at_level(logging.DEBUG):
        main(["-q", "predict", str(tiny_run), str(tmp_path / "scans"), "--out", str(tmp_path / "pred")])
        main(["-q", "measure", "--masks", str(tmp_path / "masks"), str(tmp_path / "scans"), "--out",
              str(tmp_path / "meas")])
        app = create_app(load_model(tiny_run, device="cpu"), Settings(allowed_hosts=("testserver",)))
        with TestClient(app) as client:
            for data in (path.read_bytes(), broken.read_bytes()):
                texts.append(client.post("/v1/segment", files={"file": ("x.dcm", data)}).text)
    outputs = [p for folder in ("pred", "meas") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert {p.name for p in outputs} >= {"predictions.csv", "lesions.csv", "errors.csv", "measurements.csv",
                                         "case_mask.png"}
    blobs = [p.read_bytes() for p in outputs] + [t.encode() for t in texts] + [caplog.text.encode()]
    markers = [*PS315.values(), "PRIVATE-MARK", "9999.424242", "Zyxwq", "Qwvzx"]  # none can occur in base64
    for blob in blobs:
        for marker in markers:
            assert marker.encode() not in blob, marker
    assert json.loads(texts[0])["measurements"]["spacing"]["source"].startswith("ultrasound region")
