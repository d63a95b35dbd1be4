"""Learn from the corrections: train on the saved scans in a background thread, keep the new model only
if it is better.

One training at a time (`Finetuner.start` refuses a second), in a thread, so the page stays usable; the
page polls `status()`. A fine-tune is an ordinary hemaseg run (`training.train.fit`) written to
DATASET/label_runs/finetune-NNN/, with its training cache in a folder beside it that is deleted when it
ends, so nothing leaves DATASET.

Held out: every pair in DATASET (saved from the page or there before) is a candidate; each name is
hashed with the seed (`holdout_split`) and the scans whose hash falls below `holdout_fraction` (at least
one, never all) are held out and never trained on. The rule looks at one name at a time, so a scan stays
held out as more scans are saved. The run's splits.json records the split; `result` says how many.

Compared: the old model (with its own threshold and postprocessing) and the new one (its last epoch's
weights, last.pt: best.pt is chosen on the held-out scans, so scoring it there would flatter it) predict
every held-out scan at its own size; the mean Dice over them (a scan where both masks are empty is left
out, `evaluation.metrics.dice`) decides. The new model replaces the old for the rest of the worklist only
if its Dice is higher (with no old model, any new one is kept).

Where the weights start: from the old model's recipe (`base`: its architecture, input size and
normalisation). `fit` starts a network from its `init` (hemaseg's packaged ultrasound model for the
EfficientNet-Lite0 UNet, else random weights), not from an arbitrary run's weights, so "fine-tune" here is
a retraining on the labelled scans with the old model's recipe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hemaseg.io import atomic_write_text, json_safe

log = logging.getLogger(__name__)

RUNS = "label_runs"


@dataclass(frozen=True)
class FinetuneSettings:
    """How a fine-tune trains. `overrides` are flat hemaseg settings (`config.SETTINGS`: epochs, batch_size,
    size, lr, arch, init ...) on top of the old model's recipe (or `preset` without one)."""

    overrides: Mapping = field(default_factory=dict)
    budget_minutes: float | None = 10.0  # when overrides give neither epochs nor a budget
    preset: str = "default"  # the recipe without an old model to copy (config.PRESETS)
    holdout_fraction: float = 0.2
    seed: int = 0
    min_scans: int = 4  # saved scans needed before a fine-tune can start
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"holdout_fraction must be between 0 and 1, got {self.holdout_fraction}")
        if self.min_scans < 2:
            raise ValueError(f"min_scans must be >= 2 (one to train on, one to hold out), got {self.min_scans}")


class Busy(RuntimeError):
    """A fine-tune is already running."""


class NotEnoughScans(ValueError):
    """Too few saved scans to train on and hold out."""


class _Stopped(Exception):
    pass


def holdout_split(names: Sequence[str], fraction: float, seed: int = 0) -> dict[str, list[str]]:
    """{"train", "val"}: a name is held out (val) when its seeded hash, as a fraction in [0, 1), is below
    `fraction`; at least one is held out and at least one trained on (for two or more names)."""
    def u(name: str) -> float:
        h = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") / 2 ** 64

    ranked = sorted(names, key=lambda n: (u(n), n))
    val = [n for n in ranked if u(n) < fraction]
    if not val and ranked:
        val = ranked[:1]
    if len(val) == len(ranked) and len(ranked) > 1:
        val = val[:-1]
    held = set(val)
    return {"train": sorted(n for n in names if n not in held), "val": sorted(held)}


