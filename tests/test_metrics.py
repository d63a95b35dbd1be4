import math

import numpy as np

from hemaseg.evaluation.evaluate import summarize
from hemaseg.evaluation.metrics import dice, iou


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


# ---------------------------------------------------------------------------- metrics added for issue 3

import warnings  # noqa: E402

import pytest  # noqa: E402

from hemaseg.evaluation.metrics import (  # noqa: E402
    METRIC_KEYS,
    assd,
    bootstrap_ci,
    detection_summary,
    hd95,
    match_lesions,
    per_image_metrics,
    precision,
    recall,
    specificity,
    summarize_metrics,
)


def _squares():
    a = np.zeros((5, 5), bool); a[1:4, 1:4] = True  # rows/cols 1..3
    b = np.zeros((5, 5), bool); b[2:5, 2:5] = True  # rows/cols 2..4: 4 px shared
    return a, b


def test_confusion_metrics_against_hand_computed_values():
    a, b = _squares()  # tp 4, fp 5, fn 5, tn 25 - 14 = 11
    assert np.isclose(precision(a, b)[0], 4 / 9) and np.isclose(recall(a, b)[0], 4 / 9)
    assert np.isclose(specificity(a, b)[0], 11 / 16)
    pred, ref = np.array([[1, 1, 1, 1]], bool), np.array([[1, 1, 0, 0]], bool)  # tp 2, fp 2, fn 0, tn 0
    assert (precision(pred, ref)[0], recall(pred, ref)[0], specificity(pred, ref)[0]) == (0.5, 1.0, 0.0)
    assert precision(np.stack([a, b]), np.stack([b, b])).shape == (2,)


# Surfaces (MONAI): mask pixels removed by a 4-connected erosion; a 3x3 square's is its 8-pixel ring.
# Ring of a (centre (2,2)) to the nearest pixel of b's ring (centre (3,3)), in pixels:
#   (1,1)->(2,2) sqrt2; (1,2),(1,3),(2,1),(3,1),(3,3) -> 1; (2,3),(3,2) lie on b's ring -> 0
#   sorted [0, 0, 1, 1, 1, 1, 1, sqrt2]; b -> a is the mirror image, the same set.
# HD95 = numpy 95th percentile (linear): index 0.95 * 7 = 6.65 -> 1 + 0.65 (sqrt2 - 1); then max of both.
# ASSD = mean of both sets = 2 (5 + sqrt2) / 16.
# Spacing (sy, sx) = (2.0, 0.5) mm: a row step is 2 mm, a column step 0.5 mm:
#   (1,1)->(2,2) sqrt(4 + 0.25); (1,2)->(2,2), (1,3)->(2,3) 2; (2,1),(3,1),(3,3) 0.5 (a column away); 0, 0
#   sorted [0, 0, .5, .5, .5, 2, 2, sqrt4.25] (b -> a the same by symmetry)
HD95_PX = 1 + 0.65 * (math.sqrt(2) - 1)
ASSD_PX = (5 + math.sqrt(2)) / 8
HD95_MM = 2 + 0.65 * (math.sqrt(4.25) - 2)
ASSD_MM = (1.5 + 4 + math.sqrt(4.25)) / 8


def test_surface_distances_against_hand_computed_values():
    a, b = _squares()
    assert np.isclose(hd95(a, b)[0], HD95_PX, atol=1e-5) and np.isclose(assd(a, b)[0], ASSD_PX, atol=1e-5)
    assert np.isclose(hd95(a, b, (2.0, 0.5))[0], HD95_MM, atol=1e-5)
    assert np.isclose(assd(a, b, (2.0, 0.5))[0], ASSD_MM, atol=1e-5)
    assert np.isclose(hd95(a, b, 0.5)[0], HD95_PX / 2, atol=1e-5)  # isotropic spacing scales linearly
    assert hd95(a, a)[0] == 0 and assd(a, a)[0] == 0
    # a's centre pixel alone (its own surface) vs a's ring: 1 one way; 4 x 1 and 4 x sqrt2 the other.
    # ASSD pools both sets (MONAI concatenates them) -> (1 + 4 + 4 sqrt2) / 9; HD95 = max(1, p95 of ring)
    one = np.zeros((5, 5), bool); one[2, 2] = True
    assert np.isclose(assd(one, a)[0], (5 + 4 * math.sqrt(2)) / 9, atol=1e-5)
    assert np.isclose(hd95(one, a)[0], math.sqrt(2), atol=1e-5)


