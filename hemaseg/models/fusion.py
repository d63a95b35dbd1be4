"""Conv+BN folding: an eval copy of a network with each BatchNorm merged into the convolution before it.

Inference backends (`torch-fast`, ONNX export) run the folded copy: the same numbers in fp32 with one
pass over memory instead of two.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _fold(conv: nn.Module, bn: nn.Module) -> nn.Module | None:
    if not (isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats):
        return None
    if isinstance(conv, nn.ConvTranspose2d):
        return fuse_conv_bn_eval(conv, bn, transpose=True)
    if isinstance(conv, nn.Conv2d):
        return fuse_conv_bn_eval(conv, bn)
    return None


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every Conv2d/ConvTranspose2d -> BatchNorm2d pair folded into one
    convolution (the BN becomes Identity): pairs that follow each other in an nn.Sequential, and the
    pairs a module names in its `conv_bn_pairs()` (blocks whose forward is not a plain sequence).
    The original model is left untouched."""
    fused = copy.deepcopy(model).eval()
    for module in fused.modules():
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                folded = _fold(module[i], module[i + 1])
                if folded is not None:
                    module[i], module[i + 1] = folded, nn.Identity()
        for conv_name, bn_name in getattr(module, "conv_bn_pairs", lambda: [])():
            folded = _fold(getattr(module, conv_name), getattr(module, bn_name))
            if folded is not None:
                setattr(module, conv_name, folded)
                setattr(module, bn_name, nn.Identity())
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
