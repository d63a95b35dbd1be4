"""Annotation formats (hemaseg.data.formats) and `convert` (hemaseg.data.convert) on tiny synthetic data:
the rasterisation convention by hand, exact round trips, every malformed-file problem named by `check`,
and the predict -> correct in LabelMe -> train loop."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from hemaseg.data.convert import convert, read_folds
from hemaseg.data.dataset import (
    check_dataset,
    dataset_fingerprint,
    find_samples,
    kfold_split,
    load_dataset,
    load_sample,
)
from hemaseg.data.formats import (
    SUSPECT,
    UNREVIEWED_FLAG,
    detect_format,
    fill_polygon,
    labelme_document,
    lesion_outlines,
    self_intersects,
    simplify_outline,
)
from hemaseg.data.images import DataError
from hemaseg.lesions import label_lesions
from tests.conftest import tiny_config


def _scan(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _masks() -> dict[str, np.ndarray]:
    """Masks that stress a round trip: two lesions, none, a ring with a hole on the border, tiny specks."""
    yy, xx = np.mgrid[0:20, 0:28]
    two = ((xx - 8) ** 2 + (yy - 9) ** 2 <= 20) | ((xx >= 18) & (xx < 25) & (yy >= 3) & (yy < 8))
    ring = ((xx - 4) ** 2 + (yy - 10) ** 2 <= 30) & ((xx - 4) ** 2 + (yy - 10) ** 2 > 4)
    specks = np.zeros((20, 28), bool)
    specks[2, 3] = specks[10, 10] = specks[11, 11] = specks[15, 20] = specks[15, 21] = True
    return {"a": two, "b": np.zeros((20, 28), bool), "c10": ring, "c2": specks}


def _folder(root: Path, masks: dict[str, np.ndarray]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "mask").mkdir()
    for i, (name, m) in enumerate(masks.items()):
        Image.fromarray(_scan(*m.shape, seed=i)).save(root / "images" / f"{name}.png")
        Image.fromarray(m.astype(np.uint8) * 255).save(root / "mask" / f"{name}.png")
    return root


def _read(root, **kw) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {s.name: load_sample(s) for s in find_samples(root, **kw)}


def _labelme(path: Path, image: str, shapes: list[dict], h: int = 20, w: int = 28) -> Path:
    doc = {"version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image, "imageData": None,
           "imageHeight": h, "imageWidth": w}
    path.write_text(json.dumps(doc))
    return path


def _shape(label: str, points, kind: str = "polygon") -> dict:
    return {"label": label, "points": points, "group_id": None, "shape_type": kind, "flags": {}}


def _problems(report) -> list[str]:
    return [str(p) for p in report.problems]


# --------------------------------------------------------------------------------------------- rasterising


def test_pixel_centres_inside_or_on_the_outline_are_lesion():
    # pixel i covers [i, i+1): corners on the pixel grid cover exactly the pixels between them
    box = fill_polygon(np.array([[1, 1], [4, 1], [4, 3], [1, 3]], float), (5, 6))
    assert np.argwhere(box).tolist() == [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]
    # an outline through pixel centres includes them: the triangle (0.5,0.5) (3.5,0.5) (0.5,3.5)
    tri = fill_polygon(np.array([[0.5, 0.5], [3.5, 0.5], [0.5, 3.5]]), (5, 5))
    expected = np.zeros((5, 5), bool)
    for j in range(4):
        expected[j, : 4 - j] = True
    assert np.array_equal(tri, expected)
    # clipped at the image edge, and a bow tie filled by the even-odd rule
    assert fill_polygon(np.array([[-5, -5], [2, -5], [2, 2], [-5, 2]], float), (4, 4)).sum() == 4
    bow = np.array([[0, 0], [4, 4], [4, 0], [0, 4]], float)
    assert self_intersects(bow) and not self_intersects(np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float))


def test_outlines_at_tolerance_zero_read_back_exactly_with_holes_filled():
    rng = np.random.default_rng(0)
    for t in range(60):
        h, w = rng.integers(3, 18, 2)
        m = rng.random((h, w)) < rng.uniform(0.2, 0.7)
        if t % 2:
            m = ndimage.binary_opening(m) | (rng.random((h, w)) < 0.05)
        back = np.zeros_like(m)
        for outline in lesion_outlines(m, 0.0):
            assert len(outline) >= 3
            back |= fill_polygon(np.array(outline), m.shape)
        labels, n = label_lesions(m)
        filled = np.zeros_like(m)
        for k in range(1, n + 1):
            filled |= ndimage.binary_fill_holes(labels == k)
        assert np.array_equal(back, filled), t


def test_simplified_outlines_stay_within_the_tolerance():
    yy, xx = np.mgrid[0:80, 0:90]
    m = ((xx - 45) / 30.0) ** 2 + ((yy - 40) / 20.0) ** 2 <= 1
    near = ndimage.distance_transform_edt(~(m ^ ndimage.binary_erosion(m)))  # px to the nearest border pixel
    for tol in (0.5, 1.0, 2.0):
        (outline,) = lesion_outlines(m, tol)
        back = fill_polygon(np.array(outline), m.shape)
        assert not self_intersects(np.array(outline))
        assert near[back ^ m].max(initial=0) <= tol + 0.5
    assert len(lesion_outlines(m, 1.0)[0]) < len(lesion_outlines(m, 0.0)[0]) / 3
    # a spur that runs out and back is kept; collinear points go at tolerance 0
    assert simplify_outline([(0, 0), (1, 0), (2, 0), (2, 1), (2, 2), (0, 2)], 0) == [(0, 0), (2, 0), (2, 2), (0, 2)]


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["nnunet", "coco", "cvat"])
def test_round_trip_through_a_format_gives_identical_masks(tmp_path, fmt):
    masks = _masks()
    src = _folder(tmp_path / "src", masks)
    (src / "manifest.csv").write_text("name,patient\na,p1\nb,p1\nc10,p2\nc2,p3\n")
    mid = tmp_path / ("Dataset001_Test" if fmt == "nnunet" else fmt)
    result = convert(src, fmt, mid)
    assert result.n_cases == 4 and result.n_lesions == 2 + 1 + 3  # specks: one alone, a diagonal pair, a side-by-side pair
    assert detect_format(mid).format == fmt
    direct, original = _read(mid), _read(src)
    back = tmp_path / "back"
    convert(mid, "folder", back)
    again = _read(back)
    for name, m in masks.items():
        assert np.array_equal(direct[name][1], m), name
        assert np.array_equal(again[name][1], m), name
        assert np.array_equal(direct[name][0], original[name][0]), name
        assert np.array_equal(np.asarray(Image.open(back / "images" / f"{name}.png")),
                              np.asarray(Image.open(src / "images" / f"{name}.png")))  # the scans' pixels too
    assert (back / "manifest.csv").read_text() == (src / "manifest.csv").read_text()  # groups travel
    assert check_dataset(mid).ok


def test_nnunet_output_is_what_nnunet_expects_and_folds_become_splits_final(tmp_path):
    src = _folder(tmp_path / "src", _masks())
    names = [s.name for s in find_samples(src)]
    folds = kfold_split(names, 2, seed=0)
    (tmp_path / "folds.json").write_text(json.dumps({"n_folds": 2, "seed": 0, "grouped": False, "folds": folds}))
    out = tmp_path / "Dataset501_Lesions"
    result = convert(src, "nnunet", out, folds=tmp_path / "folds.json")
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "ultrasound"} and spec["labels"] == {"background": 0, "lesion": 1}
    assert spec["numTraining"] == 4 and spec["file_ending"] == ".png"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == sorted(f"{n}_0000.png" for n in names)
    label = np.asarray(Image.open(out / "labelsTr" / "a.png"))
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
    assert result.splits == out / "splits_final.json"
    assert json.loads(result.splits.read_text()) == folds == read_folds(tmp_path / "folds.json")
    (tmp_path / "other.json").write_text(json.dumps({"train": ["a", "zz"], "val": ["b"]}))
    with pytest.raises(DataError, match=r"other\.json: names 1 scan\(s\) not in the dataset, e.g. 'zz'"):
        convert(src, "nnunet", tmp_path / "Dataset502_X", folds=tmp_path / "other.json")
    assert not (tmp_path / "Dataset502_X").exists()


def test_convert_refuses_a_full_output_and_replaces_it_whole_with_overwrite(tmp_path):
    src = _folder(tmp_path / "src", _masks())
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(DataError, match="not empty; pass --overwrite"):
        convert(src, "coco", out)
    convert(src, "coco", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["annotations.json", "images"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    with pytest.raises(ValueError, match="outside DATA"):
        convert(src, "folder", src / "inside")


def test_labelme_written_from_masks_reads_back_within_the_tolerance(tmp_path):
    masks = _masks()
    src = _folder(tmp_path / "src", masks)
    exact, rough = tmp_path / "exact", tmp_path / "rough"
    convert(src, "labelme", exact, tolerance=0.0)
    convert(src, "labelme", rough, tolerance=1.0)
    assert (exact / "labels.txt").read_text().splitlines() == ["__ignore__", "_background_", "lesion"]
    doc = json.loads((exact / "a.json").read_text())
    assert doc["imagePath"] == "a.png" and doc["imageData"] is None and (doc["imageHeight"], doc["imageWidth"]) == (20, 28)
    assert {s["shape_type"] for s in doc["shapes"]} == {"polygon"} and len(doc["shapes"]) == 2
    read = _read(exact)
    for name, m in masks.items():
        labels, n = label_lesions(m)
        filled = np.zeros_like(m)
        for k in range(1, n + 1):
            filled |= ndimage.binary_fill_holes(labels == k)
        assert np.array_equal(read[name][1], filled), name  # polygons have no holes; otherwise exact
        assert (_read(rough)[name][1] ^ filled).sum() <= max(4, filled.sum() // 4)
    assert check_dataset(exact).ok


# --------------------------------------------------------------------------------------------- nnU-Net


def _nnunet(root: Path, labels: dict, cases: dict[str, np.ndarray], channels=None, rgb=False, **spec) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, (name, label) in enumerate(cases.items()):
        scan = _scan(*label.shape, seed=i)
        Image.fromarray(np.dstack([scan] * 3) if rgb else scan).save(root / "imagesTr" / f"{name}_0000.png")
        Image.fromarray(label.astype(np.uint8)).save(root / "labelsTr" / f"{name}.png")
    doc = {"channel_names": channels or {"0": "US"}, "labels": labels, "numTraining": len(cases), "file_ending": ".png",
           **spec}
    (root / "dataset.json").write_text(json.dumps(doc))
    return root


def test_nnunet_labels_default_to_all_foreground_merged_and_label_picks_one(tmp_path):
    lab = np.zeros((6, 8), np.uint8)
    lab[1:3, 1:3], lab[4:6, 5:8] = 1, 2
    root = _nnunet(tmp_path / "Dataset007_Two", {"background": 0, "lesion": 1, "cyst": 2}, {"x": lab})
    (root / "imagesTs").mkdir()
    Image.fromarray(_scan(6, 8, 9)).save(root / "imagesTs" / "t_0000.png")
    assert np.array_equal(_read(root)["x"][1], lab > 0)
    assert np.array_equal(_read(root, labels=["cyst"])["x"][1], lab == 2)
    report = check_dataset(root)
    text = report.format()
    assert report.ok and "format nnunet" in text and "labels lesion, cyst are all counted as lesion" in text
    assert "imagesTs/: 1 test case(s)" in text and report.label_counts == {"cyst": 1, "lesion": 1}
    with pytest.raises(DataError, match=r"dataset\.json: --label tumour: no such label \(labels: lesion, cyst\)"):
        find_samples(root, labels=["tumour"])


def test_nnunet_problems_are_named_one_line_each(tmp_path):
    lab = np.zeros((6, 8), np.uint8)
    lab[1, 1] = 3  # not in dataset.json
    root = _nnunet(tmp_path / "d", {"background": 0, "lesion": 1}, {"x": lab, "y": lab * 0}, numTraining=5)
    (root / "imagesTr" / "z_0000.png").write_bytes((root / "imagesTr" / "x_0000.png").read_bytes())  # no label
    lines = _problems(check_dataset(root))
    assert f"{root / 'labelsTr' / 'x.png'}: unknown label value(s) 3 (dataset.json labels have 0, 1)" in lines
    assert f"{root / 'imagesTr' / 'z_0000.png'}: image without label (no labelsTr/z.png)" in lines
    assert any(line.startswith(f"{root / 'dataset.json'}: numTraining is 5 but labelsTr/ holds 2") for line in lines)
    (root / "imagesTr" / "z_0000.png").unlink()
    with pytest.raises(DataError, match=r"x\.png: unknown label value"):  # the numTraining one is only reported
        load_dataset(root)


def test_nnunet_multichannel_is_refused_unless_one_rgb_file(tmp_path):
    lab = np.zeros((6, 8), np.uint8)
    two = _nnunet(tmp_path / "two", {"background": 0, "lesion": 1}, {"x": lab}, channels={"0": "B", "1": "Doppler"})
    Image.fromarray(_scan(6, 8, 1)).save(two / "imagesTr" / "x_0001.png")
    with pytest.raises(DataError, match=r"dataset\.json: 2 channels per case \(B, Doppler\); hemaseg segments "
                                        "one-channel scans, or one RGB CASE_0000.png"):
        find_samples(two)
    rgb = _nnunet(tmp_path / "rgb", {"background": 0, "lesion": 1}, {"x": lab}, channels={"0": "R", "1": "G", "2": "B"},
                  rgb=True)
    image, _ = _read(rgb)["x"]
    assert np.allclose(image, _scan(6, 8, 0) / 255)  # gray R = G = B: its luminance is itself
    assert "read as luminance gray" in check_dataset(rgb).format()
    nifti = _nnunet(tmp_path / "nii", {"background": 0, "lesion": 1}, {}, file_ending=".nii.gz")
    with pytest.raises(DataError, match=r"file_ending '\.nii\.gz': hemaseg reads 2-D images"):
        find_samples(nifti)


# --------------------------------------------------------------------------------------------- LabelMe


def _labelme_set(root: Path) -> Path:
    root.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(_scan(20, 28, 0)).save(root / f"{name}.png")
    _labelme(root / "a.json", "a.png", [_shape("lesion", [[2, 2], [8, 2], [8, 6], [2, 6]]),
                                         _shape("lesion", [[20, 10], [24, 14]], "rectangle"),
                                         _shape("artefact", [[0, 0], [28, 20]], "rectangle")])
    _labelme(root / "b.json", "b.png", [_shape("lesion", [[10.5, 10.5], [13.5, 10.5]], "circle")])
    _labelme(root / "c.json", "c.png", [])  # annotated, no lesion: an empty mask
    return root


def test_labelme_shapes_are_rasterised_and_label_picks_which_count(tmp_path):
    root = _labelme_set(tmp_path / "lm")
    read = _read(root, labels=["lesion"])
    expected = np.zeros((20, 28), bool)
    expected[2:6, 2:8] = expected[10:14, 20:24] = True
    assert np.array_equal(read["a"][1], expected)
    yy, xx = np.mgrid[0:20, 0:28] + 0.5
    assert np.array_equal(read["b"][1], (xx - 10.5) ** 2 + (yy - 10.5) ** 2 <= 9)
    assert not read["c"][1].any()
    assert _read(root)["a"][1].all()  # default: every label merged, the full-image "artefact" included
    report = check_dataset(root, labels=["lesion"])
    assert report.ok and report.label_counts == {"lesion": 3, "artefact": 1} and report.n_empty_masks == 1
    assert "labels (shapes): lesion 3, artefact 1; counted as lesion: lesion" in report.format()


def test_labelme_files_apart_from_their_images_and_other_json_files(tmp_path):
    root = tmp_path / "lm"
    (root / "images").mkdir(parents=True)
    Image.fromarray(_scan(20, 28, 0)).save(root / "images" / "a.png")
    Image.fromarray(_scan(20, 28, 0)).save(root / "images" / "b.png")
    _labelme(root / "a.json", "../images/a.png", [_shape("lesion", [[2, 2], [8, 2], [8, 6], [2, 6]])])  # labelme -O
    _labelme(root / "b.json", "C:\\scans\\b.png", [])  # written on another computer: found by its name
    (root / "splits.json").write_text(json.dumps({"train": ["a"], "val": ["b"]}))
    report = check_dataset(root)
    assert report.ok and report.n_pairs == 2 and "not LabelMe files, ignored: splits.json" in report.format()
    assert _read(root)["a"][1][2:6, 2:8].all()
    folder = _folder(tmp_path / "f", _masks())
    (folder / "splits.json").write_text("{}")  # beside images/ + mask/: still the folder layout
    assert detect_format(folder).format == "folder"


def test_check_names_every_problem_in_malformed_labelme_files(tmp_path):
    root = tmp_path / "lm"
    root.mkdir()
    for name in ("ok", "trunc", "few", "open", "cross", "out", "size", "lonely"):
        Image.fromarray(_scan(20, 28, 0)).save(root / f"{name}.png")
    _labelme(root / "ok.json", "ok.png", [_shape("lesion", [[2, 2], [8, 2], [8, 6]])])
    text = json.dumps({"shapes": [_shape("lesion", [[1, 1], [5, 1], [5, 5]])], "imagePath": "trunc.png"})
    (root / "trunc.json").write_text(text[: len(text) // 2])
    _labelme(root / "gone.json", "gone.png", [])
    _labelme(root / "few.json", "few.png", [_shape("lesion", [[1, 1], [5, 1]])])
    _labelme(root / "open.json", "open.png", [_shape("lesion", [[1, 1], [5, 1], [5, 5]], "linestrip")])
    _labelme(root / "cross.json", "cross.png", [_shape("lesion", [[0, 0], [8, 8], [8, 0], [0, 8]])])
    _labelme(root / "out.json", "out.png", [_shape("lesion", [[20, 10], [40, 10], [40, 18]])])
    _labelme(root / "size.json", "size.png", [], h=10, w=10)
    report = check_dataset(root, labels=["lesion", "cyst"])
    lines = _problems(report)

    def line(name, text):
        hits = [x for x in lines if x.startswith(f"{root / name}: ") and text in x]
        assert len(hits) == 1, (name, text, lines)
        return hits[0]

    assert "not valid JSON" in line("trunc.json", "the file is damaged or incomplete")
    line("gone.json", "image 'gone.png' (imagePath, relative to this file) does not exist")
    line("few.json", "shape 1 (lesion, polygon): polygon with 2 point(s); a polygon needs at least 3")
    line("open.json", "shape 1 (lesion, linestrip): an open line cannot be a lesion outline")
    line("cross.json", "the polygon crosses itself")
    line("out.json", "reaches outside the 28x20 image")
    line("size.json", "imageWidth x imageHeight 10x10 does not match the image (28x20)")
    line("lonely.png", "image without annotation")
    line("trunc.png", "image without annotation")
    assert f"{root}: --label cyst: no such label (labels: lesion)" in lines
    assert len(lines) == 10 and not report.ok
    assert all(f"ERROR {x}" in report.format() for x in lines)
    suspect = {p.path.name for p in report.problems if p.code == SUSPECT}
    assert suspect == {"cross.json", "out.json"}  # reported, but training reads them as drawn
    for name in ("trunc", "gone", "few", "open", "size", "lonely"):
        for f in root.glob(f"{name}.*"):
            f.unlink()
    data = load_dataset(root, labels=["lesion"])
    masks = {sample.name: load_sample(sample)[1] for sample in data.samples}
    assert sorted(data.shapes) == sorted(masks) == ["cross", "ok", "out"] and masks["out"][10:18, 20:].any()


# --------------------------------------------------------------------------------------------- CVAT


def _cvat(root: Path, body: str, labels=("lesion", "cyst")) -> Path:
    (root / "images").mkdir(parents=True)
    for name in ("1", "2"):
        Image.fromarray(_scan(10, 12, 0)).save(root / "images" / f"{name}.png")
    meta = "".join(f"<label><name>{n}</name></label>" for n in labels)
    xml = (f'<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version><meta><task><labels>{meta}'
           f"</labels></task></meta>{body}</annotations>")
    (root / "annotations.xml").write_text(xml)
    return root


def test_cvat_polygons_boxes_ellipses_and_masks(tmp_path):
    body = ('<image id="0" name="1.png" width="12" height="10">'
            '<polygon label="lesion" points="1.00,1.00;4.00,1.00;4.00,3.00;1.00,3.00" occluded="0"/>'
            '<box label="cyst" xtl="6" ytl="6" xbr="9" ybr="8" occluded="0"/>'
            '<mask label="lesion" rle="1, 2, 1, 2" left="8" top="1" width="3" height="2" occluded="0"/></image>'
            '<image id="1" name="2.png" width="12" height="10">'
            '<ellipse label="lesion" cx="6" cy="5" rx="2" ry="1" occluded="0"/></image>')
    root = _cvat(tmp_path / "cvat", body)
    one = np.zeros((10, 12), bool)
    one[1:3, 1:4] = True
    one[1:3, 9:11] = True  # rle 1, 2, 1, 2 row by row over the 3x2 box at x 8, y 1: 0 1 1 / 0 1 1
    box = np.zeros((10, 12), bool)
    box[6:8, 6:9] = True
    yy, xx = np.mgrid[0:10, 0:12] + 0.5
    read = _read(root, labels=["lesion"])
    assert np.array_equal(read["1"][1], one)
    assert np.array_equal(_read(root)["1"][1], one | box)
    assert np.array_equal(read["2"][1], ((xx - 6) / 2) ** 2 + (yy - 5) ** 2 <= 1)
    assert read["2"][1].sum() == 8
    assert check_dataset(root).ok
    assert detect_format(root / "annotations.xml").format == "cvat"


def test_check_names_problems_in_cvat_files(tmp_path):
    body = ('<image id="0" name="1.png" width="12" height="10">'
            '<polygon label="lesion" points="1,1;4,1" occluded="0"/>'
            '<polyline label="lesion" points="1,1;4,1;4,4" occluded="0"/>'
            '<polygon label="tumor" points="1,1;4,1;4,4" occluded="0"/></image>'
            '<image id="1" name="9.png" width="12" height="10"></image>')
    root = _cvat(tmp_path / "cvat", body)
    xml = root / "annotations.xml"
    lines = _problems(check_dataset(root))
    assert f"{xml}: image 1.png: polygon 1 (lesion): polygon with 2 point(s); a polygon needs at least 3" in lines
    assert any(x.startswith(f"{xml}: image 1.png: polyline 1 (lesion): an open line") for x in lines)
    assert f"{xml}: image 1.png: polygon 2 (tumor): unknown label 'tumor' (labels declared in <meta>: lesion, cyst)" \
        in lines
    assert any(x.startswith(f"{xml}: image 9.png (id 1): the image file does not exist") for x in lines)
    assert f"{root / 'images' / '2.png'}: image without annotation (annotations.xml does not list it)" in lines
    xml.write_text(xml.read_text()[:150])
    (line,) = _problems(check_dataset(root))[:1]
    assert line.startswith(f"{xml}: not valid XML (") and line.endswith("the file is damaged or incomplete")


# --------------------------------------------------------------------------------------------- COCO


def _coco(root: Path, annotations: list[dict], images=None, cats=None, where="annotations.json") -> Path:
    (root / "images").mkdir(parents=True)
    for name in ("1", "2"):
        Image.fromarray(_scan(10, 12, 0)).save(root / "images" / f"{name}.png")
    doc = {"images": images or [{"id": 1, "file_name": "1.png", "width": 12, "height": 10},
                                {"id": 2, "file_name": "2.png", "width": 12, "height": 10}],
           "annotations": annotations, "categories": cats or [{"id": 1, "name": "lesion"}, {"id": 2, "name": "cyst"}]}
    (root / where).parent.mkdir(exist_ok=True)
    (root / where).write_text(json.dumps(doc))
    return root


def test_coco_polygons_and_both_kinds_of_rle(tmp_path):
    crowd = np.zeros((10, 12), bool)
    crowd[5:8, 2:4] = True
    runs = [2 * 10 + 5, 3, 7, 3, 10 * 12 - 38]  # column-major (COCO's order): columns 2 and 3, rows 5-7
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "segmentation": {"size": [10, 12], "counts": runs},
             "iscrowd": 1}]
    root = _coco(tmp_path / "coco", anns, where="annotations/instances.json")
    poly = np.zeros((10, 12), bool)
    poly[1:4, 1:5] = True
    read = _read(root)
    assert np.array_equal(read["1"][1], poly | crowd) and not read["2"][1].any()
    assert np.array_equal(_read(root, labels=["cyst"])["1"][1], crowd)
    report = check_dataset(root)
    assert report.ok and report.n_empty_masks == 1 and report.format_name == "coco"


def test_check_names_problems_in_coco_files(tmp_path):
    anns = [{"id": 7, "image_id": 1, "category_id": 9, "segmentation": [[1, 1, 5, 1, 5, 4]]},
            {"id": 8, "image_id": 2, "category_id": 1, "segmentation": [[1, 1, 5, 1]]}]
    images = [{"id": 1, "file_name": "1.png", "width": 12, "height": 10},
              {"id": 2, "file_name": "2.png", "width": 12, "height": 10},
              {"id": 3, "file_name": "3.png", "width": 12, "height": 10}]
    root = _coco(tmp_path / "coco", anns, images)
    f = root / "annotations.json"
    lines = _problems(check_dataset(root))
    assert f"{f}: image 1.png (id 1): annotation 7: unknown label: category_id 9 is not in categories (1 lesion, " \
           "2 cyst)" in lines
    assert f"{f}: image 2.png (id 2): annotation 8 (lesion): polygon with 2 point(s); a polygon needs at least 3" in lines
    assert any(x.startswith(f"{f}: image 3.png (id 3): the image file does not exist") for x in lines)
    f.write_text(f.read_text()[:-20])
    with pytest.raises(DataError, match=r"annotations\.json: not valid JSON .*damaged or incomplete"):
        find_samples(f)


# --------------------------------------------------------------------------------------------- detection


def test_a_folder_matching_two_formats_is_refused_naming_both(tmp_path):
    root = _folder(tmp_path / "d", _masks())
    _labelme(root / "images" / "a.json", "a.png", [])
    with pytest.raises(DataError, match=r"matches more than one dataset format: folder \(images/ \+ mask/\); "
                                        r"labelme \(JSON files in images/\)"):
        find_samples(root)
    with pytest.raises(DataError, match="--label picks labels"):
        find_samples(_folder(tmp_path / "e", _masks()), labels=["lesion"])
    with pytest.raises(DataError, match="no mask/ or masks/ folder"):  # neither: the folder layout's own message
        (tmp_path / "f" / "images").mkdir(parents=True)
        find_samples(tmp_path / "f")


def test_the_fingerprint_follows_the_annotation_bytes_and_the_labels(tmp_path):
    root = _labelme_set(tmp_path / "lm")
    first = load_dataset(root).fingerprint
    assert first == dataset_fingerprint(find_samples(root))
    assert load_dataset(root, labels=["lesion"]).fingerprint != first
    doc = json.loads((root / "b.json").read_text())
    doc["shapes"][0]["points"][1][0] += 1
    (root / "b.json").write_text(json.dumps(doc))
    assert load_dataset(root).fingerprint != first
    coco = tmp_path / "coco"
    convert(_folder(tmp_path / "src", _masks()), "coco", coco)
    assert load_dataset(coco).fingerprint == dataset_fingerprint(find_samples(coco))


# --------------------------------------------------------------------------------------------- the loop


def test_predict_to_labelme_correct_by_hand_then_train_on_the_corrections(tiny_run, tmp_path):
    """The clinician's loop: predict writes LabelMe JSON beside each scan, the outlines are corrected (here:
    moved onto the true lesion), and training reads the corrected JSON as masks."""
    import hemaseg
    from hemaseg.data.synth import write_synthetic_dataset
    from hemaseg.inference.files import predict_files
    from hemaseg.training.train import fit

    synth = write_synthetic_dataset(tmp_path / "synth", 8, size=64, seed=5, progress=False)
    scans = tmp_path / "scans"
    scans.mkdir()
    truth = {}
    for s in find_samples(synth):
        (scans / s.image_path.name).write_bytes(s.image_path.read_bytes())
        truth[s.name] = load_sample(s)[1]
    model = hemaseg.load_model(tiny_run)
    result = predict_files(model, [scans], tmp_path / "out", progress=False, labelme_tolerance=1.0, threshold=0.05)
    assert sorted(p.name for p in result.labelme) == sorted(f"{n}.json" for n in truth)
    for name, mask in truth.items():
        path = scans / f"{name}.json"
        doc = json.loads(path.read_text())
        assert doc["imageData"] is None and doc["imagePath"] == f"{name}.png"
        assert doc["flags"] == {UNREVIEWED_FLAG: True}  # a proposal until someone unticks it
        assert all(s["shape_type"] == "polygon" and len(s["points"]) >= 3 for s in doc["shapes"])
        # the correction: the predicted outlines are replaced by the lesions' own, dragged to LabelMe's floats
        doc["shapes"] = labelme_document(mask, f"{name}.png", 1.0)["shapes"]
        for shape in doc["shapes"]:
            shape["points"] = [[x + 0.01, y - 0.01] for x, y in shape["points"]]
        path.write_text(json.dumps(doc, indent=2))
    again = predict_files(model, [scans], tmp_path / "out", progress=False, labelme_tolerance=1.0)
    assert len(again.labelme_kept) == len(truth) and not again.labelme  # corrections are never overwritten
    assert check_dataset(scans).n_unreviewed == len(truth)  # corrected, but nobody unticked the flag yet
    for name in sorted(truth)[:3]:  # reviewed: the flag unticked in LabelMe, then saved
        doc = json.loads((scans / f"{name}.json").read_text())
        doc["flags"][UNREVIEWED_FLAG] = False
        (scans / f"{name}.json").write_text(json.dumps(doc, indent=2))
    data = load_dataset(scans)
    assert data.n_unreviewed == len(truth) - 3
    read = {sample.name: load_sample(sample)[1] for sample in data.samples}
    for name, mask in truth.items():
        both = (read[name] & mask).sum() / max(1, (read[name] | mask).sum())
        assert both > 0.8 or not mask.any(), name
    summary = fit(tiny_config(scans, epochs=1), tmp_path / "run", progress=False)
    assert summary["epochs"] == 1
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["meta"]["data_fingerprint"] == data.fingerprint


def test_unreviewed_proposals_are_flagged_counted_by_check_and_train_and_unticking_clears_them(tmp_path, caplog):
    root = tmp_path / "lm"
    root.mkdir()
    masks = _masks()
    for i, (name, mask) in enumerate(masks.items()):
        Image.fromarray(_scan(*mask.shape, seed=i)).save(root / f"{name}.png")
        doc = labelme_document(mask, f"{name}.png", 1.0, proposal=name != "a", model="runs/a")
        (root / f"{name}.json").write_text(json.dumps(doc))
    doc = json.loads((root / "c10.json").read_text())
    assert doc["flags"] == {UNREVIEWED_FLAG: True}
    assert doc["shapes"] and all(s["description"] == "hemaseg proposal (runs/a)" for s in doc["shapes"])
    assert json.loads((root / "a.json").read_text())["flags"] == {}  # drawn from a mask: nothing to review
    report = check_dataset(root)
    assert report.ok and report.n_unreviewed == 3 and report.to_dict()["n_unreviewed"] == 3
    assert ("WARNING 3 of 4 masks are model proposals nobody has reviewed (LabelMe flag hemaseg_unreviewed): "
            "untick it in LabelMe after checking each") in report.format()
    with caplog.at_level("WARNING"):
        assert load_dataset(root).n_unreviewed == 3
    assert "3 of 4 masks are model proposals" in caplog.text
    for name in ("b", "c2"):  # unticked in LabelMe and saved; the flag stays in the file, false
        doc = json.loads((root / f"{name}.json").read_text())
        doc["flags"][UNREVIEWED_FLAG] = False
        (root / f"{name}.json").write_text(json.dumps(doc))
    assert check_dataset(root).n_unreviewed == 1 and load_dataset(root).n_unreviewed == 1
    doc = json.loads((root / "c10.json").read_text())
    doc["flags"][UNREVIEWED_FLAG] = False
    (root / "c10.json").write_text(json.dumps(doc))
    report = check_dataset(root)
    assert report.n_unreviewed == 0 and "WARNING" not in report.format()
    convert(root, "labelme", tmp_path / "again")  # convert writes what the dataset holds: no flag
    assert all(json.loads(p.read_text())["flags"] == {} for p in (tmp_path / "again").rglob("*.json"))


# PS3.15 attributes, each a marker that no file predict writes for LabelMe may contain
_WHO = {"PatientName": "Zyxwq^Qwvzx", "PatientID": "PID-4711", "PatientBirthDate": "20240102",
        "AccessionNumber": "ACC-99", "InstitutionName": "St Elsewhere", "StudyDate": "20251231",
        "StudyID": "STUDY-77", "ReferringPhysicianName": "Dr^Who", "StationName": "STATION-42"}


def test_dicom_scans_go_to_the_output_folder_as_png_json_and_calibration_without_identifiers(
        tiny_run, tmp_path, capsys, caplog):
    from hemaseg.cli import main
    from hemaseg.data.images import decode_image
    from tests.dicom_files import native, save

    scans = tmp_path / "scans"
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    named = native(pixels, PixelSpacing=[0.2, 0.1], BurnedInAnnotation="NO", **_WHO)
    named.StudyInstanceUID = named.SeriesInstanceUID = "1.2.826.0.1.3680043.9999.424242"
    save(named, scans, "scan7.dcm")
    save(native(pixels[::-1].copy(), **_WHO), scans, "zyxwq_left.dcm")  # named after the patient
    uid_named = native(pixels[:, ::-1].copy(), **_WHO)
    save(uid_named, scans, f"{uid_named.SOPInstanceUID}.dcm")  # named by its UID
    Image.fromarray(pixels).save(scans / "plain.png")
    before = sorted(p.name for p in scans.iterdir())
    out = tmp_path / "pred"
    with caplog.at_level("DEBUG"):
        assert main(["-q", "predict", str(tiny_run), str(scans), "--out", str(out), "--format", "labelme"]) == 0
    said = capsys.readouterr().out
    assert "marked unreviewed" in said and "3 DICOM scan(s)" in said
    assert str(out / "labelme") in said and "1 beside their scans" in said
    assert sorted(p.name for p in scans.iterdir()) == sorted(before + ["plain.json"])  # nothing beside a DICOM
    folder = out / "labelme"
    names = sorted(p.name for p in folder.iterdir())
    assert "scan7.png" in names and "scan7.json" in names and "scan7.calibration.json" in names
    hashed = sorted({n.split(".")[0] for n in names} - {"scan7"})
    assert len(hashed) == 2 and all(n.startswith("scan-") for n in hashed)
    assert len(names) == 9
    doc = json.loads((folder / "scan7.json").read_text())
    assert doc["imagePath"] == "scan7.png" and doc["imageData"] is None and doc["flags"] == {UNREVIEWED_FLAG: True}
    assert np.array_equal(np.asarray(Image.open(folder / "scan7.png")), pixels)
    np.testing.assert_allclose(decode_image(folder / "scan7.png").gray, decode_image(scans / "scan7.dcm").gray)
    side = json.loads((folder / "scan7.calibration.json").read_text())
    assert side["pixel_spacing"] == {"x_mm": 0.1, "y_mm": 0.2, "source": "pixel spacing (0028,0030)"}
    assert side["image"] == "scan7.png" and side["burned_in_annotation"] is False
    assert side["calibration_note"] is None
    other = json.loads((folder / f"{hashed[0]}.calibration.json").read_text())
    assert other["pixel_spacing"] is None and "no calibration" in other["calibration_note"]
    markers = [*_WHO.values(), "Zyxwq", "Qwvzx", "9999.424242", named.SOPInstanceUID, uid_named.SOPInstanceUID]
    for p in [*folder.iterdir(), scans / "plain.json"]:
        for marker in [*markers, "zyxwq"]:  # the file names too (one DICOM is named after the patient)
            assert marker not in p.name and marker.encode() not in p.read_bytes(), (p, marker)
    assert not any(m in caplog.text for m in markers[:-2])  # the log names the input files, UIDs and all
    # the folder trains as a LabelMe dataset, every mask a proposal nobody reviewed yet
    assert check_dataset(folder).n_unreviewed == 3
    # a second run keeps the (perhaps corrected) JSON files, beside the PNG scan and in OUT/labelme
    (folder / "scan7.json").write_text(json.dumps({**doc, "shapes": []}))
    (scans / "plain.json").write_text("{}")
    kept = (folder / "scan7.json").read_bytes()
    assert main(["-q", "predict", str(tiny_run), str(scans), "--out", str(tmp_path / "pred2"),
                 "--format", "labelme"]) == 0
    assert (scans / "plain.json").read_text() == "{}"
    assert main(["-q", "predict", str(tiny_run), str(scans), "--out", str(out), "--format", "labelme"]) == 0
    assert (folder / "scan7.json").read_bytes() == kept
    assert "4 existing NAME.json kept" in capsys.readouterr().out.splitlines()[-1]


def test_a_broken_coco_file_is_named_rather_than_the_folder_layout(tmp_path):
    root = _coco(tmp_path / "coco", [])
    f = root / "annotations.json"
    doc = json.loads(f.read_text())
    del doc["categories"]
    f.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"annotations\.json: no \"categories\" list"):
        find_samples(root)
    f.write_text(json.dumps(doc)[:30])
    with pytest.raises(DataError, match=r"annotations\.json: not valid JSON"):
        find_samples(root)


def test_a_single_source_label_keeps_its_name_through_convert(tmp_path):
    root = tmp_path / "lm"
    root.mkdir()
    Image.fromarray(_scan(20, 28, 0)).save(root / "a.png")
    _labelme(root / "a.json", "a.png", [_shape("hemangioma", [[2, 2], [8, 2], [8, 6], [2, 6]])])
    convert(root, "coco", tmp_path / "coco")
    doc = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert doc["categories"] == [{"id": 1, "name": "hemangioma", "supercategory": "hemangioma"}]
    assert doc["annotations"][0]["bbox"] == [2, 2, 6, 4] and doc["annotations"][0]["area"] == 24
    convert(tmp_path / "coco", "cvat", tmp_path / "cvat")
    assert ET.parse(tmp_path / "cvat" / "annotations.xml").find(".//mask").get("label") == "hemangioma"
    assert np.array_equal(_read(tmp_path / "cvat")["a"][1], _read(root)["a"][1])


def test_labelme_mask_shapes_and_cvat_rotated_boxes(tmp_path):
    import base64
    import io

    bits = np.zeros((3, 4), np.uint8)
    bits[0, 1:] = bits[2, :2] = 255
    buf = io.BytesIO()
    Image.fromarray(bits).save(buf, format="PNG")
    root = tmp_path / "lm"
    root.mkdir()
    Image.fromarray(_scan(20, 28, 0)).save(root / "a.png")
    shape = {**_shape("lesion", [[5, 6], [8, 8]], "mask"), "mask": base64.b64encode(buf.getvalue()).decode()}
    _labelme(root / "a.json", "a.png", [shape])  # LabelMe >= 5.3: a PNG over pixels (5, 6) to (8, 8), inclusive
    expected = np.zeros((20, 28), bool)
    expected[6:9, 5:9] = bits > 0
    assert np.array_equal(_read(root)["a"][1], expected)
    body = ('<image id="0" name="1.png" width="12" height="10">'
            '<box label="lesion" xtl="4" ytl="3" xbr="8" ybr="5" rotation="90" occluded="0"/></image>')
    cvat = _cvat(tmp_path / "cvat", body)
    (cvat / "images" / "2.png").unlink()
    turned = np.zeros((10, 12), bool)
    turned[2:6, 5:7] = True  # the 4x2 box turned a quarter about its centre (6, 4): 2 wide, 4 high
    assert np.array_equal(_read(cvat)["1"][1], turned)
