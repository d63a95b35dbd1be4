"""The labelling page in a real browser (Debian's chromium driven by Playwright, launched as
tests/test_browser.py does) against a real uvicorn server: drag a box, paint, erase, save, and find the
scan and its mask in DATASET; the worklist's order and reopening a saved scan; a fine-tune from the page.

The model and LiteMedSAM are the fakes of tests/test_label.py, so every pixel count is exact. Skips
without chromium or playwright, except under CI (env CI set), where that is a failure. Saves a
screenshot to tests/artifacts/label_page.png.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tests.conftest import ARTIFACTS, running_server
from tests.test_label import TINY, FakeBox, FakeModel, disk, ellipse, gray_key

CONFIDENCES = {"scan_a": 0.8, "scan_b": 0.35, "scan_c": 0.6, "scan_d": 0.2}
ORDER = ["scan_d", "scan_b", "scan_c", "scan_a"]  # review first (0.2, 0.35), then 0.6, 0.8
SIZE = 128


@pytest.fixture(scope="module")
def label_server(tmp_path_factory):
    from hemaseg import write_synthetic_dataset
    from hemaseg.data.synth import synth_scan
    from hemaseg.label import LabelSettings, create_app

    root = tmp_path_factory.mktemp("label")
    scans = root / "scans"
    scans.mkdir()
    answers, lesions = {}, {}
    rng = np.random.default_rng(7)
    for name, conf in CONFIDENCES.items():
        while True:
            image, mask = synth_scan(rng, SIZE)
            if 0.02 < (mask > 0).mean() < 0.2:
                break
        Image.fromarray(image).save(scans / f"{name}.png")
        lesion = mask > 0
        answers[gray_key(image / 255)] = (ndimage.binary_dilation(lesion, iterations=2), conf)  # a near miss
        lesions[name] = lesion
    # pairs already in the dataset, so a fine-tune has scans to train on and hold out
    dataset = write_synthetic_dataset(root / "dataset", 10, size=32, seed=5, progress=False)
    app = create_app(scans, dataset, FakeModel(answers), LabelSettings(device="cpu", finetune=TINY),
                     box_predictor=FakeBox())
    with running_server(app) as url:
        assert app.state.session.wait_idle(60)
        yield {"url": url, "scans": scans, "dataset": dataset, "lesions": lesions}


@pytest.fixture()
def page(browser, label_server):  # noqa: F811 - the imported fixture
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors: list[str] = []
    external: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith((label_server["url"], "data:", "blob:"))
            else external.append(r.url))
    yield page
    page.close()
    assert errors == [] and external == []


def open_page(page, url: str) -> None:
    page.goto(url + "/")
    page.wait_for_selector('#worklist[data-ready="true"]')
    page.wait_for_function("() => { const li = document.querySelector('#worklist li.current'); "
                           "return li !== null && document.getElementById('canvas').dataset.name === li.dataset.name; }")


def client_xy(page, x: int, y: int) -> tuple[float, float]:
    """Where on the screen the centre of scan pixel (x, y) is drawn."""
    box = page.locator("#canvas").bounding_box()
    zoom = float(page.get_attribute("#canvas", "data-zoom"))
    return box["x"] + (x + 0.5) * zoom, box["y"] + (y + 0.5) * zoom


def wait_area(page, area: int) -> None:
    page.wait_for_function(f"() => document.getElementById('mask-area').dataset.value === '{area}'", timeout=10_000)


def manifest(dataset: Path) -> dict[str, dict]:
    with open(dataset / "label_manifest.csv", newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def test_box_paint_erase_and_save_write_the_expected_mask(page, label_server):
    url, dataset = label_server["url"], label_server["dataset"]
    open_page(page, url)
    name = page.get_attribute("#canvas", "data-name")
    assert name == ORDER[0]
    assert float(page.get_attribute("#canvas", "data-zoom")) >= 2  # a 128 px scan is shown enlarged

    ys, xs = np.nonzero(label_server["lesions"][name])
    box = (int(xs.min()) - 4, int(ys.min()) - 4, int(xs.max()) + 4, int(ys.max()) + 4)
    box = (max(box[0], 0), max(box[1], 0), min(box[2], SIZE - 1), min(box[3], SIZE - 1))
    expected = ellipse((SIZE, SIZE), box)
    page.mouse.move(*client_xy(page, box[0], box[1]))
    page.mouse.down()
    page.mouse.move(*client_xy(page, box[2], box[3]), steps=6)
    page.mouse.up()
    wait_area(page, int(expected.sum()))
    assert page.inner_text("#mask-origin") == "(from the box)"
    ARTIFACTS.mkdir(exist_ok=True)
    # the proposal's outline, the box and its mask
    page.screenshot(path=str(ARTIFACTS / "label_page.png"), full_page=True)

    # a brush of radius 2: paint a dab outside the ellipse, erase one at its centre
    page.keyboard.press("d")
    page.keyboard.press("[")
    page.keyboard.press("[")
    assert page.inner_text("#brush-value") == "2"
    paint = (5, 5) if not expected[5, 5] else (SIZE - 6, SIZE - 6)
    centre = ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)
    page.mouse.click(*client_xy(page, *paint))
    expected |= disk((SIZE, SIZE), *paint, 2)
    wait_area(page, int(expected.sum()))
    page.keyboard.press("e")
    page.mouse.click(*client_xy(page, *centre))
    expected &= ~disk((SIZE, SIZE), *centre, 2)
    wait_area(page, int(expected.sum()))

    # undo and redo the erase, by keyboard
    page.keyboard.press("Control+z")
    wait_area(page, int((expected | disk((SIZE, SIZE), *centre, 2)).sum()))
    page.keyboard.press("Control+y")
    wait_area(page, int(expected.sum()))

    page.fill("#pixel-spacing", "0,08")
    page.keyboard.press("Enter")  # leaves the field; the next key is a shortcut again
    page.keyboard.press("s")
    page.wait_for_function(f"() => document.getElementById('save').dataset.saved === '{name}'")
    assert "Saved images/" in page.inner_text("#status")
    assert page.inner_text("#progress-text") == "1 of 4 labelled"

    saved_image = np.asarray(Image.open(dataset / "images" / f"{name}.png"))
    assert np.array_equal(saved_image, np.asarray(Image.open(label_server["scans"] / f"{name}.png")))
    saved_mask = np.asarray(Image.open(dataset / "mask" / f"{name}.png")) > 0
    assert saved_mask.sum() == expected.sum() and np.array_equal(saved_mask, expected)
    row = manifest(dataset)[f"{name}.png"]
    assert (row["method"], row["model"], row["pixel_spacing_x_mm"], row["spacing_source"]) == \
        ("edited", "fake-box", "0.08", "typed on the label page")
    assert float(row["seconds"]) > 0


def test_worklist_order_and_a_saved_scan_reopens_with_its_mask(page, label_server):
    url, dataset = label_server["url"], label_server["dataset"]
    open_page(page, url)
    names = page.eval_on_selector_all("#worklist li", "els => els.map(e => e.dataset.name)")
    assert names == ORDER
    assert "review" in page.inner_text("#worklist li:nth-child(1)")

    # next scan by keyboard, accept the model's outline, save
    page.keyboard.press("n")
    page.wait_for_function(f"() => document.getElementById('canvas').dataset.name === '{ORDER[1]}'")
    assert "review" in page.inner_text("#finding")
    page.keyboard.press("a")
    proposal = ndimage.binary_dilation(label_server["lesions"][ORDER[1]], iterations=2)
    wait_area(page, int(proposal.sum()))
    page.click("#save")
    page.wait_for_function(f"() => document.getElementById('save').dataset.saved === '{ORDER[1]}'")
    assert manifest(dataset)[f"{ORDER[1]}.png"]["method"] == "accepted"
    assert manifest(dataset)[f"{ORDER[1]}.png"]["model"] == "fake-model"

    # a fresh page: both saved scans are marked, and one reopens with the mask it was saved with
    open_page(page, url)
    saved = page.eval_on_selector_all("#worklist li[data-saved='true']", "els => els.map(e => e.dataset.name)")
    assert saved == [n for n in ORDER if (dataset / "mask" / f"{n}.png").is_file()] and ORDER[1] in saved
    page.click(f"#worklist li[data-name='{ORDER[1]}'] button")
    page.wait_for_function(f"() => document.getElementById('canvas').dataset.name === '{ORDER[1]}'")
    wait_area(page, int(proposal.sum()))
    assert page.inner_text("#saved-state") == "yes (accepted)"
    page.keyboard.press("Shift+N")  # back to the first (saved by the test before, when it ran)
    page.wait_for_function(f"() => document.getElementById('canvas').dataset.name === '{ORDER[0]}'")
    first = dataset / "mask" / f"{ORDER[0]}.png"
    wait_area(page, int((np.asarray(Image.open(first)) > 0).sum()) if first.is_file() else 0)


def test_a_finetune_started_from_the_page_finishes_and_swaps_the_model(page, label_server):
    open_page(page, label_server["url"])
    assert page.get_attribute("#model-line", "data-model") == "fake-model"
    page.keyboard.press("t")
    page.wait_for_selector("#finetune-result:not([hidden])", timeout=60_000)
    result = page.inner_text("#finetune-result")
    assert "held-out scans" in result and "before 0.000" in result
    assert page.get_attribute("#finetune-result", "data-swapped") == "true"
    page.wait_for_function("() => document.getElementById('model-line').dataset.model === 'finetune-001'")
    assert float(page.get_attribute("#finetune-progress", "value")) == 1.0
