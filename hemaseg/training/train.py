"""Training: fit(config, out_dir) writes a complete, resumable run folder.

RUN/config.json    every setting, the plan it came from, versions, and a history of resumes (appended)
RUN/splits.json    the train/val split used (reused on resume, never by a fresh run)
RUN/last.pt        weights + optimizer/scheduler/RNG state, written atomically (see below)
RUN/best.pt        weights of the epoch with the best validation Dice
RUN/metrics.csv    one row per epoch; RUN/curves.png the training curves; RUN/summary.json at the end
RUN/postprocessing.json  the postprocessing (with the "is there a lesion?" gate) decided on the validation split
RUN/confidence.json  the review decision fitted on the validation split (both in training/review.py)

What a crash can lose: the checkpoints go to disk at the end of the first and the last epoch, and
between them at the end of every epoch that would otherwise leave more than `checkpoint_every_s`
(default 60 s) unsaved; so a crash loses at most one epoch or about a minute of training, whichever
is larger (`checkpoint_every_s=0`: every epoch). A write killed midway leaves its temp file, removed at
the next start; the finished files are never half-written.

Run folders are consistent or refused: the data is read and checked before anything is written; a
fresh run into a folder that holds files is refused unless `overwrite`; a resume checks the data's
fingerprint and the settings against the run's and refuses a change unless `allow_changed_data`.

The scans come from the training cache (data/cache.py): letterboxed once per dataset and size into
memory-mapped files shared by every run, fold and process, so training holds no copy of the data.

Each sample's augmentation is seeded by (seed, epoch, index) (on the device: each batch's by (seed,
epoch, step, rank)) and each epoch's order by (seed, epoch), so a resumed run retraces the uninterrupted
one exactly.

Under torchrun the same run is trained by several processes (distributed.py): `batch_size` per process,
the single-process epoch order dealt out across them, the loss and validation Dice those of the whole
global batch and validation set, and rank 0 alone writing the run folder. A resume must use as many
processes as the run was trained with (the global batch is part of the training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceFocalLoss
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from hemaseg import __version__, distributed
from hemaseg.config import RESUMABLE, RunConfig
from hemaseg.data.batch_augment import BatchAugment
from hemaseg.data.cache import IMAGE_SCALE, ScanCache, open_or_build
from hemaseg.data.dataset import (
    LoadedDataset,
    find_groups,
    load_dataset,
    load_split,
    natural_sorted,
    read_groups,
    save_split,
    split_train_val,
)
from hemaseg.data.plan import configure
from hemaseg.data.transforms import augment, build_augmentation, normalize
from hemaseg.device import available_cpus, bf16_supported, describe_cpu, select_device
from hemaseg.distributed import Distributed
from hemaseg.evaluation.metrics import dice
from hemaseg.evaluation.report import plot_curves
from hemaseg.inference.backends import make_backend
from hemaseg.inference.predictor import predict_boxed
from hemaseg.io import atomic_write_text, remove_stale_temps, write_csv
from hemaseg.models import build_model
from hemaseg.models.checkpoint import load_checkpoint, save_checkpoint
from hemaseg.models.pretrained import load_imagenet_encoder, load_packaged_weights
from hemaseg.training.review import decide_on_validation

log = logging.getLogger(__name__)

RUN_FILES = ("config.json", "splits.json", "last.pt", "best.pt", "metrics.csv", "curves.png", "summary.json",
             "postprocessing.json", "confidence.json")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (not empty, nothing to resume, data changed)."""


class CachedSet:
    """A split's scans in the training cache (data/cache.py), read as the network sees them: the stored
    letterboxed scan normalised on the way out by `transforms.normalize` (what inference's `preprocess`
    does), its mask, its geometry and its mask at the original size. Nothing is copied into memory: each
    read takes the scan from the memory map."""

    def __init__(self, cache: ScanCache, names: Sequence[str], method: str):
        row = {name: i for i, name in enumerate(cache.names)}
        self.cache, self.method, self.names = cache, method, list(names)
        self.rows = np.array([row[n] for n in self.names], np.int64)
        self.boxes = [cache.boxes[r] for r in self.rows]

    def image(self, i: int) -> np.ndarray:
        """Scan i normalised, float32 (S, S)."""
        r = self.rows[i]
        stored = np.asarray(self.cache.images[r], np.float32) * np.float32(1 / IMAGE_SCALE)
        return normalize(stored, self.cache.boxes[r], self.method)

    def images(self, idx: Sequence[int]) -> np.ndarray:
        return np.stack([self.image(i) for i in idx])  # (n, S, S)

    def mask(self, i: int) -> np.ndarray:
        return np.asarray(self.cache.masks[self.rows[i]], np.float32)

    def orig_mask(self, i: int) -> np.ndarray:
        return self.cache.original_mask(int(self.rows[i]))


