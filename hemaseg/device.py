"""The machine: which device to run on, how many CPUs this process may use, and whether bf16 is native.

Defaults that depend on hardware (bf16 autocast, the `auto` inference backend, loader workers) ask
here, so one place decides what "this machine can" means.
"""

from __future__ import annotations

import os
import platform

import torch


def select_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` is CUDA when present, else the CPU; anything else is passed to torch.device."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None


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
    """Native bf16 only: oneDNN can emulate bf16 on plain AVX-512 or AVX2, but that is slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    native = [getattr(torch.cpu, f, None) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(f is not None and f() for f in native)


def describe_cpu() -> dict:
    """The CPU's model name and the vector features that decide speed here (for benchmark records)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "fma")
    return {"model": model, "flags": [f for f in wanted if f in flags], "cpus": available_cpus(),
            "torch_threads": torch.get_num_threads()}
