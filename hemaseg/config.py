"""Typed run configuration, saved beside every checkpoint so a run can be reproduced exactly.

Defaults live here in code; a JSON file or CLI flags only override. Unknown keys are errors that
name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .models import ModelConfig
from .transforms import NORMALIZATIONS, AugmentConfig


@dataclass(frozen=True)
class DataConfig:
    """Where the scans are and how they become network input."""

    root: str = ""
    size: int = 256
    normalize: str = "zscore"
    val_fraction: float = 0.2
    split_seed: int = 0
    split_file: str | None = None
    groups_file: str | None = None
    mask_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 16:
            raise ValueError(f"--size must be a multiple of 16 and >= 16, got {self.size}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"--normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")


PRECISIONS = ("auto", "fp32", "bf16")
LOSSES = ("dice_bce", "dice_focal")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. `epochs` is ignored when `budget_minutes` is set: the run fits epochs to it."""

    epochs: int = 30
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    loss: str = "dice_bce"
    lambda_dice: float = 1.0
    lambda_bce: float = 1.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    precision: str = "auto"  # "fp32", "bf16" (autocast), or "auto": bf16 where native (train.use_bf16) when `amp`
    num_workers: int | None = None  # data-loader processes; None: 0 on the CPU, 4 on CUDA (train.loader_workers)
    threshold: float = 0.5
    budget_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"--epochs and --batch-size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"--threshold must be between 0 and 1, got {self.threshold}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise ValueError(f"--budget-minutes must be > 0, got {self.budget_minutes}")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: dict | None = None  # the preset and dataset fingerprint the settings came from (plan.make_plan)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return _from_dict(cls, d, "config")

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        from .checkpoint import atomic_write_text

        atomic_write_text(path, json.dumps({**self.to_dict(), **(extra or {})}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        d = json.loads(Path(path).read_text())
        return cls.from_dict({k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


def _from_dict(cls, d: dict, where: str):
    """Build a (nested) frozen dataclass from a dict, refusing unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in d.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _from_dict(hint, value, f"{where}.{key}")
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        elif typing.get_origin(hint) in (typing.Union, types.UnionType) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)