class AugmentedPairs(Dataset):
    """Cached pairs with per-(seed, epoch, index) seeded paired augmentation (`pipeline` None: as they
    are, for augmentation of whole batches on the device). Indexed by (epoch, index) pairs from
    EpochSampler, so persistent worker processes need no epoch update."""

    def __init__(self, cached: CachedSet, pipeline, seed: int):
        self.cached, self.pipeline, self.seed = cached, pipeline, seed

    def __len__(self) -> int:
        return len(self.cached.names)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        image, mask = self.cached.image(i), self.cached.mask(i)
        if self.pipeline is None:
            return torch.from_numpy(image)[None], torch.from_numpy(mask)[None]
        seed = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
        return augment(self.pipeline, image, mask, seed)


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) pairs in an order seeded by (seed, epoch): the same batches after a resume.

    With `world_size` > 1 it plays DistributedSampler's part: of the epoch's first `keep` pairs (those
    the epoch's full global batches hold), rank r takes every world_size-th from the r-th, so the ranks'
    step-k batches of b together are the single-process step-k batch of world_size x b, and each scan
    comes once per epoch across ranks."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, keep: int | None = None):
        self.n, self.seed, self.epoch = n, seed, 1
        self.rank, self.world_size, self.keep = rank, world_size, n if keep is None else keep

    def __len__(self) -> int:
        return self.n if self.world_size == 1 else len(range(self.rank, self.keep, self.world_size))

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        if self.world_size > 1:
            order = order[:self.keep][self.rank::self.world_size]
        return iter([(self.epoch, int(i)) for i in order])


def _quiet_worker(_: int) -> None:
    """Data-loader workers skip MONAI's metadata tracking, as the in-process path does."""
    from monai.data import set_track_meta

    set_track_meta(False)


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether training autocasts to bf16. `auto` does wherever the hardware runs bf16 natively, CPUs
    included: on this project's AVX512-BF16 CPU it trained 1.5x the epochs in the same minutes and
    scored higher (usgra fold 0, 8 min: Dice 0.574 vs 0.502; synthetic demo, 3 min: 0.470 vs 0.433;
    benchmarks/recipe.py); AVX2-only CPUs emulate bf16 slower than fp32, so they get fp32. `bf16`
    demands native support; `fp32` never autocasts."""
    if precision == "fp32":
        return False
    if precision == "auto":
        return bf16_supported(device)
    if not bf16_supported(device):
        raise ValueError(f"precision bf16 needs native bf16 on {device} (AVX512-BF16/AMX CPU or a bf16 GPU); "
                         "use fp32")
    return True


def single_threaded_batches(loader: DataLoader):
    """Yield the loader's batches, each produced with one intra-op thread and without MONAI metadata.

    Per-image augmentation ops are too small to split across cores: OpenMP's fork/join then costs more
    than it saves (2-4x slower on a 2-core machine, worse when it is busy), and metadata tracking only
    adds overhead here. Worker processes (num_workers > 0) already run single-threaded."""
    from monai.data import get_track_meta, set_track_meta

    batches = iter(loader)
    while True:
        threads, track = torch.get_num_threads(), get_track_meta()
        torch.set_num_threads(1)
        set_track_meta(False)
        try:
            batch = next(batches, None)
        finally:
            torch.set_num_threads(threads)
            set_track_meta(track)
        if batch is None:
            return
        yield batch


def loader_workers(requested: int | None, device: torch.device) -> int:
    """Worker processes for augmentation. On the CPU none: the cores are busy with the model, and
    in-process single-threaded augmentation measured faster on 2 cores. On CUDA the model waits for
    data without them (the H200 run spent most of its time there), so 4, capped by the CPUs."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    return max(1, min(4, available_cpus() - 1))


def augment_on_batches(setting: str, device: torch.device) -> bool:
    """Whether training augments whole batches on the device (`config.AUGMENT_ON`). `auto` does on CUDA:
    there the per-pair CPU loader kept the H200 waiting (40 s first epochs of a small fold); on the CPU
    the pairs are augmented in the loader, the path the CPU recipes were measured with."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "batch"


def build_loss(tc) -> torch.nn.Module:
    """Dice + BCE (default) or Dice + focal, both MONAI's, on logits; Dice over the whole batch
    (as nnU-Net) so images without a lesion do not produce a degenerate per-image Dice."""
    if tc.loss == "dice_focal":
        return DiceFocalLoss(sigmoid=True, batch=True, lambda_dice=tc.lambda_dice, lambda_focal=tc.lambda_bce)
    return DiceCELoss(sigmoid=True, batch=True, lambda_dice=tc.lambda_dice, lambda_ce=tc.lambda_bce)


def global_batch_loss(loss_fn: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor,
                      share: float) -> torch.Tensor:
    """This process's part of `loss_fn` (build_loss's) over the global batch of a distributed step.

    logits, target: (n, 1, H, W), this process's n of the step's N images; share = world_size x n / N.
    The Dice term comes from MONAI's tp/fp/fn counts summed over processes (the batch Dice of the global
    batch, differentiable through the sum); the pointwise term (BCE or focal, a mean over pixels) is
    weighted by `share`. DDP averages the gradients over processes, so the step is the one a single
    process takes on the global batch, and the mean of the returned values over processes is that
    process's loss value. Outside a process group (share 1) it is `loss_fn(logits, target)`."""
    from monai.losses.utils import compute_tp_fp_fn

    dice = loss_fn.dice
    probs = torch.sigmoid(logits)
    axes = [0, *range(2, logits.dim())]  # batch and space: Dice over the whole batch (batch=True)
    tp, fp, fn = compute_tp_fp_fn(probs, target, axes, 2 if dice.squared_pred else 1, dice.soft_label)
    tp, fp, fn = distributed.all_reduce_sum(torch.stack([tp, fp, fn])).unbind(0)  # each (C,)
    if not dice.jaccard:
        fp, fn = 0.5 * fp, 0.5 * fn
    dice_loss = (1 - (2 * tp + dice.smooth_nr) / (2 * (tp + fp + fn) + dice.smooth_dr)).mean()
    if isinstance(loss_fn, DiceFocalLoss):
        pointwise, weight = loss_fn.focal(logits, target), loss_fn.lambda_focal
    else:
        pointwise, weight = loss_fn.bce(logits, target), loss_fn.lambda_ce
    return loss_fn.lambda_dice * dice_loss + weight * share * pointwise


