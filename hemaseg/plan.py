"""Presets and the experiment plan: like nnU-Net's plans, settings derived from the dataset's
fingerprint (image and lesion sizes) and the user's time budget, stored in the run's config.

A preset names a recipe; the plan adapts it to the data. Flags the user gives always win.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A recipe: model, input size, optimisation. `epochs` applies when no time budget is given."""

    name: str
    description: str
    model: dict
    size: int
    batch_size: int
    lr: float
    epochs: int
    augment: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "seed": Preset("seed", "the original 487k-parameter network with a sound version of its recipe "
                           "(AdamW, warm-up + cosine, Dice+BCE, paired augmentation)",
                   {"arch": "seed"}, 256, 8, 3e-3, 100),
    # Measured (benchmarks/recipe.py, usgra fold 0, 10 CPU-minutes): batch 4 at lr 1e-2 makes twice the
    # updates of batch 8 per image seen and leaves the all-background start sooner: Dice 0.34 vs 0.00.
    "default": Preset("default", "the best recipe measured for a 2-core CPU: the original network, "
                                 "batch 4, lr 1e-2 (more, larger updates per CPU-minute)",
                      {"arch": "seed"}, 256, 4, 1e-2, 100),
    "large": Preset("large", "a wider UNet at a larger input size, for a GPU",
                    {"arch": "unet", "base_width": 32, "depth": 5, "norm": "batch"}, 384, 16, 2e-3, 300),
}


def fingerprint_stats(root: str) -> dict:
    """Image sizes and lesion sizes of a dataset (reads every pair once, a few seconds for ~600 scans)."""
    from .data import check_dataset

    report = check_dataset(root)
    longer = sorted(s for (w, h), n in report.sizes.items() for s in [max(w, h)] * n)
    return {
        "n_pairs": report.n_pairs,
        "median_longer_side": longer[len(longer) // 2] if longer else 0,
        "lesion_fraction_mean": report.lesion_fraction_mean,
        "n_empty_masks": report.n_empty_masks,
    }


def make_plan(preset_name: str, stats: dict, device_type: str = "cpu") -> dict:
    """Config overrides {"data": {...}, "model": {...}, "train": {...}} for a preset on a dataset.

    Size: the preset's, but never above the median image's longer side rounded up to a multiple of
    32 (upsampling adds cost, not information). Small lesions (mean under 2 % of the image) on a
    GPU get a 1.5x larger input. Batch size: the preset's, halved on a CPU when the input is larger
    than 256 (a step then already costs enough to give stable statistics).
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset_name]
    size = p.size
    if device_type == "cuda" and not math.isnan(stats.get("lesion_fraction_mean", math.nan)) \
            and stats["lesion_fraction_mean"] < 0.02:
        size = int(size * 1.5)
    median = stats.get("median_longer_side") or size
    size = max(64, min(size, -(-median // 32) * 32))
    size -= size % 32
    batch = p.batch_size if device_type == "cuda" or size <= 256 else max(2, p.batch_size // 2)
    return {"data": {"size": size}, "model": dict(p.model),
            "train": {"batch_size": batch, "lr": p.lr, "epochs": p.epochs},
            "augment": dict(p.augment), "preset": p.name, "fingerprint": stats}


def describe(plan: dict) -> str:
    m = plan["model"]
    width = "" if m.get("arch") == "seed" else f", width {m.get('base_width')}, depth {m.get('depth')}"
    return (f"plan ({plan['preset']}): {m.get('arch')}{width}, input {plan['data']['size']} px, "
            f"batch {plan['train']['batch_size']}, lr {plan['train']['lr']}, epochs {plan['train']['epochs']} "
            f"(unless a time budget is set); dataset: {plan['fingerprint']}")
