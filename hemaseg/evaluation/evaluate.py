"""Evaluate a trained model on a labelled dataset: per-image metrics to CSV, a summary JSON.

The empty-mask rule is `metrics.EMPTY_RULE`; it is printed with the results and stored in the summary.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats
from tqdm import tqdm

from hemaseg.data.dataset import find_samples, load_sample, load_split
from hemaseg.data.images import MAX_PIXELS_DEFAULT, DataError
from hemaseg.io import atomic_write_text, json_safe, write_csv
from hemaseg.evaluation.metrics import per_image_metrics, summarize_metrics
from hemaseg.inference.postprocess import confidence, entropy_confidence
from hemaseg.inference.predictor import Predictor

log = logging.getLogger(__name__)
REVIEW_BELOW_DICE = 0.5  # a scan with a lesion segmented below this Dice is a failure needing review


def evaluate(predictor: Predictor, data_root: str | Path, out_dir: str | Path | None = None,
             names: list[str] | None = None, mask_threshold: float | None = None, batch_size: int = 8,
             progress: bool = True, keep_masks: bool = False, tta: bool | None = None, fail_fast: bool = False,
             max_pixels: int | None = MAX_PIXELS_DEFAULT, labels: Sequence[str] | None = None) -> dict:
    """Predict every scan of `data_root` (or the listed `names`) and score it against its mask.

    Returns {"rows": per-image dicts, "summary": dict, "errors": [...]}; writes per_image.csv,
    summary.json (and errors.csv when a pair could not be read) to `out_dir` when given. A pair that
    cannot be read is skipped and recorded (`fail_fast` raises instead); the summary counts it in
    `n_failed`. Rows carry the final `pred` mask; with keep_masks also the image, the reference and the
    probability map (float16), for reports and postprocessing decisions. `tta` None: the predictor's.
    `labels`: which labels of an annotation dataset are lesion (`data.formats`; default: all).
    """
    samples = find_samples(data_root, labels=labels)
    if names is not None:
        wanted = set(names)
        samples = [s for s in samples if s.name in wanted]
    rows, errors = [], []
    for start in tqdm(range(0, len(samples), batch_size), desc="evaluate", unit="batch", disable=not progress):
        chunk, pairs = [], []
        for s in samples[start:start + batch_size]:
            try:
                pairs.append(load_sample(s, mask_threshold, max_pixels))
                chunk.append(s)
            except DataError as e:
                if fail_fast:
                    raise
                log.warning("skipped: %s", e)
                errors.append({"image": str(e.path), "code": e.code, "problem": e.problem})
        probs = predictor.predict_proba_batch([im for im, _ in pairs], batch_size, tta=tta)
        for s, (image, ref), prob in zip(chunk, pairs, probs):
            row = score_image(s.name, prob, ref, predictor.to_mask(prob), predictor.threshold,
                              review_head=predictor.review_head)
            if keep_masks:
                row.update(image=np.round(image * 255).astype(np.uint8), ref=ref, prob=prob.astype(np.float16))
            rows.append(row)
    summary = {**summarize(rows), "n_failed": len(errors)}
    if rows:
        for r in rows:
            r["needs_review"] = predictor.decide(r["confidence"], r["pred_area_px"] > 0).needs_review
        failed, missed = failures(rows)
        summary["review"] = {"threshold": predictor.review_threshold, **review_figures(
            np.array([r["confidence"] for r in rows]), failed, missed, np.array([r["needs_review"] for r in rows]))}
    if out_dir is not None:
        write_evaluation(out_dir, rows, summary, errors)
    return {"rows": rows, "summary": summary, "errors": errors}


def failures(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(failed, missed) per scored row. A failure is what a clinician must not trust unreviewed: Dice <
    REVIEW_BELOW_DICE on a scan with a lesion, any lesion predicted on a normal scan, or a lesion missed
    (nothing predicted where the reference has one; a miss is also a failure)."""
    ref = np.array([r["ref_area_px"] > 0 for r in rows])
    pred = np.array([r["pred_area_px"] > 0 for r in rows])
    dice = np.array([r["dice"] for r in rows], np.float64)
    missed = ref & ~pred
    failed = (ref & ~(dice >= REVIEW_BELOW_DICE)) | (~ref & pred)
    return failed, missed


