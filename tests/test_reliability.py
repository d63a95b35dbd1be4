"""Nothing absurd gets through (issue #26): implausible or broken calibration, spreadsheet formulas in the
tables, unreadable training files and annotations, paths that leave the dataset, a full disk, interrupted
and resumed jobs, impossible ages, foreign Host headers, ONNX Runtime telemetry. Each refusal is one line
naming the file (or the table line) and the problem, with the CLI's exit code for it."""

from __future__ import annotations

import csv
import errno
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from hemaseg.cli import main
from hemaseg.io import write_csv
from hemaseg.spacing import Spacing, parse_pixel_spacing
from tests.dicom_files import region
from tests.test_measure import dicom_scan, disc_mask, write_case

FORMULAS = ["=cmd|' /C calc'!A0", '=HYPERLINK("http://x","y")', "@SUM(1)", "+1", "-1+1", "\tx", "\r=1+1"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- 1-3: calibration ------------------------------------------------------------------------------------


def test_spacings_outside_the_plausible_range_are_refused_where_they_are_typed():
    for good in ("0.005", "5", "0.1,0.2"):
        parse_pixel_spacing(good)
    for bad in ("1e9", "0.0049", "5.01", "1e300", "1e-300", "1e9,1e-9", "0.1,1e9"):
        with pytest.raises(ValueError, match="plausible range for ultrasound"):
            parse_pixel_spacing(bad)
    with pytest.raises(ValueError, match="plausible range"):
        Spacing(1e9, 0.1, "anywhere")  # every Spacing, whatever made it
    from hemaseg.spacing import MAX_MM_PER_PIXEL, MIN_MM_PER_PIXEL

    assert (MIN_MM_PER_PIXEL, MAX_MM_PER_PIXEL) == (0.005, 5.0)  # defined once, there


def _dicom(mask, regions=(), pixel_spacing=None):
    ds = dicom_scan(mask, regions, pixel_spacing)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = generate_uid(), generate_uid(), "P1"  # SR-ready
    return ds


@pytest.mark.parametrize("regions,pixel_spacing,why", [
    ((), [1e9, 1e9], "plausible range"),  # Pixel Spacing of 1e9 mm
    ([region(dx=1e9, dy=1e9)], None, "plausible range"),  # an ultrasound region delta of 1e9 cm
    ([region(dx=1e-9, dy=0.01)], None, "plausible range"),
    ((), [0.0, 0.0], "> 0"),  # broken file spacings beside a typed one (item 2): the file's own wins
    ((), [-0.1, -0.1], "> 0"),
    ((), ["NaN", "NaN"], "> 0"),
], ids=["pixel-spacing-1e9mm", "region-delta-1e9cm", "region-delta-1e-9cm", "pixel-spacing-0",
        "pixel-spacing-negative", "pixel-spacing-nan"])
def test_a_files_implausible_or_broken_calibration_keeps_pixels_and_writes_no_sr(tmp_path, regions, pixel_spacing,
                                                                                   why):
    mask = disc_mask()
    with pytest.warns(UserWarning) if pixel_spacing == ["NaN", "NaN"] else _nothing():
        write_case(tmp_path, "scan", mask, _dicom(mask, regions, pixel_spacing))
    code = main(["-q", "measure", "--masks", str(tmp_path / "masks"), str(tmp_path / "scans"), "--out",
                 str(tmp_path / "out"), "--dicom-sr", "--pixel-spacing", "0.1"])
    row = _rows(tmp_path / "out" / "measurements.csv")[0]
    assert code == 0 and row["spacing_source"] == "" and row["longest_diameter_mm"] == ""
    assert float(row["longest_diameter_px"]) > 0 and why in row["calibration_note"]
    assert not list((tmp_path / "out").glob("*_sr.dcm"))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_extreme_spacings_are_a_clean_refusal_of_the_cli_and_the_service(tiny_run, tiny_data, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from hemaseg.inference.predictor import load_model
    from hemaseg.serve import Settings, create_app

    scan = min((tiny_data / "images").glob("*.png"))
    for value in ("1e300", "1e9"):
        with pytest.raises(SystemExit) as exit_:
            main(["-q", "predict", str(tiny_run), str(scan), "--out", str(tmp_path / "out"),
                  "--pixel-spacing", value])
        assert exit_.value.code == 2 and "plausible range" in _one_line(capsys)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    app = create_app(load_model(tiny_run, device="cpu"), Settings(allowed_hosts=("testserver",)))
    with TestClient(app, raise_server_exceptions=False) as client:
        for value in ("1e300", "1e-300", "1e9,1e-9", "1e9"):
            r = client.post("/v1/segment", params={"pixel_spacing": value},
                            files={"file": ("s.png", scan.read_bytes(), "image/png")})
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_pixel_spacing", r.text


def _track_case(tmp_path: Path, rows: list[dict]) -> Path:
    """A track table over PNG scans with a disc lesion (masks given); each row's extra cells as given."""
    mask = disc_mask()
    write_case(tmp_path, "scan", mask)
    columns = ["patient", "lesion", "site", "age_weeks", "date", "image", "mask", "pixel_spacing"]
    table = tmp_path / "visits.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({"patient": "P1", "lesion": "A", "site": "cheek", "image": "scans/scan.png",
                        "mask": "masks/scan.png", "pixel_spacing": "0.1", **r})
    return table