def test_empty_rules_for_every_metric():
    empty = np.zeros((4, 4), bool)
    lesion = np.zeros((4, 4), bool); lesion[1:3, 1:3] = True
    nan = math.nan
    expected = {  # (pred, ref): dice, iou, precision, recall, specificity, hd95, assd
        "both empty": ((empty, empty), (nan, nan, nan, nan, 1.0, nan, nan)),
        "missed lesion": ((empty, lesion), (0.0, 0.0, nan, 0.0, 1.0, nan, nan)),
        "false positive": ((lesion, empty), (0.0, 0.0, 0.0, nan, 12 / 16, nan, nan)),
    }
    funcs = (dice, iou, precision, recall, specificity, hd95, assd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI's empty-input warnings must not leak out
        for case, ((p, r), want) in expected.items():
            got = tuple(float(f(p, r)[0]) for f in funcs)
            assert np.allclose(got, want, equal_nan=True), (case, got)
            assert math.isnan(hd95(p, r, 1.5)[0])
    full = np.ones((4, 4), bool)
    assert math.isnan(specificity(full, full)[0]) and math.isnan(specificity(empty, full)[0])  # no background
    batch = hd95(np.stack([lesion, empty, lesion]), np.stack([lesion, lesion, empty]))
    assert batch[0] == 0 and np.isnan(batch[1:]).all()


def test_per_image_metrics_keys_and_spacing():
    a, b = _squares()
    row = per_image_metrics(a, b, spacing=(2.0, 0.5))
    assert list(row)[:11] == [*METRIC_KEYS, "ref_area_px", "pred_area_px"]
    assert np.isclose(row["dice"], 8 / 18) and np.isclose(row["hd95_mm"], HD95_MM, atol=1e-5)
    assert (row["ref_area_px"], row["pred_area_px"], row["lesion_tp"]) == (9, 9, 1)
    plain = per_image_metrics(a, b)
    assert math.isnan(plain["hd95_mm"]) and math.isnan(plain["assd_mm"])
    assert np.isclose(plain["assd_px"], ASSD_PX, atol=1e-5)
    for bad in (0.0, (1.0, -1.0), (1.0, 1.0, 1.0)):
        with pytest.raises(ValueError, match="spacing"):
            per_image_metrics(a, b, spacing=bad)
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:4])


def _blob(mask, y, x, r=2):
    mask[y - r:y + r + 1, x - r:x + r + 1] = True


def test_match_lesions():
    ref = np.zeros((30, 30), bool); pred = np.zeros_like(ref)
    _blob(ref, 5, 5); _blob(ref, 20, 20)  # two lesions
    _blob(pred, 6, 6); _blob(pred, 5, 25)  # one detected (shifted), one spurious
    assert match_lesions(pred, ref) == {"tp": 1, "fp": 1, "fn": 1}
    z = np.zeros_like(ref)
    assert match_lesions(z, z) == {"tp": 0, "fp": 0, "fn": 0}
    assert match_lesions(z, ref) == {"tp": 0, "fp": 0, "fn": 2}
    diag = np.zeros((4, 4), bool); diag[0, 0] = diag[1, 1] = True  # one lesion under 8-connectivity
    assert match_lesions(diag, diag) == {"tp": 1, "fp": 0, "fn": 0}
    big = np.zeros((30, 30), bool); big[5:25, 5:25] = True
    speck = np.zeros_like(big); speck[10, 10] = True  # IoU 1/400
    assert match_lesions(speck, big) == {"tp": 0, "fp": 1, "fn": 1}
    assert match_lesions(speck, big, min_iou=0) == {"tp": 1, "fp": 0, "fn": 0}
    merged = np.zeros_like(ref); merged[3:23, 3:23] = True  # one blob over both lesions: one-to-one
    assert match_lesions(merged, ref, min_iou=0) == {"tp": 1, "fp": 0, "fn": 1}
    with pytest.raises(ValueError):
        match_lesions(pred, ref, min_iou=1.5)


