"""Models: the network registry (`build_model`), conv+BN folding for inference, and checkpoints.

A model variant is a small named builder taking the run's `ModelConfig`; `config.ARCHS` holds the
names and descriptions (so the CLI lists them without importing torch) and the registry must match it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from hemaseg.config import ARCHS, ModelConfig
from hemaseg.models.unet import UNet


def _seed(cfg: ModelConfig) -> nn.Module:
    return UNet(in_channels=1, base_width=8, depth=4, norm="batch")


def _unet(cfg: ModelConfig) -> nn.Module:
    return UNet(cfg.in_channels, cfg.base_width, cfg.depth, cfg.norm)


def _efficientnet_unet(variant: str) -> Callable[[ModelConfig], nn.Module]:
    def build(cfg: ModelConfig) -> nn.Module:
        from hemaseg.models.efficientnet import EfficientNetUNet

        return EfficientNetUNet(cfg.in_channels, variant)

    return build


MODELS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "seed": _seed, "unet": _unet,
    **{f"efficientnet-{v}-unet": _efficientnet_unet(v) for v in ("lite0", "lite1", "lite2")},
}
assert set(MODELS) == set(ARCHS), "config.ARCHS and models.MODELS must name the same networks"


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the network a config names (`seed` ignores the width/depth/norm fields). Returns logits."""
    return MODELS[cfg.arch](cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
