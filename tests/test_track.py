"""`track`: one lesion followed visit after visit on the synthetic series (known diameters at a known
anisotropic DICOM calibration), its statuses under default and custom rules, volumes only from two
orthogonal planes, bad rows named by their CSV line, pixels never compared, and no patient ID in any
output."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from hemaseg.config import ConfigError
from hemaseg.data.dataset import read_mask
from hemaseg.data.images import decode_image
from hemaseg.data.series import SERIES_COLUMNS, write_synthetic_series
from hemaseg.measure.track import SALT_FILE, VISIT_COLUMNS, TrackRules, patient_key, read_table, track

RAW_ID = "HEM-2024-0042"  # write_synthetic_series' default patient, also the DICOM files' Patient ID
SPACING = (0.08, 0.1)
PX = max(SPACING)  # "one pixel's size": the larger pixel side, as in test_morphometry
DEFAULT_STATUSES = ["baseline", "growth", "growth", "stable", "stable", *["involution"] * 3]


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    return write_synthetic_series(tmp_path_factory.mktemp("series"), seed=0, spacing=SPACING)


@pytest.fixture(scope="module")
def tracked(series, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked")
    return track(series, out), out


def _table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_table(path: Path, rows: list[dict], base: Path, columns=SERIES_COLUMNS) -> Path:
    """`rows` as a CSV at `path`, their image and mask paths made absolute (they were relative to `base`)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            r = dict(r)
            for k in ("image", "mask"):
                if r.get(k) and not Path(r[k]).is_absolute():
                    r[k] = str(base / r[k])
            w.writerow(r)
    return path


def _truth(series: Path) -> list[dict]:
    """Per visit (date order): the true visit figures, as track defines them (largest section's)."""
    by_date: dict[str, list[dict]] = {}
    for r in _table(series):
        by_date.setdefault(r["date"], []).append(r)
    out = []
    for date in sorted(by_date):
        rows = by_date[date]
        big = max(rows, key=lambda r: float(r["true_longest_mm"]))
        vol = rows[0]["true_volume_mm3"]
        out.append({"date": date, "longest": float(big["true_longest_mm"]),
                    "perpendicular": float(big["true_perpendicular_mm"]),
                    "thickness": max(float(r["true_thickness_mm"]) for r in rows),
                    "volume": float(vol) if vol else None})
    return out


