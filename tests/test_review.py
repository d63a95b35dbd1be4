"""The learned review head: fitted out of fold by `hemaseg cv`, stored in confidence.json, used as the
confidence of a CV run's predictions; it must flag a missed lesion the data taught it to distrust."""

import json

import numpy as np
import pytest

from hemaseg.evaluation.evaluate import failures
from hemaseg.inference.review import REVIEW_FEATURES, ReviewHead, review_features
from hemaseg.crossval.cv import fit_review


def blob(peak: float, size: int = 32, r: int = 6) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return (peak * np.exp(-((xx - 16) ** 2 + (yy - 16) ** 2) / (2 * r ** 2))).astype(np.float32)


def case(kind: str, rng) -> dict:
    """A scored row like cv's: a sure hit, a correct empty scan, or a near miss (peak below threshold)."""
    ref = np.zeros((32, 32), bool)
    if kind == "hit":
        prob, ref = blob(rng.uniform(0.9, 1.0)), blob(1.0) >= 0.5
    elif kind == "empty":
        prob = blob(rng.uniform(0.0, 0.15))
    else:  # a lesion the model saw faintly and did not outline
        prob, ref = blob(rng.uniform(0.3, 0.48)), blob(1.0) >= 0.5
    pred = prob >= 0.5
    inter, total = (pred & ref).sum(), pred.sum() + ref.sum()
    dice = 2 * inter / total if total else float("nan")
    from hemaseg.inference.postprocess import confidence

    return {"prob": prob, "pred": pred, "ref_area_px": int(ref.sum()), "pred_area_px": int(pred.sum()),
            "dice": dice, "confidence_rule": confidence(prob), "confidence": confidence(prob)}


def rows_for(n_per_kind: int = 12, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = [case(kind, rng) for kind in ("hit", "empty", "miss") for _ in range(n_per_kind)]
    for i, r in enumerate(rows):
        r["fold"] = i % 3
    return rows


def test_features_describe_the_answer():
    x = review_features(blob(0.4), blob(0.4) >= 0.5)
    assert len(x) == len(REVIEW_FEATURES) and x[2] == pytest.approx(0.4, abs=1e-6) and x[4] == 0.0
    assert review_features(blob(0.95), blob(0.95) >= 0.5)[4] == 1.0


def test_cv_fits_the_head_out_of_fold_and_it_flags_the_misses():
    rows = rows_for()
    failed, missed = failures(rows)
    assert missed.sum() == 12
    review = fit_review(rows, failed, np.array([r["dice"] for r in rows], float), missed, 3, 0.5)
    assert review["method"].startswith("review head") and review["head"]["features"] == list(REVIEW_FEATURES)
    flagged = np.array([r["confidence"] for r in rows]) <= review["threshold"]
    assert flagged[missed].all() and not flagged[~failed].any()  # every miss, no good answer
    assert review["auroc"] > review["rule"]["auroc"] - 1e-9
    head = ReviewHead.from_dict(json.loads(json.dumps(review["head"])))
    miss = rows[-1]
    assert head.score(miss["prob"], miss["pred"]) <= review["threshold"]


def test_too_few_scans_keep_the_rule():
    rows = rows_for(n_per_kind=2)
    failed, missed = failures(rows)
    review = fit_review(rows, failed, np.array([r["dice"] for r in rows], float), missed, 3, 0.5)
    assert review["method"].startswith("rule") and "head" not in review


def test_a_cv_runs_predictor_reports_the_heads_confidence(tiny_run, tmp_path):
    import shutil

    from hemaseg.inference.predictor import load_model

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    head = ReviewHead((0.0, 0.0, 0.0, 0.0, -3.0), 1.0)  # anything found: low confidence
    (run / "confidence.json").write_text(json.dumps({"threshold": 0.5, "head": head.to_dict()}))
    predictor = load_model(run, device="cpu")
    pred = predictor.prediction(blob(0.95))
    assert pred.confidence == pytest.approx(1 / (1 + np.exp(2.0))) and pred.needs_review
    assert predictor.prediction(blob(0.1)).confidence == pytest.approx(1 / (1 + np.exp(-1.0)))


def test_weighting_misses_ranks_them_below_other_failures():
    """Two kinds of failure the features cannot tell apart from good cases equally well: weighting the
    misses makes the head score them lower, so a review budget catches them first."""
    from hemaseg.inference.review import ReviewHead

    rng = np.random.default_rng(0)
    n = 300
    x = rng.normal(size=(n, 5))
    kind = rng.choice(["ok", "miss", "fail"], size=n, p=[0.7, 0.1, 0.2])
    x[kind == "miss", 0] -= 1.0  # misses show on feature 0
    x[kind == "fail", 1] -= 1.0  # other failures on feature 1
    ok = kind == "ok"
    plain = ReviewHead.fit(x, ok)
    weighted = ReviewHead.fit(x, ok, weights=np.where(kind == "miss", 3.0, 1.0))

    def misses_in_lowest(head, share=0.3):
        s = head.score_features(x)
        return (s[kind == "miss"] <= np.quantile(s, share)).mean()

    assert misses_in_lowest(weighted) > misses_in_lowest(plain)
    assert ReviewHead.fit(x, ok, weights=np.ones(n)).weights == pytest.approx(plain.weights)


def test_without_a_fitted_decision_no_lesion_is_never_trusted(tiny_run, tmp_path):
    """The rule of last resort: a confident-looking empty map (max p 0.01, margin confidence ~1) from a
    model with no fitted review decision is flagged; a clear lesion is not."""
    import shutil

    from hemaseg.inference.predictor import load_model

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "confidence.json").unlink(missing_ok=True)
    predictor = load_model(run, device="cpu", backend="torch")
    empty = predictor.prediction(blob(0.01))
    assert empty.confidence > 0.9 and empty.finding.needs_review and not empty.finding.found
    assert empty.finding.text == "no lesion found - review" and "never trusted" in empty.finding.why
    sure = predictor.prediction(np.where(blob(1.0) >= 0.5, 0.99, 0.01).astype(np.float32))  # crisp edges
    assert sure.finding.found and not sure.needs_review and sure.finding.text == "lesion found"


