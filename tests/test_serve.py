"""The HTTP service in-process (FastAPI TestClient): every endpoint, every limit, auth, privacy."""

import base64
import builtins
import io
import logging
import os
import struct
import tempfile
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from hemaseg.data.images import read_image
from hemaseg.inference.predictor import load_model
from hemaseg.lesions import count_lesions
from hemaseg.serve import Settings, create_app


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    im = Image.fromarray(array)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def post(client, data: bytes, name: str = "scan.png", ctype: str = "image/png", headers=None, **params):
    return client.post("/v1/segment", params=params, files={"file": (name, data, ctype)}, headers=headers)


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    assert response.headers["x-request-id"]


def png_array(b64_or_bytes) -> np.ndarray:
    data = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return load_model(tiny_run, device="cpu")


@pytest.fixture(scope="module")
def scan_path(tiny_data) -> Path:
    return min((tiny_data / "images").glob("*.png"))


@pytest.fixture(scope="module")
def scan(scan_path) -> bytes:
    return scan_path.read_bytes()


TEST_HOSTS = ("testserver",)


def make_client(predictor, **settings) -> TestClient:
    # TestClient sends Host: testserver, which the service serves only when told to (DNS rebinding)
    client = TestClient(create_app(predictor, Settings(**{"allowed_hosts": TEST_HOSTS, **settings})))
    client.__enter__()  # runs the lifespan: warm-up starts
    assert client.app.state.service.ready.wait(60)
    return client


@pytest.fixture(scope="module")
def client(predictor):
    c = make_client(predictor)
    yield c
    c.__exit__(None, None, None)


# --- endpoints -----------------------------------------------------------------------------------------------


def test_health_and_readiness(client, predictor):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    cold = TestClient(create_app(predictor, Settings(allowed_hosts=TEST_HOSTS)))  # no lifespan run: no warm-up yet
    assert cold.get("/readyz").status_code == 503
    assert cold.get("/healthz").status_code == 200


def test_model_describes_the_run(client, predictor):
    m = client.get("/v1/model").json()
    assert m["name"] == "seed" and m["input_size"] == 32 and m["threshold"] == 0.5
    assert m["data_fingerprint"] == predictor.metadata["data_fingerprint"] and m["data_fingerprint"]
    assert "val_dice" in m["metrics"] and m["version"] and m["parameters"] > 0


def test_segment_geometry_matches_the_mask(client, predictor, scan, scan_path):
    image = read_image(scan_path)
    prob = predictor.predict_proba_batch([image])[0]
    thr = float(np.clip(np.quantile(prob, 0.8), 0.01, 0.99))  # a threshold that leaves a real lesion
    r = post(client, scan, threshold=thr)
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-request-id"] == body["request_id"]
    assert r.headers["cache-control"] == "no-store"
    assert body["image"] == {"width": 64, "height": 64, "format": "PNG", "mode": "L", "bytes": len(scan)}
    mask = png_array(body["mask_png"]) > 0
    assert mask.shape == (64, 64)
    np.testing.assert_array_equal(mask, predictor.to_mask(prob, thr))  # same as `hemaseg predict`
    assert body["area_px"] == int(mask.sum()) > 0
    assert body["area_fraction"] == pytest.approx(mask.mean(), abs=1e-6)
    assert body["n_lesions"] == count_lesions(mask) == len(body["lesions"])
    assert sum(les["area_px"] for les in body["lesions"]) == body["area_px"]
    rows, cols = np.nonzero(mask)
    assert body["bbox"] == {"x": cols.min(), "y": rows.min(), "width": cols.max() - cols.min() + 1,
                            "height": rows.max() - rows.min() + 1}
    for les in body["lesions"]:
        assert all(mask[y, x] for x, y in les["contour"])
        b = les["bbox"]
        assert all(b["x"] <= x < b["x"] + b["width"] and b["y"] <= y < b["y"] + b["height"] for x, y in les["contour"])
    assert 0 <= body["confidence"] <= 1 and body["latency_ms"] > 0
    overlay = png_array(body["overlay_png"])
    assert overlay.shape == (64, 64, 3)


def test_png_and_overlay_formats(client, scan):
    as_json = post(client, scan).json()
    mask = post(client, scan, format="png")
    assert mask.status_code == 200 and mask.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(png_array(mask.content), png_array(as_json["mask_png"]))
    overlay = post(client, scan, format="overlay")
    assert overlay.headers["content-type"] == "image/png"
    assert png_array(overlay.content).shape == (64, 64, 3)


def test_threshold_moves_the_area(client, scan):
    low = post(client, scan, threshold=0.01).json()["area_px"]
    high = post(client, scan, threshold=0.99).json()["area_px"]
    assert low >= high
    assert post(client, scan, threshold=0.01).json()["threshold"] == 0.01


