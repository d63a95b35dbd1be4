"""The UNet, in the layout of the original write-up.

The `seed` configuration reproduces the original write-up's network layer for layer (487,449
parameters): two conv3x3-BN-ReLU per level, widths 8-16-32-64-128, max-pool down, 2x2 transposed
conv + BN + ReLU up, skip concatenation, a final conv3x3 to one channel. Models return logits;
the sigmoid belongs to inference and to the loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hemaseg.config import NORMS


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


class ConvBlock(nn.Sequential):
    """Two conv3x3-norm-ReLU layers: the unit of every UNet level."""

    def __init__(self, cin: int, cout: int, norm: str = "batch"):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), _norm(norm, cout), nn.ReLU(inplace=True),
        )


class UpBlock(nn.Sequential):
    """2x2 transposed conv doubling the resolution, then norm + ReLU (as the original network)."""

    def __init__(self, cin: int, cout: int, norm: str = "batch"):
        super().__init__(nn.ConvTranspose2d(cin, cout, 2, stride=2), _norm(norm, cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Classic UNet. `depth` pooling steps; level k has `base_width * 2**k` channels.

    Input (N, in_channels, H, W) with H and W divisible by 2**depth; output logits (N, 1, H, W).
    """

    def __init__(self, in_channels: int = 1, base_width: int = 8, depth: int = 4, norm: str = "batch"):
        super().__init__()
        widths = [base_width * 2**k for k in range(depth + 1)]
        self.depth = depth
        self.encoders = nn.ModuleList(
            [ConvBlock(in_channels, widths[0], norm)]
            + [ConvBlock(widths[k], widths[k + 1], norm) for k in range(depth)]
        )
        self.ups = nn.ModuleList([UpBlock(widths[k + 1], widths[k], norm) for k in reversed(range(depth))])
        self.decoders = nn.ModuleList([ConvBlock(2 * widths[k], widths[k], norm) for k in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        multiple = 2**self.depth
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} must be divisible by {multiple}; "
                f"pad to {tuple(-(-s // multiple) * multiple for s in x.shape[-2:])}"
            )
        skips = []
        for k, encoder in enumerate(self.encoders):
            x = encoder(x)
            if k < self.depth:
                skips.append(x)
                x = F.max_pool2d(x, 2)  # (N, C, H/2**(k+1), W/2**(k+1))
        for up, decoder in zip(self.ups, self.decoders):
            x = decoder(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)  # (N, 1, H, W) logits
