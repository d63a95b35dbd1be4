import numpy as np
import pytest
import torch

import hemaseg
from hemaseg.config import ModelConfig
from hemaseg.device import bf16_supported
from hemaseg.inference.backends import PARITY_ATOL, auto_candidates, choose_backend, make_backend
from hemaseg.models.fusion import randomize_batchnorm
from hemaseg.models import build_model

# logits tolerances against eager fp32: fp32 backends differ only in summation order; bf16 keeps 8 bits
FP32_ATOL = 1e-4
BF16_ATOL = 0.15


def _trained_like_model(arch: str = "seed") -> torch.nn.Module:
    """A network with non-trivial BN statistics, so folding them is really exercised."""
    torch.manual_seed(0)
    return randomize_batchnorm(build_model(ModelConfig(arch=arch))).eval()


def _backend_names() -> list[str]:
    names = ["torch", "torch-fast", "onnxruntime"]
    return names + (["torch-bf16"] if bf16_supported(torch.device("cpu")) else [])


@pytest.mark.parametrize("arch", ["seed", "efficientnet-lite0-unet"])
@pytest.mark.parametrize("name", _backend_names())
def test_every_backend_matches_eager_fp32(name, arch):
    model = _trained_like_model(arch)
    x = torch.randn(2, 1, 64, 32)
    with torch.inference_mode():
        expected = model(x)
    got = make_backend(model, name, "cpu")(x)
    assert got.shape == expected.shape == (2, 1, 64, 32) and got.dtype == torch.float32
    diff = float((got - expected).abs().max())
    assert diff <= (BF16_ATOL if name == "torch-bf16" else FP32_ATOL), diff


def test_unknown_backend_lists_the_valid_names():
    with pytest.raises(ValueError, match="torch-fast"):
        make_backend(_trained_like_model(), "tensorrt")


@pytest.mark.parametrize("name", ["torch-fast", "onnxruntime"])
def test_predictor_backends_give_the_torch_masks(tiny_run, name):
    image = np.random.default_rng(0).integers(0, 255, (70, 45), dtype=np.uint8)
    ref = hemaseg.load_model(tiny_run, device="cpu").predict(image)
    got = hemaseg.load_model(tiny_run, device="cpu", backend=name).predict(image)
    np.testing.assert_allclose(got.prob, ref.prob, atol=1e-5)
    assert (got.mask != ref.mask).mean() <= 1e-3


def test_auto_picks_the_fastest_backend_that_matches_eager_and_records_why():
    model = _trained_like_model()
    name, backend, record = choose_backend(model, torch.device("cpu"), 64)
    assert name in auto_candidates(torch.device("cpu")) and name != "torch-bf16"
    assert set(record["ms"]) <= set(auto_candidates(torch.device("cpu"))) and name == min(record["ms"], key=record["ms"].get)
    assert all(d <= PARITY_ATOL for n, d in record["max_abs_diff"].items() if n in record["ms"])
    x = torch.randn(1, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(backend(x), model(x), atol=FP32_ATOL, rtol=0)


def test_auto_never_chooses_a_backend_that_fails_parity(monkeypatch):
    import hemaseg.inference.backends as backends

    class Wrong:
        def __call__(self, x):
            return torch.full_like(x, 5.0)

    real = backends.make_backend
    monkeypatch.setattr(backends, "make_backend", lambda m, n, d="cpu": Wrong() if n == "torch-fast" else real(m, n, d))
    name, _, record = choose_backend(_trained_like_model(), torch.device("cpu"), 32)
    assert name != "torch-fast" and "parity" in record["skipped"]["torch-fast"]


def test_the_default_predictor_runs_auto_and_says_what_it_chose(tiny_run):
    model = hemaseg.load_model(tiny_run, device="cpu")
    assert model.backend in auto_candidates(torch.device("cpu")) and "backend_auto" in model.metadata
