"""Inference backends: interchangeable ways to run a trained network on a preprocessed batch.

Every backend is a callable taking a (N, 1, H, W) float32 batch of normalised inputs (H, W multiples of
the model's size multiple) and returning (N, 1, H, W) logits. Preprocessing stays in
`transforms.preprocess` and the sigmoid in `predict.forward_probs`, so backends differ only in how the
convolutions run:

torch        the network as trained, eager fp32; the reference and default
torch-fast   eval copy with conv+BN folded, channels_last memory layout, fp32: same numbers, less memory traffic
torch-bf16   torch-fast under bf16 autocast; needs native bf16 (AVX512-BF16/AMX CPUs, Ampere+ GPUs)
onnxruntime  the network exported to ONNX (in memory) and run by ONNX Runtime on the CPU

torch.compile was measured and left out: on 2 cores (batch 1, 256 px) it ran 1.3x faster than torch-fast
and 1.15x faster than torch-bf16, but compiling took 11-18 s per input shape (a new batch size or image
size compiles again), which a `hemaseg predict` run over a folder only earns back after thousands of scans.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

log = logging.getLogger(__name__)

Backend = Callable[[torch.Tensor], torch.Tensor]

BACKENDS = {
    "torch": "eager PyTorch as trained (default)",
    "torch-fast": "conv+BN folded, channels_last, fp32",
    "torch-bf16": "torch-fast with bf16 autocast (CPUs with AVX512-BF16/AMX, recent GPUs)",
    "onnxruntime": "ONNX Runtime on the CPU (model exported in memory)",
}


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:  # cgroup v2: "max 100000" or "200000 100000"
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def cpu_threads() -> int:
    """Intra-op threads for CPU inference: PyTorch's own setting (physical cores unless the user set
    OMP_NUM_THREADS or torch.set_num_threads), capped by the CPUs actually available, because
    oversubscribed threads in a container are slower than fewer threads."""
    return max(1, min(torch.get_num_threads(), available_cpus()))


def bf16_supported(device: torch.device) -> bool:
    """Native bf16 only: oneDNN can emulate bf16 on plain AVX-512, but that is slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    native = [getattr(torch.cpu, f, None) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(f is not None and f() for f in native)


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every Conv2d/ConvTranspose2d -> BatchNorm2d pair inside an nn.Sequential
    folded into one convolution (the BN becomes Identity). The original model is left untouched."""
    fused = copy.deepcopy(model).eval()
    for seq in fused.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and isinstance(conv, nn.Conv2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
            elif isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and isinstance(conv, nn.ConvTranspose2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(conv, bn, transpose=True), nn.Identity()
    return fused


class TorchBackend:
    """Eager PyTorch. `fast` folds BN and switches to channels_last; `bf16` adds autocast.

    The plain backend is pure fp32 everywhere: on an H200 bf16 autocast made the 487k-parameter network
    slower (3.7 vs 2.6 ms per 256 px image at batch 1; benchmarks/results/speed_cuda.json), since its
    convolutions are too small for the casts to pay. torch-bf16 is the opt-in for larger networks."""

    def __init__(self, model: nn.Module, device: torch.device, fast: bool = False, bf16: bool = False):
        self.device = device
        self.fast = fast
        self.model = (fuse_conv_bn(model) if fast else model).to(device).eval()
        if fast:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.autocast = bf16
        self.name = "torch-bf16" if bf16 else "torch-fast" if fast else "torch"

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(x)
        return logits.float().contiguous()  # (N, 1, H, W)


class OnnxRuntimeBackend:
    """An ONNX model (bytes or a file path) run by ONNX Runtime with `threads` intra-op threads."""

    name = "onnxruntime"

    def __init__(self, onnx_model: bytes | str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_threads()
        options.inter_op_num_threads = 1  # the graph is a chain: parallelism is inside each op
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        model = onnx_model if isinstance(onnx_model, bytes) else os.fspath(onnx_model)
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: batch})[0])


def make_backend(model: nn.Module, name: str = "torch", device: torch.device | str = "cpu") -> Backend:
    """Wrap a trained network as backend `name` (see BACKENDS) on `device`."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "torch":
        return TorchBackend(model, device)
    if name == "torch-fast":
        return TorchBackend(model, device, fast=True)
    if name == "torch-bf16":
        if not bf16_supported(device):
            raise ValueError(f"backend torch-bf16 needs native bf16 on {device} (AVX512-BF16/AMX CPU or a "
                             "bf16 GPU); use --backend torch-fast")
        return TorchBackend(model, device, fast=True, bf16=True)
    if device.type != "cpu":
        log.warning("backend onnxruntime runs on the CPU; device %s is not used", device)
    from .export import onnx_bytes

    return OnnxRuntimeBackend(onnx_bytes(model))
