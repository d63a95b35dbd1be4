"""The cross-validation's report page, read back from what `run_cv` wrote (nothing predicted again)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from hemaseg.config import RunConfig
from hemaseg.data.dataset import find_samples, load_sample, read_mask
from hemaseg.evaluation.evaluate import summarize, write_report
from hemaseg.io import plain_cell

def write_cv_report(out: str | Path, data_root: str | Path | None = None) -> Path:
    """RUN/report.html of a finished cross-validation, from what `run_cv` wrote (cv_summary.json,
    oof/per_image.csv, oof/summary.json, oof/masks/) and the scans of `data_root` (default: the folds'
    training data). Reads only: no prediction, no decision made again, nothing else rewritten."""
    out = Path(out)
    for needed in ("cv_summary.json", "oof/summary.json", "oof/per_image.csv"):
        if not (out / needed).is_file():
            raise FileNotFoundError(f"{out / needed}: missing; run `hemaseg cv` to finish this cross-validation")
    cv_summary = json.loads((out / "cv_summary.json").read_text())
    summary = json.loads((out / "oof" / "summary.json").read_text())
    trained = RunConfig.load(out / "fold_0" / "config.json").data
    data_root = data_root or trained.root
    samples = {s.name: s for s in find_samples(data_root, strict=False, labels=trained.labels)}
    rows = []
    with open(out / "oof" / "per_image.csv", newline="") as f:
        for row in csv.DictReader(f):
            row = {k: _parse_cell(v) if k != "name" else plain_cell(v) for k, v in row.items()}
            mask_png = out / "oof" / "masks" / f"{row['name']}.png"
            if row["name"] in samples and mask_png.is_file():  # the scan and its outline, for the case pictures
                image, ref = load_sample(samples[row["name"]])
                row.update(image=np.round(image * 255).astype(np.uint8), ref=ref, pred=read_mask(mask_png))
            rows.append(row)
    review, plan, n = cv_summary["confidence"], cv_summary["postprocessing"], cv_summary["n_folds"]
    return write_report(
        out / "report.html", f"Cross-validation: {n} folds on {data_root}", rows,
        {**summary, **{k: v for k, v in cv_summary.items() if not isinstance(v, (dict, list))}},
        run_dir=out / "fold_0",
        notes=[f"Out-of-fold predictions of {n} fold models ({cv_summary['inference']} inference, postprocessing "
               f"{plan}); training curves are fold 0's. Cases with confidence <= {review['threshold']} are "
               f"flagged for review: {_share(review.get('flagged_share'))} of all scans and "
               f"{_share(review.get('missed_flagged_share'))} of the {review.get('n_missed')} scans whose lesion was "
               f"missed; AUROC of confidence against failure {_num(review.get('auroc'))} "
               f"({review.get('method', 'rule')}; the margin rule alone: AUROC "
               f"{_num(review.get('rule', {}).get('auroc'))}, missed lesions flagged "
               f"{_share(review.get('rule', {}).get('missed_flagged_share'))}; the earlier, entropy-only "
               f"confidence: {_num(review.get('entropy_confidence', {}).get('auroc'))}, missed lesions flagged "
               f"{_share(review.get('entropy_confidence', {}).get('missed_flagged_share'))}). Spearman r of confidence vs "
               f"Dice: {_num(review.get('spearman_r'))}."])


def _share(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f} %"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _parse_cell(v: str):
    if v in ("True", "False"):
        return v == "True"
    try:
        return float(v) if v != "" else float("nan")
    except ValueError:
        return v


VARIANT_KEYS = ("dice_mean", "dice_mean_lesion", "hd95_px_mean", "hd95_px_median", "lesion_sensitivity",
                "lesion_fp_per_image", "n_false_positive_images", "n_true_negative_images")


def variant_summary(rows: list[dict], n_folds: int) -> dict:
    """The headline figures of one inference variant (plain / TTA, with or without postprocessing)."""
    s = summarize(rows)
    out = {k: s.get(k) for k in VARIANT_KEYS}
    out["fold_dice"] = [_mean_dice([r for r in rows if r["fold"] == k]) for k in range(n_folds)]
    return out


def _mean_dice(rows: list[dict]) -> float:
    d = np.array([r["dice"] for r in rows], np.float64)
    return float(np.nanmean(d)) if np.isfinite(d).any() else float("nan")

