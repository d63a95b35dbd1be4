"""The labelling service in-process (FastAPI TestClient): the worklist's order, saving (pixels, manifest,
DICOM privacy, confinement, all-or-nothing), reopening, and a fine-tune that swaps the model.

The model and LiteMedSAM are small fakes with their APIs (`FakeModel`: a fixed answer per scan;
`FakeBox`: a box -> the filled ellipse inside it), so every pixel count is exact; one test runs the real
BoxPredictor when it can load."""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from hemaseg.data.images import decode_image
from hemaseg.inference.prediction import Prediction
from hemaseg.label import FinetuneSettings, LabelSettings, create_app
from hemaseg.label import store as store_module
from hemaseg.label.app import parse_spacing_text, rle_decode, rle_encode
from hemaseg.label.finetune import holdout_split
from hemaseg.label.store import MANIFEST, OutsideDataset, Store

# --- fakes with the real APIs ---------------------------------------------------------------------------


def gray_key(gray: np.ndarray) -> str:
    return hashlib.sha256(np.round(np.asarray(gray) * 255).astype(np.uint8).tobytes()).hexdigest()


def disk(shape, cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def ellipse(shape, box) -> np.ndarray:
    """The filled ellipse inside the inclusive pixel box (x0, y0, x1, y1): FakeBox's answer."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1


class FakeBox:
    """BoxPredictor's API: a box -> the filled ellipse in it; a positive point adds a disk of radius 2,
    a negative one removes it."""

    name = "fake-box"

    def embed(self, image):
        return None

    def predict(self, image, box=None, points=None, point_labels=None, threshold=0.5) -> Prediction:
        shape = np.shape(image)[:2]
        if box is None and points is None:
            raise ValueError("give a box or points")
        mask = ellipse(shape, box) if box is not None else np.zeros(shape, bool)
        for (x, y), lab in zip(points or [], point_labels or []):
            d = disk(shape, int(x), int(y), 2)
            mask = mask | d if lab else mask & ~d
        return Prediction(prob=mask.astype(np.float32), mask=mask, threshold=threshold)


class FakeModel:
    """Predictor's `predict` with a fixed answer per scan: `answers` maps `gray_key(scan)` to (mask,
    confidence), flagged for review at confidence <= 0.5; an unknown scan gets an empty mask at `default`
    confidence, or the model fails on it (ValueError) when `default` is None."""

    name = "fake-model"

    def __init__(self, answers: dict, default: float | None = 0.2):
        self.answers, self.default = answers, default

    def predict(self, image) -> Prediction:
        hit = self.answers.get(gray_key(image))
        if hit is None:
            if self.default is None:
                raise ValueError("the fake model fails on this scan")
            hit = (np.zeros(np.shape(image), bool), self.default)
        mask, conf = hit
        pred = Prediction(prob=mask.astype(np.float32), mask=mask.copy(), threshold=0.5,
                          decision=(0.5, "the fake model's cut"))
        pred.__dict__["confidence"] = conf  # the cached property's slot: the finding reads it
        return pred


def make_scans(folder: Path, confidences: dict[str, float | None], size=(40, 48), seed=0) -> FakeModel:
    """PNG scans named by `confidences`, and a FakeModel that proposes a disk on each with that confidence
    (None: the model fails on that scan)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    answers = {}
    for i, (name, conf) in enumerate(confidences.items()):
        image = rng.integers(0, 256, size, dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{name}.png")
        if conf is not None:
            answers[gray_key(image / 255)] = (disk(size, 20, 15, 6 + i % 3), conf)
    return FakeModel(answers, default=None)


def wait_for(predicate, timeout: float = 60.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("timed out")


ORDER_CONFIDENCES = {"alpha": 0.9, "bravo": 0.3, "charlie": 0.7, "delta": 0.1, "echo": None, "foxtrot": 0.45}
EXPECTED_ORDER = ["delta", "bravo", "foxtrot", "charlie", "alpha", "echo", "golf"]  # golf: unreadable


@pytest.fixture()
def scans(tmp_path) -> tuple[Path, FakeModel]:
    folder = tmp_path / "scans"
    model = make_scans(folder, ORDER_CONFIDENCES)
    (folder / "golf.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # a damaged file: no proposal
    return folder, model


@pytest.fixture()
def client(scans, tmp_path):
    folder, model = scans
    app = create_app(folder, tmp_path / "dataset", model, LabelSettings(device="cpu"), box_predictor=FakeBox())
    with TestClient(app) as c:
        assert app.state.session.wait_idle(30)
        yield c


def save_json(client, name, mask, **fields):
    body = {"mask_rle": rle_encode(mask), "method": "box", "seconds": 12.34, **fields}
    return client.post(f"/api/scans/{name}/save", json=body)


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def assert_error(r, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


# --- small parts ----------------------------------------------------------------------------------------


def test_rle_round_trip_and_refusals():
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 9)) > 0.5, np.ones((3, 4), bool), np.zeros((3, 4), bool)):
        rle = rle_encode(mask)
        assert sum(rle["counts"]) == mask.size
        assert np.array_equal(rle_decode(rle, mask.shape), mask)
    assert rle_encode(np.array([[1, 1, 0]], bool))["counts"] == [0, 2, 1]  # background first, even if empty
    for bad in ({"height": 1, "width": 3, "counts": [1, 1]}, {"height": 1, "width": 3, "counts": [1, -1, 3]},
                {"height": 2, "width": 3, "counts": [6]}, {"height": 1, "width": 3, "counts": [1.5, 1.5]}):
        with pytest.raises(ValueError):
            rle_decode(bad, (1, 3))


@pytest.mark.parametrize("text, x, y", [("0,1", 0.1, 0.1), ("0.1", 0.1, 0.1), ("0.1,0.12", 0.1, 0.12),
                                        ("0,1;0,12", 0.1, 0.12), ("0,1 x 0,12", 0.1, 0.12),
                                        (" 0,08 ", 0.08, 0.08), ("0.1, 0.2", 0.1, 0.2), ("0,1 0,12", 0.1, 0.12)])
def test_pixel_spacing_accepts_a_decimal_comma(text, x, y):
    s = parse_spacing_text(text)
    assert (s.x_mm, s.y_mm, s.source) == (pytest.approx(x), pytest.approx(y), "typed on the label page")


@pytest.mark.parametrize("text", ["0,1,0,12", "abc", "0", "-0,1", "0,1;0,2;0,3"])
def test_pixel_spacing_refuses_ambiguous_or_bad_text(text):
    with pytest.raises(ValueError, match="pixel spacing"):
        parse_spacing_text(text)
    assert parse_spacing_text("  ") is None


def test_holdout_is_seeded_per_name_and_never_empty():
    names = [f"s{i}" for i in range(40)]
    a = holdout_split(names, 0.2, seed=0)
    assert a == holdout_split(list(reversed(names)), 0.2, seed=0)
    assert 2 <= len(a["val"]) <= 16 and set(a["train"]) | set(a["val"]) == set(names)
    more = holdout_split(names + [f"t{i}" for i in range(10)], 0.2, seed=0)
    assert set(a["val"]) <= set(more["val"])  # a held-out scan stays held out as more are saved
    assert holdout_split(["x", "y"], 0.01)["val"] and holdout_split(["x", "y"], 0.99)["train"]


def test_cli_declares_label_with_loopback_defaults():
    from hemaseg.cli import build_parser

    args = build_parser().parse_args(["label", "scans/", "--into", "data"])
    assert (args.command, args.scans, args.into, args.model, args.host, args.port, args.api_key) == \
        ("label", ["scans/"], "data", None, "127.0.0.1", 8765, None)


# --- the worklist ---------------------------------------------------------------------------------------


def test_worklist_puts_the_most_doubtful_first_and_marks_saved_scans(client):
    w = client.get("/api/worklist").json()
    names = [it["name"] for it in w["items"]]
    assert names == EXPECTED_ORDER
    first = w["items"][0]
    assert first["needs_review"] is True and first["confidence"] == 0.1 and "review" in first["finding"]
    assert [it["has_proposal"] for it in w["items"]] == [True] * 5 + [False] * 2
    assert w["items"][-1]["problem"] and w["progress"] == "0 of 7 labelled" and w["model"] == "fake-model"
    assert w["box"] == {"state": "ready", "model": "fake-box", "problem": None}

    mask = np.zeros((40, 48), bool)
    assert save_json(client, "charlie", mask, method="edited").status_code == 200
    w = client.get("/api/worklist").json()
    assert [it["name"] for it in w["items"]] == EXPECTED_ORDER  # saved scans keep their place
    assert [it["name"] for it in w["items"] if it["saved"]] == ["charlie"]
    assert w["items"][3]["method"] == "edited" and w["progress"] == "1 of 7 labelled" and w["labelled"] == 1


def test_proposal_gives_the_outline_and_the_mask(client, scans):
    p = client.get("/api/scans/delta/proposal").json()
    assert p["available"] and p["needs_review"] and p["model"] == "fake-model"
    mask = rle_decode(p["mask_rle"], (40, 48))
    assert mask.sum() == p["area_px"] > 0 and len(p["outlines"]) == 1
    xs, ys = zip(*p["outlines"][0])
    assert min(xs) >= 0 and max(xs) < 48 and max(ys) < 40
    assert client.get("/api/scans/echo/proposal").json()["available"] is False
    assert_error(client.get("/api/scans/nobody/proposal"), 404, "unknown_scan")
    assert_error(client.get("/api/scans/golf"), 422, "unreadable_scan")
    img = read_png(io.BytesIO(client.get("/api/scans/alpha/image").content))
    assert np.array_equal(img, read_png(scans[0] / "alpha.png"))


def test_box_gives_the_box_predictors_mask(client):
    r = client.post("/api/scans/alpha/box", json={"box": [5, 6, 25, 20]})
    assert r.status_code == 200, r.text
    expected = ellipse((40, 48), (5, 6, 25, 20))
    assert np.array_equal(rle_decode(r.json()["mask_rle"], (40, 48)), expected)
    assert r.json()["area_px"] == expected.sum() and r.json()["model"] == "fake-box"
    r = client.post("/api/scans/alpha/box", json={"box": [5, 6, 25, 20], "points": [[40, 30]], "point_labels": [1]})
    assert r.json()["area_px"] == expected.sum() + disk((40, 48), 40, 30, 2).sum()
    assert_error(client.post("/api/scans/alpha/box", json={}), 422, "missing_prompt")


# --- saving -------------------------------------------------------------------------------------------------


def test_save_writes_the_scan_the_mask_and_a_manifest_row(client, scans, tmp_path):
    dataset = tmp_path / "dataset"
    mask = np.zeros((40, 48), bool)
    mask[10:20, 5:17] = True  # 120 px
    r = save_json(client, "bravo", mask, pixel_spacing="0,1", base="box")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["saved"]["image"] == "images/bravo.png" and body["saved"]["mask"] == "mask/bravo.png"
    assert body["saved"]["area_px"] == 120 and body["progress"] == "1 of 7 labelled"
    assert np.array_equal(read_png(dataset / "images" / "bravo.png"), read_png(scans[0] / "bravo.png"))
    saved_mask = read_png(dataset / "mask" / "bravo.png")
    assert saved_mask.dtype == np.uint8 and set(np.unique(saved_mask)) == {0, 255} and (saved_mask == 255).sum() == 120
    rows = (dataset / MANIFEST).read_text().splitlines()
    assert rows[0] == "image,mask,method,seconds,pixel_spacing_x_mm,pixel_spacing_y_mm,spacing_source,model"
    assert rows[1:] == ["bravo.png,bravo.png,box,12.3,0.1,0.1,typed on the label page,fake-box"]
    side = json.loads((dataset / "calibration" / "bravo.json").read_text())
    assert side["pixel_spacing"] == {"x_mm": 0.1, "y_mm": 0.1, "source": "typed on the label page"}

    # the same scan again, as a PNG upload (multipart), accepted from the proposal: one row, replaced
    proposal = rle_decode(client.get("/api/scans/bravo/proposal").json()["mask_rle"], (40, 48))
    png = io.BytesIO()
    Image.fromarray(proposal.astype(np.uint8) * 255).save(png, "PNG")
    r = client.post("/api/scans/bravo/save", files={"mask": ("m.png", png.getvalue(), "image/png")},
                    data={"method": "accepted", "seconds": "3,5"})
    assert r.status_code == 200, r.text
    assert (read_png(dataset / "mask" / "bravo.png") > 0).sum() == proposal.sum()
    rows = (dataset / MANIFEST).read_text().splitlines()
    assert rows[1:] == ["bravo.png,bravo.png,accepted,3.5,,,,fake-model"]

    # a base64 PNG in JSON; hemaseg's own dataset reader takes the result as it is
    b64 = base64.b64encode(png.getvalue()).decode()
    assert client.post("/api/scans/alpha/save", json={"mask_png": b64, "method": "edited"}).status_code == 200
    from hemaseg.data.dataset import check_dataset

    report = check_dataset(dataset)
    assert report.ok and report.n_pairs == 2

    assert_error(save_json(client, "alpha", np.zeros((4, 4), bool)), 422, "bad_mask")
    assert_error(save_json(client, "alpha", mask, method="guessed"), 422, "invalid_parameter")
    assert_error(save_json(client, "alpha", mask, pixel_spacing="0,1,0,2"), 422, "invalid_pixel_spacing")
    assert_error(client.post("/api/scans/alpha/save", json={"method": "box"}), 422, "missing_mask")


def test_a_saved_scan_reopens_with_its_mask(client):
    assert_error(client.get("/api/scans/foxtrot/mask"), 404, "not_saved")
    assert client.get("/api/scans/foxtrot").json()["saved"] is None
    mask = ellipse((40, 48), (3, 4, 30, 33))
    assert save_json(client, "foxtrot", mask).status_code == 200
    reopened = read_png(io.BytesIO(client.get("/api/scans/foxtrot/mask").content)) > 0
    assert np.array_equal(reopened, mask)
    info = client.get("/api/scans/foxtrot").json()
    assert info["saved"]["method"] == "box" and info["dataset_name"] == "foxtrot"


def test_dicom_is_saved_as_png_with_a_sidecar_and_no_identifier(tmp_path):
    from tests.dicom_files import native, save

    folder = tmp_path / "scans"
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    twelve = rng.integers(0, 4096, (48, 64), dtype=np.uint16)
    who = {"PatientName": "Doe^Jane", "PatientID": "ID-98765", "PatientBirthDate": "20230102",
           "InstitutionName": "Saint Example Hospital"}
    save(native(pixels, PixelSpacing=[0.2, 0.1], BurnedInAnnotation="NO", **who), folder, "scan7.dcm")
    save(native(twelve, bits=12, **who), folder, "doe_jane.dcm")  # named after her
    save(native(pixels[::-1].copy(), **who), folder, "ID-98765 left.dcm")  # named by the ID
    dataset = tmp_path / "dataset"
    app = create_app(folder, dataset, None, LabelSettings(device="cpu"), box_predictor=FakeBox())
    with TestClient(app) as client:
        assert app.state.session.wait_idle(30)
        info = client.get("/api/scans/scan7").json()
        assert info["format"] == "DICOM" and info["burned_in_annotation"] is False
        assert info["spacing"] == {"x_mm": 0.1, "y_mm": 0.2, "source": "pixel spacing (0028,0030)"}
        shown = read_png(io.BytesIO(client.get("/api/scans/scan7/image").content))
        assert np.array_equal(shown, pixels)
        mask = ellipse((48, 64), (10, 10, 40, 30))
        for name in ("scan7", "doe_jane", "ID-98765 left"):
            r = save_json(client, name, mask, pixel_spacing="0,5")
            assert r.status_code == 200, r.text
        names = {it["name"]: it for it in client.get("/api/worklist").json()["items"]}
        assert all(it["saved"] for it in names.values())
        assert client.get("/api/scans/doe_jane").json()["burned_in_annotation"] is True  # unknown counts as yes

    written = sorted(p for p in dataset.rglob("*") if p.is_file())
    images = sorted(p.name for p in (dataset / "images").iterdir())
    assert images[-1] == "scan7.png" and all(n.startswith("scan-") for n in images[:2])
    assert np.array_equal(read_png(dataset / "images" / "scan7.png"), pixels)
    twelve_saved = [p for p in (dataset / "images").iterdir() if read_png(p).dtype == np.uint16]
    assert len(twelve_saved) == 1  # 12-bit pixels kept exactly, in a 16-bit PNG
    np.testing.assert_allclose(decode_image(twelve_saved[0]).gray, twelve / 4095, atol=1e-5)
    side = json.loads((dataset / "calibration" / "scan7.json").read_text())
    assert side["pixel_spacing"]["source"] == "pixel spacing (0028,0030)" and side["burned_in_annotation"] is False
    others = [json.loads(p.read_text()) for p in (dataset / "calibration").glob("scan-*.json")]
    assert all(s["pixel_spacing"]["source"] == "typed on the label page" for s in others)
    for p in written:
        data = p.read_bytes().lower()
        for secret in (b"doe", b"jane", b"98765", b"20230102", b"example hospital", b"left"):
            assert secret not in data, f"{p.relative_to(dataset)} holds {secret!r}"
        assert not any(s in p.name.lower() for s in ("doe", "jane", "98765"))


# --- confinement and failures ---------------------------------------------------------------------------


def test_paths_that_escape_the_dataset_are_refused(client, scans, tmp_path):
    dataset = tmp_path / "dataset"
    store = Store(dataset)
    gray, mask = np.zeros((4, 4), np.float32), np.zeros((4, 4), bool)
    for name in ("../evil", "..", "a/b", "/etc/passwd", "..\\evil", ".hidden", "x\x00y", ""):
        with pytest.raises(OutsideDataset):
            store.save(name, gray, mask, "edited", 1.0, None)
    for path in ("/api/scans/..%2F..%2Fevil/save", "/api/scans/%2E%2E/save"):
        assert client.post(path, json={"mask_rle": rle_encode(mask), "method": "box"}).status_code == 404
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "scans"]

    outside = tmp_path / "outside"
    outside.mkdir()
    linked = tmp_path / "linked"
    (linked / "mask").mkdir(parents=True)
    (linked / "images").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutsideDataset, match="leads outside"):
        Store(linked)
    assert list(outside.iterdir()) == []

    with pytest.raises(ValueError, match="holds the scans"):
        create_app(scans[0], scans[0].parent / "scans", None, box_predictor=None)  # into the scans' own folder


