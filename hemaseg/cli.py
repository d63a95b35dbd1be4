"""The `hemaseg` command line: the only module that reads argv, and the one that reads hemaseg's own
settings from the environment (HEMASEG_API_KEY, HEMASEG_SALT, HEMASEG_DEBUG; the training cache's folder
and torchrun's variables are read where they are used: data/cache.py, distributed.py). Every command calls
library functions. Every error reaching it becomes one line naming the file and the problem, with an
exit code from EXIT_CODES (`--debug` or HEMASEG_DEBUG=1 shows the traceback instead)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("hemaseg")


EXIT_CODES = {
    0: "success",
    1: "finished, but some inputs failed (see errors.csv) or `check` found problems",
    2: "usage or data error: a bad flag or value, a broken or missing file, a refused run folder",
    3: "operating-system error: no space left, permission denied, a read-only folder ...",
    4: "internal error (a bug in hemaseg: please report it; --debug shows the traceback)",
    130: "interrupted (Ctrl-C); finished outputs are kept and a training run can be resumed",
}
#: Python setting names whose flag is not --name-with-dashes
FLAG_OF = {"groups_file": "--groups", "arch": "--model", "augment": "--no-augment", "labels": "--label"}


def flag(key: str) -> str:
    return FLAG_OF.get(key, "--" + key.replace("_", "-"))


def _presets(attr: str) -> str:
    """'default 4, seed 8, large 16': what each preset sets, for --help."""
    from hemaseg.config import PRESETS

    return ", ".join(f"{name} {getattr(p, attr)}" for name, p in PRESETS.items())


def _add_max_pixels_flag(p: argparse.ArgumentParser) -> None:
    from hemaseg.config import DataConfig

    p.add_argument("--max-pixels", type=int, metavar="N", default=None,
                   help=f"refuse images larger than N pixels (width x height), checked from the file header "
                        f"before decoding (default {DataConfig.max_pixels:,})")


def _frame(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a frame number (0 = the first) or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"frame numbers start at 0; got {value}")
    return value


def _size(text: str):
    from hemaseg.config import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _spacing(text: str):
    from hemaseg.spacing import parse_pixel_spacing

    try:
        return parse_pixel_spacing(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_measure_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pixel-spacing", type=_spacing, metavar="MM|X,Y",
                   help="mm per pixel of scans without their own calibration (PNG/JPEG, DICOM without "
                        "ultrasound regions or pixel spacing): one value for square pixels or x,y; a DICOM "
                        "file's own calibration always wins, and one that is unusable keeps figures in pixels")
    p.add_argument("--frame", type=_frame, default=0, metavar="N|all",
                   help="which frame of a multi-frame (cine) DICOM to use, from 0, or 'all' (outputs "
                        "NAME_frameNNN_*; default 0)")


def _add_dicom_out_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dicom-sr", action="store_true",
                   help="for DICOM scans also write NAME_sr.dcm: a DICOM Structured Report (TID 1500) of each "
                        "lesion's outline and mm figures, for a PACS; not for scans without mm calibration. It "
                        "carries the scan's patient and study data")
    p.add_argument("--dicom-seg", action="store_true",
                   help="for single-frame DICOM scans also write NAME_seg.dcm: a DICOM Segmentation of the mask; "
                        "not with --masks. It carries the scan's patient and study data")


def _model_label(run: str) -> str:
    """What the DICOM outputs call the model: 'ultrasound', a run folder's name, or folder/file.pt."""
    p = Path(run)
    return f"{p.parent.name}/{p.name}" if p.suffix == ".pt" else p.name


def _add_label_flag(p) -> None:
    p.add_argument("--label", dest="labels", action="append", metavar="NAME",
                   help="nnU-Net, LabelMe, CVAT and COCO data: a label that counts as lesion; repeat for several, "
                        "merged into one (default: the one foreground label, or all of them merged)")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mask-threshold", type=float, default=None, metavar="F",
                   help="binarise non-binary masks at F x the mask dtype's maximum (e.g. 0.5); "
                        "without it a mask must hold exactly two values")
    _add_label_flag(p)
    _add_max_pixels_flag(p)


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the probabilities of the scan and its flips")
    p.add_argument("--no-postprocess", action="store_true",
                   help="skip the postprocessing steps the run decided on (RUN/postprocessing.json)")
    p.add_argument("--threshold", type=float, help="probability threshold for masks (default: the run's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ... (default auto)")
    _add_backend_flag(p)


