"""`hemaseg convert DATA --to FORMAT OUT`: any dataset hemaseg reads, written as another.

The scans are read through `dataset.find_samples` / `load_sample` (so a LabelMe or COCO source gives the
masks training would see) and written as:

    folder   OUT/images/NAME.ext, OUT/mask/NAME.png (0/255)
    nnunet   OUT/dataset.json, OUT/imagesTr/NAME_0000.png, OUT/labelsTr/NAME.png (0/1)
             [+ OUT/splits_final.json from hemaseg's folds]
    coco     OUT/images/NAME.ext, OUT/annotations.json (one RLE annotation per lesion)
    cvat     OUT/images/NAME.ext, OUT/annotations.xml (one <mask> RLE per lesion)
    labelme  OUT/NAME.ext + OUT/NAME.json (one polygon per lesion), OUT/labels.txt

Round trips are exact for folder, nnunet, coco and cvat: the written files read back to the same masks,
pixel for pixel (RLE and PNG are pixel formats; lesions are 8-connected components, `hemaseg.lesions`).
LabelMe is for correcting outlines by hand: its polygons follow the traced outline within `tolerance` px
and lesion holes are filled (`formats.lesion_outlines`). Image files are copied byte for byte, except for
nnU-Net, which needs one-channel PNG: a gray PNG is copied, anything else is written as 8-bit (or, when the
scan has more levels, 16-bit) gray PNG of exactly the pixels hemaseg decodes. Scan names are kept, and
`manifest.csv` (groups) and the licence files are copied, so folds made on either side match.

OUT is written in a temporary folder beside it and renamed into place when complete: an interrupted
convert leaves no half dataset (nor, with --overwrite, a half-replaced one).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hemaseg.data.dataset import LICENCE_FILES, Sample, find_samples, load_sample
from hemaseg.data.formats import (
    LABELME_TOLERANCE_PX,
    LESION_LABEL,
    coco_rle,
    cvat_rle,
    detect_format,
    labelme_document,
)
from hemaseg.data.images import MAX_PIXELS_DEFAULT, DataError, decode_image, open_image
from hemaseg.data.pixels import read_file
from hemaseg.io import atomic_write_bytes, atomic_write_text, png_bytes
from hemaseg.lesions import label_lesions

log = logging.getLogger(__name__)

TARGETS = {
    "folder": "images/ + mask/ (PNG masks 0/255)",
    "nnunet": "nnU-Net v2 raw: dataset.json, imagesTr/NAME_0000.png, labelsTr/NAME.png (+ splits_final.json)",
    "coco": "images/ + annotations.json (one RLE annotation per lesion: exact)",
    "cvat": "images/ + annotations.xml, CVAT for images 1.1 (one <mask> per lesion: exact)",
    "labelme": "NAME.ext + NAME.json beside it (polygons within the tolerance, for correction by hand)",
}
_NNUNET_NAME = re.compile(r"^Dataset\d{3}_\w+$")


@dataclass
class ConvertResult:
    out: Path
    format: str
    n_cases: int
    n_lesions: int
    splits: Path | None = None  # nnU-Net splits_final.json, when folds were given


def read_folds(path: str | os.PathLike) -> list[dict[str, list[str]]]:
    """Folds as [{"train": [...], "val": [...]}, ...] from hemaseg cv's folds.json, a train run's
    splits.json (one fold) or an nnU-Net splits_final.json; DataError naming the file if malformed."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(path, f"cannot read folds file: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"not valid JSON ({e})") from None
    folds = doc.get("folds") if isinstance(doc, dict) and "folds" in doc else [doc] if isinstance(doc, dict) else doc
    if not isinstance(folds, list) or not folds:
        raise DataError(path, "expected hemaseg's folds.json ({\"folds\": [...]}), a splits.json ({\"train\", "
                              "\"val\"}) or nnU-Net's splits_final.json ([{\"train\", \"val\"}, ...])")
    for k, fold in enumerate(folds):
        if not isinstance(fold, dict) or not all(isinstance(fold.get(p), list) and all(isinstance(n, str) for n in
                                                                                      fold[p]) for p in ("train", "val")):
            raise DataError(path, f"fold {k} needs \"train\" and \"val\" lists of scan names")
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in folds]


