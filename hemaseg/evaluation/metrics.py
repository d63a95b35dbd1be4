"""Segmentation metrics, thin over MONAI, with the empty-mask rule written down once.

All per-image metrics take bool masks (H, W) or (N, H, W) and return (N,) float64 arrays. A value that is
undefined for an image is NaN: it is reported as missing and left out of means, never silently 0.

Empty-mask rule (Dice/IoU as nnU-Net):
- Dice, IoU: reference and prediction both empty -> NaN (excluded from means, counted as a true-negative
  image); reference empty but prediction not, or the reverse -> 0.
- precision = tp / (tp + fp): NaN when the prediction is empty (nothing was claimed).
- recall (sensitivity) = tp / (tp + fn): NaN when the reference is empty (nothing to find).
- specificity = tn / (tn + fp): defined whenever the image has background, so in practice always
  (NaN only when the reference covers every pixel).
- HD95, ASSD: NaN when either mask is empty (no surface to measure from), never 0 or inf.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    get_confusion_matrix,
)

from hemaseg.lesions import label_lesions

EMPTY_RULE = (
    "reference and prediction both empty -> Dice/IoU NaN (excluded from means, counted as a true-negative "
    "image); reference empty but prediction not -> 0; precision NaN when the prediction is empty, recall NaN "
    "when the reference is empty, specificity always defined; HD95/ASSD NaN (missing, never 0) when either "
    "mask is empty"
)

METRIC_KEYS = (
    "dice", "iou", "precision", "recall", "specificity", "hd95_px", "assd_px", "hd95_mm", "assd_mm",
)

Spacing = float | tuple[float, float] | Sequence[float]


def _as_batch(mask) -> torch.Tensor:
    t = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(mask, dtype=bool))
    t = t.bool().double()
    return t.reshape(-1, 1, *t.shape[-2:])


def _pair(pred, ref) -> tuple[torch.Tensor, torch.Tensor]:
    p, r = _as_batch(pred), _as_batch(ref)
    if p.shape != r.shape:
        raise ValueError(f"prediction {tuple(np.shape(pred))} and reference {tuple(np.shape(ref))} differ in "
                         "shape; resize the prediction back to the reference size first")
    return p, r


def _with_empty_rule(values: torch.Tensor, pred: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    both_empty = (pred.flatten(1).sum(1) == 0) & (ref.flatten(1).sum(1) == 0)
    out = values.reshape(-1).double().numpy().copy()
    out[both_empty.numpy()] = np.nan
    return out


def dice(pred, ref) -> np.ndarray:
    """Per-image Dice of bool masks (N, H, W) or (H, W) -> (N,) float64, empty rule above."""
    p, r = _pair(pred, ref)
    return _with_empty_rule(compute_dice(p, r, include_background=True, ignore_empty=False), p, r)


def iou(pred, ref) -> np.ndarray:
    """Per-image IoU (Jaccard), same shapes and empty rule as `dice`."""
    p, r = _pair(pred, ref)
    return _with_empty_rule(compute_iou(p, r, include_background=True, ignore_empty=False), p, r)


def _confusion_metric(name: str, pred, ref) -> np.ndarray:
    # MONAI returns NaN where the denominator is 0, which is exactly the empty rule in the module docstring.
    p, r = _pair(pred, ref)
    cm = get_confusion_matrix(p, r, include_background=True)  # (N, 1, 4): tp, fp, tn, fn
    return compute_confusion_matrix_metric(name, cm).reshape(-1).double().numpy().copy()


def precision(pred, ref) -> np.ndarray:
    """Per-image precision tp / (tp + fp) -> (N,) float64; NaN when the prediction is empty."""
    return _confusion_metric("precision", pred, ref)


def recall(pred, ref) -> np.ndarray:
    """Per-image recall (sensitivity) tp / (tp + fn) -> (N,) float64; NaN when the reference is empty."""
    return _confusion_metric("recall", pred, ref)


def specificity(pred, ref) -> np.ndarray:
    """Per-image specificity tn / (tn + fp) -> (N,) float64; NaN only when the reference fills the image."""
    return _confusion_metric("specificity", pred, ref)


def _spacing(spacing: Spacing | None) -> tuple[float, float] | None:
    if spacing is None:
        return None
    sp = (float(spacing),) * 2 if np.isscalar(spacing) else tuple(float(s) for s in spacing)  # type: ignore
    if len(sp) != 2 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be a positive float or (sy, sx) in mm per pixel, got {spacing!r}")
    return sp  # type: ignore[return-value]


def _surface_metric(kind: str, pred, ref, spacing: Spacing | None) -> np.ndarray:
    p, r = _pair(pred, ref)
    sp = _spacing(spacing)
    out = np.full(p.shape[0], np.nan)
    # MONAI gives NaN or inf (and a warning) when a side is empty; we only ask it about images where
    # both masks have a surface, so an empty side stays NaN = missing.
    both = ((p.flatten(1).sum(1) > 0) & (r.flatten(1).sum(1) > 0)).numpy()
    if not both.any():
        return out
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        if kind == "hd95":
            v = compute_hausdorff_distance(p[both], r[both], include_background=True, percentile=95,
                                           spacing=sp)
        else:
            v = compute_average_surface_distance(p[both], r[both], include_background=True, symmetric=True,
                                                 spacing=sp)
    out[both] = v.reshape(-1).double().numpy()
    return out


def hd95(pred, ref, spacing: Spacing | None = None) -> np.ndarray:
    """Per-image 95th-percentile Hausdorff distance -> (N,) float64, in pixels, or in mm with `spacing`
    (mm per pixel, float or (sy, sx)). MONAI's definition: surfaces are the mask pixels removed by a
    4-connected erosion; the 95th percentile of each directed distance set, then the larger of the two.
    NaN when either mask is empty."""
    return _surface_metric("hd95", pred, ref, spacing)


def assd(pred, ref, spacing: Spacing | None = None) -> np.ndarray:
    """Per-image average symmetric surface distance (mean over both directed distance sets) -> (N,)
    float64, in pixels or mm with `spacing`; surfaces as in `hd95`. NaN when either mask is empty."""
    return _surface_metric("assd", pred, ref, spacing)


def _lesion_counts(pred: np.ndarray, ref: np.ndarray, min_iou: float) -> dict[str, int]:
    ref_lab, n_ref = label_lesions(ref)
    pred_lab, n_pred = label_lesions(pred)
    if n_ref == 0 or n_pred == 0:
        return {"tp": 0, "fp": int(n_pred), "fn": int(n_ref)}
    # inter[i, j]: pixels shared by reference lesion i+1 and predicted component j+1
    joint = np.bincount((ref_lab * (n_pred + 1) + pred_lab).ravel(), minlength=(n_ref + 1) * (n_pred + 1))
    joint = joint.reshape(n_ref + 1, n_pred + 1)
    inter = joint[1:, 1:]
    union = joint[1:, :].sum(1)[:, None] + joint[:, 1:].sum(0)[None, :] - inter
    lesion_iou = inter / union
    ok = (inter > 0) & (lesion_iou >= min_iou)
    # one-to-one, greedy by IoU: a predicted blob that swallows two lesions detects only one of them
    ri, pj = np.nonzero(ok)
    used_r, used_p, tp = set(), set(), 0
    for k in np.argsort(-lesion_iou[ri, pj], kind="stable"):
        if ri[k] not in used_r and pj[k] not in used_p:
            used_r.add(ri[k])
            used_p.add(pj[k])
            tp += 1
    return {"tp": tp, "fp": int(n_pred - tp), "fn": int(n_ref - tp)}


def match_lesions(pred, ref, min_iou: float = 0.1) -> dict[str, int]:
    """Lesion-level detection counts for one image (bool masks (H, W)) -> {"tp", "fp", "fn"}.

    Lesions are 8-connected components. A reference lesion is detected when a predicted component
    overlaps it with component IoU >= `min_iou` (default 0.1: lenient about outlines, but a huge false
    blob that grazes a small lesion does not count); `min_iou=0` means any overlap. Matching is
    one-to-one, greedy by IoU; unmatched predicted components are false positives, unmatched
    reference lesions false negatives. Both masks empty -> all zeros.
    """
    if not 0.0 <= min_iou <= 1.0:
        raise ValueError(f"min_iou must be in [0, 1], got {min_iou}")
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    if p.shape != r.shape or p.ndim != 2:
        raise ValueError(f"match_lesions takes two (H, W) masks of one shape, got {p.shape} and {r.shape}")
    return _lesion_counts(p, r, min_iou)


def detection_summary(counts: Iterable[dict], n_images: int) -> dict[str, float]:
    """Pool per-image `match_lesions` counts: lesion sensitivity tp/(tp+fn) (NaN with no reference
    lesions), lesion precision tp/(tp+fp) (NaN with no predicted lesions), false positives per image."""
    counts = list(counts)
    tp = sum(int(c["tp"]) for c in counts)
    fp = sum(int(c["fp"]) for c in counts)
    fn = sum(int(c["fn"]) for c in counts)
    return {
        "lesion_tp": tp, "lesion_fp": fp, "lesion_fn": fn,
        "lesion_sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "lesion_precision": tp / (tp + fp) if tp + fp else float("nan"),
        "lesion_fp_per_image": fp / n_images if n_images > 0 else float("nan"),
    }


def per_image_metrics(pred, ref, spacing: Spacing | None = None, *, min_iou: float = 0.1) -> dict[str, float]:
    """Every metric above for one image (bool masks (H, W)), as plain floats/ints for a CSV row.

    Keys: METRIC_KEYS (hd95_mm/assd_mm NaN without `spacing`), ref_area_px, pred_area_px and the
    lesion counts lesion_tp, lesion_fp, lesion_fn from `match_lesions(min_iou=min_iou)`.
    """
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    if p.ndim != 2:
        raise ValueError(f"per_image_metrics takes one (H, W) mask pair, got {p.shape}; loop over a batch")
    row: dict[str, float] = {
        "dice": float(dice(p, r)[0]), "iou": float(iou(p, r)[0]),
        "precision": float(precision(p, r)[0]), "recall": float(recall(p, r)[0]),
        "specificity": float(specificity(p, r)[0]),
        "hd95_px": float(hd95(p, r)[0]), "assd_px": float(assd(p, r)[0]),
    }
    if spacing is None:
        row.update(hd95_mm=float("nan"), assd_mm=float("nan"))
    else:
        row.update(hd95_mm=float(hd95(p, r, spacing)[0]), assd_mm=float(assd(p, r, spacing)[0]))
    row.update(ref_area_px=int(r.sum()), pred_area_px=int(p.sum()))
    row.update({f"lesion_{k}": v for k, v in match_lesions(p, r, min_iou).items()})
    return row


def bootstrap_ci(values, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap (1 - alpha) confidence interval of the mean of `values`, NaNs dropped.

    Deterministic for a seed. No values -> (NaN, NaN); one value -> (v, v), a CI of zero width that
    says only that there is no spread to resample.
    """
    if n_boot < 1 or not 0 < alpha < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    x = np.asarray(values, np.float64).ravel()
    x = x[~np.isnan(x)]
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 4_000_000 // n)  # bound the (chunk, n) index array to ~32 MB
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _column(rows: Sequence[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], np.float64)


