from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import hemaseg
from hemaseg.cli import main
from hemaseg.inference.export import export_onnx


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    return export_onnx(tiny_run, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_export_checks_parity_and_embeds_the_preprocessing(exported):
    assert exported.path.is_file() and 0 <= exported.max_abs_diff < 1e-4
    props = {p.key: p.value for p in onnx.load(exported.path).metadata_props}
    assert props["input_policy"] == "letterbox" and props["input_size"] == "32"
    assert props["normalization"] == "zscore" and props["threshold"] == "0.5" and props["size_multiple"] == "16"
    assert props["model_arch"] == "seed" and props["hemaseg_version"] == hemaseg.__version__
    assert "postprocessing" in props and "canvas" in props["usage"]


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (3, 1, 48, 80)])
def test_exported_model_has_dynamic_batch_height_width(tiny_run, exported, shape):
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    (logits,) = session.run(None, {"image": x})
    with torch.inference_mode():
        expected = hemaseg.load_model(tiny_run, device="cpu").model(torch.from_numpy(x)).numpy()
    assert logits.shape == shape
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_cli_export_writes_run_model_onnx(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes((tiny_run / "best.pt").read_bytes())
    assert main(["-q", "export", str(run), "--format", "onnx"]) == 0
    assert (run / "model.onnx").is_file() and "max abs diff" in capsys.readouterr().out


def test_cli_predict_with_onnxruntime_matches_torch(tiny_run, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, (h, w) in enumerate([(45, 77), (90, 31), (64, 64)]):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w), dtype=np.uint8)).save(src / f"{i}.png")
    masks = {}
    for backend in ("torch", "onnxruntime"):
        assert main(["-q", "predict", str(tiny_run), str(src), "--out", str(tmp_path / backend),
                     "--backend", backend]) == 0
        masks[backend] = [np.asarray(Image.open(tmp_path / backend / f"{i}_mask.png")) for i in range(3)]
    differ = sum(int((a != b).sum()) for a, b in zip(masks["torch"], masks["onnxruntime"]))
    total = sum(a.size for a in masks["torch"])
    assert differ / total <= 1e-3


def test_exporting_the_shipped_model_writes_into_the_working_folder_not_the_install(tmp_path, monkeypatch):
    from hemaseg.inference.export import export_onnx
    from hemaseg.models.pretrained import WEIGHTS_DIR

    before = sorted(p.name for p in WEIGHTS_DIR.iterdir())
    monkeypatch.chdir(tmp_path)
    result = export_onnx("ultrasound")
    assert result.path == Path("ultrasound.onnx") and (tmp_path / "ultrasound.onnx").is_file()
    assert sorted(p.name for p in WEIGHTS_DIR.iterdir()) == before
