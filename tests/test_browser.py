"""The web page in a real browser (Debian's chromium driven by Playwright) against a real uvicorn server.

Skips only when chromium is absent and cannot be installed; under CI (env CI set) that is a failure, since
scripts/test.sh installs it. Saves a screenshot to tests/artifacts/serve_page.png.
"""

from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ARTIFACTS, running_server

@pytest.fixture(scope="module")
def server(tiny_run):
    from hemaseg.inference.predictor import load_model
    from hemaseg.serve import Settings, create_app

    app = create_app(load_model(tiny_run, device="cpu"), Settings())
    with running_server(app) as url:
        assert app.state.service.ready.wait(60)
        yield url


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory) -> Path:
    """A 256 x 256 synthetic scan with a lesion in it."""
    from hemaseg.data.synth import synth_scan

    for seed in range(20):
        image, mask = synth_scan(np.random.default_rng(seed), 256)
        if mask.mean() > 0.02:
            break
    path = tmp_path_factory.mktemp("browser") / "scan.png"
    Image.fromarray(image).save(path)
    return path


def api_area(base: str, path: Path, threshold: str) -> int:
    r = httpx.post(f"{base}/v1/segment", params={"threshold": threshold},
                   files={"file": ("scan.png", path.read_bytes(), "image/png")}, timeout=60)
    r.raise_for_status()
    return r.json()["area_px"]


def test_page_segments_a_scan_by_keyboard_and_shows_the_api_numbers(browser, server, scan_file, tmp_path):
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    external: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(server) or r.url.startswith("data:")
            else external.append(r.url))
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model-line').textContent.startsWith('Model')")

    # focus order, keyboard only: file chooser, threshold, mask toggle, pixel spacing, access key
    order = []
    for _ in range(5):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    assert order == ["file", "threshold", "show-mask", "pixel-spacing", "api-key"]

    page.set_input_files("#file", str(scan_file))
    page.wait_for_selector('#result[data-state="done"]')
    shown = int(page.get_attribute("#area-px", "data-value"))
    assert shown == api_area(server, scan_file, "0.50")
    assert page.inner_text("#area-px") == f"{shown:,} px"
    assert "% of image" in page.inner_text("#area-pct")
    assert page.get_attribute("#download-mask", "href").startswith("data:image/png;base64,")
    assert page.get_attribute("#download-overlay", "aria-disabled") == "false"
    # the finding and, when flagged, why: the API's own words
    reply = httpx.post(f"{server}/v1/segment", files={"file": ("scan.png", scan_file.read_bytes(), "image/png")},
                       timeout=60).json()
    assert page.inner_text("#confidence").startswith(reply["finding"])
    assert page.inner_text("#review-reason") == (f"Needs review: {reply['review_reason']}" if reply["needs_review"]
                                                 else "")

    # lower the threshold with the arrow key: the page asks again and shows the API's new number
    first_id = page.get_attribute("#result", "data-request-id")
    page.focus("#threshold")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("id => { const r = document.getElementById('result'); "
                           "return r.dataset.state === 'done' && r.dataset.requestId !== id; }", arg=first_id)
    assert page.input_value("#threshold") == "0.45"
    assert int(page.get_attribute("#area-px", "data-value")) == api_area(server, scan_file, "0.45")

    # a pixel spacing typed in: the page asks again, and the reply's calibration is shown with its source
    second_id = page.get_attribute("#result", "data-request-id")
    page.fill("#pixel-spacing", "0.1,0.12")
    page.keyboard.press("Tab")  # change fires when the field is left
    page.wait_for_function("id => { const r = document.getElementById('result'); "
                           "return r.dataset.state === 'done' && r.dataset.requestId !== id; }", arg=second_id)
    assert "pixel_spacing parameter" in page.inner_text("#calibration")
    assert page.get_attribute("#size", "data-mm")  # in mm

    # a decimal comma is one: "0,1" is 0.1 mm, not x = 0 and y = 1
    third_id = page.get_attribute("#result", "data-request-id")
    page.fill("#pixel-spacing", "0,1")
    page.keyboard.press("Tab")
    page.wait_for_function("id => { const r = document.getElementById('result'); "
                           "return r.dataset.state === 'done' && r.dataset.requestId !== id; }", arg=third_id)
    assert page.inner_text("#error") == "" and "pixel_spacing parameter" in page.inner_text("#calibration")
    shown_mm = float(page.get_attribute("#size", "data-mm"))
    r = httpx.post(f"{server}/v1/segment", params={"pixel_spacing": "0.1", "threshold": "0.45"},
                   files={"file": ("scan.png", scan_file.read_bytes(), "image/png")}, timeout=60).json()
    assert shown_mm == pytest.approx(r["measurements"]["longest_diameter_mm"])  # the page sent 0.1, not 0 and 1

    page.focus("#show-mask")
    page.keyboard.press("Space")
    assert page.is_checked("#show-mask")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
    print(f"screenshot: {ARTIFACTS / 'serve_page.png'}")

    # a text file named like a PNG: a plain-words error, no crash
    fake = tmp_path / "notes.png"
    fake.write_text("Patient notes, not an image")
    page.set_input_files("#file", str(fake))
    page.wait_for_selector("#error:not([hidden])")
    assert "not an image hemaseg can read (PNG, JPEG, BMP or TIFF)" in page.inner_text("#error")
    assert errors == [] and external == []
    page.close()
