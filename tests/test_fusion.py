import torch

from hemaseg.config import ModelConfig
from hemaseg.models import build_model
from hemaseg.models.fusion import fuse_conv_bn, randomize_batchnorm


def test_folding_leaves_the_original_model_alone():
    model = randomize_batchnorm(build_model(ModelConfig())).eval()
    fused = fuse_conv_bn(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 22  # 9 blocks x 2 + 4 ups
    x = torch.randn(2, 1, 32, 48)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=0)


def test_blocks_that_name_their_conv_bn_pairs_are_folded_too():
    model = randomize_batchnorm(build_model(ModelConfig(arch="efficientnet-lite0-unet"))).eval()
    fused = fuse_conv_bn(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(1, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=0)
