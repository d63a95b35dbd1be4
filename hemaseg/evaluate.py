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
from .metrics import per_image_metrics, summarize_metrics
from .postprocess import confidence
from .predict import Predictor


def evaluate(predictor: Predictor, data_root: str | Path, out_dir: str | Path | None = None,
             names: list[str] | None = None, mask_threshold: float | None = None, batch_size: int = 8,
             progress: bool = True, keep_masks: bool = False) -> dict:
    """Predict every scan of `data_root` (or the listed `names`) and score it against its mask.

    Returns {"rows": per-image dicts, "summary": dict}; writes per_image.csv and summary.json to
    `out_dir` when given. Rows carry the final `pred` mask; with keep_masks also the image, the
    reference and the probability map (float16), for reports and postprocessing decisions.
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
            row = score_image(s.name, prob, ref, predictor.to_mask)
            if keep_masks:
                row.update(image=np.round(image * 255).astype(np.uint8), ref=ref, prob=prob.astype(np.float16))
            rows.append(row)
    summary = summarize(rows)
    if out_dir is not None:
        write_evaluation(out_dir, rows, summary)
    return {"rows": rows, "summary": summary}


def write_evaluation(out_dir: str | Path, rows: list[dict], summary: dict) -> None:
    """per_image.csv (arrays left out) and summary.json, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain = [{k: v for k, v in r.items() if not isinstance(v, np.ndarray)} for r in rows]
    buf = io.StringIO()
    if plain:
        writer = csv.DictWriter(buf, fieldnames=list(plain[0]))
        writer.writeheader()
        writer.writerows(plain)
    atomic_write_text(out / "per_image.csv", buf.getvalue())
    atomic_write_text(out / "summary.json", json.dumps(json_safe(summary), indent=2))


def score_image(name: str, prob: np.ndarray, ref: np.ndarray, to_mask, spacing=None) -> dict:
    """One image's metrics row; `to_mask` turns probabilities into the final mask (threshold +
    postprocessing), so callers can rescore the same probabilities under another plan."""
    pred = to_mask(np.asarray(prob, np.float32))
    return {"name": name, **per_image_metrics(pred, ref, spacing), "height": ref.shape[0], "width": ref.shape[1],
            "confidence": round(confidence(prob), 4), "pred": pred}


def summarize(rows: list[dict]) -> dict:
    """Means follow the empty rule (metrics.EMPTY_RULE): `dice_mean` over images where reference or
    prediction has a lesion; `dice_mean_lesion` over images whose reference has one."""
    return summarize_metrics(rows)


def format_summary(summary: dict) -> str:
    """The printed table: mean, median and 95 % CI of the main metrics, then the image counts."""
    lines = [f"  {'metric':<14} {'mean':>8} {'median':>8} {'95% CI of mean':>18} {'n':>5}"]
    for m in ("dice", "iou", "precision", "recall", "specificity", "hd95_px", "assd_px", "hd95_mm", "assd_mm"):
        if summary.get(f"{m}_n"):
            lo, hi = summary[f"{m}_ci95"]
            lines.append(f"  {m:<14} {_fmt(summary[f'{m}_mean']):>8} {_fmt(summary[f'{m}_median']):>8} "
                         f"{'[' + _fmt(lo) + ', ' + _fmt(hi) + ']':>18} {summary[f'{m}_n']:>5}")
    for k in ("n_images", "dice_mean_lesion", "n_true_negative_images", "n_false_positive_images",
              "n_missed_images", "lesion_sensitivity", "lesion_fp_per_image"):
        if k in summary:
            lines.append(f"  {k:<26} {_fmt(summary[k])}")
    return "\n".join(lines + [f"  empty-mask rule: {summary['empty_rule']}"])


def _fmt(v) -> str:
    return ("n/a" if math.isnan(v) else f"{v:.4f}") if isinstance(v, float) else str(v)


def json_safe(v):
    """NaN -> null (JSON has no NaN), recursively through dicts, lists and tuples."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def load_history(run_dir: str | Path) -> list[dict] | None:
    """Per-epoch rows of a run's metrics.csv (None when the run has none)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return None
    return [{k: float(v) if k != "epoch" else int(v) for k, v in row.items()}
            for row in csv.DictReader(io.StringIO(path.read_text()))]


def write_report(path: str | Path, title: str, rows: list[dict], summary: dict, run_dir: str | Path | None = None,
                 notes: list[str] | None = None, credits: list[str] | None = None) -> Path:
    """The self-contained HTML report for evaluated rows (rows need image/ref/pred for overlays)."""
    from .report import write_run_report

    history = load_history(run_dir) if run_dir is not None else None
    write_run_report(path, title=title, summary=summary, rows=rows, history=history, notes=notes or [],
                     credits=credits or [])
    return Path(path)


def run_split_names(run_dir: str | Path, part: str = "val") -> list[str] | None:
    path = Path(run_dir) / "splits.json"
    return load_split(path)[part] if path.is_file() else None
