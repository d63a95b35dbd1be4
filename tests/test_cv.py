import json

import numpy as np

import hemaseg
from hemaseg.crossval.cv import make_folds, run_cv
from hemaseg.evaluation.decisions import choose_review_threshold

from .conftest import tiny_config


def test_folds_are_deterministic_cover_every_scan_once_and_are_reused(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data)
    a = make_folds(cfg, tmp_path / "a", 4, seed=1) if (tmp_path / "a").mkdir() is None else None
    b = make_folds(cfg, tmp_path / "b", 4, seed=1) if (tmp_path / "b").mkdir() is None else None
    assert a == b
    val = [n for f in a for n in f["val"]]
    assert sorted(val) == sorted(set(val)) and len(val) == 16
    for f in a:
        assert not set(f["train"]) & set(f["val"])
    saved = json.loads((tmp_path / "a" / "folds.json").read_text())
    assert saved["folds"] == a and make_folds(cfg, tmp_path / "a", 4, seed=99) == a


def test_cv_trains_each_fold_evaluates_out_of_fold_and_loads_as_an_ensemble(tiny_data, tmp_path):
    out = tmp_path / "cv"
    result = run_cv(tiny_config(tiny_data, epochs=1), out, folds=2, seed=0, progress=False)
    s = result["summary"]
    assert s["n_folds"] == 2 and s["n_images"] == 16 and len(s["fold_dice"]) == 2
    for name in ("folds.json", "postprocessing.json", "confidence.json", "cv_summary.json", "oof/per_image.csv"):
        assert (out / name).is_file(), name
    assert {r["fold"] for r in result["rows"]} == {0, 1}
    # resumable: a second call retrains nothing (fold checkpoints untouched)
    mtime = (out / "fold_0" / "best.pt").stat().st_mtime_ns
    run_cv(tiny_config(tiny_data, epochs=1), out, folds=2, seed=0, progress=False)
    assert (out / "fold_0" / "best.pt").stat().st_mtime_ns == mtime
    ensemble = hemaseg.load_model(out)
    assert len(ensemble.models) == 2
    image = np.random.default_rng(0).integers(0, 255, (40, 56), dtype=np.uint8)
    single = [hemaseg.load_model(out / f"fold_{k}" / "last.pt").predict_proba_batch([image])[0] for k in range(2)]
    np.testing.assert_allclose(ensemble.predict_proba_batch([image])[0], (single[0] + single[1]) / 2, atol=1e-5)


def test_cv_scores_and_ensembles_final_weights_never_the_checkpoint_picked_on_the_held_out_fold(tiny_data, tmp_path):
    out = tmp_path / "cv"
    first = run_cv(tiny_config(tiny_data, epochs=2), out, folds=2, seed=0, progress=False)["summary"]
    for k in range(2):  # best.pt was selected on fold k's held-out scans: make it unusable
        (out / f"fold_{k}" / "best.pt").write_bytes(b"selected on the test fold")
    again = run_cv(tiny_config(tiny_data, epochs=2), out, folds=2, seed=0, progress=False)["summary"]
    assert again["fold_dice"] == first["fold_dice"] and again["oof_dice_final"] == first["oof_dice_final"]
    assert len(hemaseg.load_model(out).models) == 2


def test_review_threshold_flags_low_confidence_low_dice_cases():
    conf = np.array([0.9, 0.85, 0.8, 0.3, 0.2, 0.95])
    dice = np.array([0.9, 0.8, 0.85, 0.1, 0.2, 0.92])
    r = choose_review_threshold(conf, dice < 0.5, dice)
    assert r["threshold"] == 0.3 and r["spearman_r"] > 0.8 and r["auroc"] == 1.0 and r["flagged_share"] == 2 / 6