def test_track_refuses_an_implausible_spacing_column_and_impossible_ages_naming_the_line(tmp_path):
    from hemaseg.measure.track import read_table

    table = _track_case(tmp_path, [{"age_weeks": "4"}, {"age_weeks": "8", "pixel_spacing": "1e9"},
                                   {"age_weeks": "1e308"}, {"age_weeks": "1101"},
                                   {"age_weeks": "", "date": "2999-01-01"}, {"age_weeks": "", "date": "2024-01-01"}])
    rows, errors = read_table(table)
    assert [r.line for r in rows] == [2, 7]
    problems = {e.line: str(e) for e in errors}
    assert "plausible range" in problems[3] and problems[3].startswith("line 3: ")
    assert "from 0 to 1,100" in problems[4] and "from 0 to 1,100" in problems[5]
    assert problems[6] == "line 6: date 2999-01-01 is in the future"


# --- 4: spreadsheet formulas -----------------------------------------------------------------------------


def test_write_csv_neutralises_formula_text_and_leaves_numbers_alone(tmp_path):
    from hemaseg.io import csv_cell, plain_cell

    rows = [{"text": f, "number": n} for f, n in zip(FORMULAS, [-3.5, -1, np.float32(-2.5), np.int64(-7), 0, 1.5,
                                                                  None])]
    rows.append({"text": "--pixel-spacing", "number": "plain"})  # hemaseg's own flag name, no formula
    write_csv(tmp_path / "t.csv", rows, ["text", "number"])
    back = _rows(tmp_path / "t.csv")
    assert [r["text"] for r in back] == ["'" + f for f in FORMULAS] + ["--pixel-spacing"]
    assert [r["number"] for r in back] == ["-3.5", "-1", "-2.5", "-7", "0", "1.5", "", "plain"]
    assert [plain_cell(csv_cell(f)) for f in FORMULAS] == FORMULAS  # hemaseg's own readers get the text back


def test_track_tables_carry_no_formula(tmp_path):
    from hemaseg.measure.track import track

    table = _track_case(tmp_path, [{"patient": FORMULAS[0], "lesion": FORMULAS[2], "site": FORMULAS[1],
                                    "age_weeks": w} for w in ("4", "8")])
    track(table, tmp_path / "out", raw_patient_id=True)
    for name in ("visits.csv", "scans.csv"):
        rows = _rows(tmp_path / "out" / name)
        assert rows and all(r["patient_key"] == "'" + FORMULAS[0] and r["lesion"] == "'" + FORMULAS[2]
                            and r["site"] == "'" + FORMULAS[1] for r in rows)
        assert not any(v.startswith(("=", "+", "@", "\t", "\r")) for r in rows for v in r.values())


def test_evaluate_and_predict_tables_carry_no_formula_from_file_names(tiny_run, tiny_data, tmp_path):
    data = tmp_path / "data"
    names = ["@SUM(1)", "+1", "-1+1", "=1+2"]
    for sub in ("images", "mask"):
        (data / sub).mkdir(parents=True)
        for name, src in zip(names, sorted((tiny_data / sub).glob("*.png"))):
            shutil.copy(src, data / sub / f"{name}.png")
    assert main(["-q", "evaluate", str(tiny_run), str(data), "--out", str(tmp_path / "eval"),
                 "--device", "cpu"]) == 0
    cells = [v for r in _rows(tmp_path / "eval" / "per_image.csv") for v in r.values()]
    assert {"'" + n for n in names} <= set(cells)
    assert not any(v.startswith(("=", "+", "@")) for v in cells)
    assert main(["-q", "predict", str(tiny_run), str(data / "images"), "--out", str(tmp_path / "pred"),
                 "--device", "cpu"]) == 0
    images = {Path(r["image"]).name for r in _rows(tmp_path / "pred" / "predictions.csv")}
    assert images == {f"{n}.png" for n in names}  # the path's folder comes first: nothing to neutralise here


