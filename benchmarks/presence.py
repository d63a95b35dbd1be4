"""False lesions on normal scans: how they look, and what the "is there a lesion?" gate does, out of fold.

    python benchmarks/presence.py --runs benchmarks/runs/shape_busi --variants square,shape,shape+no-busi
    python benchmarks/presence.py --runs benchmarks/runs/encoders_busi --variants lite0,lite1,lite2 --tag encoders

Reads RUN/held_out.npz of each `VARIANT_foldK` run (written by benchmarks/shape.py and
benchmarks/encoders.py: the final weights' flip-TTA probabilities of the held-out fold, no postprocessing)
and, per variant:
- plain: threshold 0.5, nothing else (what those benchmarks score);
- gated: the postprocessing `decide_plan` picks (`hemaseg cv` and `hemaseg train` use the same function;
  its "is there a lesion?" step empties a mask whose highest probability stays below a cut), decided for
  each fold on the other folds' held-out scans only (leave one fold out), applied to that fold;
- presence_at_goal: a lesion-present classifier on the output's features (`presence_cut`), cut on the
  other folds where their normal scans meet the goal (at most 15 of 106 given a lesion): what meeting the
  normals goal by a decision after the network would cost in missed lesions;
- the causes: the peak probability of normal scans against lesion scans (AUROC of the peak as a presence
  score: 1 would separate them perfectly) and the size of the false blobs on normals.
Lesion Dice is the mean over each fold's lesion scans, then mean +- sd over folds; normals with a false
lesion are summed over folds. Prints a table and writes benchmarks/results/presence_<tag>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from common import RUNS, hardware, table, write_result
from encoders import lscpu_model, mean_sd
from scipy import stats

from hemaseg.evaluation.decisions import decide_plan
from hemaseg.evaluation.metrics import dice
from hemaseg.inference.postprocess import apply_plan
from hemaseg.inference.review import ReviewHead, review_features

THRESHOLD = 0.5
NORMALS_GOAL = 15 / 106  # the goal: at most 15 of BUSI's 106 normal scans given a lesion


def load_fold(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(name, prob float32, ref bool)] of one run's held-out scans."""
    with np.load(path) as z:
        names = sorted(k.split("/", 1)[1] for k in z.files if k.startswith("prob/"))
        return [(n, z[f"prob/{n}"].astype(np.float32) / 255, z[f"ref/{n}"].astype(bool)) for n in names]


def score(scans, plan=None, keep=None) -> dict:
    """`plan`: postprocessing; `keep`: per scan, False empties the mask (a presence decision)."""
    lesion_dice, fp, missed, n_normal = [], 0, 0, 0
    for i, (_, prob, ref) in enumerate(scans):
        pred = prob >= THRESHOLD
        if plan is not None:
            pred = apply_plan(pred, plan, prob)
        if keep is not None and not keep[i]:
            pred = np.zeros_like(pred)
        if ref.any():
            lesion_dice.append(float(dice(pred, ref)[0]))
            missed += int(not pred.any())
        else:
            n_normal += 1
            fp += int(pred.any())
    return {"dice_lesion": float(np.mean(lesion_dice)), "fp_normals": fp, "n_normal": n_normal,
            "missed_lesions": missed, "n_lesion": len(lesion_dice)}


def features(scans) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack([review_features(prob, prob >= THRESHOLD, THRESHOLD) for _, prob, _ in scans])
    return x, np.array([ref.any() for *_, ref in scans])


def presence_cut(others, scans) -> tuple[np.ndarray, float]:
    """A lesion-present classifier on the output's features (the review head's logistic model and features,
    fitted to "has a lesion" on the other folds), cut where at most NORMALS_GOAL of the other folds' normal
    scans still count as positive; returns which of `scans` keep their mask, and the cut."""
    x, has = features(others)
    head = ReviewHead.fit(x, has)
    normal_scores = np.sort(head.score_features(x[~has]))
    cut = float(normal_scores[int(np.floor(len(normal_scores) * (1 - NORMALS_GOAL)))])
    return head.score_features(features(scans)[0]) > cut, cut


def causes(scans) -> dict:
    peaks = np.array([float(prob.max()) for _, prob, _ in scans])
    has = np.array([ref.any() for *_, ref in scans])
    false_blobs = [(prob >= THRESHOLD).mean() for _, prob, ref in scans if not ref.any() and (prob >= THRESHOLD).any()]
    auroc = (stats.mannwhitneyu(peaks[has], peaks[~has]).statistic / (has.sum() * (~has).sum())
             if has.any() and (~has).any() else None)  # AUROC = U / (n1 n2)
    return {"peak_auroc_lesion_vs_normal": None if auroc is None else float(auroc),
            "peak_median_normal": float(np.median(peaks[~has])) if (~has).any() else None,
            "peak_median_lesion": float(np.median(peaks[has])) if has.any() else None,
            "false_blob_median_share_of_scan": float(np.median(false_blobs)) if false_blobs else None}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=RUNS / "shape_busi", help="folder of VARIANT_foldK runs")
    p.add_argument("--variants", default="square,shape", help="comma-separated run name prefixes")
    p.add_argument("--tag", default="busi", help="result file: benchmarks/results/presence_TAG.json")
    args = p.parse_args(argv)
    results, rows = {}, []
    for variant in args.variants.split(","):
        files = sorted(args.runs.glob(f"{variant}_fold*/held_out.npz"))
        folds = {int(f.parent.name.rsplit("_fold", 1)[1]): load_fold(f) for f in files}
        if len(folds) < 2:
            print(f"skipped {variant}: {len(folds)} fold(s) with held_out.npz under {args.runs} (needs 2+)")
            continue
        per_fold = {}
        for k, scans in sorted(folds.items()):
            others = [s for j, f in folds.items() if j != k for s in f]
            plan, evidence = decide_plan([s[1] for s in others], [s[2] for s in others], THRESHOLD)
            keep, cut = presence_cut(others, scans)
            per_fold[k] = {"plain": score(scans), "gated": score(scans, plan), "plan": plan.__dict__,
                           "presence_at_goal": score(scans, keep=keep), "presence_cut": cut,
                           "plan_evidence": evidence, "causes": causes(scans)}
        results[variant] = per_fold
        for kind in ("plain", "gated", "presence_at_goal"):
            fs = [f[kind] for f in per_fold.values()]
            rows.append([variant, kind, ",".join(map(str, per_fold)), mean_sd([f["dice_lesion"] for f in fs]),
                         f"{sum(f['fp_normals'] for f in fs)}/{sum(f['n_normal'] for f in fs)}",
                         f"{sum(f['missed_lesions'] for f in fs)}/{sum(f['n_lesion'] for f in fs)}",
                         "; ".join(f"{pf['plan']['lesion_min_prob']:g}" for pf in per_fold.values())
                         if kind == "gated" else "",
                         mean_sd([pf["causes"]["peak_auroc_lesion_vs_normal"] for pf in per_fold.values()])
                         if kind == "plain" else ""])
    headers = ["variant", "inference", "folds", "lesion Dice (mean ± sd over folds)", "normals with a false lesion",
               "lesions missed", "gate cut per fold", "peak AUROC lesion vs normal"]
    print(table(headers, rows))
    hw = {**hardware(), "lscpu_model_name": lscpu_model()}
    out = write_result(f"presence_{args.tag}", {
        "command": "python benchmarks/presence.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "runs": str(args.runs), "threshold": THRESHOLD, "hardware": hw, "variants": results,
        "table": {"headers": headers, "rows": rows}})
    print(f"written {out}")


if __name__ == "__main__":
    main()
