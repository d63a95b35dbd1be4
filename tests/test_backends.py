import numpy as np
import pytest
import torch

import hemaseg
from hemaseg.backends import BACKENDS, bf16_supported, fuse_conv_bn, make_backend
from hemaseg.cli import build_parser
from hemaseg.models import ModelConfig, build_model

# logits tolerances against eager fp32: fp32 backends differ only in summation order; bf16 keeps 8 bits
FP32_ATOL = 1e-4
BF16_ATOL = 0.15


def _trained_like_model() -> torch.nn.Module:
    """The seed network with non-trivial BN statistics, so folding them is really exercised."""
    torch.manual_seed(0)
    model = build_model(ModelConfig()).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model


def _backend_names() -> list[str]:
    names = ["torch", "torch-fast", "onnxruntime"]
    return names + (["torch-bf16"] if bf16_supported(torch.device("cpu")) else [])


@pytest.mark.parametrize("name", _backend_names())
def test_every_backend_matches_eager_fp32(name):
    model = _trained_like_model()
    x = torch.randn(2, 1, 48, 32)
    with torch.inference_mode():
        expected = model(x)
    got = make_backend(model, name, "cpu")(x)
    assert got.shape == expected.shape == (2, 1, 48, 32) and got.dtype == torch.float32
    diff = float((got - expected).abs().max())
    assert diff <= (BF16_ATOL if name == "torch-bf16" else FP32_ATOL), diff


def test_folding_leaves_the_original_model_alone():
    model = _trained_like_model()
    fused = fuse_conv_bn(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 22  # 9 blocks x 2 + 4 ups


def test_unknown_backend_lists_the_valid_names():
    with pytest.raises(ValueError, match="torch-fast"):
        make_backend(_trained_like_model(), "tensorrt")


def test_cli_backend_choices_are_the_registry():
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions
                  if a.dest == "backend")
    assert action.choices == list(BACKENDS) and action.default == "torch"


@pytest.mark.parametrize("name", ["torch-fast", "onnxruntime"])
def test_predictor_backends_give_the_torch_masks(tiny_run, name):
    image = np.random.default_rng(0).integers(0, 255, (70, 45), dtype=np.uint8)
    ref = hemaseg.load_model(tiny_run, device="cpu").predict(image)
    got = hemaseg.load_model(tiny_run, device="cpu", backend=name).predict(image)
    np.testing.assert_allclose(got.prob, ref.prob, atol=1e-5)
    assert (got.mask != ref.mask).mean() <= 1e-3