def _add_backend_flag(p: argparse.ArgumentParser) -> None:
    from hemaseg.config import BACKENDS

    p.add_argument("--backend", choices=list(BACKENDS), default="auto",
                   help="how the network runs: " + "; ".join(f"{k}: {v}" for k, v in BACKENDS.items())
                        + " (default auto)")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from hemaseg.config import ARCHS, AUGMENT_ON, INITS, LOSSES, NORMALIZATIONS, NORMS, PRECISIONS, PRESETS, \
        AugmentConfig, DataConfig, InferenceConfig, ModelConfig, TrainConfig

    d, m, tr = DataConfig(), ModelConfig(), TrainConfig()
    g = p.add_argument_group("recipe")
    g.add_argument("--preset", choices=list(PRESETS), default="default",
                   help="recipe to start from, adapted to the dataset (input size, batch) and stored in the run: "
                        + "; ".join(f"'{k}' = {v.description}" for k, v in PRESETS.items())
                        + " (default: default); the flags below override it")
    g.add_argument("--config", metavar="JSON", help="a config.json (e.g. from an earlier run) to start from "
                                                    "instead of a preset; flags given here override it")
    g = p.add_argument_group("data")
    g.add_argument("--size", type=_size, metavar="PX|HxW",
                   help="network input: 256 for a square or 224x320 for height x width; scans are letterboxed into "
                        "it with their aspect ratio kept (default: the preset's pixel count "
                        f"({_presets('size')} squared) at the data's median aspect ratio, sides multiples of 32, "
                        "never above the median scan)")
    g.add_argument("--normalize", choices=NORMALIZATIONS, help=f"intensity normalisation (default {d.normalize})")
    g.add_argument("--val-fraction", type=float, help=f"share of scans held out for validation (default {d.val_fraction})")
    g.add_argument("--split-seed", type=int, help=f"seed of the train/val split (default {d.split_seed})")
    g.add_argument("--split-file", help="JSON {'train': [...], 'val': [...]} of scan names to use instead")
    g.add_argument("--groups", dest="groups_file", metavar="CSV",
                   help="CSV of image name + group (group/dup_group/patient column): a group never spans "
                        "train and val (default: DATA/manifest.csv when it has such a column)")
    g.add_argument("--mask-threshold", type=float, metavar="F", help="binarise non-binary masks at F x dtype max")
    _add_label_flag(g)
    _add_max_pixels_flag(g)
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="arch", choices=list(ARCHS),
                   help="; ".join(f"'{k}' = {v}" for k, v in ARCHS.items())
                        + " (presets: " + ", ".join(f"{k} {v.model.arch}" for k, v in PRESETS.items()) + ")")
    g.add_argument("--init", choices=list(INITS),
                   help="where the weights start: " + "; ".join(f"{k} = {v}" for k, v in INITS.items())
                        + f" (default {tr.init})")
    g.add_argument("--encoder-lr-scale", type=float, metavar="F",
                   help=f"a pretrained encoder learns at F x --lr (default {tr.encoder_lr_scale})")
    g.add_argument("--base-width", type=int, help=f"channels at the first level of 'unet' (default {m.base_width})")
    g.add_argument("--depth", type=int, help=f"pooling steps of 'unet' (default {m.depth})")
    g.add_argument("--norm", choices=NORMS, help=f"normalisation layers of 'unet' (default {m.norm})")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"training epochs (presets: {_presets('epochs')})")
    g.add_argument("--budget-minutes", type=float, metavar="M",
                   help="fit the number of epochs to M minutes of wall time (measured after the first epoch)")
    g.add_argument("--budget-images", type=int, metavar="N",
                   help="train the whole epochs closest to N training images seen (steps x batch): the same "
                        "training on any machine, however fast (instead of --budget-minutes)")
    g.add_argument("--ema-decay", type=float, metavar="D",
                   help=f"validate and save an exponential moving average of the weights with decay D, e.g. "
                        f"0.99; 0 = off (default {tr.ema_decay:g})")
    g.add_argument("--batch-size", type=int, help=f"images per step per process (presets: {_presets('batch_size')}; "
                                                  "halved on a CPU above 256 px; under torchrun the global batch "
                                                  "is processes x B)")
    g.add_argument("--sync-batchnorm", action="store_true", default=None,
                   help="under torchrun: BatchNorm statistics of the global batch, so N processes at --batch-size B "
                        "train what one process trains at N x B (one all-reduce per BatchNorm layer and step)")
    g.add_argument("--loss", choices=LOSSES, help=f"Dice + BCE or Dice + focal, MONAI's (default {tr.loss})")
    g.add_argument("--lr", type=float, help=f"peak AdamW learning rate (presets: {_presets('lr')})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {tr.weight_decay})")
    g.add_argument("--warmup-epochs", type=float, help=f"linear warm-up before cosine decay (default {tr.warmup_epochs})")
    g.add_argument("--seed", type=int, help=f"seed of weights, batch order and augmentation (default {tr.seed})")
    g.add_argument("--device", help=f"auto (CUDA when present), cpu, cuda, cuda:1 ... (default {tr.device})")
    g.add_argument("--num-workers", type=int,
                   help="augmentation worker processes (default: none on the CPU, where in-process is faster; "
                        "4 on CUDA, which otherwise waits for data)")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="autocast precision: auto = bf16 where the hardware runs it natively (bf16 GPUs, CPUs "
                        "with AVX512-BF16/AMX: 1.6x faster training there, same or better Dice per minute), else "
                        "fp32; bf16 = demand it; fp32 = never autocast (default auto)")
    g.add_argument("--checkpoint-every-s", type=float, metavar="S",
                   help=f"write last.pt at the end of any epoch that would otherwise leave more than S seconds "
                        f"unsaved, and after the first and last epoch: a crash loses at most one epoch or about S "
                        f"seconds, whichever is larger; 0 = every epoch (default {tr.checkpoint_every_s:g})")
    g.add_argument("--threshold", type=float,
                   help=f"probability threshold for masks, used in validation and stored for inference "
                        f"(default {InferenceConfig().threshold})")
    g.add_argument("--augment-on", choices=list(AUGMENT_ON),
                   help="where augmentation runs: loader = pair by pair on the CPU (MONAI), batch = whole batches on "
                        "the training device (torch); auto = batch on CUDA, loader on the CPU (default auto)")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where the training cache of letterboxed uint8 scans goes, reused by every run, fold and "
                        "process on the same data and size (default: env HEMASEG_CACHE_DIR, else ~/.cache/hemaseg)")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="train without augmentation (flips, affine, intensity: " + ", ".join(
                       f"{k} {v}" for k, v in vars(AugmentConfig()).items() if k.endswith("_p") or "flip" in k) + ")")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (exit 2), like every other error of the CLI."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from hemaseg import __version__

    parser = _Parser(
        prog="hemaseg", description="Find and measure lesions in 2-D ultrasound.",
        epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
    parser.add_argument("--version", action="version", version=f"hemaseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also HEMASEG_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write synthetic ultrasound scans with known lesions",
                       description="Write OUT/images/N.png and OUT/mask/N.png: synthetic B-mode scans "
                                   "(speckle, tissue layers, lesions), deterministic for a seed.")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=200, help="number of scans (default 200)")
    p.add_argument("--size", type=_size, default=256, metavar="PX|HxW",
                   help="scan size: 256 for a square or 240x480 for height x width, e.g. a 2:1 skin scan "
                        "(default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed; scan i depends only on (seed, i) (default 0)")
    p.add_argument("--series", action="store_true",
                   help="write one patient's follow-up for `hemaseg track` instead: 8 visits (weeks 4-40) of a "
                        "hemangioma that grows, then involutes after treatment starts at week 16, as DICOM files "
                        "calibrated at 0.08 x 0.1 mm/pixel with their masks, and OUT/visits.csv with the true "
                        "sizes (--n and --size do not apply)")

    p = sub.add_parser("mix", help="combine dataset folders into one, keeping each one's groups",
                       description="Write OUT/images and OUT/mask as links to the scans of every DATA folder (named "
                                   "TAG__NAME, TAG = the folder's name), OUT/manifest.csv with each source's groups "
                                   "(patients, near-duplicates) kept apart, and each source's licence files in "
                                   "OUT/licenses/TAG/. Train on OUT like on any dataset.")
    p.add_argument("out", help="mixture folder to write")
    p.add_argument("data", nargs="+", help="dataset folders")
    p.add_argument("--overwrite", action="store_true", help="replace the mixture already in OUT")

    p = sub.add_parser("check", help="check a dataset folder and list every problem",
                       description="Count and measure DATA (images/ + mask/ or masks/, or an nnU-Net, LabelMe, CVAT "
                                   "or COCO dataset, detected from its contents) and report every problem as one "
                                   "line naming the file. Exit status 1 when problems were found.")
    p.add_argument("data", help="dataset folder (or a COCO .json / CVAT .xml file)")
    _add_data_flags(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("train", help="train a model on a dataset folder",
                       description="Train a UNet on DATA and write RUN/ (config.json, splits.json, best.pt, "
                                   "last.pt, metrics.csv, curves.png, summary.json). The data is read and checked "
                                   "before anything is written.")
    p.add_argument("data", nargs="?", help="dataset folder (with --resume: only if the data has moved)")
    p.add_argument("--out", help="run folder to write (must be empty or new, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--resume", metavar="RUN",
                   help="continue RUN from its last.pt with its own settings (same result as uninterrupted); "
                        "with --epochs N, extend it to N epochs")
    p.add_argument("--allow-changed-data", action="store_true",
                   help="with --resume: continue although the data's fingerprint differs from the run's (recorded "
                        "in RUN/config.json's history)")
    _add_train_flags(p)

    p = sub.add_parser("evaluate", help="score a trained model on a labelled dataset",
                       description="Predict every scan of DATA with RUN's model and write per-image metrics "
                                   "(per_image.csv), summary.json, report.html and, for pairs that could not be "
                                   "read, errors.csv (exit status 1).")
    p.add_argument("run", help="run folder, cross-validation run folder, checkpoint file, or 'ultrasound' (the "
                                "model shipped with hemaseg)")
    p.add_argument("data", help="labelled dataset folder")
    p.add_argument("--out", help="output folder (default RUN/eval)")
    p.add_argument("--split", choices=["all", "val", "train"], default="all",
                   help="score all of DATA (default), or only the run's val/train split of it")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first pair that cannot be read")
    _add_inference_flags(p)
    _add_data_flags(p)

    p = sub.add_parser("predict", help="segment new scans",
                       description="For each image: NAME_mask.png (0/255, original size), NAME_overlay.png "
                                   "(outline on the scan) and a row of predictions.csv with lesion measurements. "
                                   "A scan that cannot be read is listed in errors.csv and skipped (exit status 1). "
                                   "manifest.jsonl records each input done (--skip-existing resumes). Under torchrun "
                                   "the inputs are shared out across the processes, each one to one process.")
    p.add_argument("run", help="run folder, cross-validation run folder, checkpoint file, 'ultrasound' (the model "
                                "shipped with hemaseg) or 'litemedsam' (box-prompted: give --boxes)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--boxes", metavar="CSV",
                   help="with litemedsam: the boxes, one row per box, columns image,x0,y0,x1,y1 in the scan's "
                        "pixels (image: the scan's file name or stem); several boxes on a scan give the union")
    p.add_argument("--save-prob", action="store_true", help="also write NAME_prob.png (probability x 255)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first scan that cannot be read")
    p.add_argument("--skip-existing", action="store_true",
                   help="resume a job into --out: skip the inputs its manifest.jsonl records as done whose outputs "
                        "are all there (failed ones are tried again); refused if the model or settings differ")
    p.add_argument("--format", choices=["png", "labelme"], default="png",
                   help="png: masks, overlays and CSVs in --out (default); labelme: also NAME.json beside each "
                        "scan, each lesion's outline as a LabelMe polygon (imageData null) to correct in LabelMe "
                        "and train on, flagged unreviewed until unticked; DICOM scans go to --out/labelme/ as "
                        "NAME.png + NAME.json + NAME.calibration.json; an existing NAME.json is never overwritten")
    p.add_argument("--tolerance", type=float, metavar="PX",
                   help="with --format labelme: simplify the outlines so that every traced border point stays "
                        "within PX pixels of the polygon (default 1; 0 keeps every corner of the traced outline)")
    _add_measure_flags(p)
    _add_dicom_out_flags(p)
    _add_max_pixels_flag(p)
    _add_inference_flags(p)

    p = sub.add_parser("convert", help="write a dataset in another format: nnU-Net, COCO, CVAT, LabelMe, folder",
                       description="Read DATA (any format check reads) and write it to the new folder OUT as --to: "
                                   "nnunet (dataset.json, imagesTr/NAME_0000.png, labelsTr/NAME.png), coco "
                                   "(images/ + annotations.json, RLE), cvat (images/ + annotations.xml, CVAT for "
                                   "images 1.1 masks), labelme (NAME.png + NAME.json polygons) or folder (images/ + "
                                   "mask/). Masks round-trip exactly through nnunet, coco, cvat and folder; LabelMe "
                                   "polygons follow the outline within --tolerance. Scan names, manifest.csv and "
                                   "licence files are kept. OUT appears only when complete.")
    p.add_argument("data", help="dataset folder (or a COCO .json / CVAT .xml file)")
    p.add_argument("out", help="folder to write (new or empty, unless --overwrite); for nnU-Net name it "
                               "DatasetNNN_Name inside nnUNet_raw")
    p.add_argument("--to", required=True, choices=["nnunet", "coco", "cvat", "labelme", "folder"],
                   help="the format to write")
    p.add_argument("--folds", metavar="JSON",
                   help="with --to nnunet: hemaseg's folds (RUN/folds.json of hemaseg cv, or a run's splits.json) "
                        "written as OUT/splits_final.json, for nnU-Net to train on the same folds")
    p.add_argument("--tolerance", type=float, default=1.0, metavar="PX",
                   help="with --to labelme: outline tolerance in pixels (default 1; 0 = exact, holes filled)")
    p.add_argument("--overwrite", action="store_true", help="replace what is in OUT")
    _add_label_flag(p)
    _add_max_pixels_flag(p)

    p = sub.add_parser("measure", help="lesion size in mm: of predicted outlines, or of masks you have",
                       description="Per lesion and per scan: area, longest diameter, the diameter perpendicular "
                                   "to it, thickness along the image rows, depth below the skin line, perimeter, "
                                   "circularity and echogenicity (hemaseg.measure.morphometry), in mm where the "
                                   "scan is calibrated (DICOM ultrasound regions or pixel spacing, else "
                                   "--pixel-spacing) and in pixels otherwise, with the calibration's source. "
                                   "`measure RUN INPUT...` segments first (the outputs of predict); `measure "
                                   "--masks DIR INPUT...` measures masks DIR/NAME.png or DIR/NAME_mask.png.")
    p.add_argument("items", nargs="+", metavar="RUN|INPUT",
                   help="RUN (run folder, checkpoint or 'ultrasound') then image files or folders; with "
                        "--masks only image files or folders")
    p.add_argument("--masks", metavar="DIR", help="measure these masks instead of segmenting")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mask-threshold", type=float, metavar="F", help="binarise non-binary masks at F x dtype max")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first scan that cannot be read")
    _add_measure_flags(p)
    _add_dicom_out_flags(p)
    _add_max_pixels_flag(p)
    _add_inference_flags(p)

    p = sub.add_parser("track", help="follow lesions visit after visit: size, volume, growth or involution",
                       description="Measure every scan of TABLE (CSV: patient, lesion, site, date YYYY-MM-DD or "
                                   "age_weeks, image; optional plane, mask, pixel_spacing, birth_date, "
                                   "treatment_start; paths relative to the table) and follow each lesion (patient, "
                                   "lesion, site) over its visits: longest and perpendicular diameter, thickness, "
                                   "area, volume (pi/6 L W H, only with a transverse and a longitudinal scan of "
                                   "the visit), changes since the previous visit, the baseline and the smallest so "
                                   "far, and a status by the rules below (printed on every page). Writes "
                                   "OUT/visits.csv, scans.csv, rules.txt, curves/*.png and patients/KEY.html, one "
                                   "self-contained page per patient. Patients are named by a salted key unless "
                                   "--raw-patient-id. A row that cannot be used is one line of OUT/errors.csv "
                                   "naming its CSV line (exit status 1); the others are tracked.")
    p.add_argument("table", help="the visits table (CSV)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", metavar="RUN",
                   help="segment the scans whose row has no mask with RUN (run folder, cross-validation folder, "
                        "checkpoint or 'ultrasound'); without it such rows are errors")
    p.add_argument("--salt", help="secret for the patient keys (default: HEMASEG_SALT, else hemaseg-salt.txt "
                                  "beside the table, generated on the first run and reused for every --out; "
                                  "share the pages, not the salt)")
    p.add_argument("--raw-patient-id", action="store_true",
                   help="name patients by their ID in every output instead of a salted key")
    p.add_argument("--growth-pct", type=float, metavar="P",
                   help="growth: longest or perpendicular diameter up by >= P %% since the previous visit ... "
                        "(default 20)")
    p.add_argument("--growth-mm", type=float, metavar="MM", help="... and by >= MM mm (default 2)")
    p.add_argument("--involution-pct", type=float, metavar="P",
                   help="involution: longest diameter down by >= P %% from the reference (default 30) ...")
    p.add_argument("--volume-ratio", type=float, metavar="R",
                   help="... or volume < R x the reference volume, at visits with two planes; 0 turns it off "
                        "(default 0.75)")
    p.add_argument("--involution-reference", choices=["largest", "previous"],
                   help="the reference for involution: the largest earlier visit or the previous one "
                        "(default largest)")
    p.add_argument("--mask-threshold", type=float, metavar="F", help="binarise non-binary masks at F x dtype max")
    _add_max_pixels_flag(p)
    _add_inference_flags(p)

    p = sub.add_parser("export", help="export a trained model for use outside hemaseg (ONNX)",
                       description="Write RUN's best model as ONNX with dynamic batch/height/width and the "
                                   "preprocessing (letterbox size, normalisation, threshold) in its metadata. "
                                   "ONNX Runtime's output is checked against PyTorch before the file is written.")
    p.add_argument("run", help="run folder, checkpoint file, or 'ultrasound' (the model shipped with hemaseg)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default onnx)")
    p.add_argument("--out", help="file to write (default RUN/model.onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")

    p = sub.add_parser("cv", help="k-fold cross-validation: train every fold, evaluate out of fold",
                       description="Deterministic (group-aware) folds saved to RUN/folds.json; trains RUN/fold_K "
                                   "(resumable: rerun the same command), then evaluates out of fold with and without "
                                   "TTA, decides postprocessing and the needs-review threshold, and writes "
                                   "RUN/cv_summary.json, RUN/oof/ and RUN/report.html. predict/evaluate accept RUN "
                                   "as an ensemble.")
    p.add_argument("data", help="dataset folder")
    p.add_argument("--out", required=True, help="cross-validation run folder")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N folds at once, each in its own process (default 1). Pays on a GPU, whose card "
                        "one small UNet leaves mostly idle, or on a many-core CPU; --budget-minutes stays per fold")
    _add_train_flags(p)

    p = sub.add_parser("report", help="write the HTML report of a run",
                       description="A plain run: evaluate RUN on its validation split and write RUN/report.html. "
                                   "A cross-validation run: redraw RUN/report.html from what `hemaseg cv` wrote "
                                   "(no prediction, no decision made again).")
    p.add_argument("run", help="run folder or cross-validation run folder")
    p.add_argument("--data", help="dataset folder (default: the one the run was trained on)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")

    p = sub.add_parser("demo", help="synthesize, train, evaluate, predict and report in a few minutes",
                       description="End to end on built-in synthetic scans: writes OUT/data, OUT/test, OUT/run, "
                                   "OUT/eval, OUT/predictions and OUT/report.html (a rerun replaces them).")
    p.add_argument("--out", default="hemaseg-demo", help="output folder (default ./hemaseg-demo)")
    p.add_argument("--n", type=int, default=300, help="training + validation scans (default 300)")
    p.add_argument("--n-test", type=int, default=60, help="held-out test scans (default 60)")
    p.add_argument("--size", type=int, default=128, help="scan and training size (default 128)")
    p.add_argument("--budget-minutes", type=float, default=3.0,
                   help="training wall time; epochs are fitted to it (default 3)")
    p.add_argument("--epochs", type=int, help="train exactly this many epochs instead of a time budget")
    p.add_argument("--seed", type=int, default=0, help="seed of data and training (default 0)")

    p = sub.add_parser("serve", help="serve a model over HTTP, with a web page for people",
                       description="Serve RUN at http://HOST:PORT/: a web page to upload a scan and see its outline, "
                                   "and a versioned JSON API (POST /v1/segment, GET /v1/model, GET /healthz, "
                                   "GET /readyz; schema at /openapi.json). Uploads stay in memory and are not "
                                   "logged. Needs the serving dependencies (fastapi, uvicorn, python-multipart).")
    p.add_argument("run", help="run folder, cross-validation run folder, checkpoint file, or 'ultrasound' (the "
                                "model shipped with hemaseg)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                        "network, so set an API key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--allowed-hosts", metavar="NAME[,NAME...]",
                   help="host names clients may use to reach the service (the Host header), besides localhost, "
                        "127.0.0.1, ::1 and --host; e.g. scanner.local,10.0.0.5 or *.example.org ('*': any). "
                        "Other names get 400, so a web page cannot reach the service through DNS rebinding")
    p.add_argument("--workers", type=int, default=2,
                   help="threads that decode, run the model and encode at once, in one process with one copy "
                        "of the model (default 2)")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="group up to N requests that arrive together into one forward pass on one model "
                        "thread (default 1 = off: on a 2-core CPU a thread pool served more; measure yours "
                        "with benchmarks/service.py)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require KEY (any UTF-8 text) on every /v1 route (header X-API-Key or Authorization: Bearer "
                        "KEY); default: the HEMASEG_API_KEY environment variable, else no key; an empty key is "
                        "refused. The page, /healthz and /readyz stay open. Prefer the variable: a flag shows in "
                        "the process list")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB",
                   help="largest upload accepted, in MiB; larger ones get 413 (default 20)")
    p.add_argument("--max-pixels", type=int, default=16_000_000, metavar="N",
                   help="largest image accepted, width x height, checked before decoding; larger ones get 413 "
                        "(default 16000000)")
    p.add_argument("--keep-uploads", metavar="DIR",
                   help="save every upload to DIR under an id the server makes (logged with the request id); off "
                        "by default: nothing is written to disk. These files may hold patient data")
    _add_inference_flags(p)

    p = sub.add_parser("label", help="label scans on a web page and learn from the corrections",
                       description="Open http://HOST:PORT/ to label SCANS, most doubtful first: accept the model's "
                                   "outline, drag a box (LiteMedSAM), add or remove points, paint; each save writes "
                                   "the scan and its mask into DATASET (images/ + mask/, label_manifest.csv). The "
                                   "fine-tune button trains on the saved scans and keeps the new model only if it "
                                   "scores better on held-out ones.")
    p.add_argument("scans", nargs="+", help="scan files (PNG, JPEG, BMP, TIFF, DICOM) or folders of them")
    p.add_argument("--into", required=True, metavar="DATASET", help="dataset folder the labelled scans are saved in")
    p.add_argument("--model", metavar="RUN", help="run folder, checkpoint or 'ultrasound' that proposes outlines "
                                                  "(default: none, label from scratch)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765)")
    p.add_argument("--api-key", metavar="KEY", help="require KEY on every /api route; default: the HEMASEG_API_KEY "
                                                    "environment variable, else no key")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    return parser