def test_every_csv_hemaseg_writes_goes_through_write_csv():
    root = Path(__file__).resolve().parents[1] / "hemaseg"
    offenders = [f"{p.relative_to(root)}" for p in root.rglob("*.py") if p.name != "io.py"
                 and any(s in p.read_text() for s in ("csv.writer(", "DictWriter(", ".to_csv("))]
    assert not offenders, f"write CSVs with hemaseg.io.write_csv: {offenders}"


# --- 5-7: training data and annotations --------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "text"])
@pytest.mark.parametrize("command", ["train", "convert"])
def test_unreadable_training_scans_are_named_with_exit_2(tiny_data, tmp_path, capsys, damage, command):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bad = min((data / "images").glob("*.png"))
    bad.write_bytes(bad.read_bytes()[:300] if damage == "truncated" else b"hello, not an image\n")
    out = tmp_path / "out"
    args = (["train", str(data), "--out", str(out), "--size", "32", "--epochs", "1"] if command == "train"
            else ["convert", str(data), str(out), "--to", "coco"])
    assert main(["-q", *args]) == 2
    assert str(bad) in _one_line(capsys) and not out.exists()


def _labelme_folder(root: Path, image_path: str | None = None, points=((2, 2), (12, 2), (12, 10))) -> Path:
    root.mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.full((20, 28), 90, np.uint8)).save(root / f"{name}.png")
        doc = {"version": "5.4.1", "flags": {}, "imagePath": f"{name}.png", "imageData": None, "imageHeight": 20,
               "imageWidth": 28, "shapes": [{"label": "lesion", "points": [list(p) for p in points],
                                             "shape_type": "polygon", "flags": {}}]}
        if name == "b" and image_path is not None:
            doc["imagePath"] = image_path
        (root / f"{name}.json").write_text(json.dumps(doc))
    return root


def _coco_folder(root: Path, file_name: str | None = None) -> Path:
    root.mkdir(parents=True)
    images = []
    for i, name in enumerate(("s0", "s1")):  # named after annotations.json: its problems come first
        Image.fromarray(np.full((20, 28), 90, np.uint8)).save(root / f"{name}.png")
        images.append({"id": i, "file_name": f"{name}.png", "width": 28, "height": 20})
    if file_name is not None:
        images[1]["file_name"] = file_name
    anns = [{"id": i + 1, "image_id": i, "category_id": 1, "segmentation": [[2, 2, 12, 2, 12, 10]], "iscrowd": 0}
            for i in range(2)]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                       "categories": [{"id": 1, "name": "lesion"}]}))
    return root


def _nest(path: Path) -> None:
    """Deeply nested JSON inside a valid-looking annotation file."""
    text = path.read_text()
    path.write_text(text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")


@pytest.mark.parametrize("case", ["labelme 1e300", "labelme nested", "coco nested"])
def test_absurd_annotation_files_are_named_with_exit_2(tmp_path, capsys, case):
    if case == "labelme 1e300":
        data = _labelme_folder(tmp_path / "d", points=((1e300, 1e300), (-1e300, 10), (30, -1e300)))
        bad = data / "a.json"
    elif case == "labelme nested":
        data = _labelme_folder(tmp_path / "d")
        bad = data / "b.json"
        _nest(bad)
    else:
        data = _coco_folder(tmp_path / "d")
        bad = data / "annotations.json"
        _nest(bad)
    for args in (["convert", str(data), str(tmp_path / "out"), "--to", "folder"],
                 ["train", str(data), "--out", str(tmp_path / "run"), "--size", "32", "--epochs", "1"]):
        assert main(["-q", *args]) == 2
        assert _one_line(capsys).split("error: ", 1)[1].startswith(f"{bad}: ")
    assert main(["-q", "check", str(data)]) == 1
    assert str(bad) in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["labelme", "coco"])
