import sys

import pytest
import torch

from hemaseg.config import ARCHS, ModelConfig
from hemaseg.models import MODELS, build_model, count_parameters
from hemaseg.models.unet import UNet

from .conftest import SHARED_DATA


def test_seed_config_has_the_original_parameter_count():
    assert count_parameters(build_model(ModelConfig(arch="seed"))) == 487_449


@pytest.mark.parametrize("h,w", [(16, 16), (32, 48), (64, 96), (80, 16)])
def test_output_shape_matches_input_for_sizes_divisible_by_16(h, w):
    model = build_model(ModelConfig()).eval()
    assert model(torch.zeros(2, 1, h, w)).shape == (2, 1, h, w)


def test_sizes_not_divisible_are_refused_with_the_size_to_pad_to():
    with pytest.raises(ValueError, match=r"pad to \(32, 48\)"):
        build_model(ModelConfig())(torch.zeros(1, 1, 30, 40))


@pytest.mark.parametrize("norm", ["batch", "instance", "group", "none"])
def test_configurable_unet_width_depth_norm(norm):
    model = build_model(ModelConfig(arch="unet", base_width=4, depth=3, norm=norm)).eval()
    assert isinstance(model, UNet) and model.depth == 3
    assert model(torch.zeros(1, 1, 24, 40)).shape == (1, 1, 24, 40)
    wider = build_model(ModelConfig(arch="unet", base_width=8, depth=3, norm=norm))
    assert count_parameters(wider) > count_parameters(model)


def test_model_returns_logits_not_probabilities():
    torch.manual_seed(0)
    out = build_model(ModelConfig()).eval()(torch.randn(1, 1, 32, 32) * 5)
    assert out.min() < 0 or out.max() > 1


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="seed, unet, efficientnet-lite0-unet"):
        ModelConfig(arch="resnet")
    with pytest.raises(ValueError, match="batch"):
        ModelConfig(norm="layer")
    lite = {f"efficientnet-lite{k}-unet" for k in (0, 1, 2)}
    assert set(MODELS) == {"seed", "unet", *lite} == set(ARCHS)


@pytest.mark.skipif(not (SHARED_DATA.parent / "reference" / "seed_unet.py").is_file(), reason="../shared absent")
def test_seed_matches_the_reference_network_layer_for_layer():
    """Copy the reference's weights into ours in module order: identical outputs prove identical layers."""
    sys.path.insert(0, str(SHARED_DATA.parent / "reference"))
    from seed_unet import SeedUnet

    torch.manual_seed(0)
    ref = SeedUnet().eval()
    ours = build_model(ModelConfig()).eval()

    def ordered(model):  # conv/BN modules in forward order (the reference registers convs before BNs)
        mods = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d,
                                                             torch.nn.BatchNorm2d))]
        return mods

    def ref_order(model):
        out = []
        for blk in model.down:
            out += [blk.c1, blk.b1, blk.c2, blk.b2]
        for up, blk in zip(model.ups, model.dec):
            out += [up.c, up.b, blk.c1, blk.b1, blk.c2, blk.b2]
        return out + [model.head]

    def our_order(model):
        out = []
        for blk in model.encoders:
            out += [blk[0], blk[1], blk[3], blk[4]]
        for up, blk in zip(model.ups, model.decoders):
            out += [up[0], up[1], blk[0], blk[1], blk[3], blk[4]]
        return out + [model.head]

    assert len(ordered(ours)) == len(ordered(ref))
    for a, b in zip(ref_order(ref), our_order(ours)):
        b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 64, 48)
    torch.testing.assert_close(torch.sigmoid(ours(x)), ref(x))
