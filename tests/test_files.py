import csv
from pathlib import Path
import errno

import numpy as np
import pytest
from PIL import Image

import hemaseg
from hemaseg.data.listing import collect_inputs
from hemaseg.inference.files import predict_files


def _scans(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (h, w) in sizes.items():
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_files_writes_masks_overlays_and_measurements(tiny_run, tmp_path):
    sizes = {"a": (45, 77), "b": (90, 31)}
    src = _scans(tmp_path / "in", sizes)
    model = hemaseg.load_model(tiny_run)
    result = predict_files(model, [src], tmp_path / "out", save_prob=True, progress=False)
    assert [r["image"].endswith(f"{n}.png") for r, n in zip(result.rows, "ab")] == [True, True]
    for name, (h, w) in sizes.items():
        mask = np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert np.asarray(Image.open(tmp_path / "out" / f"{name}_overlay.png")).shape == (h, w, 3)
        assert np.asarray(Image.open(tmp_path / "out" / f"{name}_prob.png")).shape == (h, w)
    assert (tmp_path / "out" / "predictions.csv").read_text().startswith("image,width,height,lesion_area_px")
    assert not (tmp_path / "out" / "errors.csv").exists()


def test_a_bad_scan_is_listed_in_errors_csv_and_the_others_are_segmented(tiny_run, tmp_path):
    src = _scans(tmp_path / "in", {str(i): (40, 40) for i in range(1, 13)})
    good = (src / "1.png").read_bytes()
    (src / "13.png").write_bytes(good[: len(good) // 2])  # truncated
    model = hemaseg.load_model(tiny_run)
    result = predict_files(model, [src], tmp_path / "out", progress=False)
    assert len(result.rows) == 12 and len(result.errors) == 1
    rows, errors = _rows(tmp_path / "out" / "predictions.csv"), _rows(tmp_path / "out" / "errors.csv")
    assert [r["image"] for r in rows] == [str(src / f"{i}.png") for i in range(1, 13)]
    assert errors[0]["image"] == str(src / "13.png") and errors[0]["code"] == "corrupt"
    written = sorted(p.name for p in (tmp_path / "out").glob("*_mask.png"))
    assert written == sorted(f"{i}_mask.png" for i in range(1, 13))  # predictions.csv describes exactly these
    with pytest.raises(hemaseg.data.images.DataError, match="13.png"):
        predict_files(model, [src], tmp_path / "out2", progress=False, fail_fast=True)


def test_a_failed_write_leaves_no_half_outputs_and_the_csv_lists_what_was_written(tiny_run, tmp_path, monkeypatch):
    import hemaseg.inference.files as files

    src = _scans(tmp_path / "in", {"a": (30, 30), "b": (30, 30), "c": (30, 30)})
    real = files.atomic_write_bytes

    def full_disk(path, data, fsync=True):
        if path.name == "b_overlay.png":  # b's mask is already written when its overlay fails
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, fsync)

    monkeypatch.setattr(files, "atomic_write_bytes", full_disk)
    with pytest.raises(OSError, match="No space"):
        predict_files(hemaseg.load_model(tiny_run), [src], tmp_path / "out", progress=False)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["a_mask.png", "a_overlay.png", "lesions.csv", "manifest.jsonl", "predictions.csv"]
    assert [r["image"] for r in _rows(tmp_path / "out" / "predictions.csv")] == [str(src / "a.png")]


def test_inputs_are_deduplicated_and_name_clashes_refused(tmp_path):
    (tmp_path / "x").mkdir(); (tmp_path / "y").mkdir()
    for d in ("x", "y"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / d / "1.png")
    assert len(collect_inputs([tmp_path / "x", tmp_path / "x" / "1.png"])) == 1
    with pytest.raises(ValueError, match="same name"):
        collect_inputs([tmp_path / "x", tmp_path / "y"])
    with pytest.raises(FileNotFoundError, match="nope"):
        collect_inputs([tmp_path / "nope"])


def test_a_missing_input_creates_no_output_folder(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        predict_files(hemaseg.load_model(tiny_run), [tmp_path / "nope.png"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _interrupt_at(monkeypatch, name):
    """Ctrl-C when the output `name` is about to be written (the scans before it are done)."""
    import hemaseg.inference.files as files

    real = files.atomic_write_bytes

    def write(path, data, fsync=True):
        if path.name == name:
            raise KeyboardInterrupt
        return real(path, data, fsync)

    monkeypatch.setattr(files, "atomic_write_bytes", write)


def test_skip_existing_resumes_an_interrupted_job_and_the_tables_list_every_scan(tiny_run, tmp_path, monkeypatch):
    import json

    src = _scans(tmp_path / "in", {str(i): (30, 30) for i in range(1, 6)})
    model, out = hemaseg.load_model(tiny_run), tmp_path / "out"
    _interrupt_at(monkeypatch, "3_mask.png")
    with pytest.raises(KeyboardInterrupt):
        predict_files(model, [src], out, progress=False, batch_size=2)
    monkeypatch.undo()
    assert [r["image"] for r in _rows(out / "predictions.csv")] == [str(src / f"{i}.png") for i in (1, 2)]
    (out / "2_overlay.png").unlink()  # an output gone since: that scan is done again
    written = []
    import hemaseg.inference.files as files

    real = files.atomic_write_bytes
    monkeypatch.setattr(files, "atomic_write_bytes", lambda p, d, fsync=True: written.append(p.name) or real(p, d, fsync))
    result = predict_files(model, [src], out, progress=False, batch_size=2, skip_existing=True)
    assert result.skipped == 1 and sorted(n for n in written if n.endswith("_mask.png")) == [
        "2_mask.png", "3_mask.png", "4_mask.png", "5_mask.png"]
    assert [r["image"] for r in _rows(out / "predictions.csv")] == [str(src / f"{i}.png") for i in range(1, 6)]
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert lines[0]["settings"]["weights"] and [e["input"] for e in lines[1:]] == [str(src / f"{i}.png")
                                                                                 for i in range(1, 6)]
    assert all(e["status"] == "done" and f"{Path(e['input']).stem}_mask.png" in e["outputs"] for e in lines[1:])
    assert not list(out.glob("manifest.part*"))


def test_skip_existing_refuses_other_settings_and_retries_failed_scans(tiny_run, tmp_path):
    from hemaseg.inference.manifest import ManifestError

    src = _scans(tmp_path / "in", {"a": (30, 30), "b": (30, 30)})
    (src / "c.png").write_bytes((src / "a.png").read_bytes()[:50])  # truncated
    model, out = hemaseg.load_model(tiny_run), tmp_path / "out"
    first = predict_files(model, [src], out, progress=False)
    assert len(first.rows) == 2 and len(first.errors) == 1
    with pytest.raises(ManifestError, match="threshold"):
        predict_files(model, [src], out, progress=False, threshold=0.9, skip_existing=True)
    (src / "c.png").write_bytes((src / "a.png").read_bytes())  # mended
    again = predict_files(model, [src], out, progress=False, skip_existing=True)
    assert again.skipped == 2 and len(again.rows) == 3 and not again.errors and not (out / "errors.csv").exists()


def test_a_killed_jobs_manifest_part_is_read_up_to_its_last_whole_line(tiny_run, tmp_path):
    from hemaseg.inference.manifest import Manifest

    src = _scans(tmp_path / "in", {"a": (30, 30), "b": (30, 30)})
    model, out = hemaseg.load_model(tiny_run), tmp_path / "out"
    predict_files(model, [src], out, progress=False)
    text = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join(text[:2]) + "\n")  # header + a
    (out / "manifest.part1.jsonl").write_text(text[2][: len(text[2]) // 2])  # b's line cut by a kill
    assert set(Manifest.read(out).done(out)) == {str(src / "a.png")}
    result = predict_files(model, [src], out, progress=False, skip_existing=True)
    assert result.skipped == 1 and len(result.rows) == 2
