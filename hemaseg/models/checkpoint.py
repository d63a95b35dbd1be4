"""Self-describing checkpoints, written atomically and loaded without executing pickled code.

The schema (FORMAT, checked on load):

    format            "hemaseg-checkpoint/2"
    version           hemaseg version that wrote it
    config            RunConfig.to_dict(): everything needed to rebuild the network and its preprocessing
    model             state_dict (tensors only)
    epoch, metrics    the epoch it was taken at and that epoch's metrics row
    data_fingerprint  dataset.dataset_fingerprint of the training data
    last.pt adds      optimizer, scheduler, rng, best_dice, history, planned_epochs, elapsed_s (resume state)

Format 1 (before the config's inference section) still loads; its config is migrated by RunConfig.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hemaseg.config import RunConfig
from hemaseg.io import atomic_write

FORMAT = "hemaseg-checkpoint/2"
READABLE_FORMATS = ("hemaseg-checkpoint/1", FORMAT)
REQUIRED_KEYS = ("config", "model")


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write `payload` (with `format` set to FORMAT) atomically: a crash leaves the old file or the new."""
    atomic_write(path, lambda f: torch.save({**payload, "format": FORMAT}, f))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load with weights_only=True (a checkpoint can carry tensors and plain data, never code) and check
    its format. Raises FileNotFoundError or ValueError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated, foreign or code-carrying file
        raise ValueError(f"{path}: not a readable hemaseg checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise ValueError(f"{path}: not a hemaseg checkpoint (no config and weights in it)")
    fmt = ckpt.get("format", "hemaseg-checkpoint/1")
    if fmt not in READABLE_FORMATS:
        raise ValueError(f"{path}: checkpoint format {fmt!r} is not one this hemaseg reads "
                         f"({', '.join(READABLE_FORMATS)}); it was written by hemaseg {ckpt.get('version')}")
    return ckpt


def load_weights(path: str | os.PathLike) -> tuple[torch.nn.Module, RunConfig, dict]:
    """(network with the checkpoint's weights, its RunConfig, the raw checkpoint)."""
    from hemaseg.models import build_model

    ckpt = load_checkpoint(path)
    try:
        config = RunConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its config is not valid ({e})") from None
    model = build_model(config.model)
    missing, unexpected = _key_mismatch(model.state_dict(), ckpt["model"])
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not fit a {config.model.arch!r} network "
                         f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. "
                         f"{(missing or unexpected)[0]!r})")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # same names, other shapes
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise ValueError(f"{path}: the weights do not fit a {config.model.arch!r} network ({first})") from None
    return model, config, ckpt


def _key_mismatch(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def resolve_checkpoint(path: str | os.PathLike, which: str = "best") -> Path:
    """A run folder resolves to its best (or last) checkpoint; a file is taken as it is."""
    path = Path(path)
    if path.is_dir():
        for name in (f"{which}.pt", "last.pt", "best.pt"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no {which}.pt or last.pt in this run folder")
    return path