def test_annotations_cannot_name_files_outside_the_dataset(tmp_path, capsys, fmt):
    from hemaseg.data.dataset import check_dataset, find_samples

    outside = tmp_path / "outside.png"
    Image.fromarray(np.full((20, 28), 200, np.uint8)).save(outside)  # a real image: before, it was trained on
    data = (_labelme_folder(tmp_path / "d", "../outside.png") if fmt == "labelme"
            else _coco_folder(tmp_path / "d", "../outside.png"))
    ann = data / ("b.json" if fmt == "labelme" else "annotations.json")
    assert outside not in [s.image_path for s in find_samples(data, strict=False)]
    report = check_dataset(data)
    assert any(str(p).startswith(f"{ann}: ") and "outside the dataset folder" in str(p) for p in report.problems)
    assert main(["-q", "convert", str(data), str(tmp_path / "out"), "--to", "folder"]) == 2
    assert "outside the dataset folder" in _one_line(capsys)
    if fmt == "labelme":  # an imagePath that escapes only by its folder still finds the image beside the JSON
        doc = json.loads(ann.read_text())
        doc["imagePath"] = "../../elsewhere/b.png"
        ann.write_text(json.dumps(doc))
        assert check_dataset(data).ok


# --- 8-10: a full disk, an interrupted predict, a resumed training ----------------------------------------


def _disk_full_after(monkeypatch, n: int, under: Path) -> None:
    """Writes under `under` fail with ENOSPC, as on a full disk, once `n` have succeeded: the real atomic
    writer runs, and the write itself raises (so the temp file and the error's file name are its own)."""
    import hemaseg.io as hio

    real, count = hio.atomic_write, [0]

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    def atomic_write(path, write, *args, **kwargs):
        if Path(path).resolve().is_relative_to(under.resolve()):
            count[0] += 1
            if count[0] > n:
                return real(path, full, *args, **kwargs)
        return real(path, write, *args, **kwargs)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("hemaseg") and getattr(module, "atomic_write", None) is real:
            monkeypatch.setattr(module, "atomic_write", atomic_write)