def validate(model: torch.nn.Module, cached: CachedSet, device: torch.device, threshold: float,
             batch_size: int = 8, dist: Distributed = distributed.SINGLE) -> np.ndarray:
    """Per-image Dice on whole validation images at their original size (NaN where both empty), through
    the same batch function as every other inference; the folded fp32 backend gives eager's numbers.

    Under torchrun each process scores its shard of the images and all receive every image's Dice, in
    the set's order: the epoch's Dice is then the mean over images, as in one process (a mean of the
    processes' means would weigh the images of a smaller shard more)."""
    model.eval()
    mine = distributed.shard(len(cached.names), dist.rank, dist.world_size)
    runner = make_backend(model, "torch-fast", device)
    scores = []
    for start in range(0, len(mine), batch_size):
        idx = list(mine[start:start + batch_size])
        probs = predict_boxed([runner], cached.images(idx), [cached.boxes[i] for i in idx], (), device)
        scores.extend(dice(p >= threshold, cached.orig_mask(i))[0] for p, i in zip(probs, idx))
    if not dist.active:
        return np.asarray(scores, np.float64)
    return gather_shards(dist.all_gather(scores), len(cached.names))


def gather_shards(parts: list[list[float]], n: int) -> np.ndarray:
    """Per-rank lists of per-item values (rank r holding items r, r + world, ...) back in item order."""
    out = np.full(n, np.nan, np.float64)
    for rank, part in enumerate(parts):
        out[rank::len(parts)] = part
    return out


def param_groups(model: torch.nn.Module, tc) -> list[dict]:
    """A pretrained encoder learns at `encoder_lr_scale` x lr, the new decoder at lr: large updates
    would first wreck the features that make the pretrained start worth having."""
    encoder = getattr(model, "encoder", None)
    if tc.init == "none" or encoder is None:
        return [{"params": list(model.parameters())}]
    own = {id(p) for p in encoder.parameters()}
    return [{"params": list(encoder.parameters()), "lr": tc.lr * tc.encoder_lr_scale},
            {"params": [p for p in model.parameters() if id(p) not in own]}]


