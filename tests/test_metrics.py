import math

import numpy as np

from hemaseg.evaluate import summarize
from hemaseg.metrics import dice, iou


def test_dice_and_iou_against_hand_computed_values():
    pred = np.array([[1, 1, 1, 1]], bool)
    ref = np.array([[1, 1, 0, 0]], bool)
    assert np.isclose(dice(pred, ref)[0], 2 * 2 / (4 + 2))  # 2/3
    assert np.isclose(iou(pred, ref)[0], 2 / 4)
    a = np.zeros((5, 5), bool); a[1:4, 1:4] = True  # 9 px
    b = np.zeros((5, 5), bool); b[2:5, 2:5] = True  # 9 px, 4 shared
    assert np.isclose(dice(a, b)[0], 8 / 18) and np.isclose(iou(a, b)[0], 4 / 14)


def test_empty_rule():
    empty = np.zeros((4, 4), bool)
    lesion = np.zeros((4, 4), bool); lesion[1, 1] = True
    assert math.isnan(dice(empty, empty)[0]) and math.isnan(iou(empty, empty)[0])
    assert dice(lesion, empty)[0] == 0 and dice(empty, lesion)[0] == 0
    batch = dice(np.stack([lesion, empty]), np.stack([lesion, empty]))
    assert batch[0] == 1 and math.isnan(batch[1])


def test_summary_means_follow_the_rule():
    rows = [
        {"dice": 0.8, "iou": 0.67, "ref_area_px": 10, "pred_area_px": 9},
        {"dice": float("nan"), "iou": float("nan"), "ref_area_px": 0, "pred_area_px": 0},
        {"dice": 0.0, "iou": 0.0, "ref_area_px": 0, "pred_area_px": 5},
        {"dice": 0.0, "iou": 0.0, "ref_area_px": 7, "pred_area_px": 0},
    ]
    s = summarize(rows)
    assert s["n_images"] == 4 and s["n_scored"] == 3
    assert np.isclose(s["dice_mean"], 0.8 / 3) and np.isclose(s["dice_mean_lesion"], 0.4)
    assert (s["n_true_negative_images"], s["n_false_positive_images"], s["n_missed_images"]) == (1, 1, 1)