def test_a_full_disk_leaves_predict_tables_listing_exactly_what_was_written(tiny_run, tiny_data, tmp_path,
                                                                           monkeypatch, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    for src in sorted((tiny_data / "images").glob("*.png"))[:4]:
        shutil.copy(src, scans / src.name)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        # manifest, scan 1 (2 files), the tables after the first batch (3), scans 2 and 3, then full
        _disk_full_after(m, 1 + 2 + 3 + 2 + 2, out)
        code = main(["-q", "predict", str(tiny_run), str(scans), "--out", str(out), "--batch-size", "1",
                     "--device", "cpu"])
    line = _one_line(capsys)
    assert code == 3 and f"{out}/" in line and "No space left on device" in line and "--skip-existing" in line
    listed = {Path(r["image"]).stem for r in _rows(out / "predictions.csv")}
    written = {p.name[:-len("_mask.png")] for p in out.glob("*_mask.png")}
    assert listed and listed == written == {p.name[:-len("_overlay.png")] for p in out.glob("*_overlay.png")}
    assert not list(out.glob(".*.tmp"))
    assert main(["-q", "predict", str(tiny_run), str(scans), "--out", str(out), "--batch-size", "1", "--device",
                 "cpu", "--skip-existing"]) == 0  # space freed: the job finishes
    assert len(_rows(out / "predictions.csv")) == 4 and len(list(out.glob("*_mask.png"))) == 4


@pytest.mark.parametrize("after", [0, 2])
def test_a_full_disk_before_the_first_checkpoint_leaves_no_run_folder(tiny_data, tmp_path, monkeypatch, capsys,
                                                                      after):
    run = tmp_path / "run"
    _disk_full_after(monkeypatch, after, run)  # 0: splits.json fails; 2: last.pt after config + splits
    assert main(["-q", "train", str(tiny_data), "--out", str(run), "--size", "32", "--epochs", "1",
                 "--device", "cpu"]) == 3
    line = _one_line(capsys)
    assert f"{run}/" in line and "--resume" in line and not run.exists()


def test_a_full_disk_leaves_no_half_written_track_folder(tmp_path, monkeypatch, capsys):
    table = _track_case(tmp_path, [{"age_weeks": w} for w in ("4", "8")])
    out = tmp_path / "tracked"
    _disk_full_after(monkeypatch, 2, out)  # salt.txt and the curve, then full
    assert main(["-q", "track", str(table), "--out", str(out)]) == 3
    line = _one_line(capsys)
    assert f"{out}/" in line and "run the command again" in line and not out.exists()


def test_resuming_predict_removes_the_temp_files_of_a_killed_write(tiny_run, tiny_data, tmp_path):
    scan = min((tiny_data / "images").glob("*.png"))
    out = tmp_path / "out"
    args = ["-q", "predict", str(tiny_run), str(scan), "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    stale = out / ".44_mask.png.1a2b3c4d.tmp"
    stale.write_bytes(b"half a png")
    assert main([*args, "--skip-existing"]) == 0
    assert not stale.exists()


def test_resume_from_another_folder_names_the_changed_files(tiny_data, tmp_path, monkeypatch):
    from hemaseg.training.train import RunFolderError, fit, resumed_config
    from tests.conftest import tiny_config

    shutil.copytree(tiny_data, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    fit(tiny_config(Path("data"), epochs=1), Path("run"), progress=False)  # a relative DATA
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["root"] == str(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = tmp_path / "run"
    changed = sorted((tmp_path / "data" / "images").glob("*.png"))[:6]
    for p in changed:
        img = np.asarray(Image.open(p)).copy()
        img[0, 0] ^= 255
        Image.fromarray(img).save(p)
    with pytest.raises(RunFolderError) as info:
        fit(resumed_config(run), run, resume=True, progress=False, epochs=2)
    message = str(info.value)
    shown = [f"images/{p.name} changed" for p in changed]
    assert sum(s in message for s in shown) == 5 and "and 1 more" in message
    fit(resumed_config(run), run, resume=True, progress=False, epochs=2, allow_changed_data=True)


# --- 11-13: the service's hosts, ONNX Runtime ---------------------------------------------------------------


def test_the_service_answers_only_its_own_host_names(tiny_run, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    from hemaseg.inference.predictor import load_model
    from hemaseg.serve import Settings, create_app

    predictor = load_model(tiny_run, device="cpu")

    def status(app, host: str) -> int:
        return TestClient(app, base_url=f"http://{host}").get("/healthz").status_code

    app = create_app(predictor, Settings())
    assert [status(app, h) for h in ("localhost:8000", "127.0.0.1", "[::1]:8000")] == [200, 200, 200]
    assert status(app, "evil.example") == 400 and status(app, "testserver") == 400
    r = TestClient(app, base_url="http://evil.example").get("/healthz")
    assert r.headers["X-Content-Type-Options"] == "nosniff"  # the refusal carries the security headers too
    app = create_app(predictor, Settings(allowed_hosts=("scanner.local", "*.example.org")))
    assert [status(app, h) for h in ("scanner.local", "a.example.org", "evil.example")] == [200, 200, 400]
    with pytest.raises(ValueError, match="--allowed-hosts"):
        Settings(allowed_hosts=("a*b",))
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["-q", "serve", str(tiny_run), "--host", "10.0.0.5", "--device", "cpu", "--api-key", "k",
                 "--allowed-hosts", "scanner.local"]) == 0
    assert [status(seen["app"], h) for h in ("10.0.0.5:8000", "scanner.local", "localhost", "evil.example")] \
        == [200, 200, 200, 400]


def test_onnx_runtime_telemetry_is_off_before_a_session_starts(tiny_run, monkeypatch):
    import onnxruntime as ort

    from hemaseg.inference.predictor import load_model

    calls = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "disable_telemetry_events", lambda: calls.append("off"), raising=False)
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: (calls.append("session"), real(*a, **k))[1])
    load_model(tiny_run, device="cpu", backend="onnxruntime")
    assert calls[:2] == ["off", "session"]


# --- 15: a warm load ------------------------------------------------------------------------------------


def test_a_second_auto_load_reuses_the_measured_choice(tiny_run, tmp_path, monkeypatch):
    from hemaseg.inference import backends
    from hemaseg.inference.predictor import load_model

    monkeypatch.setenv("HEMASEG_CACHE_DIR", str(tmp_path / "cache"))
    measured, real = [], backends.choose_backend
    monkeypatch.setattr(backends, "choose_backend", lambda *a, **k: (measured.append(1), real(*a, **k))[1])
    first = load_model(tiny_run, device="cpu")
    second = load_model(tiny_run, device="cpu")
    assert len(measured) == 1 and second.backend == first.backend and second.metadata["backend_auto"]["cached"]
    scan = np.random.default_rng(0).random((40, 52), dtype=np.float32)
    assert np.allclose(first.predict_proba_batch([scan])[0], second.predict_proba_batch([scan])[0], atol=1e-5)
    for entry in (tmp_path / "cache" / "backends").glob("*.json"):  # a damaged entry is measured again
        entry.write_text("{")
    assert load_model(tiny_run, device="cpu").backend == first.backend and len(measured) == 2