def nanmean_or(values: np.ndarray, default: float = float("nan")) -> float:
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else default


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist()}


# --- the run folder ------------------------------------------------------------------------------------


def _claim_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse what would mix two runs in one folder; with `overwrite`, clear the old run's files."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: the run folder is a file")
    if resume:
        if not (out / "last.pt").is_file() or not (out / "config.json").is_file():
            raise RunFolderError(f"{out}: nothing to resume (no last.pt and config.json); start a fresh run")
        return
    remove_stale_temps(out)
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not present:
        return
    if not overwrite:
        shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
        hint = ("--resume to continue it" if (out / "last.pt").is_file() else
                "it has no last.pt, so there is nothing to resume: a run killed in its first epoch starts over")
        raise RunFolderError(f"{out}: the run folder is not empty ({shown}); pass --overwrite to replace the "
                             f"run there ({hint})")
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def _choose_split(cfg: RunConfig, data: LoadedDataset, split: Mapping | None) -> dict:
    if split is None and cfg.data.split_file:
        split = load_split(cfg.data.split_file)
    if split is None:
        groups = read_groups(cfg.data.groups_file) if cfg.data.groups_file else find_groups(cfg.data.root)
        split = split_train_val([s.name for s in data.samples], cfg.data.val_fraction, cfg.data.split_seed, groups)
    _check_split_names(split, data)
    return {"train": list(split["train"]), "val": list(split["val"])}


def _check_split_names(split: Mapping, data: LoadedDataset, where: str = "split") -> None:
    missing = [n for part in ("train", "val") for n in split[part] if n not in data.shapes]
    if missing:
        raise ValueError(f"{where} names {len(missing)} scan(s) not in {data.root}, e.g. {missing[0]!r}")


def _what_changed(state: dict, split: Mapping, data: LoadedDataset, shown: int = 5) -> str:
    """A one-line account of how the data differs from what the run was trained on, naming up to `shown`
    files changed, added or removed (from the file hashes last.pt keeps; runs from before them name scans)."""
    known = set(split["train"]) | set(split["val"])
    now = set(data.shapes)
    gone, new = natural_sorted(known - now), natural_sorted(now - known)
    parts = []
    if gone:
        parts.append(f"{len(gone)} scan(s) gone (e.g. {gone[0]!r})")
    if new:
        parts.append(f"{len(new)} new scan(s) (e.g. {new[0]!r})")
    if not parts:
        parts.append("same scan names, different file contents")
    was = state.get("data_files") or {}
    if was and data.files:
        changes = [(f, "changed") for f in natural_sorted(set(was) & set(data.files)) if was[f] != data.files[f]]
        changes += [(f, "added") for f in natural_sorted(set(data.files) - set(was))]
        changes += [(f, "removed") for f in natural_sorted(set(was) - set(data.files))]
        if changes:
            more = f" and {len(changes) - shown} more" if len(changes) > shown else ""
            parts.append("files: " + ", ".join(f"{f} {how}" for f, how in changes[:shown]) + more)
    return (f"fingerprint {state.get('data_fingerprint')} -> {data.fingerprint}: " + ", ".join(parts))




def _settings_changed(saved: dict, cfg: RunConfig) -> list[str]:
    """Settings that differ between the run and `cfg`, apart from config.RESUMABLE (data that moved,
    another device or loader; `epochs` is given to a resume explicitly)."""
    now = cfg.to_dict()
    changed = []
    for section in ("data", "model", "augment", "train", "inference"):
        for key, value in now[section].items():
            old = saved.get(section, {}).get(key, value)
            if key not in RESUMABLE and (list(old) if isinstance(old, tuple) else old) != \
                    (list(value) if isinstance(value, tuple) else value):
                changed.append(f"{key} {old!r} -> {value!r}")
    return changed


