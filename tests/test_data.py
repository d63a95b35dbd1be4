"""Tests for hemaseg.data.dataset on tiny datasets built in tmp_path (plus real-data checks behind a marker)."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hemaseg.data.dataset import (
    Sample,
    check_dataset,
    dataset_fingerprint,
    find_dataset_dirs,
    find_groups,
    find_samples,
    kfold_split,
    load_sample,
    load_split,
    natural_sorted,
    read_groups,
    read_mask,
    save_split,
    split_train_val,
)
from hemaseg.data.images import DataError, read_image

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    im.save(path)
    return path


def scan(h: int = 6, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def lesion(h: int = 6, w: int = 8, box: tuple[int, int, int, int] = (1, 1, 3, 4)) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    y0, x0, y1, x1 = box
    m[y0:y1, x0:x1] = 255
    return m


def make_dataset(root: Path, names=("a", "b"), mask_dir: str = "mask") -> Path:
    for i, name in enumerate(names):
        save(root / "images" / f"{name}.png", scan(seed=i))
        save(root / mask_dir / f"{name}.png", lesion())
    return root


# --------------------------------------------------------------------------------------------- pairing


def test_pairs_by_stem_and_sorts_naturally(tmp_path):
    make_dataset(tmp_path, names=["10", "2", "1", "img10", "img9"])
    samples = find_samples(tmp_path)
    assert [s.name for s in samples] == ["1", "2", "10", "img9", "img10"]
    s = samples[1]
    assert s.image_path == tmp_path / "images" / "2.png"
    assert s.mask_paths == (tmp_path / "mask" / "2.png",)


def test_masks_dir_name_and_both_is_an_error(tmp_path):
    make_dataset(tmp_path, mask_dir="masks")
    assert find_dataset_dirs(tmp_path) == (tmp_path / "images", tmp_path / "masks")
    assert len(find_samples(tmp_path)) == 2
    (tmp_path / "mask").mkdir()
    with pytest.raises(DataError, match="both mask/ and masks/"):
        find_dataset_dirs(tmp_path)


def test_name_mask_suffix_and_several_masks_merged(tmp_path):
    save(tmp_path / "images" / "benign_1.png", scan())
    save(tmp_path / "images" / "benign_2.png", scan())
    save(tmp_path / "mask" / "benign_1_mask.png", lesion(box=(0, 0, 2, 2)))
    save(tmp_path / "mask" / "benign_2_mask.png", lesion(box=(0, 0, 2, 2)))
    save(tmp_path / "mask" / "benign_2_mask_1.png", lesion(box=(4, 5, 6, 8)))
    samples = find_samples(tmp_path)
    assert [s.name for s in samples] == ["benign_1", "benign_2"]
    assert [p.name for p in samples[1].mask_paths] == ["benign_2_mask.png", "benign_2_mask_1.png"]
    _, mask = load_sample(samples[1])
    assert mask.dtype == bool and mask.sum() == 4 + 6
    assert mask[0, 0] and mask[5, 7] and not mask[3, 3]


@pytest.mark.parametrize("suffix", [".jpg", ".JPEG", ".bmp", ".tif", ".TIFF"])
def test_other_image_formats(tmp_path, suffix):
    gray = np.full((6, 8), 200, np.uint8)
    save(tmp_path / "images" / f"x{suffix}", gray)
    save(tmp_path / "mask" / "x.png", lesion())
    (sample,) = find_samples(tmp_path)
    image, mask = load_sample(sample)
    assert image.dtype == np.float32 and image.shape == (6, 8) == mask.shape
    assert np.allclose(image, 200 / 255, atol=3 / 255)  # JPEG is lossy


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "images" / "notes.txt").write_text("x")
    (tmp_path / "images" / "._a.png").write_bytes(b"resource fork")
    assert [s.name for s in find_samples(tmp_path)] == ["a", "b"]


# --------------------------------------------------------------------------------------------- reading


def test_16bit_image_is_scaled_by_65535(tmp_path):
    a = np.array([[0, 32768, 65535]], np.uint16)
    path = save(tmp_path / "x.png", a)
    assert Image.open(path).mode.startswith("I;16")
    img = read_image(path)
    assert img.dtype == np.float32
    np.testing.assert_allclose(img, [[0.0, 32768 / 65535, 1.0]], rtol=1e-6)
    # dark 16-bit data must not be mistaken for 8-bit
    np.testing.assert_allclose(
        read_image(save(tmp_path / "d.png", np.array([[0, 200]], np.uint16))), [[0, 200 / 65535]], rtol=1e-6
    )


def test_float_and_int32_images(tmp_path):
    f = np.array([[0.0, 0.25, 1.0]], np.float32)
    np.testing.assert_allclose(read_image(save(tmp_path / "f.tif", f)), f)
    wide = np.array([[-10.0, 0.0, 30.0]], np.float32)  # out of [0, 1]: min-max scaled
    np.testing.assert_allclose(read_image(save(tmp_path / "w.tif", wide)), [[0.0, 0.25, 1.0]])
    i32 = np.array([[0, 1000, 65535]], np.int32)
    np.testing.assert_allclose(read_image(save(tmp_path / "i.tif", i32)), i32 / 65535, rtol=1e-6)


def test_rgb_rgba_palette_become_luminance(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (255, 255, 255)
    expected = np.array([[76, 0], [0, 255]]) / 255  # ITU-R 601-2: 0.299 * 255 = 76
    np.testing.assert_allclose(read_image(save(tmp_path / "rgb.png", rgb)), expected, atol=1e-6)
    np.testing.assert_allclose(read_image(save(tmp_path / "rgba.png", rgb, "RGBA")), expected, atol=1e-6)
    np.testing.assert_allclose(read_image(save(tmp_path / "p.png", rgb, "P")), expected, atol=1e-6)
    assert read_image(save(tmp_path / "la.png", rgb, "LA")).shape == (2, 2)


def test_binary_masks_of_any_scale(tmp_path):
    base = lesion() > 0
    for name, arr in {
        "u8_1": base.astype(np.uint8),
        "u8_255": base * np.uint8(255),
        "u16": base.astype(np.uint16) * 65535,
    }.items():
        np.testing.assert_array_equal(read_mask(save(tmp_path / f"{name}.png", arr)), base)
    np.testing.assert_array_equal(read_mask(save(tmp_path / "one.png", base * np.uint8(255), "1")), base)
    assert read_mask(save(tmp_path / "full.png", np.full((3, 3), 255, np.uint8))).all()
    assert not read_mask(save(tmp_path / "empty.png", np.zeros((3, 3), np.uint8))).any()
    red = np.zeros((6, 8, 3), np.uint8)
    red[base] = (255, 0, 0)  # a red-drawn mask counts, not just white
    np.testing.assert_array_equal(read_mask(save(tmp_path / "red.png", red)), base)


def test_non_binary_mask_lists_values_and_threshold_fixes_it(tmp_path):
    arr = np.array([[0, 3, 128, 255]], np.uint8)
    path = save(tmp_path / "m.png", arr)
    with pytest.raises(DataError) as info:
        read_mask(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "{0, 3, 128, 255}" in str(info.value) and "--mask-threshold" in str(info.value)
    np.testing.assert_array_equal(read_mask(path, threshold=0.5), [[False, False, True, True]])
    with pytest.raises(ValueError, match="fraction"):
        read_mask(path, threshold=128)


def test_many_mask_values_are_abbreviated(tmp_path):
    path = save(tmp_path / "m.png", np.arange(20, dtype=np.uint8).reshape(4, 5))
    with pytest.raises(DataError, match=r"\{0, 1, 2, 3, 4, 5, \.\.\. \(20 distinct values\)\}"):
        read_mask(path)


def test_truncated_and_garbage_images(tmp_path):
    good = save(tmp_path / "good.png", scan(64, 64))
    half = tmp_path / "half.png"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="cannot read image") as info:
        read_image(half)
    assert info.value.path == half and str(info.value).startswith(f"{half}: ")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot read image"):
        read_image(junk)
    with pytest.raises(DataError, match="does not exist"):
        read_image(tmp_path / "missing.png")


def test_decompression_bomb_refused_from_header_before_decoding(tmp_path):
    big = save(tmp_path / "big.png", scan(40, 50))
    with pytest.raises(DataError, match="2,000 pixels exceeds the limit of 1,000"):
        read_image(big, max_pixels=1000)
    with pytest.raises(DataError, match="exceeds the limit"):
        read_mask(big, max_pixels=1000)
    # Only the header survives: the size guard must fire before any decoding is attempted.
    header_only = tmp_path / "header_only.png"
    header_only.write_bytes(big.read_bytes()[:60])
    with pytest.raises(DataError, match="exceeds the limit"):
        read_image(header_only, max_pixels=1000)
    assert read_image(big, max_pixels=None).shape == (40, 50)


def test_pil_decompression_bomb_error_becomes_data_error(tmp_path, monkeypatch):
    big = save(tmp_path / "big.png", scan(40, 50))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses above 2x this
    with pytest.raises(DataError, match="exceeds the limit"):
        read_image(big)


def test_data_error_pickles():
    e = pickle.loads(pickle.dumps(DataError("a/b.png", "bad")))
    assert isinstance(e, DataError) and e.path == Path("a/b.png") and e.problem == "bad"
    assert str(e) == "a/b.png: bad"


# --------------------------------------------------------------------------------------------- errors


def test_image_without_mask(tmp_path):
    make_dataset(tmp_path)
    save(tmp_path / "images" / "c.png", scan())
    with pytest.raises(DataError, match="image without mask") as info:
        find_samples(tmp_path)
    assert info.value.path == tmp_path / "images" / "c.png"
    assert [s.name for s in find_samples(tmp_path, strict=False)] == ["a", "b"]


def test_mask_without_image(tmp_path):
    make_dataset(tmp_path)
    save(tmp_path / "mask" / "zzz_mask.png", lesion())
    with pytest.raises(DataError, match="mask without image") as info:
        find_samples(tmp_path)
    assert info.value.path == tmp_path / "mask" / "zzz_mask.png"


def test_mask_size_mismatch_names_both_sizes(tmp_path):
    save(tmp_path / "images" / "a.png", scan(6, 10))
    save(tmp_path / "mask" / "a.png", lesion(6, 8))
    (sample,) = find_samples(tmp_path)
    with pytest.raises(DataError, match=r"mask size 8x6 does not match image size 10x6") as info:
        load_sample(sample)
    assert info.value.path == tmp_path / "mask" / "a.png"


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "mask").mkdir()
    with pytest.raises(DataError, match="no images") as info:
        find_samples(tmp_path)
    assert info.value.path == tmp_path / "images"
    assert find_samples(tmp_path, strict=False) == []
    with pytest.raises(DataError, match="no images/ folder"):
        find_samples(tmp_path / "images")
    with pytest.raises(DataError, match="does not exist"):
        find_samples(tmp_path / "nope")
    shutil.rmtree(tmp_path / "mask")
    with pytest.raises(DataError, match="no mask/ or masks/"):
        find_samples(tmp_path)


def test_duplicate_image_stems(tmp_path):
    make_dataset(tmp_path)
    save(tmp_path / "images" / "a.jpg", scan())
    with pytest.raises(DataError, match="two images share the name 'a'"):
        find_samples(tmp_path)


# --------------------------------------------------------------------------------------------- checking


def test_check_dataset_collects_every_problem(tmp_path):
    make_dataset(tmp_path, names=["good", "bad_size", "grey"])
    good_bytes = save(tmp_path / "x.png", scan(64, 64)).read_bytes()
    (tmp_path / "images" / "trunc.png").write_bytes(good_bytes[: len(good_bytes) // 2])
    save(tmp_path / "mask" / "trunc.png", lesion())
    save(tmp_path / "images" / "lonely.png", scan())
    save(tmp_path / "mask" / "orphan.png", lesion())
    save(tmp_path / "mask" / "bad_size.png", lesion(5, 8))
    save(tmp_path / "mask" / "grey.png", np.array([[0, 7], [128, 255]], np.uint8).repeat(3, 0).repeat(4, 1))

    report = check_dataset(tmp_path)
    assert not report.ok
    expected = {
        tmp_path / "images" / "trunc.png": "cannot read image",
        tmp_path / "images" / "lonely.png": "image without mask",
        tmp_path / "mask" / "orphan.png": "mask without image",
        tmp_path / "mask" / "bad_size.png": "mask size 8x5 does not match image size 8x6",
        tmp_path / "mask" / "grey.png": "mask values are not binary: {0, 7, 128, 255}",
    }
    assert sorted(p.path for p in report.problems) == sorted(expected)
    assert all(p.problem.startswith(expected[p.path]) for p in report.problems)
    assert all(str(p).startswith(f"{p.path}: ") for p in report.problems)
    assert (report.n_images, report.n_masks, report.n_pairs) == (5, 5, 4)
    assert report.sizes == {(8, 6): 3}
    assert report.mask_values[(0, 255)] == 3 and report.mask_values[(0, 7, 128, 255)] == 1
    assert report.lesion_fraction_mean == pytest.approx(6 / 48)  # only "good" loaded cleanly

    text = report.format()
    assert text.count("\nERROR ") == 5 and f"ERROR {tmp_path / 'mask' / 'orphan.png'}: " in text
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["ok"] is False and len(d["problems"]) == 5

    fixed = check_dataset(tmp_path, mask_threshold=0.5)
    assert len(fixed.problems) == 4 and not any("binary" in p.problem for p in fixed.problems)


def test_check_dataset_ok_summary(tmp_path):
    make_dataset(tmp_path, names=["1", "2", "3"])
    save(tmp_path / "mask" / "3.png", np.zeros((6, 8), np.uint8))
    report = check_dataset(tmp_path, progress=True, workers=1)
    assert report.ok and report.problems == []
    assert report.n_empty_masks == 1
    assert report.lesion_fraction_min == 0.0 and report.lesion_fraction_max == pytest.approx(6 / 48)
    assert report.mask_values == {(0, 255): 2, (0,): 1}
    assert report.format().endswith("OK")
    assert report.to_dict()["sizes"] == [{"width": 8, "height": 6, "count": 3}]


def test_check_dataset_empty_folder_and_bomb(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "mask").mkdir()
    report = check_dataset(tmp_path)
    assert not report.ok and {p.path for p in report.problems} == {tmp_path / "images", tmp_path / "mask"}
    assert np.isnan(report.lesion_fraction_mean)
    json.dumps(report.to_dict(), allow_nan=False)
    make_dataset(tmp_path)
    report = check_dataset(tmp_path, max_pixels=10)
    assert len(report.problems) == 4 and all("exceeds the limit" in p.problem for p in report.problems)


def test_fingerprint_tracks_content_not_order_or_location(tmp_path):
    root = make_dataset(tmp_path / "ds", names=["a", "b", "c"])
    samples = find_samples(root)
    fp = dataset_fingerprint(samples)
    assert len(fp) == 16 and fp == dataset_fingerprint(samples[::-1])
    assert dataset_fingerprint(find_samples(shutil.copytree(root, tmp_path / "copy"))) == fp
    save(root / "mask" / "b.png", lesion(box=(0, 0, 1, 1)))
    assert dataset_fingerprint(samples) != fp


# --------------------------------------------------------------------------------------------- groups


def test_read_groups_headers(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("name,class,dup_group\nbenign_0001.png,benign,g1\nbenign_0002.png,benign,g1\nx.png,n,\n")
    assert read_groups(a) == {"benign_0001": "g1", "benign_0002": "g1"}
    b = tmp_path / "b.csv"
    b.write_text("\ufeffImage,Patient\n12,p7\n13.JPG,p7\ncase.v2,p8\n")  # BOM, case, no suffix
    assert read_groups(b) == {"12": "p7", "13": "p7", "case.v2": "p8"}
    c = tmp_path / "c.csv"
    c.write_text("name,label\na,1\n")
    with pytest.raises(DataError, match="no group column") as info:
        read_groups(c)
    assert info.value.path == c
    d = tmp_path / "d.csv"
    d.write_text("file,group\na,1\n")
    with pytest.raises(DataError, match="no image-name column"):
        read_groups(d)
    e = tmp_path / "e.csv"
    e.write_text("name,group\na,1\na.png,2\n")
    with pytest.raises(DataError, match="line 3: a is in two groups"):
        read_groups(e)


def test_find_groups(tmp_path):
    assert find_groups(tmp_path) is None
    (tmp_path / "manifest.csv").write_text("name,class\na.png,benign\n")
    assert find_groups(tmp_path) is None
    (tmp_path / "manifest.csv").write_text("name,dup_group\na.png,a\nb.png,a\n")
    assert find_groups(tmp_path) == {"a": "a", "b": "a"}


# --------------------------------------------------------------------------------------------- splits

NAMES = [f"img_{i}" for i in range(50)]
GROUPS = {n: f"g{i // 3}" for i, n in enumerate(NAMES[:45])}  # groups of 3; the last 5 have no group


def test_split_deterministic_disjoint_complete():
    shuffled = NAMES[:]
    random.Random(1).shuffle(shuffled)
    split = split_train_val(NAMES, 0.2, seed=3)
    assert split == split_train_val(shuffled, 0.2, seed=3)  # depends on the set, not the order
    assert split != split_train_val(NAMES, 0.2, seed=4)
    assert len(split["val"]) == 10 and not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"]) == sorted(NAMES)
    assert split["val"] == natural_sorted(split["val"])
    tiny = split_train_val(["a", "b"], 0.2)
    assert len(tiny["train"]) == len(tiny["val"]) == 1
    with pytest.raises(ValueError):
        split_train_val(NAMES, 1.0)


def test_split_keeps_groups_together():
    for seed in range(5):
        split = split_train_val(NAMES, 0.2, seed=seed, groups=GROUPS)
        assert sorted(split["train"] + split["val"]) == sorted(NAMES)
        train_groups = {GROUPS.get(n, n) for n in split["train"]}
        val_groups = {GROUPS.get(n, n) for n in split["val"]}
        assert not train_groups & val_groups
        assert 10 <= len(split["val"]) <= 12
    assert split_train_val(NAMES, 0.2, 0, GROUPS) == split_train_val(NAMES[::-1], 0.2, 0, GROUPS)
    with pytest.raises(ValueError, match="one group"):
        split_train_val(["a", "b"], groups={"a": "g", "b": "g"})


def test_kfold_every_name_once_no_group_in_two_folds():
    folds = kfold_split(NAMES, folds=5, seed=0, groups=GROUPS)
    assert len(folds) == 5
    vals = [name for f in folds for name in f["val"]]
    assert sorted(vals) == sorted(NAMES)
    for f in folds:
        assert sorted(f["train"] + f["val"]) == sorted(NAMES)
        assert 9 <= len(f["val"]) <= 12  # balanced to within one group
    fold_of_group: dict[str, int] = {}
    for k, f in enumerate(folds):
        for name in f["val"]:
            assert fold_of_group.setdefault(GROUPS.get(name, name), k) == k
    assert folds == kfold_split(NAMES[::-1], folds=5, seed=0, groups=GROUPS)
    with pytest.raises(ValueError, match="cannot fill"):
        kfold_split(["a", "b"], folds=3)


def test_save_load_split_round_trip(tmp_path):
    split = split_train_val(NAMES, seed=0) | {"seed": 0, "fingerprint": "abc"}
    path = save_split(split, tmp_path / "run" / "splits.json")
    assert load_split(path) == split
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]  # no temp file left behind
    bad = tmp_path / "bad.json"
    for text, match in [
        ("{", "not valid JSON"),
        ('{"train": []}', "missing key 'val'"),
        ('{"train": ["a"], "val": ["a"]}', "in both train and val"),
        ("[]", "JSON object"),
    ]:
        bad.write_text(text)
        with pytest.raises(DataError, match=match) as info:
            load_split(bad)
        assert info.value.path == bad
    with pytest.raises(DataError, match="cannot read"):
        load_split(tmp_path / "missing.json")


# --------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["busi", "usgra"])
def test_real_dataset_checks_ok(name):
    root = REAL_DATA / name
    if not (root / "images").is_dir():
        pytest.skip(f"{root} not present")
    report = check_dataset(root)
    assert report.ok, report.format()
    assert report.n_pairs == report.n_images > 100
    samples = find_samples(root)
    image, mask = load_sample(samples[0])
    assert image.shape == mask.shape and 0.0 <= image.min() <= image.max() <= 1.0
    groups = find_groups(root)
    split = split_train_val([s.name for s in samples], groups=groups)
    if groups:
        assert not {groups.get(n, n) for n in split["train"]} & {groups.get(n, n) for n in split["val"]}


def test_sample_is_frozen():
    s = Sample("a", Path("a.png"), (Path("m.png"),))
    with pytest.raises(AttributeError):
        s.name = "b"  # type: ignore[misc]


# --------------------------------------------------------------------------------------------- symlinks


def test_broken_symlinks_and_loops_are_problems_naming_the_file(tmp_path):
    """Not skipped (is_file() is False for both), so neither hides from `check` nor makes its partner
    look unpaired; a link to a real image still pairs and reads."""
    make_dataset(tmp_path, names=["a", "b", "c", "d", "e", "f"])
    images, masks = tmp_path / "images", tmp_path / "mask"
    real = save(tmp_path / "elsewhere" / "d.png", scan(seed=9))
    (images / "d.png").unlink()
    (images / "d.png").symlink_to(real)
    for link, target in [(masks / "b.png", "gone.png"), (images / "e.png", tmp_path / "nowhere" / "e.png")]:
        link.unlink()
        link.symlink_to(target)
    (masks / "c.png").unlink()
    (masks / "c.png").symlink_to("c.png")  # points at itself
    (images / "f.png").unlink()
    (images / "f.png").symlink_to("f2.png")
    (images / "f2.png").symlink_to("f.png")  # and round again

    report = check_dataset(tmp_path)
    nowhere = tmp_path / "nowhere" / "e.png"
    expected = {
        masks / "b.png": "broken symbolic link (points to gone.png, which does not exist)",
        images / "e.png": f"broken symbolic link (points to {nowhere}, which does not exist)",
        masks / "c.png": "symbolic link loop",
        images / "f.png": "symbolic link loop",
        images / "f2.png": "symbolic link loop",
    }
    assert sorted(p.path for p in report.problems) == sorted(expected)  # no "image without mask" for b, c
    assert all(p.problem.startswith(expected[p.path]) for p in report.problems)
    assert f"ERROR {masks / 'b.png'}: broken symbolic link" in report.format()
    assert (report.n_images, report.n_masks, report.n_pairs) == (7, 6, 2)
    assert report.sizes == {(8, 6): 2}  # a, and d through its link
    with pytest.raises(DataError, match="symbolic link"):
        find_samples(tmp_path)
    samples = find_samples(tmp_path, strict=False)
    assert [s.name for s in samples] == ["a", "d"]
    np.testing.assert_array_equal(load_sample(samples[1])[0], read_image(real))


def test_broken_link_beside_a_good_mask_part_keeps_the_pair_out(tmp_path):
    """Merging the parts that remain would train on a mask missing a lesion."""
    save(tmp_path / "images" / "a.png", scan())
    save(tmp_path / "mask" / "a_mask_1.png", lesion())
    (tmp_path / "mask" / "a_mask_2.png").symlink_to("lost.png")
    with pytest.raises(DataError, match=r"broken symbolic link \(points to lost.png") as info:
        find_samples(tmp_path)
    assert info.value.path == tmp_path / "mask" / "a_mask_2.png"
    assert find_samples(tmp_path, strict=False) == []


# --------------------------------------------------------------------------------------------- pixel limit


def test_pixel_limit_errors_name_the_flag_that_raises_it(tmp_path, monkeypatch):
    big = save(tmp_path / "images" / "big.png", scan(40, 50))
    save(tmp_path / "mask" / "big.png", lesion(40, 50))
    for read in (read_image, read_mask):
        with pytest.raises(DataError, match="exceeds the limit") as info:
            read(big, max_pixels=1000)
        assert "--max-pixels" in str(info.value)
    report = check_dataset(tmp_path, max_pixels=1000)
    assert len(report.problems) == 2 and all("--max-pixels" in p.problem for p in report.problems)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own guard, past ours
    with pytest.raises(DataError, match="--max-pixels"):
        read_image(big, max_pixels=None)
