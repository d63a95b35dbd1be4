"""Conv+BN folding: an eval copy of a network with each BatchNorm merged into the convolution before it.

Inference backends (`torch-fast`, ONNX export) run the folded copy: the same numbers in fp32 with one
pass over memory instead of two.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every Conv2d/ConvTranspose2d -> BatchNorm2d pair inside an nn.Sequential
    folded into one convolution (the BN becomes Identity). The original model is left untouched."""
    fused = copy.deepcopy(model).eval()
    for seq in fused.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if not (isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats):
                continue
            if isinstance(conv, nn.Conv2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
            elif isinstance(conv, nn.ConvTranspose2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(conv, bn, transpose=True), nn.Identity()
    return fused


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm2d the non-trivial statistics and affine weights a trained network has (in
    place; returns `model`): a freshly built network's BN layers are identities, so folding them would
    prove nothing. For parity tests and speed benchmarks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model