def mean_dice(predict: Callable[[np.ndarray], np.ndarray], pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean Dice of `predict(image) -> bool mask` over (image, reference) pairs; both-empty pairs are NaN
    and left out (`evaluation.metrics.dice`); NaN when every pair is."""
    from hemaseg.evaluation.metrics import dice

    scores = [float(dice(predict(image), ref)[0]) for image, ref in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: reported as NaN
        return float(np.nanmean(scores)) if scores else math.nan


def _next_run(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    taken = {p.name for p in root.iterdir()}
    i = 1
    while f"finetune-{i:03d}" in taken:
        i += 1
    return root / f"finetune-{i:03d}"


def recipe(base_config, dataset: Path, settings: FinetuneSettings, cache_dir: Path) -> tuple[dict | None, dict]:
    """(base sections for `data.plan.configure`, flat overrides): the old model's recipe with this
    dataset's root, no split or groups file of its own, no time budget unless asked for."""
    overrides = dict(settings.overrides)
    if "epochs" not in overrides and "budget_images" not in overrides and "budget_minutes" not in overrides \
            and settings.budget_minutes is not None:
        overrides["budget_minutes"] = settings.budget_minutes
    overrides.setdefault("device", settings.device)
    overrides["cache_dir"] = str(cache_dir)
    base = None
    if base_config is not None:
        base = base_config.to_dict()
        base["data"].update(root=str(dataset), split_file=None, groups_file=None, mask_threshold=None, labels=None)
        base["train"].update(budget_minutes=None, budget_images=None,
                             init="ultrasound" if base["model"]["arch"] == "efficientnet-lite0-unet" else "none")
    return base, overrides


class Finetuner:
    """At most one background fine-tune for DATASET; `on_better(predictor, name, result)` is called from
    its thread when the new model beats the old."""

    def __init__(self, dataset: str | Path, settings: FinetuneSettings = FinetuneSettings(),
                 on_better: Callable[[object, str, dict], None] | None = None):
        self.dataset = Path(dataset)
        self.settings = settings
        self.on_better = on_better
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._status: dict = {"state": "idle", "phase": None, "progress": 0.0, "epoch": 0, "epochs": None,
                              "message": "", "result": None}

    def status(self) -> dict:
        with self._lock:
            return json_safe(dict(self._status))

    def _set(self, **changes) -> None:
        with self._lock:
            self._status.update(changes)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, saved: Sequence[str], old_predictor=None, old_name: str | None = None) -> dict:
        """Start training on the saved scans (names in DATASET); Busy while one runs, NotEnoughScans below
        `settings.min_scans`. Returns the status."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise Busy("a fine-tune is already running; wait for it to finish")
            if len(saved) < self.settings.min_scans:
                raise NotEnoughScans(f"{len(saved)} saved scan(s); a fine-tune needs at least "
                                     f"{self.settings.min_scans} (some are held out to compare the models)")
            split = holdout_split(list(saved), self.settings.holdout_fraction, self.settings.seed)
            self._stop.clear()
            self._status = {"state": "running", "phase": "reading the saved scans", "progress": 0.0, "epoch": 0,
                            "epochs": None, "message": f"training on {len(split['train'])} scans, "
                                                       f"{len(split['val'])} held out", "result": None,
                            "n_train": len(split["train"]), "n_holdout": len(split["val"])}
            self._thread = threading.Thread(target=self._run, args=(old_predictor, old_name),
                                            name="hemaseg-finetune", daemon=True)
            self._thread.start()
            return json_safe(dict(self._status))

    def stop(self, timeout: float = 10.0) -> None:
        """Ask a running fine-tune to stop at its next epoch's end, and wait up to `timeout` s."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> dict:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status()

    def _run(self, old_predictor, old_name: str | None) -> None:
        t0 = time.monotonic()
        runs = self.dataset / RUNS
        run = _next_run(runs)
        cache = runs / f".cache-{run.name}"
        try:
            result = self._train_and_compare(old_predictor, old_name, run, cache, t0)
        except _Stopped:
            self._set(state="stopped", phase=None, message="stopped before it finished; the old model stays")
            return
        except Exception as e:  # reported on the page; the old model stays
            log.exception("fine-tune failed")
            self._set(state="failed", phase=None, message=f"{type(e).__name__}: {e}; the old model stays")
            return
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        self._set(state="done", phase=None, progress=1.0, result=result, message=result["summary"])

    def _train_and_compare(self, old_predictor, old_name: str | None, run: Path, cache: Path, t0: float) -> dict:
        from hemaseg.data.dataset import load_sample
        from hemaseg.data.plan import configure
        from hemaseg.inference.predictor import load_model
        from hemaseg.training.train import fit

        s = self.settings
        base, overrides = recipe(getattr(old_predictor, "config", None), self.dataset, s, cache)
        cfg, loaded = configure(self.dataset, s.preset, overrides, base)
        # every pair in DATASET, split by the same per-name rule (`start` counted them a moment ago)
        split = holdout_split([x.name for x in loaded.samples], s.holdout_fraction, s.seed)
        if not split["train"] or not split["val"]:
            raise NotEnoughScans(f"{len(loaded.samples)} scan(s) in {self.dataset}: too few to train and hold out")
        epochs = cfg.train.epochs if cfg.train.budget_minutes is None else None
        budget_s = cfg.train.budget_minutes * 60 if cfg.train.budget_minutes else None
        self._set(phase="training", epochs=epochs, progress=0.02)
        t_train = time.monotonic()

        def on_epoch_end(epoch: int, row: dict) -> None:
            if self._stop.is_set():
                raise _Stopped()
            done = epoch / epochs if epochs else min(1.0, (time.monotonic() - t_train) / budget_s)
            self._set(epoch=epoch, progress=round(0.02 + 0.88 * done, 3),
                      message=f"epoch {epoch}" + (f" of {epochs}" if epochs else "") +
                              f", training loss {row['train_loss']:.3f}")

        fit(cfg, run, dataset=loaded, split=split, progress=False, on_epoch_end=on_epoch_end)
        self._set(phase="comparing on the held-out scans", progress=0.92)
        new = load_model(run / "last.pt", device=s.device, backend="torch")
        by_name = {x.name: x for x in loaded.samples}
        pairs = [load_sample(by_name[n]) for n in split["val"]]
        new_dice = mean_dice(lambda im: new.predict(im).mask, pairs)
        old_dice = mean_dice(lambda im: old_predictor.predict(im).mask, pairs) if old_predictor is not None \
            else None
        # with no old model any new one is better; NaN (every held-out pair empty in both) decides nothing
        better = old_dice is None or (not math.isnan(new_dice) and (math.isnan(old_dice) or new_dice > old_dice))
        fmt = (lambda d: "n/a" if d is None or math.isnan(d) else f"{d:.3f}")
        summary = (f"Dice on {len(pairs)} held-out scan{'s' if len(pairs) != 1 else ''}: "
                   f"old {fmt(old_dice)}, new {fmt(new_dice)}; "
                   + ("the new model is used for the rest of the worklist" if better else "the old model stays"))
        result = {"run": run.name, "n_train": len(split["train"]), "n_holdout": len(pairs), "holdout": split["val"],
                  "dice_old": old_dice, "dice_new": new_dice, "old_model": old_name, "new_model": run.name,
                  "swapped": bool(better), "seconds": round(time.monotonic() - t0, 1),
                  "holdout_rule": f"seeded name hash < {s.holdout_fraction} (seed {s.seed})", "summary": summary}
        atomic_write_text(run / "label_finetune.json", json.dumps(json_safe(result), indent=2))
        log.info("fine-tune %s: %s", run.name, summary)
        if better and self.on_better is not None:
            self.on_better(new, run.name, result)
        return result