def fit(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
        on_epoch_end: Callable[[int, dict], None] | None = None, dataset: LoadedDataset | None = None,
        split: Mapping | None = None, overwrite: bool = False, allow_changed_data: bool = False,
        epochs: int | None = None, clock: Callable[[], float] = time.perf_counter,
        world: Distributed | None = None, review: bool = True) -> dict:
    """Train per `cfg`, writing the run folder described above. Returns the final summary dict.

    `dataset` is the data already read by `load_dataset` (read here when not given); `split` a fixed
    {"train", "val"} split (cross-validation folds); `epochs` extends a resumed run to that many epochs;
    `clock` measures time for the budget (a test passes a fake one). `on_epoch_end(epoch, row)` is
    called after each epoch's metrics are written (a hook for callers that log elsewhere or stop early
    by raising); under torchrun on every process.

    Under torchrun (WORLD_SIZE > 1 in the environment) this process trains its share of the run
    (distributed.py; the module docstring above); every process returns the summary. `world` overrides
    the environment: `distributed.SINGLE` trains in this process alone (a cross-validation fold).
    `review`: decide the postprocessing and fit the needs-review decision on the validation split
    (RUN/postprocessing.json, RUN/confidence.json; a cross-validation decides its own out of fold instead)."""
    session = distributed.session(select_device(cfg.train.device)) if world is None else contextlib.nullcontext(world)
    out = Path(out_dir)
    # a fresh run that will claim the folder (new, empty or --overwrite): on a failure before its first
    # last.pt, what it wrote is removed, so no half-started run folder is left to refuse the next start
    created = not out.exists()
    fresh = not resume and (overwrite or created or (out.is_dir() and not any(out.iterdir())))
    with session as dist:
        try:
            summary = _fit(cfg, out, resume, progress, on_epoch_end, dataset, split, overwrite,
                           allow_changed_data, epochs, clock, dist)
        except BaseException:
            if fresh and dist.is_main:
                _discard_unstarted_run(out, created)
            raise
        if review and dist.is_main:
            val_names = load_split(Path(out_dir) / "splits.json")["val"]
            summary.update(decide_on_validation(Path(out_dir), cfg, val_names))
        return summary


def _discard_unstarted_run(out: Path, created: bool) -> None:
    """After a fresh run failed: without a last.pt nothing in `out` can be resumed or used, so remove the
    run's files (and the folder when this run `created` it and it is left empty)."""
    if not out.is_dir() or (out / "last.pt").is_file():
        return
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    remove_stale_temps(out)
    if created and not any(out.iterdir()):
        out.rmdir()


def _resume_state(out: Path, cfg: RunConfig, data: LoadedDataset, allow_changed_data: bool,
                  world_size: int) -> tuple[dict, dict]:
    """(last.pt's state, the run's split), once the data and settings are checked against the run's."""
    state = load_checkpoint(out / "last.pt")
    split = load_split(out / "splits.json")
    changed = _settings_changed(RunConfig.from_dict(state["config"]).to_dict(), cfg)
    if changed:
        raise RunFolderError(f"{out}: resume must keep the run's settings; changed: {'; '.join(changed)}")
    trained_on = state.get("world_size", 1)
    if trained_on != world_size:
        raise RunFolderError(
            f"{out}: the run was trained by {trained_on} process(es), a global batch of {trained_on} x "
            f"{cfg.train.batch_size}; resume it with {trained_on} (torchrun giving WORLD_SIZE {trained_on}"
            f"{'' if trained_on > 1 else ', or no torchrun'}), not {world_size}")
    if state.get("data_fingerprint") != data.fingerprint:
        message = f"{cfg.data.root}: the data changed since {out} was trained ({_what_changed(state, split, data)})"
        if not allow_changed_data:
            raise RunFolderError(message + "; pass --allow-changed-data to resume on it anyway")
        log.warning("%s; resuming anyway (--allow-changed-data)", message)
    _check_split_names(split, data, f"{out / 'splits.json'}")
    return state, split