@pytest.mark.parametrize("fail_at", ["mask temp", "mask rename", "manifest"])
def test_a_failed_write_leaves_no_half_pair(client, tmp_path, monkeypatch, fail_at):
    dataset = tmp_path / "dataset"
    real_temp, real_replace, real_csv = store_module._write_temp, store_module._replace, store_module.write_csv
    full = OSError(errno.ENOSPC, "No space left on device")

    def temp(path, data):
        if fail_at == "mask temp" and path.parent.name == "mask":
            raise full
        return real_temp(path, data)

    def replace(src, dst):
        if fail_at == "mask rename" and dst.parent.name == "mask":
            raise full
        return real_replace(src, dst)

    def csv(*a, **k):
        if fail_at == "manifest":
            raise full
        return real_csv(*a, **k)

    monkeypatch.setattr(store_module, "_write_temp", temp)
    monkeypatch.setattr(store_module, "_replace", replace)
    monkeypatch.setattr(store_module, "write_csv", csv)
    mask = ellipse((40, 48), (5, 5, 30, 30))
    assert_error(save_json(client, "alpha", mask), 507, "not_saved")
    leftovers = sorted(p.relative_to(dataset).as_posix() for p in dataset.rglob("*") if p.is_file())
    assert leftovers == [], leftovers  # no scan, no mask, no temp file, no sidecar, no manifest, no journal
    assert client.get("/api/worklist").json()["labelled"] == 0

    monkeypatch.undo()
    assert save_json(client, "alpha", mask).status_code == 200
    assert (read_png(dataset / "mask" / "alpha.png") > 0).sum() == mask.sum()