def _train_overrides(args: argparse.Namespace) -> dict:
    """The training settings the user gave as flags (None = not given: the preset or config decides)."""
    from hemaseg.config import SETTINGS

    given = {k: v for k, v in vars(args).items() if k in SETTINGS and v is not None}
    if getattr(args, "augment", None) is False:
        given["augment"] = False
    return given


def _configure(args: argparse.Namespace):
    from hemaseg.data.plan import configure

    base = None
    if args.config:
        try:
            base = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{args.config}: not a readable config.json ({e})") from None
    return configure(args.data, args.preset, _train_overrides(args), base, progress=not args.quiet)




def cmd_synth(args) -> int:
    if args.series:
        from hemaseg.data.series import write_synthetic_series

        table = write_synthetic_series(args.out, seed=args.seed)
        if not args.quiet:
            print(f"wrote a synthetic follow-up (one patient, one lesion, 8 visits) to {args.out}; track it with "
                  f"`hemaseg track {table} --out OUT`")
        return 0
    from hemaseg.data.synth import write_synthetic_dataset

    t = time.perf_counter()
    out = write_synthetic_dataset(args.out, args.n, size=args.size, seed=args.seed, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {args.n} scans to {out}/images and {out}/mask in {time.perf_counter() - t:.1f} s")
    return 0


def cmd_mix(args) -> int:
    from hemaseg.data.dataset import write_mixture

    out = write_mixture(args.out, args.data, overwrite=args.overwrite)
    n = sum(1 for _ in (out / "images").iterdir())
    print(f"wrote a mixture of {n} scans from {len(args.data)} folder(s) to {out}")
    return 0


def cmd_check(args) -> int:
    from hemaseg.config import DataConfig
    from hemaseg.data.dataset import check_dataset

    report = check_dataset(args.data, mask_threshold=args.mask_threshold, progress=not args.quiet,
                           max_pixels=args.max_pixels or DataConfig.max_pixels, labels=args.labels)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def cmd_train(args) -> int:
    from hemaseg.config import RESUMABLE
    from hemaseg.training.train import fit, resumed_config

    if args.resume:
        others = sorted(flag(k) for k in _train_overrides(args) if k not in RESUMABLE)
        if others or args.config or args.out or args.overwrite:
            given = others + [f for f, v in (("--config", args.config), ("--out", args.out),
                                              ("--overwrite", args.overwrite)) if v]
            raise ValueError(f"--resume continues {args.resume} with its own settings; drop {', '.join(given)} "
                             f"(only {', '.join(flag(k) for k in RESUMABLE if k != 'root')} and DATA, for data "
                             "that moved, may be given)")
        run = Path(args.resume)
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"{run}: not a run folder (no config.json)")
        cfg = resumed_config(run, args.data)
        changes = {k: getattr(args, k) for k in ("device", "num_workers") if getattr(args, k) is not None}
        if changes:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
        summary = fit(cfg, run, resume=True, progress=not args.quiet, epochs=args.epochs,
                      allow_changed_data=args.allow_changed_data)
    else:
        if not args.data or not args.out:
            raise ValueError("train needs DATA and --out RUN (or --resume RUN)")
        if args.allow_changed_data:
            raise ValueError("--allow-changed-data only applies to --resume")
        cfg, data = _configure(args)
        summary = fit(cfg, args.out, progress=not args.quiet, dataset=data, overwrite=args.overwrite)
    if _speaks_for_the_job():
        print(f"best validation Dice {summary['best_val_dice']:.4f} at epoch {summary['best_epoch']} "
              f"of {summary['epochs']} ({summary['train_s']:.0f} s, {summary['images_seen']} images seen); "
              f"run written to {summary['run']}")
    return 0