def test_a_train_run_fits_its_review_decision_on_its_validation_split(tmp_path):
    from hemaseg.data.synth import SynthConfig, write_synthetic_dataset
    from hemaseg.inference.predictor import load_model
    from hemaseg.training.train import fit
    from tests.conftest import tiny_config

    # half the scans empty and 8 quick epochs: some validation answers acceptable, some failures (measured: 15
    # of 24), so both outcomes are there to fit on
    data = write_synthetic_dataset(tmp_path / "data", 48, size=48, seed=5, progress=False,
                                   config=SynthConfig(p_empty=0.5))
    summary = fit(tiny_config(data, epochs=8, val_fraction=0.5, lr=1e-2), tmp_path / "run", progress=False)
    stored = json.loads((tmp_path / "run" / "confidence.json").read_text())
    assert summary["n_val"] >= 20 and stored["head"]["features"] == list(REVIEW_FEATURES)
    assert stored["threshold"] is not None and "validation split" in stored["fitted_on"]
    predictor = load_model(tmp_path / "run", device="cpu", backend="torch")
    assert predictor.review_head == ReviewHead.from_dict(stored["head"])
    assert predictor.review_threshold == stored["threshold"]
    finding = predictor.prediction(blob(0.01)).finding
    assert "the cut fitted on the validation split" in finding.why
    # the postprocessing (with the "is there a lesion?" gate) is decided on the same split, before the head,
    # and predict applies it
    from hemaseg.inference.postprocess import PostprocessPlan

    decided = json.loads((tmp_path / "run" / "postprocessing.json").read_text())
    assert "validation split" in decided["evidence"]["decided_on"] and "none" in decided["evidence"]
    plan = PostprocessPlan.load(tmp_path / "run" / "postprocessing.json")
    assert {k: decided[k] for k in summary["postprocessing"]} == summary["postprocessing"] and predictor.plan == plan
    assert load_model(tmp_path / "run", device="cpu", backend="torch", postprocess=False).plan.is_identity


def test_a_tiny_validation_split_leaves_the_rule_of_last_resort_and_says_why(tiny_run):
    stored = json.loads((tiny_run / "confidence.json").read_text())
    assert stored["threshold"] is None and "too few" in stored["method"]
    decided = json.loads((tiny_run / "postprocessing.json").read_text())
    assert decided["evidence"]["decided_on"] is None and "too few" in decided["evidence"]["why"]


def test_the_python_finding_is_the_one_predict_writes(tiny_run, tiny_data, tmp_path):
    import csv

    from hemaseg.data.images import read_image
    from hemaseg.inference.files import predict_files
    from hemaseg.inference.predictor import load_model

    predictor = load_model(tiny_run, device="cpu", backend="torch")
    scans = sorted((tiny_data / "images").iterdir())[:4]
    predict_files(predictor, scans, tmp_path / "out", progress=False)
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    for scan in scans:
        finding = predictor.predict(read_image(scan)).finding
        row = rows[str(scan.absolute())]
        assert (row["finding"], row["needs_review"], row["review_reason"]) == \
            (finding.text, str(finding.needs_review), finding.why)
        assert float(row["confidence"]) == pytest.approx(finding.confidence, abs=1e-4)


def test_the_shipped_model_carries_a_fitted_review_decision_that_flags_an_empty_map():
    from hemaseg.inference.predictor import load_model

    predictor = load_model("ultrasound", device="cpu", backend="torch")
    assert predictor.review_head is not None and predictor.review_threshold is not None
    assert "never trained on" in predictor.review_fitted_on
    empty = predictor.prediction(np.zeros((64, 80), np.float32))
    assert not empty.finding.found and empty.needs_review and empty.finding.text == "no lesion found - review"
    assert "the cut fitted on" in empty.finding.why