def test_the_next_start_finishes_or_undoes_an_interrupted_save(tmp_path):
    dataset = tmp_path / "dataset"
    store = Store(dataset)
    gray, mask = np.full((6, 5), 0.5, np.float32), np.eye(6, 5, dtype=bool)
    store.save("done", gray, mask, "edited", 1.0, None)

    # killed after the scan's rename, before the mask's: the scan goes
    journal = {"name": "cut", "had_image": False, "had_mask": False, "mask_sha256": "0" * 64,
               "row": {"image": "cut.png"}, "sidecar": {}}
    (dataset / "images" / "cut.png").write_bytes(b"scan")
    (dataset / "mask" / ".cut.png.abcd1234.tmp").write_bytes(b"half")
    (dataset / store_module.JOURNAL).write_text(json.dumps(journal))
    Store(dataset)
    assert sorted(p.name for p in (dataset / "images").iterdir()) == ["done.png"]
    assert list((dataset / "mask").iterdir()) == [dataset / "mask" / "done.png"]

    # killed after the mask's rename, before the manifest: the row is written
    png = store_module.mask_to_png(mask)
    (dataset / "images" / "late.png").write_bytes(store_module.gray_to_png(gray))
    (dataset / "mask" / "late.png").write_bytes(png)
    row = {"image": "late.png", "mask": "late.png", "method": "box", "seconds": 2.0, "model": "m"}
    journal = {"name": "late", "had_image": False, "had_mask": False,
               "mask_sha256": hashlib.sha256(png).hexdigest(), "row": row, "sidecar": {"image": "late.png"}}
    (dataset / store_module.JOURNAL).write_text(json.dumps(journal))
    reopened = Store(dataset)
    assert reopened.row("late")["method"] == "box" and reopened.saved_names() == {"done", "late"}
    assert not (dataset / store_module.JOURNAL).exists()