def test_page_and_static_files_are_served_without_cdn(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200
    base = client.get("/base/base.css")  # the stylesheet the service's and the labelling page share
    assert base.status_code == 200 and base.headers["content-type"].startswith("text/css") and "--accent" in base.text
    assert 'href="/base/base.css"' in page.text
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text, base.text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text


def test_openapi_documents_the_versioned_api(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/segment", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["required"] == ["file"]
    assert {"413", "415", "422", "401"} <= set(spec["paths"]["/v1/segment"]["post"]["responses"])
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN


# --- limits --------------------------------------------------------------------------------------------------


def test_oversized_upload_is_413_whatever_the_headers_say(predictor, scan):
    small = make_client(predictor, max_upload_bytes=1000)
    try:
        assert_error(post(small, scan), 413, "file_too_large")

        def chunks():  # no Content-Length: the limit must hold while streaming
            yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
            for _ in range(200):
                yield b"\0" * 1024

        r = small.post("/v1/segment", content=chunks(),
                       headers={"content-type": "multipart/form-data; boundary=b"})
        assert_error(r, 413, "file_too_large")
    finally:
        small.__exit__(None, None, None)


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: a decompression bomb's calling card."""
    data = encode(np.zeros((1, 1), np.uint8))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def test_pixel_bombs_are_refused_from_the_header(client, predictor, scan):
    assert_error(post(client, _png_claiming(100_000, 100_000)), 413, "image_too_large")
    tiny_limit = make_client(predictor, max_pixels=1000)
    try:
        assert_error(post(tiny_limit, scan), 413, "image_too_large")  # 64 x 64 > 1000
    finally:
        tiny_limit.__exit__(None, None, None)


def test_type_is_judged_by_content_not_name(client, scan):
    assert_error(post(client, b"Patient: Jane Doe\nnot an image\n", name="scan.png"), 415, "unsupported_type")
    gif = encode(np.zeros((8, 8), np.uint8), "GIF")
    assert_error(post(client, gif, name="scan.png"), 415, "unsupported_type")
    assert post(client, scan, name="notes.txt", ctype="text/plain").status_code == 200


def test_corrupt_truncated_and_empty_files_are_422(client, scan):
    assert_error(post(client, scan[: len(scan) // 2]), 422, "corrupt_image")
    assert_error(post(client, scan[:40]), 422, "corrupt_image")
    assert_error(post(client, b""), 422, "empty_file")
    nan = encode(np.full((8, 8), np.nan, np.float32), "TIFF")
    assert_error(post(client, nan, name="x.tif"), 422, "corrupt_image")


@pytest.mark.parametrize("fmt,mode", [("JPEG", "CMYK"), ("TIFF", "CMYK"), ("PNG", "P"), ("PNG", "LA"),
                                      ("PNG", "I;16"), ("BMP", "1"), ("TIFF", "RGBA"), ("JPEG", "RGB")])
def test_odd_modes_are_converted_to_gray(client, fmt, mode):
    gray = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    r = post(client, encode(gray, fmt, mode))
    assert r.status_code == 200, r.text
    assert r.json()["image"]["format"] == fmt and r.json()["image"]["width"] == 40


def test_unconvertible_mode_is_422(client):
    lab = Image.new("LAB", (8, 8))
    buf = io.BytesIO()
    lab.save(buf, format="TIFF")
    assert_error(post(client, buf.getvalue(), name="x.tif"), 422, "unsupported_mode")


def test_missing_file_and_bad_bodies_are_422(client, scan):
    assert_error(client.post("/v1/segment"), 422, "missing_file")
    assert_error(client.post("/v1/segment", json={"file": "x"}), 422, "missing_file")
    assert_error(client.post("/v1/segment", files={"scan": ("a.png", scan, "image/png")}), 422, "missing_file")
    assert_error(client.post("/v1/segment", data={"file": "not a file"}), 422, "missing_file")
    r = client.post("/v1/segment", content=b"garbage", headers={"content-type": "multipart/form-data"})
    assert_error(r, 422, "bad_multipart")
    two = [("file", ("a.png", scan, "image/png")), ("file", ("b.png", scan, "image/png"))]
    assert_error(client.post("/v1/segment", files=two), 422, "bad_multipart")


@pytest.mark.parametrize("value", ["0", "1", "-0.5", "1.5", "abc", "nan", "inf", ""])
def test_bad_threshold_is_422(client, scan, value):
    assert_error(post(client, scan, threshold=value), 422, "invalid_parameter")


def test_bad_format_and_unknown_routes(client, scan):
    assert_error(post(client, scan, format="gif"), 422, "invalid_parameter")
    assert_error(client.get("/v2/segment"), 404, "not_found")
    assert_error(client.get("/v1/segment"), 405, "method_not_allowed")


def test_busy_service_says_503(client, scan):
    service = client.app.state.service
    service.pending = service.settings.max_pending
    try:
        r = post(client, scan)
        assert_error(r, 503, "busy")
        assert r.headers["retry-after"] == "1"
    finally:
        service.pending = 0


# --- auth ----------------------------------------------------------------------------------------------------


def test_api_key_guards_v1_only(predictor, scan):
    c = make_client(predictor, api_key="s3cret")
    try:
        assert_error(c.get("/v1/model"), 401, "unauthorized")
        assert_error(c.get("/v1/model", headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        assert_error(c.get("/v1/model", headers={"Authorization": "Basic s3cret"}), 401, "unauthorized")
        assert_error(post(c, scan), 401, "unauthorized")
        assert c.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/v1/segment", files={"file": ("a.png", scan, "image/png")}, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200
        for path in ("/healthz", "/readyz", "/", "/static/app.js"):
            assert c.get(path).status_code == 200, path
    finally:
        c.__exit__(None, None, None)


def test_api_key_of_any_utf8_text_works_in_both_headers(predictor, scan):
    """Clients send the key's UTF-8 bytes; Starlette hands the header over decoded as latin-1, so the key
    only matches when both sides are compared as those bytes (and in constant time)."""
    key = "clé-秘密"
    raw = key.encode("utf-8")
    c = make_client(predictor, api_key=key)
    try:
        assert c.get("/v1/model", headers={"X-API-Key": raw}).status_code == 200
        assert c.get("/v1/model", headers={"Authorization": b"Bearer " + raw}).status_code == 200
        r = c.post("/v1/segment", files={"file": ("a.png", scan, "image/png")}, headers={"X-API-Key": raw})
        assert r.status_code == 200, r.text
        latin1 = "clé".encode("latin-1") + "-秘密".encode()
        for wrong in ("clé-秘蜜".encode(), raw[:-1], raw + b"x", latin1, key.encode("utf-16"), b"cl-", b""):
            for headers in ({"X-API-Key": wrong}, {"Authorization": b"Bearer " + wrong}):
                assert_error(c.get("/v1/model", headers=headers), 401, "unauthorized")
    finally:
        c.__exit__(None, None, None)


@pytest.mark.parametrize("key", ["", " ", "\t\n "])
def test_empty_api_key_is_refused_when_the_app_is_made(predictor, key):
    """An empty key would either lock every client out or, if treated as unset, serve without one."""
    with pytest.raises(ValueError, match="--api-key is empty"):
        create_app(predictor, Settings(api_key=key))


def test_keep_uploads_naming_a_file_is_refused_at_start(predictor, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    with pytest.raises(ValueError, match="--keep-uploads must name a folder") as info:
        create_app(predictor, Settings(keep_uploads=notes))
    assert str(info.value).startswith(f"{notes}: ") and "\n" not in str(info.value)
    assert notes.read_text() == "not a folder"
    # a file, or a dangling link, that appears after the settings were made: the same one line
    later, dangling = tmp_path / "later", tmp_path / "dangling"
    settings = Settings(keep_uploads=later)
    later.write_text("x")
    dangling.symlink_to(tmp_path / "nowhere")
    for path, s in ((later, settings), (dangling, Settings(keep_uploads=dangling))):
        with pytest.raises(ValueError, match="--keep-uploads must name a folder") as info:
            create_app(predictor, s)
        assert str(info.value).startswith(f"{path}: ")


def test_settings_are_validated():
    with pytest.raises(ValueError, match="threshold"):
        Settings(threshold=1.0)
    with pytest.raises(ValueError, match="api-key"):
        Settings(api_key=" ")
    with pytest.raises(ValueError, match="workers"):
        Settings(workers=0)


# --- privacy and request ids ---------------------------------------------------------------------------------


def test_uploads_never_touch_the_disk(client, monkeypatch):
    """A > 1 MB upload (Starlette's usual spool limit) with every way to a file blocked."""
    big = encode(np.random.default_rng(0).integers(0, 256, (1100, 1100), dtype=np.uint8))
    assert len(big) > 1024 * 1024

    def refuse(*args, **kwargs):
        raise AssertionError("the service tried to write a file")

    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            refuse()
        return real_open(file, mode, *args, **kwargs)

    real_os_open = os.open

    def guarded_os_open(path, flags, *args, **kwargs):  # what hemaseg.io creates its temp files with
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse()
        return real_os_open(path, flags, *args, **kwargs)

    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", refuse)
    monkeypatch.setattr(builtins, "open", guarded_open)
    r = post(client, big, format="png")
    assert r.status_code == 200, r.text


def test_keep_uploads_are_named_by_the_server_never_by_the_client(predictor, scan, tmp_path, caplog):
    c = make_client(predictor, keep_uploads=tmp_path / "kept")
    other = scan[:-12] + b"\x00" * 12  # another client's upload
    try:
        with caplog.at_level(logging.INFO, logger="hemaseg.serve"):
            r = post(c, scan, name="Jane_Doe_1970.png", headers={"X-Request-ID": "same-id"})
            r2 = post(c, other, name="Jane_Doe_1970.png", headers={"X-Request-ID": "same-id"})
            bad = post(c, b"not an image", name="Jane_Doe_1970.png")
    finally:
        c.__exit__(None, None, None)
    kept = sorted((tmp_path / "kept").iterdir())
    assert len(kept) == 3 and sorted(p.suffix for p in kept) == [".bin", ".png", ".png"]
    assert sorted(p.read_bytes() for p in kept if p.suffix == ".png") == sorted([scan, other])  # nothing overwritten
    assert not any("same-id" in p.name or "Jane" in p.name for p in kept)
    assert r.status_code == 200 and r2.status_code == 200 and bad.status_code == 415
    assert all(f"upload kept as {p.name}" in caplog.text for p in kept)  # the log ties a file to its request


def test_logs_carry_request_id_and_sizes_but_no_names(client, scan, caplog):
    with caplog.at_level(logging.INFO, logger="hemaseg.serve"):
        r = post(client, scan, name="Jane_Doe_1970.png")
    text = caplog.text
    assert r.json()["request_id"] in text and f"bytes={len(scan)}" in text and "image=64x64" in text
    assert "Jane_Doe" not in text


def test_request_id_is_echoed_when_sane(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    odd = client.get("/healthz", headers={"X-Request-ID": "bad id; drop table"}).headers["x-request-id"]
    assert odd != "bad id; drop table" and len(odd) == 32


# --- batching worker -----------------------------------------------------------------------------------------


def test_batching_worker_gives_the_same_masks(predictor, scan, tiny_data):
    images = [read_image(p) for p in sorted((tiny_data / "images").glob("*.png"))[:6]]
    expected = predictor.predict_proba_batch(images)
    c = make_client(predictor, max_batch=4, workers=4)
    try:
        service = c.app.state.service
        results: dict[int, np.ndarray] = {}

        def run(i):
            results[i] = service.probabilities(images[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(images))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, e in enumerate(expected):
            np.testing.assert_allclose(results[i], e, atol=1e-5)
        assert post(c, scan).status_code == 200
    finally:
        c.__exit__(None, None, None)


# --- the command -----------------------------------------------------------------------------------------------


def test_serve_command_wires_flags_and_the_key_from_the_environment(tiny_run, scan, monkeypatch):
    import uvicorn

    from hemaseg.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setenv("HEMASEG_API_KEY", "from-env")
    assert main(["-q", "serve", str(tiny_run), "--port", "8123", "--max-upload-mb", "0.001", "--device", "cpu",
                 "--threshold", "0.3", "--allowed-hosts", "testserver"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    with TestClient(seen["app"]) as c:
        assert_error(c.get("/v1/model"), 401, "unauthorized")
        model = c.get("/v1/model", headers={"X-API-Key": "from-env"}).json()
        assert model["threshold"] == 0.3
        r = c.post("/v1/segment", files={"file": ("a.png", scan, "image/png")}, headers={"X-API-Key": "from-env"})
        assert_error(r, 413, "file_too_large")  # 0.001 MiB


def test_serve_command_refuses_bad_flags(tiny_run, capsys):
    from hemaseg.cli import main

    assert main(["serve", str(tiny_run), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


def _no_server(monkeypatch):
    import uvicorn

    def refuse(*args, **kwargs):
        raise AssertionError("the server was started")

    monkeypatch.setattr(uvicorn, "run", refuse)


@pytest.mark.parametrize("key", ["", "  "])
def test_serve_command_refuses_an_empty_key_from_flag_or_environment(tiny_run, monkeypatch, capsys, key):
    from hemaseg.cli import main

    _no_server(monkeypatch)
    monkeypatch.delenv("HEMASEG_API_KEY", raising=False)
    assert main(["serve", str(tiny_run), "--api-key", key]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hemaseg serve: error: --api-key is empty")
    monkeypatch.setenv("HEMASEG_API_KEY", key)
    assert main(["serve", str(tiny_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HEMASEG_API_KEY" in err


def test_serve_command_refuses_keep_uploads_naming_a_file(tiny_run, tmp_path, monkeypatch, capsys):
    from hemaseg.cli import main

    _no_server(monkeypatch)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    assert main(["serve", str(tiny_run), "--keep-uploads", str(notes)]) == 2
    err = capsys.readouterr().err
    assert err == f"hemaseg serve: error: {notes}: --keep-uploads must name a folder, and this is a file\n"
    assert notes.read_text() == "not a folder"