def _speaks_for_the_job() -> bool:
    """Whether this process prints the command's results: always, except under torchrun, where rank 0
    speaks for every process (RANK is torchrun's; the CLI reads argv and the environment, nothing else)."""
    return os.environ.get("RANK", "0") == "0"


def _exit_status(errors: list, what: str, out) -> int:
    """1 with a line on stderr when some inputs failed (listed in OUT/errors.csv), else 0."""
    if not errors:
        return 0
    print(f"{len(errors)} {what} and were skipped: {Path(out) / 'errors.csv'}", file=sys.stderr)
    return 1


def _load(args, run=None):
    from hemaseg.device import select_device
    from hemaseg.inference.predictor import load_model
    from hemaseg.distributed import local_device

    from hemaseg.models.pretrained import PROMPTABLE

    device = local_device(select_device(args.device))  # under torchrun: this process's GPU
    run = run or args.run
    if run in PROMPTABLE and not Path(run).exists():  # a box-prompted model: its threshold goes to each prediction
        return load_model(run, device=device, tta=args.tta, backend=args.backend)
    return load_model(run, device=device, threshold=args.threshold, tta=args.tta,
                      postprocess=not args.no_postprocess, backend=args.backend)


def cmd_evaluate(args) -> int:
    from hemaseg.config import DataConfig
    from hemaseg.evaluation.evaluate import evaluate, format_summary, run_split_names, write_report

    names = None
    if args.split != "all":
        names = run_split_names(args.run, args.split)
        if names is None:
            raise FileNotFoundError(f"{args.run}/splits.json: needed for --split {args.split}")
    predictor = _load(args)
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent
    out = Path(args.out) if args.out else run_dir / "eval"
    # the run's own lesion labels unless --label says otherwise: score what the model was trained to find
    labels = args.labels or predictor.config.data.labels
    result = evaluate(predictor, args.data, out, names=names, mask_threshold=args.mask_threshold,
                      progress=not args.quiet, keep_masks=True, fail_fast=args.fail_fast,
                      max_pixels=args.max_pixels or DataConfig.max_pixels, labels=labels)
    report = write_report(out / "report.html", f"Evaluation of {run_dir} on {args.data} ({args.split})",
                          result["rows"], result["summary"], run_dir=run_dir)
    print(f"evaluation of {predictor.metadata['checkpoint']} on {args.data} ({args.split}; backend "
          f"{predictor.backend}):")
    print(format_summary(result["summary"]))
    print(f"per-image metrics: {out / 'per_image.csv'}; summary: {out / 'summary.json'}; report: {report}")
    return _exit_status(result["errors"], "pair(s) could not be read", out)


