"""Training: fit(config, out_dir) writes a complete, resumable run folder.

RUN/config.json    every setting, dataset fingerprint, versions
RUN/splits.json    the train/val split used (reused on resume)
RUN/last.pt        weights + optimizer/scheduler/RNG state, written atomically every epoch
RUN/best.pt        weights of the epoch with the best validation Dice
RUN/metrics.csv    one row per epoch; RUN/curves.png the training curves

Each sample's augmentation is seeded by (seed, epoch, index) and each epoch's order by (seed,
epoch), so a resumed run retraces the uninterrupted one exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceFocalLoss
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import __version__
from .backends import available_cpus, bf16_supported, make_backend
from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from .config import RunConfig
from .data import (
    dataset_fingerprint,
    find_groups,
    find_samples,
    load_sample,
    load_split,
    read_groups,
    save_split,
    split_train_val,
)
from .metrics import dice
from .models import build_model
from .predict import forward_probs, select_device
from .report import plot_curves
from .transforms import Letterbox, augment, build_augmentation, letterbox, normalize, unletterbox

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "hemaseg-checkpoint/1"
CHECKPOINT_EVERY_S = 60.0  # between the first and the last epoch, checkpoints are written at most this often


@dataclass
class CachedSet:
    """Scans decoded and letterboxed once, kept in memory for every epoch."""

    names: list[str]
    images: np.ndarray  # (N, S, S) float32, normalised
    masks: np.ndarray  # (N, S, S) float32 in {0, 1}
    boxes: list[Letterbox]
    orig_masks: list[np.ndarray]  # bool, each at its image's original size


def cache_samples(samples, size: int, method: str, mask_threshold=None, progress: bool = True, desc="load") -> CachedSet:
    images, masks, boxes, orig = [], [], [], []
    for s in tqdm(samples, desc=desc, unit="img", disable=not progress, leave=False):
        image, mask = load_sample(s, mask_threshold=mask_threshold)
        boxed, boxed_mask, box = letterbox(image, size, mask)
        images.append(normalize(boxed, box, method))
        masks.append(boxed_mask)
        boxes.append(box)
        orig.append(mask)
    n = len(samples)
    return CachedSet(
        [s.name for s in samples],
        np.stack(images) if n else np.zeros((0, size, size), np.float32),
        np.stack(masks) if n else np.zeros((0, size, size), np.float32),
        boxes, orig,
    )


class AugmentedPairs(Dataset):
    """In-memory pairs with per-(seed, epoch, index) seeded paired augmentation. Indexed by
    (epoch, index) pairs from EpochSampler, so persistent worker processes need no epoch update."""

    def __init__(self, cached: CachedSet, pipeline, seed: int):
        self.cached, self.pipeline, self.seed = cached, pipeline, seed

    def __len__(self) -> int:
        return len(self.cached.names)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        seed = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0])
        return augment(self.pipeline, self.cached.images[i], self.cached.masks[i], seed)


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) pairs in an order seeded by (seed, epoch): the same batches after a resume."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 1

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return iter([(self.epoch, int(i)) for i in order])


def _quiet_worker(_: int) -> None:
    """Data-loader workers skip MONAI's metadata tracking, as the in-process path does."""
    from monai.data import set_track_meta

    set_track_meta(False)


def use_bf16(precision: str, amp: bool, device: torch.device) -> bool:
    """Whether training autocasts to bf16. `auto` (with `amp`) does wherever the hardware runs bf16
    natively, CPUs included: on this project's AVX512-BF16 CPU it trained 1.5x the epochs in the same
    minutes and scored higher (usgra fold 0, 8 min: Dice 0.574 vs 0.502; synthetic demo, 3 min: 0.470
    vs 0.433; benchmarks/recipe.py). Elsewhere fp32. `bf16` demands native support (emulated bf16 is
    slower than fp32); `fp32` never autocasts."""
    if precision == "fp32" or (precision == "auto" and not amp):
        return False
    if precision == "auto":
        return bf16_supported(device)
    if not bf16_supported(device):
        raise ValueError(f"--precision bf16 needs native bf16 on {device} (AVX512-BF16/AMX CPU or a bf16 "
                         "GPU); use --precision fp32")
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


def build_loss(tc) -> torch.nn.Module:
    """Dice + BCE (default) or Dice + focal, both MONAI's, on logits; Dice over the whole batch
    (as nnU-Net) so images without a lesion do not produce a degenerate per-image Dice."""
    if tc.loss == "dice_focal":
        return DiceFocalLoss(sigmoid=True, batch=True, lambda_dice=tc.lambda_dice, lambda_focal=tc.lambda_bce)
    return DiceCELoss(sigmoid=True, batch=True, lambda_dice=tc.lambda_dice, lambda_ce=tc.lambda_bce)


