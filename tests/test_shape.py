"""Inputs shaped like the scans: the plan fits height x width to the data's median aspect ratio, and a
non-square input goes through every path (training cache, both augmentations, predictor, every backend,
ONNX export, the service, the CLI)."""

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import hemaseg
from hemaseg.cli import main
from hemaseg.config import (
    SQUARE_WITHIN,
    DatasetStats,
    RunConfig,
    format_size,
    input_hw,
    make_plan,
    parse_size,
    resolve_config,
)
from hemaseg.data.cache import open_or_build
from hemaseg.data.dataset import load_dataset
from hemaseg.data.plan import configure
from hemaseg.data.synth import write_synthetic_dataset
from hemaseg.device import bf16_supported
from hemaseg.inference.backends import choose_backend
from hemaseg.inference.export import export_onnx
from hemaseg.io import png_bytes
from hemaseg.serve import Settings, create_app
from hemaseg.training.train import fit

WIDE = (32, 64)  # height x width of the test runs' input: the 2:1 scans below fill it without padding


@pytest.fixture(scope="module")
def wide_data(tmp_path_factory):
    """12 synthetic 48 x 96 scans: the 2:1 shape of a high-frequency skin scan."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("wide") / "data", 12, size=(48, 96), seed=5,
                                   progress=False)


@pytest.fixture(scope="module")
def wide_run(wide_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("wide_run") / "run"
    fit(resolve_config(wide_data, "seed", None, "cpu", {"size": WIDE, "epochs": 2, "batch_size": 4}), out,
        progress=False)
    return out


# --- the plan -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aspect", [0.5, 0.75, 1.2, 1.48, 2.0, 3.0])
def test_the_plan_fits_the_preset_pixel_count_to_the_median_aspect_ratio(aspect):
    plan = make_plan("default", DatasetStats(n_pairs=10, median_longer_side=2000, median_aspect=aspect))
    h, w = input_hw(plan.size)
    assert h % 32 == 0 and w % 32 == 0 and not isinstance(plan.size, int)
    assert 0.85 < h * w / 256**2 < 1.15  # the preset's pixel budget, rounded to whole 32-pixel steps
    assert abs(math.log(w / h / aspect)) < math.log(1.25)  # as close to the data's shape as 32 px steps allow
    assert plan.batch_size == (8 if h * w <= 256**2 else 4)


def test_square_data_keeps_a_square_and_small_scans_are_not_upsampled():
    assert make_plan("default", DatasetStats(10, 2000, median_aspect=1.0)).size == 256
    assert make_plan("default", DatasetStats(10, 2000, median_aspect=SQUARE_WITHIN - 0.01)).size == 256
    assert make_plan("default", DatasetStats(10, 100, median_aspect=1.0)).size == 128  # old rule: ceil to 32
    # a 2:1 scan of 200 x 100 px: never above its sides rounded up to 32
    assert make_plan("default", DatasetStats(10, 200, median_aspect=2.0)).size == (128, 224)
    assert make_plan("default", DatasetStats(10, 200, median_aspect=0.5)).size == (224, 128)


def test_the_data_sets_the_shape_and_the_config_keeps_it(wide_data, tiny_data, tmp_path):
    cfg, loaded = configure(wide_data, "default")
    # the median scan (48 x 96) caps each side at its own rounded up to 32 px
    assert loaded.stats.median_aspect == 2.0 and cfg.data.size == (64, 96)
    assert "input 64x96 px" in cfg.plan.describe(cfg)
    cfg.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["data"]["size"] == [64, 96]
    assert RunConfig.load(tmp_path / "config.json") == cfg
    assert configure(tiny_data, "default")[0].data.size == 64  # square scans: a square, as before


def test_sizes_parse_and_are_checked_on_each_side():
    assert parse_size("256") == 256 and parse_size("224x320") == (224, 320) and parse_size("64X64") == 64
    assert format_size((224, 320)) == "224x320" and format_size(256) == "256"
    for bad in ("wide", "1x2x3", "x64"):
        with pytest.raises(ValueError, match="height x width"):
            parse_size(bad)
    assert resolve_config("d", "seed", None, "cpu", {"size": (64, 64)}).data.size == 64  # one spelling of a square
    with pytest.raises(ValueError, match="multiple of 16 on each side .* got 32x40, try 32x32 or 32x48"):
        resolve_config("d", "seed", None, "cpu", {"size": (32, 40)})


# --- every path -----------------------------------------------------------------------------------------


def test_a_non_square_run_caches_trains_and_predicts_at_the_scan_size(wide_run, wide_data):
    cfg = RunConfig.load(wide_run / "config.json")
    assert cfg.data.hw == WIDE
    loaded = load_dataset(wide_data)
    cache = open_or_build(loaded.samples, loaded.fingerprint, cfg.data.size, None, None, None)
    assert cache.images.shape == (12, *WIDE) and cache.masks.shape == (12, *WIDE)
    assert all((b.top, b.left, b.new_h, b.new_w) == (0, 0, *WIDE) for b in cache.boxes)  # 2:1 fills 2:1
    model = hemaseg.load_model(wide_run, device="cpu", backend="torch")
    for shape in ((48, 96), (70, 45)):  # its own shape, and a tall scan letterboxed into the wide input
        image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
        p = model.predict(image)
        assert p.prob.shape == p.mask.shape == shape and np.isfinite(p.prob).all()


def test_the_batch_augmentation_path_trains_a_non_square_input(wide_data, tmp_path):
    cfg = resolve_config(wide_data, "seed", None, "cpu", {"size": WIDE, "epochs": 1, "batch_size": 4,
                                                         "augment_on": "batch"})
    summary = fit(cfg, tmp_path / "run", progress=False)
    assert summary["epochs"] == 1 and math.isfinite(summary["best_val_dice"])


BACKENDS = ["torch-fast", "onnxruntime"] + (["torch-bf16"] if bf16_supported(torch.device("cpu")) else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_gives_the_torch_result_on_a_non_square_input(wide_run, backend):
    image = np.random.default_rng(1).integers(0, 255, (48, 96), dtype=np.uint8)
    ref = hemaseg.load_model(wide_run, device="cpu", backend="torch").predict(image)
    got = hemaseg.load_model(wide_run, device="cpu", backend=backend).predict(image)
    np.testing.assert_allclose(got.prob, ref.prob, atol=0.05 if backend == "torch-bf16" else 1e-5)


def test_auto_measures_at_the_run_input_shape(wide_run):
    model = hemaseg.load_model(wide_run, device="cpu", backend="torch").model
    name, backend, record = choose_backend(model, torch.device("cpu"), WIDE)
    assert record["size"] == "32x64"
    assert backend(torch.zeros(1, 1, *WIDE)).shape == (1, 1, *WIDE)


def test_onnx_export_of_a_non_square_run_says_its_shape_and_matches(wide_run, tmp_path):
    result = export_onnx(wide_run, tmp_path / "model.onnx")
    props = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert (props["input_size"], props["input_height"], props["input_width"]) == ("32x64", "32", "64")
    assert "height 32 and width 64" in props["usage"] and "(N,1,32,64)" in props["usage"]
    x = np.random.default_rng(0).standard_normal((1, 1, *WIDE), dtype=np.float32)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": x})
    model = hemaseg.load_model(wide_run, device="cpu", backend="torch").model
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_the_service_reports_and_uses_the_shape(wide_run):
    predictor = hemaseg.load_model(wide_run, device="cpu")
    with TestClient(create_app(predictor, Settings(allowed_hosts=("testserver",)))) as client:
        m = client.get("/v1/model").json()
        assert (m["input_size"], m["input_height"], m["input_width"]) == (list(WIDE), *WIDE)
        scan = np.random.default_rng(2).integers(0, 255, (60, 150), dtype=np.uint8)
        reply = client.post("/v1/segment", files={"file": ("scan.png", png_bytes(scan), "image/png")})
        assert reply.status_code == 200, reply.text
        expected = predictor.predict(scan)
        assert reply.json()["area_px"] == int(expected.mask.sum())


def test_cli_takes_height_x_width_and_names_the_flag_when_it_does_not_fit(wide_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["-q", "train", str(wide_data), "--out", str(out), "--preset", "seed", "--size", "32x64",
                 "--epochs", "1", "--batch-size", "4"]) == 0
    assert json.loads((out / "config.json").read_text())["data"]["size"] == [32, 64]
    assert main(["-q", "train", str(wide_data), "--out", str(tmp_path / "bad"), "--preset", "seed",
                 "--size", "32x40"]) == 2
    assert "--size must be a multiple of 16 on each side" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(wide_data), "--size", "32by64"])
    assert "height x width" in capsys.readouterr().err


def test_synth_writes_scans_of_a_given_height_x_width(tmp_path):
    assert main(["-q", "synth", str(tmp_path / "d"), "--n", "2", "--size", "40x72"]) == 0
    for folder in ("images", "mask"):
        assert Image.open(tmp_path / "d" / folder / "1.png").size == (72, 40)  # PIL: (width, height)