def cmd_predict(args) -> int:
    from hemaseg.config import DataConfig
    from hemaseg.data.listing import collect_inputs
    from hemaseg.inference.files import predict_files

    from hemaseg.models.pretrained import PROMPTABLE, resolve_model

    prompted = args.run in PROMPTABLE and not Path(args.run).exists()
    if getattr(args, "boxes", None) is not None and not prompted:
        raise ValueError(f"--boxes prompt a box-prompted model ({', '.join(PROMPTABLE)}), not {args.run}")
    if prompted and getattr(args, "boxes", None) is None:
        raise ValueError(f"{args.run} outlines what a box points at: give --boxes boxes.csv (image,x0,y0,x1,y1)")
    if not prompted and not resolve_model(args.run).exists():
        raise FileNotFoundError(f"{args.run}: no such run folder or checkpoint")
    labelme = getattr(args, "format", "png") == "labelme"  # `measure RUN ...` comes here without --format
    if getattr(args, "tolerance", None) is not None and not labelme:
        raise ValueError("--tolerance simplifies LabelMe outlines: it goes with --format labelme")
    tolerance = (1.0 if args.tolerance is None else args.tolerance) if labelme else None
    files = collect_inputs(args.inputs)  # a wrong argument fails before the model loads and --out exists
    if prompted:
        from hemaseg.inference.promptable import BoxedScans, box_index, find_boxes, read_boxes

        boxes = read_boxes(args.boxes)
        index = box_index(boxes)
        unboxed = [p.name for p in files if find_boxes(index, p.name) is None and find_boxes(index, p.stem) is None]
        if unboxed:
            raise ValueError(f"{args.boxes}: no box for {len(unboxed)} scan(s): {', '.join(unboxed[:5])}"
                             + (" ..." if len(unboxed) > 5 else ""))
        predictor = BoxedScans(_load(args), boxes, 0.5 if args.threshold is None else args.threshold)
    else:
        predictor = _load(args)
    result = predict_files(predictor, files, args.out, save_prob=args.save_prob, batch_size=args.batch_size,
                           progress=not args.quiet, fail_fast=args.fail_fast,
                           max_pixels=args.max_pixels or DataConfig.max_pixels,
                           pixel_spacing=args.pixel_spacing, frame=args.frame, dicom_sr=args.dicom_sr,
                           dicom_seg=args.dicom_seg, model_name=_model_label(args.run), labelme_tolerance=tolerance,
                           skip_existing=getattr(args, "skip_existing", False))
    if not _speaks_for_the_job():
        return 0
    found = sum(r["n_lesions"] > 0 for r in result.rows)
    print(f"segmented {len(result.rows)} image(s), {found} with a lesion (backend {predictor.backend}); masks, "
          f"overlays, predictions.csv, lesions.csv and manifest.jsonl in {args.out}"
          + (f" ({result.skipped} input(s) done before, skipped)" if result.skipped else ""))
    if labelme:
        from hemaseg.data.formats import UNREVIEWED_FLAG
        from hemaseg.inference.files import LABELME_DIR

        folder = Path(args.out) / LABELME_DIR
        in_out = sum(p.parent == folder for p in result.labelme)
        where = [f"{len(result.labelme) - in_out} beside their scans"] if len(result.labelme) > in_out else []
        where += [f"{in_out} DICOM scan(s) as NAME.png + NAME.json + NAME.calibration.json in {folder}"] if in_out else []
        print(f"LabelMe outlines (tolerance {tolerance:g} px), marked unreviewed (file flag {UNREVIEWED_FLAG}): "
              + ("; ".join(where) or "none written")
              + (f"; {len(result.labelme_kept)} existing NAME.json kept (they may hold corrections)"
                 if result.labelme_kept else "")
              + f"; correct them in LabelMe, untick {UNREVIEWED_FLAG} on each you checked, then: hemaseg train "
              + "FOLDER" + (f" (for the DICOM scans: hemaseg train {folder})" if in_out else ""))
    return _exit_status(result.errors, "image(s) could not be read", args.out)


