import numpy as np
import pytest
from PIL import Image

import hemaseg
from hemaseg.predict import collect_inputs, predict_files, to_gray_unit


@pytest.mark.parametrize("h,w", [(37, 91), (101, 33), (64, 64)])
def test_predict_returns_masks_at_the_original_odd_size(tiny_run, h, w):
    model = hemaseg.load_model(tiny_run)
    image = np.random.default_rng(0).integers(0, 255, (h, w), dtype=np.uint8)
    pred = model.predict(image)
    assert pred.prob.shape == pred.mask.shape == (h, w)
    assert pred.prob.dtype == np.float32 and 0 <= pred.prob.min() and pred.prob.max() <= 1
    assert np.array_equal(pred.mask, pred.prob >= model.threshold)
    assert np.array_equal(model.predict(image, threshold=0.0).mask, np.ones((h, w), bool))


def test_rgb_and_16bit_inputs_are_accepted(tiny_run):
    model = hemaseg.load_model(tiny_run)
    gray = np.random.default_rng(0).integers(0, 255, (40, 50), dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    np.testing.assert_allclose(model.predict(rgb).prob, model.predict(gray).prob, atol=1e-5)
    np.testing.assert_allclose(to_gray_unit(gray.astype(np.uint16) * 257), to_gray_unit(gray), atol=1e-6)


def test_predict_files_writes_masks_overlays_and_measurements(tiny_run, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sizes = {"a": (45, 77), "b": (90, 31)}
    for name, (h, w) in sizes.items():
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w), dtype=np.uint8)).save(src / f"{name}.png")
    model = hemaseg.load_model(tiny_run)
    rows = predict_files(model, [src], tmp_path / "out", save_prob=True, progress=False)
    assert [r["image"].endswith(f"{n}.png") for r, n in zip(rows, "ab")] == [True, True]
    for name, (h, w) in sizes.items():
        mask = np.asarray(Image.open(tmp_path / "out" / f"{name}_mask.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
        assert np.asarray(Image.open(tmp_path / "out" / f"{name}_overlay.png")).shape == (h, w, 3)
        assert np.asarray(Image.open(tmp_path / "out" / f"{name}_prob.png")).shape == (h, w)
    assert (tmp_path / "out" / "predictions.csv").read_text().startswith("image,width,height,lesion_area_px")


def test_inputs_are_deduplicated_and_name_clashes_refused(tmp_path):
    (tmp_path / "x").mkdir(); (tmp_path / "y").mkdir()
    for d in ("x", "y"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / d / "1.png")
    assert len(collect_inputs([tmp_path / "x", tmp_path / "x" / "1.png"])) == 1
    with pytest.raises(ValueError, match="same name"):
        collect_inputs([tmp_path / "x", tmp_path / "y"])
    with pytest.raises(FileNotFoundError, match="nope"):
        collect_inputs([tmp_path / "nope"])