def _fit(cfg: RunConfig, out: Path, resume: bool, progress: bool, on_epoch_end, dataset: LoadedDataset | None,
         split: Mapping | None, overwrite: bool, allow_changed_data: bool, epochs: int | None,
         clock: Callable[[], float], dist: Distributed) -> dict:
    t_start = clock()
    tc = cfg.train
    main = dist.is_main
    progress = progress and main
    # Rank 0 alone claims and reads the run folder; every process reads and checks the data. A failure on
    # any one ends them all here, before a collective that the failed one would never reach.
    with dist.agreed("checking the run folder and the data"):
        if main:
            _claim_run_folder(out, resume, overwrite)
        data = dataset or load_dataset(cfg.data.root, cfg.data.mask_threshold, cfg.data.max_pixels, progress,
                                       labels=cfg.data.labels)
        state = None
        if main and resume:
            state, split = _resume_state(out, cfg, data, allow_changed_data, dist.world_size)
        elif main:
            split = _choose_split(cfg, data, split)
    if dist.active:
        fingerprints = dist.all_gather(data.fingerprint)
        if len(set(fingerprints)) > 1:
            odd = next(r for r, f in enumerate(fingerprints) if f != fingerprints[0])
            raise ValueError(f"{cfg.data.root}: rank {odd} reads other data than rank 0 (fingerprint "
                             f"{fingerprints[odd]} vs {fingerprints[0]}); every node needs the same dataset")
        state, split = dist.broadcast((state, split))
        _check_split_names(split, data)
    # one process per machine builds the cache; the others wait for it to appear, then map the same files
    cache = open_or_build(data.samples, data.fingerprint, cfg.data.size, cfg.data.mask_threshold, cfg.data.labels,
                          cfg.data.max_pixels, cfg.data.cache_dir, progress, wait=dist.local_rank != 0)
    train_set = CachedSet(cache, split["train"], cfg.data.normalize)
    val_set = CachedSet(cache, split["val"], cfg.data.normalize)
    if len(train_set.names) == 0:
        raise ValueError(f"{cfg.data.root}: the training split is empty")
    if len(train_set.names) < dist.world_size:
        raise ValueError(f"{cfg.data.root}: {len(train_set.names)} training scans cannot be shared by "
                         f"{dist.world_size} processes; use fewer processes")

    device = dist.device(select_device(tc.device))
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    model = build_model(cfg.model)
    if tc.init == "imagenet" and state is None:
        load_imagenet_encoder(model)
    elif tc.init != "none" and state is None:
        load_packaged_weights(model, tc.init, cfg.model.arch)
    if tc.sync_batchnorm and dist.active:
        distributed.convert_sync_batchnorm(model)
    model = model.to(device)
    amp = use_bf16(tc.precision, device)
    # measured on a 2-core AVX-512/AMX CPU: fp32 steps run ~1.2-1.4x faster in channels_last, bf16 steps
    # ~1.3x faster in the default NCHW layout
    channels_last = device.type == "cpu" and not amp
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(param_groups(model, tc), lr=tc.lr, weight_decay=tc.weight_decay)
    loss_fn = build_loss(tc)
    global_batch = tc.batch_size * dist.world_size
    drop_last = len(train_set.names) > global_batch
    steps_per_epoch = len(train_set.names) // global_batch if drop_last else 1
    warmup_steps = max(1, round(tc.warmup_epochs * steps_per_epoch))
    images_per_epoch = steps_per_epoch * global_batch if drop_last else len(train_set.names)
    # mutable: a time budget rewrites it after the first epoch; an images budget fixes it here
    plan = {"epochs": tc.epochs if tc.budget_images is None else max(1, round(tc.budget_images / images_per_epoch))}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, plan["epochs"] * steps_per_epoch))

    ema = AveragedModel(model, multi_avg_fn=ema_update(tc.ema_decay), use_buffers=True) if tc.ema_decay else None
    scored = ema.module if ema is not None else model  # what validation scores and checkpoints hold
    start_epoch, best_dice, history, elapsed_before = 1, -1.0, [], 0.0
    workers = loader_workers(tc.num_workers, device)
    on_batches = augment_on_batches(tc.augment_on, device)
    meta = {
        "hemaseg_version": __version__, "torch_version": torch.__version__, "python": platform.python_version(),
        "device": str(device), "cpu": describe_cpu(), "data_fingerprint": data.fingerprint,
        "n_train": len(train_set.names), "n_val": len(val_set.names), "loader_workers": workers,
        "bf16_autocast": amp, "world_size": dist.world_size, "global_batch": global_batch,
        "augment_on": "batch" if on_batches else "loader",
    }
    if state is not None:
        model.load_state_dict(state["train_model"] if ema is not None else state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        done = state["epoch"]
        plan["epochs"] = state["planned_epochs"] if epochs is None else epochs
        if plan["epochs"] < done:
            raise RunFolderError(f"{out}: the run has already trained {done} epochs; --epochs must be at least "
                                 f"that (it extends a run, it cannot shorten one)")
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch, best_dice, history = done + 1, state["best_dice"], list(state["history"])
        elapsed_before = state.get("elapsed_s", 0.0)
    with dist.agreed("writing the run folder"):
        if main and state is not None:
            _append_history(out, {"event": "resume", "at_epoch": done, "planned_epochs": plan["epochs"],
                                  "data_fingerprint": data.fingerprint, "allow_changed_data": allow_changed_data,
                                  "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **{
                                      k: meta[k] for k in ("hemaseg_version", "device", "bf16_autocast",
                                                           "world_size")}})
            log.info("resuming %s at epoch %d of %d", out, start_epoch, plan["epochs"])
        elif main:
            out.mkdir(parents=True, exist_ok=True)
            save_split(split, out / "splits.json")
            cfg.save(out / "config.json", {"meta": meta, "history": []})
        if main:
            remove_stale_temps(out)
    net = dist.wrap(model, device)  # what the steps run: under torchrun DDP, averaging the gradients
    batch_augment = BatchAugment(cfg.augment, cfg.data.size) if on_batches else None
    dataset_ = AugmentedPairs(train_set, None if on_batches else build_augmentation(cfg.augment, cfg.data.size),
                              tc.seed)
    data_files = data.files  # each file's hash, in last.pt: a resume on changed data names the files
    del data  # the letterboxed cache is all training needs from here on

    run_config = state["config"] if state is not None else cfg.to_dict()  # a resume keeps the original

    def payload(epoch: int, metrics: dict, weights: dict | None = None) -> dict:
        return {"version": __version__, "config": run_config,
                "model": scored.state_dict() if weights is None else weights, "epoch": epoch, "metrics": metrics,
                "data_fingerprint": meta["data_fingerprint"]}

    # under torchrun the sampler deals out each step's global batch and drops the incomplete one itself
    kept = steps_per_epoch * global_batch if drop_last else len(dataset_)
    sampler = EpochSampler(len(dataset_), tc.seed, dist.rank, dist.world_size, kept)
    # one loader for the whole run: worker processes start once, not every epoch
    loader = DataLoader(dataset_, batch_size=tc.batch_size, sampler=sampler,
                        drop_last=drop_last and not dist.active, num_workers=workers, persistent_workers=workers > 0,
                        worker_init_fn=_quiet_worker if workers else None, pin_memory=device.type == "cuda")
    bar = tqdm(total=plan["epochs"], initial=start_epoch - 1, desc="train", unit="epoch", disable=not progress)
    best_payload, last_flush = None, -math.inf
    resumed = state is not None
    epoch = start_epoch
    while epoch <= plan["epochs"]:
        t_epoch = clock()
        net.train()
        sampler.epoch = epoch
        losses = []
        for step, (x, y) in enumerate(loader if workers else single_threaded_batches(loader)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if batch_augment is not None:  # seeded by (seed, epoch, step, rank): the same after a resume
                batch_seed = np.random.SeedSequence([tc.seed, epoch, step, dist.rank]).generate_state(1)[0]
                x, y = batch_augment(x, y, torch.Generator().manual_seed(int(batch_seed)))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x)
            if dist.active:  # this process's share of the step's images (global_batch, or all scans at once)
                share = dist.world_size * len(x) / (global_batch if drop_last else len(train_set.names))
                loss = global_batch_loss(loss_fn, logits.float(), y, share)
            else:
                loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(model)
            losses.append(loss.item())
        scores = (validate(scored, val_set, device, cfg.inference.threshold, tc.batch_size, dist)
                  if len(val_set.names) else np.array([]))
        val_dice = nanmean_or(scores)
        # a step's loss is the mean over processes of their parts of it (global_batch_loss)
        train_loss = float(np.mean(losses)) if not dist.active else \
            dist.sum(float(np.sum(losses))) / (dist.world_size * len(losses))
        now = clock()
        epoch_s = now - t_epoch
        elapsed = elapsed_before + now - t_start
        # the configured lr's group (a pretrained encoder's group, first, learns at encoder_lr_scale x it)
        row = {"epoch": epoch, "lr": optimizer.param_groups[-1]["lr"], "train_loss": train_loss,
               "val_dice": val_dice, "epoch_s": round(epoch_s, 3), "elapsed_s": round(elapsed, 3)}
        history.append(row)
        if tc.budget_minutes is not None and not resumed:  # a resumed run keeps the epochs it planned
            _fit_epochs_to_budget(plan, tc.budget_minutes * 60, elapsed, history, epoch)
            plan["epochs"] = dist.broadcast(plan["epochs"])  # rank 0's clock decides for every process
            bar.total = plan["epochs"]
        score = -1.0 if math.isnan(val_dice) else val_dice
        if score > best_dice:
            best_dice = score
            if main:  # kept until the next flush
                best_payload = payload(epoch, row, _cpu_copy(scored.state_dict()))
        # A large model's last.pt is ~400 MB: written after every few-second epoch, it made the disk the
        # bottleneck. So between the first and the last epoch a checkpoint is written once leaving it
        # out would risk more than checkpoint_every_s of work (see the module docstring).
        due = main and (epoch == start_epoch or epoch >= plan["epochs"] or
                        clock() - last_flush + epoch_s > tc.checkpoint_every_s)
        if due:
            if best_payload is not None:
                save_checkpoint(out / "best.pt", best_payload)
                best_payload = None
            save_checkpoint(out / "last.pt", {
                **payload(epoch, row), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "best_dice": best_dice, "history": history, "planned_epochs": plan["epochs"],
                "elapsed_s": elapsed, "world_size": dist.world_size, "data_files": data_files,
                **({"train_model": model.state_dict(), "ema": ema.state_dict()} if ema is not None else {}),
            })
            last_flush = clock()
        if main:
            _write_metrics(out, history)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_dice=f"{val_dice:.3f}")
        bar.update(1)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        epoch += 1
    bar.close()
    if main:
        plot_curves(history, out / "curves.png")
    best = max(history, key=lambda h: -1 if math.isnan(h["val_dice"]) else h["val_dice"])
    summary = {"run": str(out), "epochs": plan["epochs"], "best_epoch": best["epoch"], "best_val_dice": best["val_dice"],
               "last_val_dice": history[-1]["val_dice"], "train_s": round(clock() - t_start, 1),
               "elapsed_s": history[-1]["elapsed_s"], "n_train": len(train_set.names), "n_val": len(val_set.names),
               "images_seen": plan["epochs"] * steps_per_epoch * global_batch if drop_last
               else plan["epochs"] * len(train_set.names),
               "cpu": meta["cpu"]["model"], "device": meta["device"], "bf16_autocast": amp}
    if tc.budget_minutes is not None:
        summary["budget_minutes"] = tc.budget_minutes
    if tc.budget_images is not None:
        summary["budget_images"] = tc.budget_images
    summary["world_size"] = dist.world_size
    if main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    dist.barrier()  # every process returns once the run folder is complete
    return summary