def cmd_measure(args) -> int:
    from hemaseg.config import DataConfig

    if args.masks is None:
        if len(args.items) < 2:
            raise ValueError("measure: give RUN then the scans (or --masks DIR and the scans)")
        args.run, args.inputs, args.save_prob, args.batch_size = args.items[0], args.items[1:], False, 8
        return cmd_predict(args)
    if args.dicom_seg:
        raise ValueError("--dicom-seg is for outlines hemaseg draws (measure RUN ..., predict), not --masks: a "
                         "DICOM SEG would call your outlines AUTOMATIC; --dicom-sr works with --masks")
    from hemaseg.measure.files import measure_files

    result = measure_files(args.items, args.masks, args.out, args.pixel_spacing, args.frame, args.fail_fast,
                           args.mask_threshold, args.max_pixels or DataConfig.max_pixels, dicom_sr=args.dicom_sr)
    mm = sum(r["spacing_source"] is not None for r in result.rows)
    print(f"measured {len(result.rows)} scan(s) ({mm} in mm, {len(result.rows) - mm} in pixels), "
          f"{len(result.lesions)} lesion(s): measurements.csv and lesions.csv in {args.out}")
    return _exit_status(result.errors, "scan(s) could not be measured", args.out)


def cmd_track(args) -> int:
    from hemaseg.config import DataConfig
    from hemaseg.measure.track import TrackRules, track

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrackRules) if getattr(args, f.name) is not None}
    rules = TrackRules(**given)  # a bad value names its flag (ConfigError)
    if not Path(args.table).is_file():  # before a model loads
        raise FileNotFoundError(f"{args.table}: no such table (a CSV file)")
    predictor = _load(args, args.model) if args.model else None
    salt = args.salt if args.salt is not None else os.environ.get("HEMASEG_SALT") or None
    result = track(args.table, args.out, predictor=predictor, rules=rules, salt=salt,
                   raw_patient_id=args.raw_patient_id, mask_threshold=args.mask_threshold,
                   max_pixels=args.max_pixels or DataConfig.max_pixels)
    print(f"tracked {len(result.curves)} lesion(s) of {len(result.pages)} patient(s) over {len(result.visits)} "
          f"visit(s): index.html, visits.csv, scans.csv, curves/ and patients/ in {args.out}")
    if not args.quiet:
        print("status rules:")
        for line in rules.describe():
            print(f"  {line}")
    return _exit_status(result.errors, "row(s) could not be tracked", args.out)


