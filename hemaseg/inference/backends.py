"""Inference backends: interchangeable ways to run a trained network on a preprocessed batch.

Every backend is a callable taking a (N, 1, H, W) float32 batch of normalised inputs (H, W multiples of
the model's size multiple) and returning (N, 1, H, W) fp32 logits on the CPU or the device.
Preprocessing stays in `data.transforms.preprocess` and the sigmoid in `predictor.predict_boxed`, so
backends differ only in how the convolutions run (names and meanings: `config.BACKENDS`).

`auto` (the default) measures, when a model loads, every backend that can reproduce eager fp32 on this
machine (max |Δp| <= PARITY_ATOL on a random input; torch-bf16 cannot) and keeps the fastest at batch 1:
the folded channels_last path at least, ONNX Runtime where it is faster. On AVX2-only, AVX-512 and
AMX CPUs alike both beat the plain eager network; which of them wins differs (benchmarks/speed.py).

torch.compile was measured and left out: on 2 cores (batch 1, 256 px) it ran 1.3x faster than torch-fast
and 1.15x faster than torch-bf16, but compiling took 11-18 s per input shape (a new batch size or image
size compiles again), which a `hemaseg predict` run over a folder only earns back after thousands of scans.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hemaseg import __version__
from hemaseg.config import BACKENDS, format_size, input_hw
from hemaseg.device import bf16_supported, describe_cpu
from hemaseg.io import atomic_write_bytes, atomic_write_text
from hemaseg.models.fusion import fuse_conv_bn

log = logging.getLogger(__name__)

Backend = Callable[[torch.Tensor], torch.Tensor]
PARITY_ATOL = 1e-3  # on probabilities; fp32 kernels differ in summation order only (~1e-6 seen)
AUTO_ROUNDS = 7  # timed calls per candidate, interleaved, after one warm-up call each


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


def make_backend(model: nn.Module, name: str, device: torch.device | str = "cpu") -> Backend:
    """Wrap a trained network as backend `name` (a fixed one: `auto` is `choose_backend`) on `device`."""
    device = torch.device(device)
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"backend must be one of {', '.join(b for b in BACKENDS if b != 'auto')}; got {name!r}")
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
    from hemaseg.inference.onnx import OnnxRuntimeBackend, onnx_bytes

    return OnnxRuntimeBackend(onnx_bytes(model))


def auto_candidates(device: torch.device) -> list[str]:
    """Backends `auto` tries: those that can match eager fp32 (ONNX Runtime runs on the CPU only)."""
    return ["torch-fast", "onnxruntime"] if device.type == "cpu" else ["torch-fast"]


def choose_backend(model: nn.Module, device: torch.device, size: int | tuple[int, int],
                   candidates: list[str] | None = None) -> tuple[str, Backend, dict]:
    """The fastest candidate that matches eager fp32 on this machine, at batch 1 and the input `size` (a
    square side or (height, width)).

    Returns (name, backend, record) where record holds each candidate's median ms, its parity error, and
    why any was skipped. Falls back to eager `torch` when no candidate passes."""
    candidates = candidates or auto_candidates(device)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, *input_hw(size)), dtype=np.float32))
    reference = torch.sigmoid(TorchBackend(model, device)(x).cpu())
    record: dict = {"size": format_size(size), "parity_atol": PARITY_ATOL, "ms": {}, "max_abs_diff": {}, "skipped": {}}
    passed: dict[str, Backend] = {}
    for name in candidates:
        try:
            backend = make_backend(model, name, device)
            diff = float((torch.sigmoid(backend(x).cpu()) - reference).abs().max())
        except Exception as e:  # noqa: BLE001 - a backend that cannot run here is simply not chosen
            record["skipped"][name] = f"{type(e).__name__}: {e}"
            continue
        record["max_abs_diff"][name] = diff
        if diff <= PARITY_ATOL:
            passed[name] = backend
        else:
            record["skipped"][name] = f"parity {diff:.2g} > {PARITY_ATOL:g}"
    if not passed:
        log.warning("no fast backend matched eager PyTorch here; using torch")
        return "torch", TorchBackend(model, device), record
    times: dict[str, list[float]] = {name: [] for name in passed}
    for _ in range(AUTO_ROUNDS):  # interleaved, so a busy moment costs every candidate alike
        for name, backend in passed.items():
            t = time.perf_counter()
            backend(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - t) * 1000)
    record["ms"] = {name: round(statistics.median(ts), 3) for name, ts in times.items()}
    best = min(record["ms"], key=record["ms"].get)
    log.debug("backend auto: %s (%s)", best, record["ms"])
    return best, passed[best], record


def _choice_key(model: nn.Module, device: torch.device, size: int | tuple[int, int], candidates: list[str]) -> str:
    """What decides `auto`'s choice: the weights (their bytes), the machine (CPU model, GPU name), the
    libraries that run them, the input size and the candidates."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    facts = [h.hexdigest(), str(device), gpu, describe_cpu()["model"], torch.__version__, ort_version, __version__,
             np.__version__, input_hw(size), candidates, PARITY_ATOL, AUTO_ROUNDS]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:24]


def choose_backend_cached(model: nn.Module, device: torch.device, size: int | tuple[int, int], cache_dir: str | Path | None,
                          candidates: list[str] | None = None) -> tuple[str, Backend, dict]:
    """`choose_backend`, remembered in `cache_dir`/backends/ per weights, machine and library versions (with
    the exported ONNX model when ONNX Runtime won), so loading the same model again neither exports nor
    times anything. The record says `cached: true` then. Without `cache_dir`, or when the cache cannot be
    read or written, it measures as `choose_backend` does."""
    candidates = candidates or auto_candidates(device)
    if cache_dir is None:
        return choose_backend(model, device, size, candidates)
    folder = Path(cache_dir) / "backends"
    key = _choice_key(model, device, size, candidates)
    try:
        record = json.loads((folder / f"{key}.json").read_text())
        name = record["chosen"]
        if name == "onnxruntime":
            from hemaseg.inference.onnx import OnnxRuntimeBackend

            backend = OnnxRuntimeBackend((folder / f"{key}.onnx").read_bytes())
        else:
            backend = make_backend(model, name, device)
        return name, backend, {**record, "cached": True}
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001 - a damaged or stale cache entry is measured again
        log.debug("backend cache %s: %s; measuring again", key, e)
    name, backend, record = choose_backend(model, device, size, candidates)
    try:
        onnx = getattr(backend, "model_bytes", None)
        if name == "onnxruntime" and onnx is not None:
            atomic_write_bytes(folder / f"{key}.onnx", onnx, fsync=False)
        if name != "onnxruntime" or onnx is not None:  # the record last: its presence means complete
            atomic_write_text(folder / f"{key}.json", json.dumps({**record, "chosen": name}))
    except OSError as e:  # a read-only or full cache folder costs speed, not the load
        log.debug("backend cache %s not written: %s", folder, e)
    return name, backend, record
