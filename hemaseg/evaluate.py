"""Evaluate a trained model on a labelled dataset: per-image metrics to CSV, a summary JSON.

The empty-mask rule is `metrics.EMPTY_RULE`; it is printed with the results and stored in the summary.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .checkpoint import atomic_write_text
from .data import find_samples, load_sample, load_split
from .metrics import EMPTY_RULE, dice, iou
from .predict import Predictor


def evaluate(predictor: Predictor, data_root: str | Path, out_dir: str | Path | None = None,
             names: list[str] | None = None, mask_threshold: float | None = None, batch_size: int = 8,
             progress: bool = True, keep_masks: bool = False) -> dict:
    """Predict every scan of `data_root` (or the listed `names`) and score it against its mask.

    Returns {"rows": per-image dicts, "summary": dict}; writes per_image.csv and summary.json to
    `out_dir` when given. With keep_masks, rows also carry image/ref/pred arrays (for reports).
    """
    samples = find_samples(data_root)
    if names is not None:
        wanted = set(names)
        samples = [s for s in samples if s.name in wanted]
    rows = []
    for start in tqdm(range(0, len(samples), batch_size), desc="evaluate", unit="batch", disable=not progress):
        chunk = samples[start:start + batch_size]
        pairs = [load_sample(s, mask_threshold) for s in chunk]
        probs = predictor.predict_proba_batch([im for im, _ in pairs], batch_size)
        for s, (image, ref), prob in zip(chunk, pairs, probs):
            pred = prob >= predictor.threshold
            row = {"name": s.name, "dice": float(dice(pred, ref)[0]), "iou": float(iou(pred, ref)[0]),
                   "ref_area_px": int(ref.sum()), "pred_area_px": int(pred.sum()),
                   "height": ref.shape[0], "width": ref.shape[1]}
            if keep_masks:
                row.update(image=image, ref=ref, pred=pred)
            rows.append(row)
    summary = summarize(rows)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plain = [{k: v for k, v in r.items() if not isinstance(v, np.ndarray)} for r in rows]
        buf = io.StringIO()
        if plain:
            writer = csv.DictWriter(buf, fieldnames=list(plain[0]))
            writer.writeheader()
            writer.writerows(plain)
        atomic_write_text(out / "per_image.csv", buf.getvalue())
        atomic_write_text(out / "summary.json", json.dumps(_json_safe(summary), indent=2))
    return {"rows": rows, "summary": summary}


def summarize(rows: list[dict]) -> dict:
    """Means follow the empty rule: `dice_mean` over images where reference or prediction has a
    lesion; `dice_mean_lesion` over images whose reference has one."""
    d = np.array([r["dice"] for r in rows], np.float64)
    j = np.array([r["iou"] for r in rows], np.float64)
    ref_pos = np.array([r["ref_area_px"] > 0 for r in rows], bool)
    pred_pos = np.array([r["pred_area_px"] > 0 for r in rows], bool)

    def stat(f, x):
        return float(f(x)) if np.isfinite(x).any() else float("nan")

    return {
        "n_images": len(rows),
        "n_scored": int(np.isfinite(d).sum()),
        "dice_mean": stat(np.nanmean, d),
        "dice_median": stat(np.nanmedian, d),
        "dice_sd": stat(np.nanstd, d),
        "dice_mean_lesion": stat(np.nanmean, d[ref_pos]) if ref_pos.any() else float("nan"),
        "iou_mean": stat(np.nanmean, j),
        "iou_median": stat(np.nanmedian, j),
        "n_true_negative_images": int((~ref_pos & ~pred_pos).sum()),
        "n_false_positive_images": int((~ref_pos & pred_pos).sum()),
        "n_missed_images": int((ref_pos & ~pred_pos).sum()),
        "empty_rule": EMPTY_RULE,
    }


def format_summary(summary: dict) -> str:
    keys = ["n_images", "n_scored", "dice_mean", "dice_median", "dice_mean_lesion", "iou_mean", "iou_median",
            "n_true_negative_images", "n_false_positive_images", "n_missed_images"]
    lines = [f"  {k:<24} {_fmt(summary[k])}" for k in keys]
    return "\n".join(lines + [f"  empty-mask rule: {summary['empty_rule']}"])


def _fmt(v) -> str:
    return ("n/a" if math.isnan(v) else f"{v:.4f}") if isinstance(v, float) else str(v)


def _json_safe(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def run_split_names(run_dir: str | Path, part: str = "val") -> list[str] | None:
    path = Path(run_dir) / "splits.json"
    return load_split(path)[part] if path.is_file() else None