def convert(data: str | os.PathLike, to: str, out: str | os.PathLike, labels: Sequence[str] | None = None,
            folds: str | os.PathLike | None = None, tolerance: float = LABELME_TOLERANCE_PX, overwrite: bool = False,
            max_pixels: int | None = MAX_PIXELS_DEFAULT, progress: bool = False) -> ConvertResult:
    """Write the dataset DATA (any format `find_samples` reads; `labels` picks its lesion labels) as `to`
    in the new folder `out`. `folds` (nnunet only): hemaseg's folds.json or splits.json, written as nnU-Net's
    splits_final.json so both train on the same folds. `tolerance`: px, for LabelMe outlines. The first
    broken scan raises its DataError (`hemaseg check DATA` lists them all) before OUT exists."""
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}; got {to!r}")
    if folds is not None and to != "nnunet":
        raise ValueError("--folds writes nnU-Net's splits_final.json: it goes with --to nnunet")
    out = Path(out)
    source = detect_format(data)
    _check_out(out, source.root, Path(data), overwrite)
    samples = find_samples(data, labels=labels)
    if not samples:
        raise DataError(data, "no scans to convert")
    split = read_folds(folds) if folds is not None else None
    if split is not None:
        _check_folds(split, [s.name for s in samples], Path(folds))
    label = _label_name(samples)

    tmp = out.parent / f".{out.name}.converting-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        writer = _WRITERS[to](tmp, label, tolerance)
        n_lesions = 0
        for sample in tqdm(samples, desc="convert", unit="img", disable=not progress, leave=False):
            _, mask = load_sample(sample, max_pixels=max_pixels)
            n_lesions += writer.add(sample, read_file(sample.image_path), mask, max_pixels)
        writer.finish(source_name=str(data), name=out.name)
        splits = None
        if split is not None:
            splits = out / "splits_final.json"
            atomic_write_text(tmp / "splits_final.json", json.dumps(split, indent=1) + "\n")
        _copy_extras(source.root, tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if to == "nnunet" and not _NNUNET_NAME.match(out.name):
        log.warning("%s: nnU-Net finds datasets by folder name DatasetNNN_Name (e.g. Dataset501_Lesions) under "
                    "nnUNet_raw; rename the folder before nnUNetv2_plan_and_preprocess", out)
    return ConvertResult(out, to, len(samples), n_lesions, splits)


def _check_out(out: Path, root: Path, data: Path, overwrite: bool) -> None:
    r, o = root.resolve(), out.resolve()
    if o == r or o.is_relative_to(r) or r.is_relative_to(o):
        raise ValueError(f"{out}: OUT must be a folder outside DATA ({data}), and not contain it")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: OUT is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(out, "the output folder is not empty; pass --overwrite to replace it")


def _check_folds(split: list[dict], names: list[str], path: Path) -> None:
    known = set(names)
    listed = {n for fold in split for part in ("train", "val") for n in fold[part]}
    unknown = sorted(listed - known)
    if unknown:
        raise DataError(path, f"names {len(unknown)} scan(s) not in the dataset, e.g. {unknown[0]!r}: the folds were "
                              "made for other data")
    missing = sorted(known - listed)
    if missing:
        raise DataError(path, f"{len(missing)} scan(s) of the dataset are in no fold, e.g. {missing[0]!r}: the folds "
                              "were made for other data (rerun hemaseg cv, or convert the data they were made on)")


def _label_name(samples: Sequence[Sample]) -> str:
    """The source's one lesion label when it had one (so a LabelMe "hemangioma" stays that), else "lesion"."""
    chosen = {s.annotation.labels for s in samples if s.annotation is not None}
    if len(chosen) == 1:
        (only,) = chosen
        if len(only) == 1:
            return only[0]
    return LESION_LABEL


def _copy_extras(root: Path, tmp: Path) -> None:
    """Groups and licences travel with the scans (names are kept, so manifest.csv still applies)."""
    for name in ("manifest.csv", *LICENCE_FILES):
        src = root / name
        if src.is_file() and not (tmp / name).exists():
            atomic_write_bytes(tmp / name, src.read_bytes())


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old OUT is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _image_name(sample: Sample) -> str:
    return f"{sample.name}{sample.image_path.suffix.lower()}"


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """Each lesion (8-connected, `hemaseg.lesions`) as its own bool HxW mask, in label order."""
    labels, n = label_lesions(mask)
    return [labels == k for k in range(1, n + 1)]


def _gray_png(data: bytes, path: Path, max_pixels: int | None) -> bytes:
    """One-channel PNG bytes of a scan with the pixels hemaseg decodes: a gray PNG as it is, else 8-bit
    when the decoded levels are multiples of 1/255, else 16-bit (rounded, logged, when even that is not exact)."""
    with open_image(data, max_pixels, name=path) as im:
        if im.format == "PNG" and (im.mode == "L" or im.mode.startswith("I;16")):
            return data
    gray = decode_image(data, max_pixels, name=path).gray
    for top, dtype in ((255, np.uint8), (65535, np.uint16)):
        q = np.round(gray.astype(np.float64) * top)
        if np.array_equal((q / top).astype(np.float32), gray):
            return png_bytes(q.astype(dtype))
    log.warning("%s: its gray levels are not 16-bit values; written as 16-bit PNG, rounded", path)
    return png_bytes(np.round(gray.astype(np.float64) * 65535).astype(np.uint16))


class _Writer:
    def __init__(self, out: Path, label: str, tolerance: float):
        self.out, self.label, self.tolerance = out, label, tolerance

    def add(self, sample: Sample, image: bytes, mask: np.ndarray, max_pixels: int | None) -> int:
        raise NotImplementedError

    def finish(self, source_name: str, name: str) -> None:
        """Write what describes the whole dataset, after every scan (`name`: OUT's folder name)."""


class _FolderWriter(_Writer):
    def add(self, sample, image, mask, max_pixels):
        atomic_write_bytes(self.out / "images" / _image_name(sample), image)
        atomic_write_bytes(self.out / "mask" / f"{sample.name}.png", png_bytes(mask.astype(np.uint8) * 255))
        return label_lesions(mask)[1]


class _NnunetWriter(_Writer):
    def __init__(self, *args):
        super().__init__(*args)
        self.n = 0

    def add(self, sample, image, mask, max_pixels):
        atomic_write_bytes(self.out / "imagesTr" / f"{sample.name}_0000.png", _gray_png(image, sample.image_path,
                                                                                         max_pixels))
        atomic_write_bytes(self.out / "labelsTr" / f"{sample.name}.png", png_bytes(mask.astype(np.uint8)))
        self.n += 1
        return label_lesions(mask)[1]

    def finish(self, source_name, name):
        spec = {"channel_names": {"0": "ultrasound"}, "labels": {"background": 0, self.label: 1},
                "numTraining": self.n, "file_ending": ".png", "name": name,
                "description": f"converted by hemaseg from {source_name}"}
        atomic_write_text(self.out / "dataset.json", json.dumps(spec, indent=2) + "\n")


class _CocoWriter(_Writer):
    def __init__(self, *args):
        super().__init__(*args)
        self.images, self.annotations = [], []

    def add(self, sample, image, mask, max_pixels):
        name = _image_name(sample)
        atomic_write_bytes(self.out / "images" / name, image)
        image_id = len(self.images) + 1
        h, w = mask.shape
        self.images.append({"id": image_id, "file_name": name, "width": int(w), "height": int(h)})
        parts = _components(mask)
        for part in parts:
            ys, xs = np.nonzero(part)
            x0, y0 = int(xs.min()), int(ys.min())
            self.annotations.append({
                "id": len(self.annotations) + 1, "image_id": image_id, "category_id": 1,
                "segmentation": coco_rle(part), "area": int(part.sum()),
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1], "iscrowd": 0})
        return len(parts)

    def finish(self, source_name, name):
        doc = {"info": {"description": f"converted by hemaseg from {source_name}"}, "licenses": [],
               "images": self.images, "annotations": self.annotations,
               "categories": [{"id": 1, "name": self.label, "supercategory": self.label}]}
        atomic_write_text(self.out / "annotations.json", json.dumps(doc, indent=1) + "\n")


