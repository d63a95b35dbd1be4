"""The one way a run's config is made from data: read the dataset once, then `config.resolve_config` adapts
the preset to its statistics. `hemaseg train`, `hemaseg cv`, `train_model`, the demo and the benchmarks all
call `configure`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from hemaseg.config import DataConfig, RunConfig, resolve_config
from hemaseg.data.dataset import LoadedDataset, load_dataset
from hemaseg.device import select_device

log = logging.getLogger(__name__)


def configure(data_root: str | Path, preset: str = "default", overrides: Mapping | None = None,
              base: Mapping | None = None, progress: bool = False) -> tuple[RunConfig, LoadedDataset]:
    """Read the dataset once and resolve the run's config from its statistics (`config.resolve_config`):
    what `hemaseg train`, `hemaseg cv`, `train_model`, the demo and the benchmarks all do."""
    overrides = dict(overrides or {})
    base_data = (base or {}).get("data", {})
    mask_threshold = overrides.get("mask_threshold", base_data.get("mask_threshold"))
    max_pixels = overrides.get("max_pixels") or base_data.get("max_pixels") or DataConfig.max_pixels
    labels = overrides.get("labels", base_data.get("labels"))
    data = load_dataset(data_root, mask_threshold, max_pixels, progress, labels=labels)
    device = overrides.get("device") or (base or {}).get("train", {}).get("device") or "auto"
    cfg = resolve_config(data_root, preset, data.stats, select_device(device).type, overrides, base)
    if cfg.plan is not None:
        log.info(cfg.plan.describe(cfg))
    return cfg, data
