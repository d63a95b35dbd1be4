"""Segmentation metrics, thin over MONAI, with the empty-mask rule written down once.

Empty-mask rule (as nnU-Net): when reference and prediction are both empty, Dice and IoU are NaN
(the image is excluded from means and counted as a true-negative image); when the reference is
empty but the prediction is not, Dice and IoU are 0 (a false-positive image).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou

EMPTY_RULE = (
    "reference and prediction both empty -> Dice/IoU NaN (excluded from means, counted as a true-negative "
    "image); reference empty but prediction not -> 0"
)


def _as_batch(mask) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(mask, dtype=bool) if not isinstance(mask, torch.Tensor) else mask)
    t = t.bool().float()
    return t.reshape(-1, 1, *t.shape[-2:])


def _with_empty_rule(values: torch.Tensor, pred: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    both_empty = (pred.flatten(1).sum(1) == 0) & (ref.flatten(1).sum(1) == 0)
    out = values.reshape(-1).double().numpy().copy()
    out[both_empty.numpy()] = np.nan
    return out


def dice(pred, ref) -> np.ndarray:
    """Per-image Dice of bool masks (N, H, W) or (H, W) -> (N,) float64, empty rule above."""
    p, r = _as_batch(pred), _as_batch(ref)
    return _with_empty_rule(compute_dice(p, r, include_background=True, ignore_empty=False), p, r)


def iou(pred, ref) -> np.ndarray:
    """Per-image IoU (Jaccard), same shapes and empty rule as `dice`."""
    p, r = _as_batch(pred), _as_batch(ref)
    return _with_empty_rule(compute_iou(p, r, include_background=True, ignore_empty=False), p, r)
