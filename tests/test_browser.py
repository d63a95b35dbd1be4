"""The web page in a real browser (Debian's chromium driven by Playwright) against a real uvicorn server.

Skips only when chromium is absent and cannot be installed; under CI (env CI set) that is a failure, since
scripts/test.sh installs it. Saves a screenshot to tests/artifacts/serve_page.png.
"""

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run"]


def _chromium_available() -> bool:
    if CHROMIUM.exists():
        return True
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=False, env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=False, env=env,
                       capture_output=True, timeout=900)
    return CHROMIUM.exists()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not _chromium_available():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing and could not be installed; scripts/test.sh should install it")
        pytest.skip(f"{CHROMIUM} is missing and cannot be installed here")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny_run):
    uvicorn = pytest.importorskip("uvicorn")
    from hemaseg.inference.predictor import load_model
    from hemaseg.serve import Settings, create_app

    app = create_app(load_model(tiny_run, device="cpu"), Settings())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.05)
    assert srv.started, "uvicorn did not start"
    assert app.state.service.ready.wait(60)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


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