# --- security ---------------------------------------------------------------------------------------------


def test_api_key_headers_and_cross_site_requests(scans, tmp_path):
    settings = LabelSettings(api_key="s3cret", device="cpu", allowed_hosts=("127.0.0.1", "localhost"))
    app = create_app(scans[0], tmp_path / "dataset", None, settings, box_predictor=None)
    with TestClient(app, base_url="http://127.0.0.1:8765") as client:
        page = client.get("/")
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        assert "http" not in page.text.replace("http://HOST", "")  # nothing from a CDN
        assert_error(client.get("/api/worklist"), 401, "unauthorized")
        key = {"X-API-Key": "s3cret"}
        r = client.get("/api/worklist", headers=key)
        assert r.status_code == 200 and r.headers["x-frame-options"] == "DENY"
        assert r.headers["cache-control"] == "no-store" and r.headers["cross-origin-resource-policy"] == "same-origin"
        assert client.get("/api/worklist", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        evil = {**key, "Origin": "http://evil.example"}
        assert_error(client.post("/api/finetune", headers=evil), 403, "cross_origin")
        same = {**key, "Origin": "http://127.0.0.1:8765"}
        assert_error(client.post("/api/finetune", headers=same), 422, "not_enough_scans")
        assert_error(client.get("/api/worklist", headers={**key, "Host": "rebind.example"}), 421, "wrong_host")
        assert_error(client.post("/api/scans/alpha/box", headers=key, json={"box": [1, 1, 9, 9]}), 503,
                     "box_unavailable")


# --- fine-tune --------------------------------------------------------------------------------------------


class OracleModel(FakeModel):
    """Knows every scan's reference mask: no fine-tune can beat it."""

    def __init__(self, dataset: Path):
        answers = {}
        for p in (dataset / "images").glob("*.png"):
            gray = decode_image(p).gray
            answers[gray_key(gray)] = (read_png(dataset / "mask" / p.name) > 0, 0.9)
        super().__init__(answers, default=0.2)


TINY = FinetuneSettings(overrides={"size": 32, "epochs": 2, "batch_size": 4, "threshold": 0.3}, preset="seed",
                        device="cpu", min_scans=4)


def finetune(client, timeout: float = 90) -> dict:
    r = client.post("/api/finetune")
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "running"
    return wait_for(lambda: (s := client.get("/api/finetune").json())["state"] != "running" and s, timeout)


def test_finetune_swaps_the_model_only_when_it_is_better(tmp_path):
    from hemaseg import write_synthetic_dataset

    dataset = write_synthetic_dataset(tmp_path / "dataset", 12, size=32, seed=5, progress=False)
    scans = tmp_path / "scans"
    make_scans(scans, {"u1": 0.3, "u2": 0.6}, size=(32, 32))
    oracle = OracleModel(dataset)
    blank = FakeModel({}, default=0.2)  # finds nothing anywhere: Dice 0 on every held-out lesion

    app = create_app(scans, dataset, blank, LabelSettings(device="cpu", finetune=TINY), box_predictor=None)
    session = app.state.session
    with TestClient(app) as client:
        assert session.wait_idle(30)
        t = time.monotonic()
        status = finetune(client)
        assert status["state"] == "done", status
        r = status["result"]
        assert r["swapped"] is True and r["dice_old"] == 0.0 and r["dice_new"] > 0.0
        assert r["n_holdout"] == len(holdout_split([str(i) for i in range(1, 13)], 0.2)["val"]) >= 1
        assert r["n_train"] + r["n_holdout"] == 12 and status["model"] == r["new_model"] == "finetune-001"
        assert time.monotonic() - t < 60
        run = dataset / "label_runs" / "finetune-001"
        assert (run / "last.pt").is_file() and json.loads((run / "label_finetune.json").read_text())["swapped"]
        assert json.loads((run / "splits.json").read_text())["val"] == r["holdout"]
        assert not list((dataset / "label_runs").glob(".cache-*"))  # the training cache went with the run
        assert session.wait_idle(30)
        w = client.get("/api/worklist").json()
        assert w["model"] == "finetune-001"
        assert client.get("/api/scans/u1/proposal").json()["model"] == "finetune-001"

    app = create_app(scans, dataset, oracle, LabelSettings(device="cpu", finetune=TINY), box_predictor=None)
    with TestClient(app) as client:
        status = finetune(client)
        assert status["state"] == "done", status
        r = status["result"]
        assert r["swapped"] is False and r["dice_old"] == 1.0 and r["dice_new"] < 1.0
        assert client.get("/api/worklist").json()["model"] == "fake-model"
        assert (dataset / "label_runs" / "finetune-002" / "label_finetune.json").is_file()


def test_finetune_runs_one_at_a_time_and_needs_enough_scans(tmp_path):
    from hemaseg import write_synthetic_dataset

    scans = tmp_path / "scans"
    model = make_scans(scans, {"u1": 0.3}, size=(32, 32))
    few = write_synthetic_dataset(tmp_path / "few", 2, size=32, seed=1, progress=False)
    app = create_app(scans, few, model, LabelSettings(device="cpu", finetune=TINY), box_predictor=None)
    with TestClient(app) as client:
        assert_error(client.post("/api/finetune"), 422, "not_enough_scans")
    dataset = write_synthetic_dataset(tmp_path / "dataset", 6, size=32, seed=2, progress=False)
    slow = FinetuneSettings(overrides={"size": 32, "epochs": 50, "batch_size": 4}, preset="seed", device="cpu")
    app = create_app(scans, dataset, model, LabelSettings(device="cpu", finetune=slow), box_predictor=None)
    with TestClient(app) as client:
        assert client.post("/api/finetune").status_code == 202
        assert_error(client.post("/api/finetune"), 409, "busy")
        assert client.get("/api/worklist").status_code == 200  # the page stays usable meanwhile
        app.state.session.finetuner.stop(timeout=60)
        assert client.get("/api/finetune").json()["state"] == "stopped"


# --- the real LiteMedSAM --------------------------------------------------------------------------------


def test_the_real_box_predictor_outlines_inside_the_box(tmp_path):
    promptable = pytest.importorskip("hemaseg.inference.promptable")
    try:
        box_predictor = promptable.BoxPredictor(device="cpu", backend="torch")
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(f"LiteMedSAM cannot load here: {e}")
    from hemaseg.data.synth import synth_scan

    for seed in range(30):
        image, mask = synth_scan(np.random.default_rng(seed), 96)
        if 0.03 < (mask > 0).mean() < 0.3:
            break
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(image).save(scans / "s.png")
    ys, xs = np.nonzero(mask)
    box = [int(xs.min()) - 3, int(ys.min()) - 3, int(xs.max()) + 3, int(ys.max()) + 3]
    app = create_app(scans, tmp_path / "dataset", None, LabelSettings(device="cpu"), box_predictor=box_predictor)
    with TestClient(app) as client:
        r = client.post("/api/scans/s/box", json={"box": box})
        assert r.status_code == 200, r.text
        out = rle_decode(r.json()["mask_rle"], image.shape)
        assert r.json()["model"] == "litemedsam" and out.sum() > 0
        inside = out[max(box[1] - 2, 0): box[3] + 3, max(box[0] - 2, 0): box[2] + 3].sum()
        assert inside >= 0.9 * out.sum()


def test_finetune_keeps_the_recipe_of_a_real_run(tiny_run, tmp_path):
    """The old model is a trained run: the fine-tune copies its network and input size, and the swap
    follows the held-out Dice whichever way it goes."""
    from hemaseg import write_synthetic_dataset
    from hemaseg.config import RunConfig
    from hemaseg.inference.predictor import load_model

    old = load_model(tiny_run, device="cpu", backend="torch")
    dataset = write_synthetic_dataset(tmp_path / "dataset", 8, size=32, seed=3, progress=False)
    scans = tmp_path / "scans"
    make_scans(scans, {"u1": 0.5}, size=(32, 32))
    settings = LabelSettings(device="cpu", finetune=FinetuneSettings(overrides={"epochs": 1}, device="cpu"))
    app = create_app(scans, dataset, old, settings, box_predictor=None, predictor_name="tiny")
    with TestClient(app) as client:
        status = finetune(client)
        assert status["state"] == "done", status
        r = status["result"]
        assert r["old_model"] == "tiny" and r["swapped"] == (r["dice_new"] > r["dice_old"])
        assert client.get("/api/worklist").json()["model"] == ("finetune-001" if r["swapped"] else "tiny")
    cfg = RunConfig.load(dataset / "label_runs" / "finetune-001" / "config.json")
    assert cfg.model == old.config.model and cfg.data.size == old.config.data.size == 32
    assert cfg.data.root == str(dataset) and cfg.train.epochs == 1 and cfg.train.budget_minutes is None