def validate(model: torch.nn.Module, cached: CachedSet, device: torch.device, threshold: float,
             batch_size: int = 8) -> np.ndarray:
    """Per-image Dice on whole validation images at their original size (NaN where both empty)."""
    model.eval()
    # on the CPU an eval copy with BN folded, channels_last, runs ~2x faster with the same fp32 numbers
    runner = make_backend(model, "torch-fast", device) if device.type == "cpu" else model
    scores = []
    for start in range(0, len(cached.names), batch_size):
        probs = forward_probs(runner, cached.images[start:start + batch_size], device)
        for j, p in enumerate(probs):
            k = start + j
            pred = unletterbox(p, cached.boxes[k]) >= threshold
            scores.append(dice(pred, cached.orig_masks[k])[0])
    return np.asarray(scores, np.float64)


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


def _prepare_run(cfg: RunConfig, out: Path, progress: bool):
    samples = find_samples(cfg.data.root)
    split_path = out / "splits.json"
    if split_path.is_file():
        split = load_split(split_path)
    elif cfg.data.split_file:
        split = load_split(cfg.data.split_file)
    else:
        groups = read_groups(cfg.data.groups_file) if cfg.data.groups_file else find_groups(cfg.data.root)
        split = split_train_val([s.name for s in samples], cfg.data.val_fraction, cfg.data.split_seed, groups)
    by_name = {s.name: s for s in samples}
    missing = [n for part in ("train", "val") for n in split[part] if n not in by_name]
    if missing:
        raise ValueError(f"split names {len(missing)} scan(s) not in {cfg.data.root}, e.g. {missing[0]!r}")
    save_split(split, split_path)
    train_set = cache_samples([by_name[n] for n in split["train"]], cfg.data.size, cfg.data.normalize,
                              cfg.data.mask_threshold, progress, "load train")
    val_set = cache_samples([by_name[n] for n in split["val"]], cfg.data.size, cfg.data.normalize,
                            cfg.data.mask_threshold, progress, "load val")
    return samples, split, train_set, val_set


