"""Self-describing checkpoints, written atomically and loaded without executing pickled code.

A checkpoint holds the weights, the full run config, the hemaseg version and the metrics of the
epoch it was taken at, so `load_model(path)` needs nothing else. Resume state (optimizer,
scheduler, RNG) rides along in `last.pt`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def _atomic_replace(path: Path, write) -> None:
    """Write through a temp file in the target's folder, fsync, then rename over the target, so a
    crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_replace(Path(path), lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(path: str | Path, payload: dict) -> None:
    _atomic_replace(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> dict:
    """Load with weights_only=True: a checkpoint can carry tensors and plain data, never code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable hemaseg checkpoint ({type(e).__name__}: {e})") from None


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A run folder resolves to its best (or last) checkpoint; a file is taken as it is."""
    path = Path(path)
    if path.is_dir():
        for name in (f"{which}.pt", "last.pt", "best.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no {which}.pt or last.pt in this run folder")
    return path