def test_a_missed_lesion_is_flagged_not_the_most_confident_answer():
    """A probability map peaking just below the threshold on a scan with a lesion: nothing is predicted,
    and the new confidence sends it to review (the entropy-only one called it certain)."""
    from hemaseg.inference.postprocess import confidence, entropy_confidence
    from hemaseg.evaluation.evaluate import failures

    near_miss = np.full((32, 32), 0.01)
    near_miss[10:16, 10:16] = 0.08  # the model half-saw it, below 0.1 and far below the 0.5 threshold
    clean = np.full((32, 32), 0.003)
    sure = np.full((32, 32), 0.01)
    sure[5:20, 5:20] = 0.99
    assert entropy_confidence(near_miss) == 1.0  # the old rule: a complete miss was 'certain'
    assert confidence(near_miss) < confidence(clean) and confidence(near_miss) < confidence(sure)
    rows = [{"ref_area_px": 36, "pred_area_px": 0, "dice": 0.0, "conf": confidence(near_miss)},  # the miss
            {"ref_area_px": 0, "pred_area_px": 0, "dice": float("nan"), "conf": confidence(clean)},  # a normal scan
            {"ref_area_px": 225, "pred_area_px": 225, "dice": 0.95, "conf": confidence(sure)}] * 3
    failed, missed = failures(rows)
    assert failed.tolist() == [True, False, False] * 3 and missed.tolist() == [True, False, False] * 3
    review = choose_review_threshold(np.array([r["conf"] for r in rows]), failed, missed=missed)
    assert review["missed_flagged_share"] == 1.0 and review["flagged_share"] == 1 / 3 and review["auroc"] == 1.0


def test_parallel_folds_train_the_same_models_as_sequential_ones(tiny_data, tmp_path):
    import torch

    from hemaseg.models.checkpoint import load_checkpoint
    from hemaseg.crossval.cv import make_folds, train_folds

    cfg = tiny_config(tiny_data, epochs=1)
    for name, jobs in (("seq", 1), ("par", 2)):
        (tmp_path / name).mkdir()
        train_folds(cfg, tmp_path / name, make_folds(cfg, tmp_path / name, 2, seed=0), progress=False, jobs=jobs)
    for k in range(2):
        seq = load_checkpoint(tmp_path / "seq" / f"fold_{k}" / "last.pt")["model"]
        par = load_checkpoint(tmp_path / "par" / f"fold_{k}" / "last.pt")["model"]
        assert seq.keys() == par.keys()
        for key in seq:
            torch.testing.assert_close(par[key], seq[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_failing_parallel_fold_is_reported_by_number(tiny_data, tmp_path):
    import dataclasses

    import pytest

    from hemaseg.crossval.cv import make_folds, train_folds

    cfg = tiny_config(tiny_data, epochs=1)
    split = make_folds(cfg, tmp_path, 2, seed=0)
    broken = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(tmp_path / "missing")))
    with pytest.raises(RuntimeError, match=r"fold\(s\) 0, 1 failed"):
        train_folds(broken, tmp_path, split, progress=False, jobs=2)


def test_report_of_a_cv_reads_what_cv_wrote_and_recomputes_nothing(tiny_data, tmp_path, monkeypatch, capsys):
    import hemaseg.inference.predictor as predictor
    from hemaseg.cli import main

    out = tmp_path / "cv"
    run_cv(tiny_config(tiny_data, epochs=1), out, folds=2, seed=0, progress=False)
    decided = {n: (out / n).read_bytes() for n in ("postprocessing.json", "confidence.json", "cv_summary.json")}
    (out / "report.html").unlink()

    def no_prediction(*args, **kwargs):
        raise AssertionError("report must not predict")

    monkeypatch.setattr(predictor.Predictor, "predict_proba_batch", no_prediction)
    assert main(["-q", "report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "Cross-validation: 2 folds" in html and html.count("<figure class=\"case\"") >= 1
    assert {n: (out / n).read_bytes() for n in decided} == decided


def test_the_review_cut_never_flags_more_than_the_budget():
    """Youden's J would flag 4 of 6 here (every failure, one good case): capped at 40 %, 2 of 6."""
    conf = np.array([0.1, 0.2, 0.3, 0.4, 0.8, 0.9])
    failed = np.array([True, True, False, True, False, False])
    capped = choose_review_threshold(conf, failed)
    uncapped = choose_review_threshold(conf, failed, max_flagged=None)
    assert uncapped["threshold"] == 0.4 and uncapped["flagged_share"] == 4 / 6
    assert capped["threshold"] == 0.2 and capped["flagged_share"] == 2 / 6 and capped["youden_threshold"] == 0.4