def fit(cfg: RunConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
        on_epoch_end=None) -> dict:
    """Train per `cfg`, writing the run folder described above. Returns the final summary dict.

    `on_epoch_end(epoch, row)` is called after each epoch's metrics are written (a hook for
    callers that log elsewhere or stop early by raising)."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tc = cfg.train
    device = select_device(tc.device)
    samples, split, train_set, val_set = _prepare_run(cfg, out, progress)
    if len(train_set.names) == 0:
        raise ValueError(f"{cfg.data.root}: the training split is empty")

    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    model = build_model(cfg.model).to(device)
    amp = use_bf16(tc.precision, tc.amp, device)
    # measured on a 2-core AVX-512/AMX CPU: fp32 steps run ~1.2-1.4x faster in channels_last, bf16 steps
    # ~1.3x faster in the default NCHW layout
    channels_last = device.type == "cpu" and not amp
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    loss_fn = build_loss(tc)
    drop_last = len(train_set.names) > tc.batch_size
    steps_per_epoch = len(train_set.names) // tc.batch_size if drop_last else 1
    warmup_steps = max(1, round(tc.warmup_epochs * steps_per_epoch))
    plan = {"epochs": tc.epochs}  # mutable: a time budget rewrites it after the first epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, plan["epochs"] * steps_per_epoch))

    start_epoch, best_dice, history, elapsed_before = 1, -1.0, [], 0.0
    if resume:
        state = load_checkpoint(out / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        # an unchanged config continues the planned schedule; a new epoch count extends (or cuts) it
        extended = state["config"]["train"]["epochs"] != tc.epochs
        plan["epochs"] = tc.epochs if extended else state["planned_epochs"]
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        start_epoch, best_dice, history = state["epoch"] + 1, state["best_dice"], list(state["history"])
        elapsed_before = state.get("elapsed_s", 0.0)
        log.info("resuming %s at epoch %d of %d", out, start_epoch, plan["epochs"])

    fingerprint = dataset_fingerprint(samples)
    workers = loader_workers(tc.num_workers, device)
    meta = {
        "hemaseg_version": __version__, "torch_version": torch.__version__, "python": platform.python_version(),
        "device": str(device), "data_fingerprint": fingerprint, "n_train": len(train_set.names),
        "n_val": len(val_set.names), "loader_workers": workers,
        "bf16_autocast": amp,
    }
    cfg.save(out / "config.json", {"meta": meta})
    dataset = AugmentedPairs(train_set, build_augmentation(cfg.augment, cfg.data.size), tc.seed)

    def payload(epoch: int, metrics: dict, state: dict | None = None) -> dict:
        return {"format": CHECKPOINT_FORMAT, "version": __version__, "config": cfg.to_dict(),
                "model": model.state_dict() if state is None else state, "epoch": epoch, "metrics": metrics,
                "data_fingerprint": fingerprint}

    sampler = EpochSampler(len(dataset), tc.seed)
    # one loader for the whole run: worker processes start once, not every epoch
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, drop_last=drop_last,
                        num_workers=workers, persistent_workers=workers > 0,
                        worker_init_fn=_quiet_worker if workers else None, pin_memory=device.type == "cuda")
    bar = tqdm(total=plan["epochs"], initial=start_epoch - 1, desc="train", unit="epoch", disable=not progress)
    best_payload, last_flush = None, -math.inf
    epoch = start_epoch
    while epoch <= plan["epochs"]:
        t_epoch = time.perf_counter()
        model.train()
        sampler.epoch = epoch
        losses = []
        for x, y in loader if workers else single_threaded_batches(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        scores = validate(model, val_set, device, tc.threshold, tc.batch_size) if len(val_set.names) else np.array([])
        val_dice = nanmean_or(scores)
        epoch_s = time.perf_counter() - t_epoch
        elapsed = elapsed_before + time.perf_counter() - t_start
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": float(np.mean(losses)),
               "val_dice": val_dice, "epoch_s": round(epoch_s, 3), "elapsed_s": round(elapsed, 3)}
        history.append(row)
        if tc.budget_minutes is not None and not resume:
            _fit_epochs_to_budget(plan, tc.budget_minutes * 60, elapsed, history, epoch)
            bar.total = plan["epochs"]
        score = -1.0 if math.isnan(val_dice) else val_dice
        if score > best_dice:
            best_dice = score
            best_payload = payload(epoch, row, _cpu_copy(model.state_dict()))  # kept until the next flush
        # Checkpoints go to disk after the first and the last epoch and at most once a CHECKPOINT_EVERY_S
        # between: a large model's last.pt is ~400 MB, and writing it every few-second epoch made the
        # disk the bottleneck. A crash loses under a minute; resume replays from last.pt exactly.
        if epoch == start_epoch or epoch >= plan["epochs"] or time.perf_counter() - last_flush >= CHECKPOINT_EVERY_S:
            if best_payload is not None:
                save_checkpoint(out / "best.pt", best_payload)
                best_payload = None
            save_checkpoint(out / "last.pt", {
                **payload(epoch, row), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "best_dice": best_dice, "history": history, "planned_epochs": plan["epochs"],
                "elapsed_s": elapsed,
            })
            last_flush = time.perf_counter()
        _write_metrics(out, history)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_dice=f"{val_dice:.3f}")
        bar.update(1)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        epoch += 1
    bar.close()
    plot_curves(history, out / "curves.png")
    best = max(history, key=lambda h: -1 if math.isnan(h["val_dice"]) else h["val_dice"])
    summary = {"run": str(out), "epochs": plan["epochs"], "best_epoch": best["epoch"], "best_val_dice": best["val_dice"],
               "last_val_dice": history[-1]["val_dice"], "train_s": round(time.perf_counter() - t_start, 1),
               "n_train": len(train_set.names), "n_val": len(val_set.names)}
    if tc.budget_minutes is not None:
        summary["budget_minutes"] = tc.budget_minutes
    atomic_write_text(out / "summary.json", __import__("json").dumps(summary, indent=2))
    return summary


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _fit_epochs_to_budget(plan: dict, budget_s: float, elapsed_s: float, history: list[dict], epoch: int) -> None:
    """Set the planned epoch count so the run ends inside the budget, from the measured epoch time
    (the first epoch's is excluded once later ones exist: it pays one-off warm-up costs)."""
    times = [h["epoch_s"] for h in history[1:]] or [history[0]["epoch_s"]]
    per_epoch = float(np.median(times))
    plan["epochs"] = max(epoch, epoch + int((budget_s - elapsed_s) / per_epoch))


def _write_metrics(out: Path, history: list[dict]) -> None:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def train_model(data: str, out: str, **overrides) -> dict:
    """Python API: `hemaseg.train_model("data/", "runs/x", epochs=20, size=256)`; keys of any config section."""
    sections = {"data": {"root": str(data)}, "model": {}, "augment": {}, "train": {}}
    fields = {s: {f.name for f in dataclasses.fields(t)} for s, t in
              (("data", RunConfig().data), ("model", RunConfig().model), ("augment", RunConfig().augment),
               ("train", RunConfig().train))}
    for key, value in overrides.items():
        owner = [s for s, names in fields.items() if key in names]
        if not owner:
            raise ValueError(f"unknown setting {key!r}")
        sections[owner[0]][key] = value
    return fit(RunConfig.from_dict(sections), out)