def cmd_convert(args) -> int:
    from hemaseg.config import DataConfig
    from hemaseg.data.convert import convert

    result = convert(args.data, args.to, args.out, labels=args.labels, folds=args.folds, tolerance=args.tolerance,
                     overwrite=args.overwrite, max_pixels=args.max_pixels or DataConfig.max_pixels,
                     progress=not args.quiet)
    print(f"wrote {result.n_cases} scan(s) with {result.n_lesions} lesion(s) as {result.format} to {result.out}"
          + (f"; nnU-Net folds in {result.splits} (copy it to nnUNet_preprocessed/{result.out.name}/ after "
             "nnUNetv2_plan_and_preprocess)" if result.splits else ""))
    return 0


def cmd_export(args) -> int:
    from hemaseg.inference.export import export_onnx

    result = export_onnx(args.run, args.out, opset=args.opset)
    print(f"wrote {result.path} ({result.n_bytes / 1e6:.1f} MB); onnxruntime vs torch max abs diff on logits "
          f"{result.max_abs_diff:.2e}")
    return 0


def cmd_cv(args) -> int:
    from hemaseg.crossval.cv import run_cv

    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    cfg, data = _configure(args)
    result = run_cv(cfg, args.out, folds=args.folds, seed=args.fold_seed, progress=not args.quiet,
                    jobs=args.jobs, dataset=data)
    if not _speaks_for_the_job():
        return 0
    s = result["summary"]
    print(f"out-of-fold Dice: plain {s['oof_dice_plain']:.4f}, TTA {s['oof_dice_tta']:.4f}, "
          f"final ({s['inference']} + postprocessing) {s['oof_dice_final']:.4f}; per fold "
          + ", ".join(f"{d:.3f}" for d in s["fold_dice"])
          + f" (mean {s['fold_dice_mean']:.4f} +- {s['fold_dice_sd']:.4f})")
    print(f"postprocessing kept: {s['postprocessing']}; summary in {Path(args.out) / 'cv_summary.json'}")
    return 0


