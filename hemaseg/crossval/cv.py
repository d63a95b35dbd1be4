"""Cross-validation: deterministic (group-aware) folds, one resumable training per fold, and
out-of-fold evaluation that decides TTA, postprocessing and the review threshold on data the
models never saw. Folds are scored with their final weights (predict.FOLD_WEIGHTS): their best.pt
was picked on the very scans they are scored on.

RUN/folds.json             the folds (written once, reused)
RUN/fold_K/                a normal training run per fold (resumable)
RUN/postprocessing.json    steps that raised out-of-fold Dice (predict applies them)
RUN/confidence.json        needs_review threshold and the confidence-Dice correlation
RUN/oof/per_image.csv, RUN/oof/summary.json, RUN/cv_summary.json

Folds train one per device, as nnU-Net advises (a small UNet does not fill a GPU, and a fold's
processes would only wait for each other): `jobs` folds at once as processes of this machine, each on
its own GPU where there are several (`fold_devices`), or under torchrun one process per GPU or node,
rank r training folds r, r + world_size, ... (the run folder on storage every node sees). Rank 0 alone
writes folds.json and evaluates once every fold is trained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

from hemaseg.config import RunConfig
from hemaseg.data.dataset import find_groups, find_samples, kfold_split, read_groups
from hemaseg.device import available_cpus
from hemaseg.evaluation.evaluate import (
    evaluate,
    failures,
    score_image,
    summarize,
    write_evaluation,
)
from hemaseg.inference.predictor import FOLD_WEIGHTS, load_model
from hemaseg.inference.review import ReviewHead, review_features
from hemaseg.io import atomic_write_text, json_safe, save_png
from hemaseg import distributed
from hemaseg.training.train import fit
from hemaseg.crossval.report import _mean_dice, variant_summary, write_cv_report
from hemaseg.evaluation.decisions import MISS_WEIGHT, choose_review_threshold, decide_plan

log = logging.getLogger(__name__)


def make_folds(cfg: RunConfig, out: Path, folds: int, seed: int) -> list[dict]:
    path = out / "folds.json"
    names = [s.name for s in find_samples(cfg.data.root, labels=cfg.data.labels)]
    if path.is_file():
        saved = json.loads(path.read_text())
        saved_names = sorted(n for f in saved["folds"] for n in f["val"])
        if saved_names != sorted(names):
            raise ValueError(f"{path}: folds were made for a different set of scans than {cfg.data.root}")
        return saved["folds"]
    groups = read_groups(cfg.data.groups_file) if cfg.data.groups_file else find_groups(cfg.data.root)
    split = kfold_split(names, folds, seed, groups)
    atomic_write_text(path, json.dumps({"n_folds": folds, "seed": seed, "grouped": groups is not None,
                                        "folds": split}, indent=2))
    return split


def fit_review(rows: list[dict], failed: np.ndarray, dice: np.ndarray, missed: np.ndarray, n_folds: int,
               threshold: float) -> dict:
    """The needs-review decision for a CV run (confidence.json): the learned review head
    (`inference.review`, a missed lesion weighing MISS_WEIGHT failures) when it can be fitted, else the
    margin rule, each with its threshold chosen on out-of-fold scores (`choose_review_threshold`). The head's scores here are honest: each fold's scans are scored by a
    head fitted on the other folds; the head stored for predict is then fitted on every row. Rewrites
    each row's `confidence` to the score the threshold applies to (`confidence_rule` keeps the rule's)."""
    rule = choose_review_threshold(np.array([r["confidence_rule"] for r in rows]), failed, dice, missed)
    x = np.stack([review_features(r["prob"], r["pred"], threshold) for r in rows])
    fold = np.array([r["fold"] for r in rows])
    scores = np.full(len(rows), np.nan)
    weight = np.where(missed, MISS_WEIGHT, 1.0)
    for k in range(n_folds):
        head_k = ReviewHead.fit(x[fold != k], ~failed[fold != k], weights=weight[fold != k])
        if head_k is None:
            return {**rule, "method": "rule (too few out-of-fold scans or failures to fit a review head)"}
        scores[fold == k] = head_k.score_features(x[fold == k])
    head = ReviewHead.fit(x, ~failed, weights=weight)
    for r, score in zip(rows, scores):
        r["confidence"] = round(float(score), 4)
    review = choose_review_threshold(np.round(scores, 4), failed, dice, missed)
    return {**review, "method": f"review head (a miss weighs {MISS_WEIGHT:g} failures; scores out of fold)", "head": head.to_dict(), "rule": rule}


def _train_fold(cfg: RunConfig, fold_dir: Path, split: dict, resume: bool, progress: bool,
                threads: int | None = None, dataset=None, device: str | None = None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
    if device is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=device))
    # a fold folder belongs to the cross-validation: one left by a fold killed before its first
    # checkpoint is started over. Each fold trains in this process alone, under torchrun too.
    fit(cfg, fold_dir, resume=resume, progress=progress, split=None if resume else split, overwrite=not resume,
        dataset=dataset, world=distributed.SINGLE, review=False)


def pending_folds(out: Path, split: list[dict]) -> list[tuple[int, Path, dict, bool]]:
    """(fold, folder, split, resume) of every fold not finished yet (interrupted ones resume)."""
    pending = []
    for k, fold in enumerate(split):
        fold_dir = out / f"fold_{k}"
        if (fold_dir / "summary.json").is_file():
            log.info("fold %d/%d already trained", k + 1, len(split))
            continue
        pending.append((k, fold_dir, {"train": fold["train"], "val": fold["val"]}, (fold_dir / "last.pt").is_file()))
    return pending


def fold_devices(device: str, slots: int) -> list[str | None]:
    """The device of each of `slots` folds trained at once: CUDA folds share out the visible GPUs in
    turn (slot i on cuda:i mod count), anything else keeps the configured device (None)."""
    import torch

    from hemaseg.device import select_device

    if select_device(device).type != "cuda" or torch.cuda.device_count() <= 1 or ":" in str(device):
        return [None] * slots
    return [f"cuda:{i % torch.cuda.device_count()}" for i in range(slots)]


def train_folds(cfg: RunConfig, out: Path, split: list[dict], progress: bool = True, jobs: int = 1,
                dataset=None, pending: list | None = None, device: str | None = None) -> None:
    """Train every fold not finished yet (`pending`, default `pending_folds`). `jobs` > 1 trains that many
    folds at once, each in its own process with an even share of the CPU threads and, on a machine with
    several GPUs, its own GPU: on a GPU one small UNet leaves the card mostly idle (its data loading is the
    bottleneck), so parallel folds finish a CV several times sooner. `device` overrides the config's."""
    pending = pending_folds(out, split) if pending is None else pending
    if jobs <= 1 or len(pending) <= 1:
        for k, fold_dir, fold_split, resume in pending:
            log.info("fold %d/%d: %s", k + 1, len(split), "resuming" if resume else "training")
            _train_fold(cfg, fold_dir, fold_split, resume, progress, dataset=dataset, device=device)
        return
    log.info("training folds %s, %d at once", ", ".join(str(k + 1) for k, *_ in pending), jobs)
    # spawn, not fork: a forked child would inherit an initialised CUDA context or OpenMP pool
    ctx = multiprocessing.get_context("spawn")
    slots = min(jobs, len(pending))
    threads = max(1, available_cpus() // slots)
    devices = fold_devices(cfg.train.device, slots)
    free = list(range(slots))
    running: dict[int, tuple[int, int, multiprocessing.Process]] = {}  # sentinel -> (fold, slot, process)
    failed = []
    queue = list(pending)
    while queue or running:
        while queue and free:
            k, fold_dir, fold_split, resume = queue.pop(0)
            slot = free.pop(0)
            proc = ctx.Process(target=_train_fold, args=(cfg, fold_dir, fold_split, resume, False, threads, None,
                                                         devices[slot] or device), name=f"fold_{k}")
            proc.start()
            running[proc.sentinel] = (k, slot, proc)
        for sentinel in wait(list(running)):  # refill a slot as soon as any fold ends
            k, slot, proc = running.pop(sentinel)
            free.append(slot)
            proc.join()
            if proc.exitcode != 0:
                failed.append(k)
            else:
                log.info("fold %d/%d trained", k + 1, len(split))
    if failed:
        raise RuntimeError(f"{out}: training of fold(s) {', '.join(map(str, sorted(failed)))} failed (see the messages "
                           "above); rerun the same command to resume them")


def run_cv(cfg: RunConfig, out_dir: str | Path, folds: int = 5, seed: int = 0, progress: bool = True,
           jobs: int = 1, dataset=None) -> dict:
    """Train every fold (skipping finished ones, resuming interrupted ones), then evaluate out of fold.
    `dataset` (from `load_dataset`) saves each fold trained in this process from reading the data again.

    Under torchrun (WORLD_SIZE > 1) each process trains its share of the folds on its own device and
    rank 0 evaluates them once all are trained; the other ranks return the summary without the rows."""
    import torch

    from hemaseg.device import select_device

    out = Path(out_dir)
    # gloo only coordinates: each fold trains alone, and a process that is done waits for the others' folds
    with distributed.session(torch.device("cpu"), timeout_s=distributed.wait_timeout_s()) as dist:
        if dist.active and jobs > 1:
            raise ValueError("--jobs N trains folds as processes of one machine; under torchrun each process "
                             "already trains its own folds: leave --jobs at 1")
        with dist.agreed("writing the folds"):
            split, pending = None, None
            if dist.is_main:
                out.mkdir(parents=True, exist_ok=True)
                split = make_folds(cfg, out, folds, seed)
                pending = pending_folds(out, split)
        split, pending = dist.broadcast((split, pending))
        device = str(distributed.local_device(select_device(cfg.train.device))) if dist.active else None
        with dist.agreed("training the folds"):
            mine = pending[dist.rank::dist.world_size]
            if dist.active:
                log.info("rank %d trains fold(s) %s on %s", dist.rank, ", ".join(str(k + 1) for k, *_ in mine) or
                         "none", device)
            train_folds(cfg, out, split, progress and dist.is_main, jobs, dataset, mine, device)
        summary = None
        if dist.is_main:
            result = _evaluate_folds(cfg, out, split, progress)
            summary = result["summary"]
        summary = dist.broadcast(summary)
    return result if dist.is_main else {"summary": summary, "rows": []}


def _evaluate_folds(cfg: RunConfig, out: Path, split: list[dict], progress: bool) -> dict:
    """Out-of-fold evaluation of the trained folds: TTA, postprocessing and review decided, reports written."""

    variants = {"plain": [], "tta": []}
    for k, fold in enumerate(split):
        predictor = load_model(out / f"fold_{k}" / FOLD_WEIGHTS, device=cfg.train.device, postprocess=False)
        for name in variants:
            result = evaluate(predictor, cfg.data.root, names=fold["val"], mask_threshold=cfg.data.mask_threshold,
                              labels=cfg.data.labels,
                              progress=progress, keep_masks=True, tta=name == "tta", fail_fast=True,
                              max_pixels=cfg.data.max_pixels)
            for row in result["rows"]:
                row["fold"] = k
            variants[name].extend(result["rows"])

    threshold = predictor.threshold
    base = "tta" if _mean_dice(variants["tta"]) >= _mean_dice(variants["plain"]) else "plain"
    plan, evidence = decide_plan([r["prob"] for r in variants[base]], [r["ref"] for r in variants[base]], threshold)
    plan.save(out / "postprocessing.json", {"decided_on": f"out-of-fold, {base}", **evidence})
    for name in list(variants):
        variants[f"{name}+pp"] = [
            {**score_image(r["name"], r["prob"], r["ref"], predictor.to_mask(r["prob"], plan=plan), threshold),
             "fold": r["fold"], "image": r["image"], "ref": r["ref"], "prob": r["prob"]} for r in variants[name]]
    final = variants[f"{base}+pp"]

    failed, missed = failures(final)
    dice = np.array([r["dice"] for r in final], np.float64)
    review = fit_review(final, failed, dice, missed, len(split), threshold)
    # the confidence before empty predictions counted (side by side, its own threshold chosen the same way)
    review["entropy_confidence"] = choose_review_threshold(
        np.array([r["confidence_entropy"] for r in final]), failed, dice, missed)
    atomic_write_text(out / "confidence.json", json.dumps(json_safe(review), indent=2))
    for r in final:
        r["needs_review"] = review["threshold"] is not None and r["confidence"] <= review["threshold"]

    summary = summarize(final)
    write_evaluation(out / "oof", final, summary)
    for r in final:  # the out-of-fold masks, so `hemaseg report` can draw them without predicting again
        save_png(out / "oof" / "masks" / f"{r['name']}.png", r["pred"].astype(np.uint8) * 255, fsync=False)
    fold_dice = [_mean_dice([r for r in final if r["fold"] == k]) for k in range(len(split))]
    cv_summary = {
        "n_folds": len(split), "n_images": len(final), "inference": base, "postprocessing": dataclasses.asdict(plan),
        "oof_dice_plain": _mean_dice(variants["plain"]), "oof_dice_tta": _mean_dice(variants["tta"]),
        "oof_dice_final": summary["dice_mean"], "oof_dice_lesion_final": summary["dice_mean_lesion"],
        "fold_dice": fold_dice, "fold_dice_mean": float(np.nanmean(fold_dice)), "fold_dice_sd": float(np.nanstd(fold_dice)),
        "confidence": review,
        "variants": {name: variant_summary(rows, len(split)) for name, rows in variants.items()},
    }
    atomic_write_text(out / "cv_summary.json", json.dumps(json_safe(cv_summary), indent=2))
    write_cv_report(out, cfg.data.root)
    return {"summary": cv_summary, "rows": final}