def _lesion_count(row: dict, key: str):
    return row.get(f"lesion_{key}", row.get(key))


def summarize_metrics(rows: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> dict:
    """Summary of per-image rows (from `per_image_metrics`, plus any extra keys).

    For each metric in METRIC_KEYS present in the rows: `{m}_mean`, `{m}_sd` (sample SD, ddof=1),
    `{m}_median`, `{m}_n` over non-NaN values and `{m}_ci95`, the 95 % percentile-bootstrap CI of the
    mean as (low, high). Also the counts of `evaluate.summarize`: n_images, n_scored (images with a Dice),
    dice_mean_lesion (images whose reference has a lesion), n_true_negative_images,
    n_false_positive_images, n_missed_images, empty_rule; and `detection_summary` totals when every row
    carries lesion_tp/lesion_fp/lesion_fn (or tp/fp/fn).
    """
    out: dict = {"n_images": len(rows)}
    for m in METRIC_KEYS:
        if not any(m in r for r in rows) and m not in ("dice", "iou"):
            continue
        v = _column(rows, m)
        v = v[~np.isnan(v)]
        out[f"{m}_mean"] = float(v.mean()) if v.size else float("nan")
        out[f"{m}_sd"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
        out[f"{m}_median"] = float(np.median(v)) if v.size else float("nan")
        out[f"{m}_n"] = int(v.size)
        out[f"{m}_ci95"] = bootstrap_ci(v, n_boot=n_boot, seed=seed)
    d = _column(rows, "dice")
    ref_pos = _column(rows, "ref_area_px") > 0
    pred_pos = _column(rows, "pred_area_px") > 0
    lesion_d = d[ref_pos & ~np.isnan(d)]
    out.update(
        n_scored=int((~np.isnan(d)).sum()),
        dice_mean_lesion=float(lesion_d.mean()) if lesion_d.size else float("nan"),
        n_true_negative_images=int((~ref_pos & ~pred_pos).sum()),
        n_false_positive_images=int((~ref_pos & pred_pos).sum()),
        n_missed_images=int((ref_pos & ~pred_pos).sum()),
        empty_rule=EMPTY_RULE,
    )
    if rows and all(all(_lesion_count(r, k) is not None for k in ("tp", "fp", "fn")) for r in rows):
        out.update(detection_summary(({k: _lesion_count(r, k) for k in ("tp", "fp", "fn")} for r in rows),
                                     len(rows)))
    return out