class _CvatWriter(_Writer):
    def __init__(self, *args):
        super().__init__(*args)
        self.root = ET.Element("annotations")
        ET.SubElement(self.root, "version").text = "1.1"
        task = ET.SubElement(ET.SubElement(self.root, "meta"), "task")
        self.size = ET.SubElement(task, "size")
        ET.SubElement(task, "mode").text = "annotation"
        label = ET.SubElement(ET.SubElement(task, "labels"), "label")
        ET.SubElement(label, "name").text = self.label
        ET.SubElement(label, "color").text = "#fa3253"
        ET.SubElement(label, "type").text = "mask"
        ET.SubElement(label, "attributes")
        self.n = 0

    def add(self, sample, image, mask, max_pixels):
        name = _image_name(sample)
        atomic_write_bytes(self.out / "images" / name, image)
        h, w = mask.shape
        el = ET.SubElement(self.root, "image", {"id": str(self.n), "name": name, "width": str(w), "height": str(h)})
        self.n += 1
        parts = _components(mask)
        for part in parts:
            counts, left, top, width, height = cvat_rle(part)
            ET.SubElement(el, "mask", {"label": self.label, "source": "manual", "occluded": "0",
                                       "rle": ", ".join(map(str, counts)), "left": str(left), "top": str(top),
                                       "width": str(width), "height": str(height), "z_order": "0"})
        return len(parts)

    def finish(self, source_name, name):
        self.size.text = str(self.n)
        ET.indent(self.root)
        atomic_write_bytes(self.out / "annotations.xml", ET.tostring(self.root, encoding="utf-8", xml_declaration=True))


class _LabelmeWriter(_Writer):
    def add(self, sample, image, mask, max_pixels):
        name = _image_name(sample)
        atomic_write_bytes(self.out / name, image)
        doc = labelme_document(mask, name, self.tolerance, self.label)
        atomic_write_text(self.out / f"{sample.name}.json", json.dumps(doc, indent=2) + "\n")
        return len(doc["shapes"])

    def finish(self, source_name, name):
        atomic_write_text(self.out / "labels.txt", f"__ignore__\n_background_\n{self.label}\n")


_WRITERS = {"folder": _FolderWriter, "nnunet": _NnunetWriter, "coco": _CocoWriter, "cvat": _CvatWriter,
            "labelme": _LabelmeWriter}