def _all_output_bytes(out: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------ the series


def test_the_synthetic_series_is_calibrated_dicom_with_masks_and_is_deterministic(series, tmp_path):
    rows = _table(series)
    assert len({r["date"] for r in rows}) == 8
    assert {r["plane"] for r in rows} == {"transverse", "longitudinal"}
    d = decode_image(series.parent / rows[0]["image"])
    assert d.format == "DICOM" and d.dicom.photometric == "MONOCHROME2" and d.gray.shape == (192, 224)
    spacing, note = d.dicom.spacing_for(None)
    assert note is None and (spacing.x_mm, spacing.y_mm) == pytest.approx(SPACING)
    assert read_mask(series.parent / rows[0]["mask"]).shape == d.gray.shape
    again = write_synthetic_series(tmp_path, seed=0, spacing=SPACING)
    assert (again.parent / rows[0]["image"]).read_bytes() == (series.parent / rows[0]["image"]).read_bytes()
    assert again.read_bytes() == series.read_bytes()


# ----------------------------------------------------------------------------------- known change


def test_track_finds_the_known_sizes_growth_then_involution(series, tracked):
    result, _ = tracked
    assert result.errors == []
    visits, truth = result.visits, _truth(series)
    assert [str(v["date"]) for v in visits] == [t["date"] for t in truth]
    for v, t in zip(visits, truth):
        assert abs(v["longest_diameter_mm"] - t["longest"]) <= PX, (v["date"], v["longest_diameter_mm"], t)
        assert abs(v["thickness_mm"] - t["thickness"]) <= PX, (v["date"], v["thickness_mm"], t)
        # measure_mask's perpendicular diameter reads 0.6-0.9 px high on these axis-aligned ellipses (worst
        # 1.2 px here): the Feret direction tilts across the ellipse's blunt ends (morphometry docstring)
        assert abs(v["perpendicular_diameter_mm"] - t["perpendicular"]) <= 1.25 * PX, (v["date"], t)
        if t["volume"] is None:
            assert v["volume_mm3"] is None
        else:
            assert v["volume_mm3"] == pytest.approx(t["volume"], rel=0.04)
    assert [v["status"] for v in visits] == DEFAULT_STATUSES
    assert visits[0]["age_weeks"] == 4.0 and visits[-1]["age_weeks"] == 40.0  # from date and birth_date
    # changes since the previous visit, the baseline and the smallest so far, absolute and %
    week8 = visits[1]
    t8 = truth[1]["longest"] - truth[0]["longest"]
    assert week8["longest_change_previous_mm"] == pytest.approx(t8, abs=2 * PX)
    assert week8["longest_change_previous_pct"] == pytest.approx(100 * t8 / truth[0]["longest"], abs=3)
    last = visits[-1]
    baseline = truth[0]["longest"]
    assert last["longest_change_baseline_mm"] == pytest.approx(truth[-1]["longest"] - baseline, abs=2 * PX)
    smallest = min(t["longest"] for t in truth[:-1])  # week 4's 6.0 mm: smaller than week 32's 6.6
    assert last["longest_change_smallest_mm"] == pytest.approx(truth[-1]["longest"] - smallest, abs=2 * PX)
    assert last["volume_change_previous_pct"] < 0 and "from its largest" in last["status_reason"]
    assert all("ultrasound region 0 (0018,6011)" in v["spacing_source"] for v in visits)


def test_track_writes_the_table_curves_and_a_self_contained_page(tracked):
    result, out = tracked
    with open(out / "visits.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == VISIT_COLUMNS and len(rows) == 8
    assert [r["status"] for r in rows] == DEFAULT_STATUSES
    assert len(_table(out / "scans.csv")) == 15 and not (out / "errors.csv").exists()
    rules = (out / "rules.txt").read_text()
    assert "at least 20 % and at least 2 mm" in rules and "down by at least 30 %" in rules
    assert len(result.curves) == 1 and result.curves[0].parent == out / "curves"
    with Image.open(result.curves[0]) as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert result.pages == [out / "patients" / f"{result.visits[0]['patient_key']}.html"]
    page = result.pages[0].read_text()
    assert "Status rules" in page and "at least 20 % and at least 2 mm" in page  # the rules on every report
    assert page.count('src="data:image/png;base64,') == 1 + 15  # the curve and a thumbnail per scan
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "treatment start" in page and "involution" in page and "0.08 × 0.1 mm/pixel" in page
    assert not list(out.rglob("*.tmp"))  # every write finished (atomic writes leave no temp file)


# ------------------------------------------------------------------------------------------- privacy


def test_patients_are_named_by_a_salted_key_and_the_raw_id_is_in_no_output(series, tracked, tmp_path):
    result, out = tracked
    key = result.visits[0]["patient_key"]
    salt = (series.parent / SALT_FILE).read_text().strip()  # kept beside the table, not in the output
    assert result.salt_file == series.parent / SALT_FILE and not list(out.rglob("*salt*"))
    assert key != RAW_ID and key == patient_key(RAW_ID, salt) and key.startswith("p") and len(key) == 13
    files = _all_output_bytes(out)
    assert files and not [p for p, b in files.items() if RAW_ID.encode() in b]
    assert not [p for p in files if RAW_ID in str(p)]

    again = track(series, tmp_path / "another")  # the same key in another output folder, and on a rerun
    assert again.visits[0]["patient_key"] == key and track(series, out).visits[0]["patient_key"] == key
    other = track(series, tmp_path / "salted", salt="clinic secret")
    assert other.visits[0]["patient_key"] == patient_key(RAW_ID, "clinic secret") != key
    assert (series.parent / SALT_FILE).read_text().strip() == salt  # a caller's salt is the caller's to keep

    raw = track(series, tmp_path / "raw", raw_patient_id=True)
    assert raw.visits[0]["patient_key"] == RAW_ID and raw.pages[0].name == f"{RAW_ID}.html"
    assert RAW_ID in (tmp_path / "raw" / "visits.csv").read_text()


# --------------------------------------------------------------------------------------------- rules


def test_custom_rules_change_the_statuses_and_bad_rules_name_their_field(series, tmp_path):
    strict = TrackRules(growth_pct=50, involution_reference="previous", volume_ratio=0)
    result = track(series, tmp_path / "strict", rules=strict)
    # +40 % and +31 % are not growth at 50 %; against the previous visit no step is 30 % down
    assert [v["status"] for v in result.visits] == ["baseline"] + ["stable"] * 7
    assert "at least 50 %" in (tmp_path / "strict" / "rules.txt").read_text()
    assert "the volume rule is off" in result.pages[0].read_text()
    loose = track(series, tmp_path / "loose", rules=TrackRules(growth_mm=0.5, growth_pct=5))
    # week 16's +9 %, +1.0 mm is growth at 5 % and 0.5 mm
    assert [v["status"] for v in loose.visits][:4] == ["baseline", "growth", "growth", "growth"]

    for kwargs, key in (({"growth_pct": -1}, "growth_pct"), ({"involution_pct": 100}, "involution_pct"),
                        ({"volume_ratio": 1.5}, "volume_ratio"), ({"involution_reference": "first"},
                                                                 "involution_reference")):
        with pytest.raises(ConfigError) as e:
            TrackRules(**kwargs)
        assert e.value.key == key


# --------------------------------------------------------------------------------------------- planes


def test_volume_needs_a_transverse_and_a_longitudinal_plane(series, tmp_path):
    rows = _table(series)
    one = [r for r in rows if r["plane"] == "transverse"]
    result = track(_write_table(tmp_path / "one.csv", one, series.parent), tmp_path / "one")
    assert len(result.visits) == 8 and all(v["volume_mm3"] is None for v in result.visits)
    assert all(v["planes"] == "transverse" for v in result.visits)

    oblique = [dict(r, plane="oblique") if r["plane"] == "longitudinal" else r for r in rows]
    result = track(_write_table(tmp_path / "oblique.csv", oblique, series.parent), tmp_path / "oblique")
    assert all(v["volume_mm3"] is None for v in result.visits)
    assert "no volume: it needs a transverse and a longitudinal scan" in result.visits[0]["warnings"]

    alias = [dict(r, plane={"transverse": "TR", "longitudinal": "Sagittal"}[r["plane"]]) for r in rows]
    result = track(_write_table(tmp_path / "alias.csv", alias, series.parent), tmp_path / "alias")
    assert result.visits[0]["volume_mm3"] is not None and result.visits[4]["volume_mm3"] is None


# ------------------------------------------------------------------------------------------ bad rows


def test_bad_rows_are_named_by_their_csv_line_and_the_rest_are_tracked(series, tmp_path):
    rows = _table(series)
    rows[2] = dict(rows[2], image="gone.dcm")  # CSV line 4
    rows[5] = dict(rows[5], date="2024-02-30")  # line 7
    rows[7] = dict(rows[7], patient="")  # line 9
    rows[9] = dict(rows[9], mask="")  # line 11: no mask and no model
    rows.append(dict(rows[0]))  # line 17: the same lesion, visit and plane as line 2
    table = _write_table(tmp_path / "bad.csv", rows, series.parent)
    result = track(table, tmp_path / "out")
    lines = {e["line"]: e["problem"] for e in result.errors}
    assert sorted(lines) == [4, 7, 9, 11, 17]
    assert "image: file does not exist" in lines[4]
    assert "date '2024-02-30' is not a date" in lines[7]
    assert "patient cell is empty" in lines[9]
    assert "no mask given and no model" in lines[11] and "--model" in lines[11]
    assert "same lesion, visit and plane" in lines[17] and "line 2" in lines[17]
    assert len(result.scans) == 15 - 4 and len(result.visits) == 8  # every visit kept a plane
    assert [r["line"] for r in _table(tmp_path / "out" / "errors.csv")] == ["4", "7", "9", "11", "17"]
    page = result.pages[0].read_text()
    assert "Rows not tracked" in page and "line 4: image: file does not exist" in page
    assert RAW_ID.encode() not in b"".join(_all_output_bytes(tmp_path / "out").values())

    fixed = track(series, tmp_path / "out")  # a clean rerun leaves no stale error list
    assert fixed.errors == [] and not (tmp_path / "out" / "errors.csv").exists()


def test_a_table_without_a_required_column_is_refused_before_anything_is_written(series, tmp_path):
    rows = _table(series)
    no_site = [c for c in SERIES_COLUMNS if c != "site"]
    table = _write_table(tmp_path / "t.csv", rows, series.parent, columns=no_site)
    with pytest.raises(ValueError, match=r"missing column\(s\) site"):
        track(table, tmp_path / "out")
    no_time = [c for c in SERIES_COLUMNS if c not in ("date",)]
    with pytest.raises(ValueError, match="date or age_weeks"):
        read_table(_write_table(tmp_path / "t2.csv", rows, series.parent, columns=no_time))
    assert not (tmp_path / "out").exists()


def test_ages_in_weeks_work_without_dates_and_a_model_segments_rows_without_a_mask(series, tmp_path):
    rows = _table(series)
    aged = []
    for r in rows:
        r = dict(r)
        weeks = (np.datetime64(r["date"]) - np.datetime64(r["birth_date"])).astype(int) / 7
        aged.append({**r, "age_weeks": f"{weeks:g}", "date": "", "birth_date": "", "treatment_start": "16",
                     "mask": "" if r["plane"] == "transverse" else r["mask"]})
    columns = (*SERIES_COLUMNS, "age_weeks")
    table = _write_table(tmp_path / "aged.csv", aged, series.parent, columns=columns)

    class MaskFromFile:  # a stand-in model: its "prediction" is the reference mask of that scan
        def predict(self, gray):
            path = next(series.parent / r["mask"] for r in rows if r["plane"] == "transverse"
                        and np.array_equal(decode_image(series.parent / r["image"]).gray, gray))
            return SimpleNamespace(mask=read_mask(path))

    result = track(table, tmp_path / "out", predictor=MaskFromFile())
    assert result.errors == [] and [v["status"] for v in result.visits] == DEFAULT_STATUSES
    assert [v["age_weeks"] for v in result.visits] == [4, 8, 12, 16, 20, 26, 32, 40]
    assert {s["outline"] for s in result.scans if s["plane"] == "transverse"} == {"model"}
    assert {s["outline"] for s in result.scans if s["plane"] == "longitudinal"} == {"mask"}


# --------------------------------------------------------------------------------------------- pixels


def test_an_uncalibrated_png_visit_is_not_measurable_in_mm_and_never_a_reference(series, tmp_path):
    rows = _table(series)
    src = rows[2]  # week 8, transverse
    gray = decode_image(series.parent / src["image"]).gray
    Image.fromarray(np.round(gray * 255).astype(np.uint8)).save(tmp_path / "export.png")
    week10 = dict(src, date="2024-03-18", image=str(tmp_path / "export.png"), true_volume_mm3="")
    table = _write_table(tmp_path / "png.csv", [*rows[:4], week10, *rows[4:]], series.parent)
    result = track(table, tmp_path / "out")
    by_age = {v["age_weeks"]: v for v in result.visits}
    png = by_age[10.0]
    assert png["status"] == "not measurable in mm" and png["longest_diameter_mm"] is None
    assert "no calibration given" in png["warnings"] and png["volume_mm3"] is None
    assert by_age[12.0]["status"] == "growth" and "since week 8.0" in by_age[12.0]["status_reason"]
    scan = next(s for s in result.scans if s["age_weeks"] == 10.0)
    assert scan["longest_diameter_mm"] is None and scan["longest_diameter_px"] > 0

    typed = dict(week10, pixel_spacing="0.08,0.1")  # the same export with its spacing typed in
    table = _write_table(tmp_path / "typed.csv", [*rows[:4], typed, *rows[4:]], series.parent,
                         columns=(*SERIES_COLUMNS, "pixel_spacing"))
    typed_result = track(table, tmp_path / "typed")
    by_age = {v["age_weeks"]: v for v in typed_result.visits}
    assert by_age[10.0]["status"] == "stable"
    assert by_age[10.0]["spacing_source"].endswith("pixel_spacing column")
    same = [s["longest_diameter_mm"] for s in typed_result.scans if s["line"] in (4, 6)]  # weeks 8, 10
    assert len(same) == 2 and math.isclose(*same, abs_tol=1e-9)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_track_and_synth_series(tmp_path):
    from hemaseg.cli import build_parser, main

    commands = build_parser()._subparsers._group_actions[0].choices
    if "track" not in commands:
        pytest.skip("`hemaseg track` is not wired into the CLI yet")
    helps = {a.dest: a.help or "" for a in commands["track"]._actions}
    for f in dataclasses.fields(TrackRules):  # --help states the defaults the rules really have
        shown = f"{f.default:g}" if isinstance(f.default, float) else f.default
        assert f"(default {shown})" in helps[f.name], f.name
    assert main(["-q", "synth", str(tmp_path / "s"), "--series", "--seed", "1"]) == 0
    assert main(["-q", "track", str(tmp_path / "s" / "visits.csv"), "--out", str(tmp_path / "t"),
                 "--growth-pct", "25"]) == 0
    assert "at least 25 %" in (tmp_path / "t" / "rules.txt").read_text()
    assert main(["-q", "track", str(tmp_path / "s" / "visits.csv"), "--out", str(tmp_path / "t"),
                 "--involution-pct", "120"]) == 2


# ------------------------------------------------------------------------------- masks, dates, patients


def test_the_largest_lesion_is_tracked_an_empty_mask_says_so_and_dates_need_no_birth_date(series, tmp_path):
    rows = [dict(r, birth_date="") for r in _table(series)]
    two = read_mask(series.parent / rows[0]["mask"]).copy()  # week 4, transverse: add a small second blob
    two[2:6, 2:6] = True
    Image.fromarray(two.astype(np.uint8) * 255).save(tmp_path / "two.png")
    Image.fromarray(np.zeros_like(two, np.uint8)).save(tmp_path / "empty.png")
    rows[0] = dict(rows[0], mask=str(tmp_path / "two.png"))
    week40 = [i for i, r in enumerate(rows) if r["date"] == max(r["date"] for r in rows)]
    for i in week40:
        rows[i] = dict(rows[i], mask=str(tmp_path / "empty.png"))
    result = track(_write_table(tmp_path / "t.csv", rows, series.parent), tmp_path / "out")
    first, last = result.visits[0], result.visits[-1]
    assert "the mask holds 2 lesions: the largest is the one tracked" in first["warnings"]
    scan = next(s for s in result.scans if s["line"] == 2)
    assert scan["n_lesions"] == 2 and abs(scan["longest_diameter_mm"] - 4.6) <= PX  # not the speck
    assert last["status"] == "no lesion in the mask" and last["longest_diameter_mm"] is None
    assert all(v["age_weeks"] is None for v in result.visits)  # no birth date: the curve is against dates
    assert [v["status"] for v in result.visits][:-1] == DEFAULT_STATUSES[:-1]
    page = result.pages[0].read_text()
    assert "Treatment start not marked" not in page and "2024-02-05" in page  # the date, not a week


def test_each_patient_gets_a_page_and_a_patient_dropped_from_the_table_loses_it(series, tmp_path):
    rows = _table(series)
    other = [dict(r, patient="HEM-2024-0099", lesion="2", site="scalp") for r in rows]
    both = _write_table(tmp_path / "both.csv", rows + other, series.parent)
    result = track(both, tmp_path / "out", salt="s")
    assert len(result.pages) == 2 and len(result.curves) == 2 and len(result.visits) == 16
    keys = {patient_key(RAW_ID, "s"), patient_key("HEM-2024-0099", "s")}
    assert {v["patient_key"] for v in result.visits} == keys
    dropped = next(p for p in result.pages if p.stem == patient_key("HEM-2024-0099", "s"))
    again = track(_write_table(tmp_path / "one.csv", rows, series.parent), tmp_path / "out", salt="s")
    assert len(again.pages) == 1 and not dropped.exists()
    assert len(list((tmp_path / "out" / "curves").iterdir())) == 1


# ------------------------------------------------------------------------------------------ review


def _doubting_model(series: Path, rows: list[dict], missed: str, doubted: str):
    """A stand-in model: each scan's reference mask, except that it misses the lesion on every scan of
    the visit dated `missed` and its outline of the visit dated `doubted` is flagged; its findings are
    decided by hemaseg's rule of last resort (`inference.review.decide` with no fitted cut)."""
    from hemaseg.inference.review import decide

    class Model:
        def predict(self, gray):
            row = next(r for r in rows if np.array_equal(decode_image(series.parent / r["image"]).gray, gray))
            mask = read_mask(series.parent / row["mask"])
            if row["date"] == missed:
                mask = np.zeros_like(mask)
            confidence = 0.2 if row["date"] == doubted else 0.95
            return SimpleNamespace(mask=mask, finding=decide(confidence, bool(mask.any()), None, None))

    return Model()


def test_a_missed_visit_is_shown_and_flagged_and_a_status_on_a_doubted_outline_is_provisional(series, tmp_path):
    rows = [dict(r, mask="") for r in _table(series)]
    dates = sorted({r["date"] for r in rows})
    missed, doubted = dates[2], dates[4]
    table = _write_table(tmp_path / "t.csv", rows, series.parent)
    result = track(table, tmp_path / "out", predictor=_doubting_model(series, _table(series), missed, doubted))
    visits = {str(v["date"]): v for v in result.visits}
    assert len(visits) == len(dates)  # the missed visit is not dropped
    assert visits[missed]["needs_review"] and visits[missed]["provisional"]
    assert visits[missed]["status"] == "no lesion in the mask" and "review" in visits[missed]["status_reason"]
    assert visits[doubted]["provisional"] and visits[dates[5]]["provisional"]  # the next one compares with it
    assert not visits[dates[1]]["provisional"] and not visits[dates[1]]["needs_review"]
    scans = [s for s in result.scans if str(s["date"]) == missed]
    assert scans and all(s["finding"] == "no lesion found - review" and s["needs_review"] for s in scans)
    page = result.pages[0].read_text()
    # each empty scan has its thumbnail, captioned and marked
    assert page.count('no lesion found — review<br><span class="tag review">') == len(scans)
    assert "provisional" in page and "⚠ review" in page and "confidence 0.20" in page
    index = (tmp_path / "out" / "index.html").read_text()
    assert result.index == tmp_path / "out" / "index.html" and result.pages[0].name in index


def test_the_track_page_in_chromium_shows_the_empty_visit_and_the_provisional_status(series, tmp_path, browser):
    rows = [dict(r, mask="") for r in _table(series)]
    dates = sorted({r["date"] for r in rows})
    table = _write_table(tmp_path / "t.csv", rows, series.parent)
    result = track(table, tmp_path / "out", predictor=_doubting_model(series, _table(series), dates[2], dates[4]))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(result.pages[0].as_uri())
    flagged = page.locator("figure.flagged")
    assert flagged.count() == sum(r["date"] in (dates[2], dates[4]) for r in rows)
    empty = page.locator("figure", has_text="no lesion found — review")
    assert empty.count() == sum(r["date"] == dates[2] for r in rows)
    assert all(img.evaluate("i => i.complete && i.naturalWidth > 0") for img in empty.locator("img").all())
    assert page.locator("td.status", has_text="provisional").count() >= 2
    # the visits table fits the screen or scrolls inside its own box, its first column fixed
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    assert page.locator("table.visits td:first-child").first.evaluate("e => getComputedStyle(e).position") == "sticky"
    page.goto((tmp_path / "out" / "index.html").as_uri())
    assert page.locator("td.status", has_text="provisional").count() >= 0 and page.locator("a").count() == 1
    page.close()