def review_figures(conf: np.ndarray, failed: np.ndarray, missed: np.ndarray, flagged: np.ndarray | None) -> dict:
    """How well a confidence ranks failures: AUROC of low confidence against failure, and, given which
    scans were flagged for review, the share of all scans and of missed-lesion scans flagged."""
    out = {"auroc": None, "flagged_share": None, "missed_flagged_share": None, "n_failed": int(failed.sum()),
           "n_missed": int(missed.sum())}
    if failed.any() and (~failed).any():  # P(a failure has lower confidence than a success); ties count half
        out["auroc"] = float(stats.mannwhitneyu(-conf[failed], -conf[~failed]).statistic
                             / (failed.sum() * (~failed).sum()))
    if flagged is not None:
        out["flagged_share"] = float(flagged.mean())
        out["missed_flagged_share"] = float(flagged[missed].mean()) if missed.any() else None
    return out


def write_evaluation(out_dir: str | Path, rows: list[dict], summary: dict, errors: list[dict] = ()) -> None:
    """per_image.csv (arrays left out), summary.json and errors.csv (when any), each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plain = [{k: v for k, v in r.items() if not isinstance(v, np.ndarray)} for r in rows]
    if plain:
        write_csv(out / "per_image.csv", plain, list(plain[0]))
    else:
        atomic_write_text(out / "per_image.csv", "")
    atomic_write_text(out / "summary.json", json.dumps(json_safe(summary), indent=2))
    if errors:
        write_csv(out / "errors.csv", errors, ["image", "code", "problem"])
    elif (out / "errors.csv").is_file():
        (out / "errors.csv").unlink()


def score_image(name: str, prob: np.ndarray, ref: np.ndarray, pred: np.ndarray, threshold: float,
                spacing=None, review_head=None) -> dict:
    """One image's metrics row: `pred` is the final mask (threshold + postprocessing) made from `prob`
    at `threshold`, so callers can rescore the same probabilities under another plan. `confidence` is
    the review head's score when given (a CV run's), else the margin rule; both rules stay beside it."""
    rule = confidence(prob, threshold)
    conf = rule if review_head is None else review_head.score(prob, pred, threshold)
    return {"name": name, **per_image_metrics(pred, ref, spacing), "height": ref.shape[0], "width": ref.shape[1],
            "confidence": round(conf, 4), "confidence_rule": round(rule, 4),
            "confidence_entropy": round(entropy_confidence(prob, threshold), 4),
            "max_prob": round(float(np.max(prob)) if np.size(prob) else 0.0, 4), "pred": pred}


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
    review = summary.get("review")
    if review:
        share = lambda v: "n/a" if v is None else f"{100 * v:.0f} %"  # noqa: E731
        lines.append(f"  needs review: {share(review['flagged_share'])} of scans flagged, "
                     f"{share(review['missed_flagged_share'])} of {review['n_missed']} missed lesions; AUROC of "
                     f"confidence against failure {_fmt(review['auroc']) if review['auroc'] is not None else 'n/a'}")
    return "\n".join(lines + [f"  empty-mask rule: {summary['empty_rule']}"])


def _fmt(v) -> str:
    return ("n/a" if math.isnan(v) else f"{v:.4f}") if isinstance(v, float) else str(v)


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
    from hemaseg.evaluation.report import write_run_report

    history = load_history(run_dir) if run_dir is not None else None
    write_run_report(path, title=title, summary=summary, rows=rows, history=history, notes=notes or [],
                     credits=credits or [])
    return Path(path)


def run_split_names(run_dir: str | Path, part: str = "val") -> list[str] | None:
    path = Path(run_dir) / "splits.json"
    return load_split(path)[part] if path.is_file() else None
