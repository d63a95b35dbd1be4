"""Shared bits of the benchmark scripts: hardware description, credits, result files, tables."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "benchmarks" / "runs"  # gitignored: checkpoints of benchmark runs

CREDITS = {
    "usgra": "usgra-seg dataset, T. M. K., CC BY 4.0",
    "busi": "BUSI dataset, Al-Dhabyani et al., Data in Brief 2020 (doi:10.1016/j.dib.2019.104863), CC BY 4.0",
    "busbra": "BUS-BRA dataset, Gómez-Flores et al., Medical Physics 2024 (doi:10.1002/mp.16812)",
}


def hardware() -> dict:
    """The machine a benchmark ran on: CPU model and vector flags (hemaseg.device.describe_cpu), the CPUs
    this process may use, the GPU if any, and the library versions."""
    import torch

    from hemaseg.device import describe_cpu

    cpu = describe_cpu()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu["model"], "cpu_flags": cpu["flags"], "cores": cpu["cpus"],
            "torch_threads": cpu["torch_threads"], "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}


def require_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "images").is_dir():
        print(f"skipped: {path} is absent (the real-data benchmarks need ../shared/data/{name})")
        sys.exit(0)
    return path


def write_result(name: str, result: dict) -> Path:
    """benchmarks/results/NAME.json, written atomically; NaN becomes null (json_safe): valid JSON."""
    from hemaseg.io import atomic_write_text, json_safe

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps(json_safe(result), indent=2))
    return path


def table(headers: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table (prints well in a terminal and pastes into the README)."""
    def cell(v):
        if isinstance(v, float):
            return "n/a" if v != v else f"{v:.3f}"
        return "n/a" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