def cmd_report(args) -> int:
    from hemaseg.config import RunConfig

    run = Path(args.run)
    if (run / "folds.json").is_file():
        from hemaseg.crossval.report import write_cv_report

        write_cv_report(run, args.data)
    else:
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"{run}: not a run folder (no config.json)")
        data = args.data or RunConfig.load(run / "config.json").data.root
        ns = build_parser().parse_args(["evaluate", str(run), str(data), "--out", str(run / "eval"), "--split", "val",
                                        "--device", args.device])
        ns.quiet = args.quiet
        cmd_evaluate(ns)
        from hemaseg.io import atomic_write_bytes

        atomic_write_bytes(run / "report.html", (run / "eval" / "report.html").read_bytes())
    print(f"report: {run / 'report.html'}")
    return 0


def cmd_demo(args) -> int:
    from hemaseg.demo import run_demo

    paths = run_demo(args.out, n=args.n, n_test=args.n_test, size=args.size, epochs=args.epochs, seed=args.seed,
                     budget_minutes=None if args.epochs else args.budget_minutes, progress=not args.quiet)
    print("demo finished; everything is under", args.out)
    for what, path in paths.items():
        print(f"  {what:<12} {path}")
    return 0


def cmd_serve(args) -> int:
    from hemaseg.extras import require

    uvicorn = require("uvicorn", "hemaseg serve")
    require("fastapi", "hemaseg serve")
    from hemaseg.serve import Settings, create_app

    api_key = args.api_key if args.api_key is not None else os.environ.get("HEMASEG_API_KEY")
    settings = Settings(
        api_key=api_key, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
        keep_uploads=Path(args.keep_uploads) if args.keep_uploads else None, workers=args.workers,
        max_batch=args.max_batch, device=args.device, threshold=args.threshold, backend=args.backend,
        tta=args.tta, postprocess=not args.no_postprocess,
        allowed_hosts=tuple(h.strip() for h in (args.allowed_hosts or "").split(",") if h.strip()) + (args.host,),
    )
    app = create_app(args.run, settings)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can upload scans", args.host)
    if args.host in ("0.0.0.0", "::") and not args.allowed_hosts:
        log.warning("listening on every address of this machine, but only the Host names localhost, 127.0.0.1 "
                    "and ::1 are served: give the names clients use with --allowed-hosts")
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.run} at http://{host}:{args.port}/ (API /v1/segment; schema /openapi.json)"
          + ("; API key required" if api_key else ""))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def cmd_label(args) -> int:
    from hemaseg.extras import require

    uvicorn = require("uvicorn", "hemaseg label")
    require("fastapi", "hemaseg label")
    from hemaseg.label import LabelSettings, create_app
    from hemaseg.label.app import LOOPBACK_HOSTS, loopback

    api_key = args.api_key if args.api_key is not None else os.environ.get("HEMASEG_API_KEY")
    settings = LabelSettings(api_key=api_key, device=args.device,
                             allowed_hosts=LOOPBACK_HOSTS if loopback(args.host) else None)
    app = create_app(args.scans, args.into, args.model, settings)
    if api_key is None and not loopback(args.host):
        log.warning("listening on %s without an API key: anyone who can reach it can read and label scans", args.host)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"labelling {len(app.state.session.worklist)} scans into {args.into} at http://{host}:{args.port}/")
    # no access log: its URLs name the scans, and a scan's file name may be a patient's
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info", access_log=False)
    return 0


COMMANDS = {"synth": cmd_synth, "mix": cmd_mix, "check": cmd_check, "train": cmd_train, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "measure": cmd_measure, "cv": cmd_cv, "report": cmd_report, "demo": cmd_demo,
            "export": cmd_export, "serve": cmd_serve, "track": cmd_track,
            "convert": cmd_convert, "label": cmd_label}


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind an exception, if any (torch wraps a failed write in a RuntimeError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


#: what to do after a full disk stopped a command ('': every other command)
DISK_FULL_HINTS = {
    "train": "free some space, then `hemaseg train --resume RUN` continues from the last epoch saved; a run "
             "stopped before its first checkpoint was removed, so start it again",
    "cv": "free some space and run the same command again: finished folds are kept",
    "predict": "free some space, then rerun with --skip-existing: the scans listed in predictions.csv are kept",
    "track": "free some space and run the command again; nothing half-written was left in --out",
    "": "free some space and run the command again",
}


def error_line(command: str, e: BaseException) -> tuple[str, int]:
    """(one line for the user, exit code) for an exception that reached the CLI."""
    from hemaseg.config import ConfigError
    from hemaseg.data.pixels import DataError
    from hemaseg.extras import MissingExtra

    if isinstance(e, ConfigError):
        return f"{flag(e.key)} {e.problem}", 2
    if isinstance(e, DataError) and e.code != "unreadable":  # a broken file, whatever PIL raised inside
        return str(e).splitlines()[0], 2
    os_error = _os_error(e)
    if os_error is not None and not isinstance(os_error, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        where = os_error.filename or ""
        what = os_error.strerror or str(os_error)
        if os_error.errno == errno.ENOSPC:
            what += f" ({DISK_FULL_HINTS.get(command, DISK_FULL_HINTS[''])})"
        return (f"{where}: {what}" if where else what), 3
    if isinstance(e, MissingExtra):  # an optional part not installed: the message names the pip command
        return str(e), 2
    if isinstance(e, ValueError | FileNotFoundError | NotADirectoryError | IsADirectoryError | KeyError):
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        return text, 2
    return f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (run with --debug for the traceback)", 4


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("HEMASEG_DEBUG", "") not in ("", "0")
    # Before any command imports torch: idle OpenMP threads sleep instead of spinning. On a shared CPU the
    # spinning threads of two busy processes starve each other (10-50x slower inference and training,
    # benchmarks/speed.py); on an idle CPU sleeping costs nothing measurable. An explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    quiet = args.quiet or not _speaks_for_the_job()  # torchrun's other ranks: warnings only
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"hemaseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line and a documented exit code
        if debug:
            raise
        line, code = error_line(args.command, e)
        print(f"hemaseg {args.command}: error: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