def test_detection_summary():
    counts = [{"tp": 1, "fp": 1, "fn": 1}, {"tp": 2, "fp": 0, "fn": 0}, {"tp": 0, "fp": 1, "fn": 0}]
    s = detection_summary(counts, 3)
    assert (s["lesion_tp"], s["lesion_fp"], s["lesion_fn"]) == (3, 2, 1)
    assert np.isclose(s["lesion_sensitivity"], 3 / 4) and np.isclose(s["lesion_precision"], 3 / 5)
    assert np.isclose(s["lesion_fp_per_image"], 2 / 3)
    none = detection_summary([{"tp": 0, "fp": 0, "fn": 0}], 1)
    assert math.isnan(none["lesion_sensitivity"]) and math.isnan(none["lesion_precision"])


def test_bootstrap_ci():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.7, 0.1, 20), rng.normal(0.7, 0.1, 2000)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(large)
    assert lo2 < large.mean() < hi2 and (hi2 - lo2) < (hi - lo) / 5  # ~ 1/sqrt(100) as wide
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3) != bootstrap_ci(small, seed=4)
    assert bootstrap_ci(np.append(small, [np.nan, np.nan])) == (lo, hi)  # NaN ignored
    assert np.isnan(bootstrap_ci([np.nan])).all() and bootstrap_ci([0.5]) == (0.5, 0.5)
    lo90, hi90 = bootstrap_ci(small, alpha=0.1)
    assert lo <= lo90 and hi90 <= hi


def test_summarize_metrics_keeps_evaluate_keys_and_adds_spread_ci_and_detection():
    lesions = [(1, 0, 0), (0, 0, 0), (0, 1, 0), (0, 0, 1)]  # (tp, fp, fn) per image
    rows = [
        {"dice": 0.8, "iou": 0.67, "ref_area_px": 10, "pred_area_px": 9},
        {"dice": float("nan"), "iou": float("nan"), "ref_area_px": 0, "pred_area_px": 0},
        {"dice": 0.0, "iou": 0.0, "ref_area_px": 0, "pred_area_px": 5},
        {"dice": 0.0, "iou": 0.0, "ref_area_px": 7, "pred_area_px": 0},
    ]
    rows = [{**r, "lesion_tp": tp, "lesion_fp": fp, "lesion_fn": fn}
            for r, (tp, fp, fn) in zip(rows, lesions)]
    old, new = summarize(rows), summarize_metrics(rows)
    assert set(old) <= set(new)
    for k in old:
        if k != "dice_sd":  # now the sample SD (ddof=1); evaluate.summarize used ddof=0
            assert new[k] == old[k] or (isinstance(old[k], float) and np.isclose(new[k], old[k])), k
    assert np.isclose(new["dice_sd"], np.std([0.8, 0, 0], ddof=1)) and np.isclose(new["dice_median"], 0)
    assert new["dice_n"] == 3 and new["dice_ci95"][0] <= new["dice_mean"] <= new["dice_ci95"][1]
    assert (new["lesion_tp"], new["lesion_fp"], new["lesion_fn"]) == (1, 1, 1)
    assert np.isclose(new["lesion_fp_per_image"], 1 / 4)
    plain = summarize_metrics([{k: v for k, v in r.items() if not k.startswith("lesion_")} for r in rows])
    assert "lesion_tp" not in plain and "hd95_px_mean" not in plain
    empty = summarize_metrics([])
    assert empty["n_images"] == 0 and math.isnan(empty["dice_mean"]) and empty["n_scored"] == 0


def test_summarize_metrics_on_real_rows():
    a, b = _squares()
    z = np.zeros_like(a)
    rows = [per_image_metrics(a, b, 1.0), per_image_metrics(b, b, 1.0), per_image_metrics(z, z, 1.0)]
    s = summarize_metrics(rows)
    assert np.isclose(s["hd95_px_mean"], HD95_PX / 2, atol=1e-5) and s["hd95_px_n"] == 2
    assert s["specificity_n"] == 3 and s["n_true_negative_images"] == 1 and s["lesion_tp"] == 2