def ema_update(decay: float) -> Callable:
    """AveragedModel's multi_avg_fn for an exponential moving average whose decay warms up as
    min(decay, (1 + n) / (10 + n)) after n updates (timm's ModelEma does the same): with a fixed 0.99 the
    first hundred steps of a few-hundred-step fine-tune would weigh the starting weights heavily.
    Integer buffers (BatchNorm's batch counter) are copied, not averaged."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        if not torch.is_floating_point(averaged[0]):
            torch._foreach_copy_(averaged, current)
            return
        n = float(n_averaged)
        torch._foreach_lerp_(averaged, current, 1 - min(decay, (1 + n) / (10 + n)))

    return update


def _append_history(out: Path, event: dict) -> None:
    """config.json keeps the run's original settings; a resume is appended to its history."""
    saved = json.loads((out / "config.json").read_text())
    saved.setdefault("history", []).append(event)
    atomic_write_text(out / "config.json", json.dumps(saved, indent=2))


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _fit_epochs_to_budget(plan: dict, budget_s: float, elapsed_s: float, history: list[dict], epoch: int) -> None:
    """Set the planned epoch count so the run ends inside the budget, from the measured wall time per
    epoch: the gaps between epochs' elapsed times, which include checkpoint writes (the first epoch's is
    excluded once later ones exist: it pays one-off warm-up costs)."""
    gaps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(history[1:], history[2:])]
    times = gaps or [h["epoch_s"] for h in history[1:]] or [history[0]["epoch_s"]]
    per_epoch = max(float(np.median(times)), 1e-6)
    plan["epochs"] = max(epoch, epoch + int((budget_s - elapsed_s) / per_epoch))


def _write_metrics(out: Path, history: list[dict]) -> None:
    write_csv(out / "metrics.csv", history, list(history[0]))


def train_model(data: str | Path, out: str | Path, preset: str = "default", overwrite: bool = False,
                progress: bool = True, **overrides) -> dict:
    """Python API: `hemaseg.train_model("data/", "runs/x", epochs=20, size=256)`; any setting of any
    config section as a keyword (`config.SETTINGS`), on top of `preset` adapted to the data."""
    cfg, loaded = configure(data, preset, overrides)
    return fit(cfg, out, dataset=loaded, overwrite=overwrite, progress=progress)


def resumed_config(run: str | Path, data_root: str | Path | None = None) -> RunConfig:
    """The config of the run in `run` (its data at `data_root` if the data has moved)."""
    cfg = RunConfig.load(Path(run) / "config.json")
    if data_root is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=os.path.abspath(data_root)))
    return cfg
