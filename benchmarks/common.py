"""Shared bits of the benchmark scripts: hardware description, credits, result files, tables."""

from __future__ import annotations

import json
import os
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
}


def hardware() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def require_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "images").is_dir():
        print(f"skipped: {path} is absent (the real-data benchmarks need ../shared/data/{name})")
        sys.exit(0)
    return path


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=lambda v: None))
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
