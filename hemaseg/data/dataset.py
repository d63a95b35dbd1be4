"""Find image/mask pairs, read them, check them, and split them reproducibly.

A dataset is a folder ``root/`` holding ``images/`` and ``mask/`` (or ``masks/``). Images and masks pair
by file stem: ``mask/12.png`` or ``mask/12_mask.png`` for ``images/12.jpg``; several
``12_mask_1.png``, ``12_mask_2.png`` are merged with OR (the original BUSI layout).

DATA may instead be an nnU-Net v2 raw folder, LabelMe JSON beside the images, a CVAT for images 1.1 XML or
a COCO JSON (`formats`, detected from the folder's contents). Their scans are Samples with an
`Annotation` instead of mask files; `load_sample`, `load_dataset` and `check_dataset` turn it into a mask
through `formats.read_annotation`, so every command sees the same masks, and the annotation file's bytes
feed the fingerprint like mask files do.

Every problem with a file is a :class:`DataError` whose message starts with the file's path, so a
user can go straight to the file. Arrays are 2-D: images float32 HxW in [0, 1], masks bool HxW.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from hemaseg.io import atomic_write_bytes, atomic_write_text, plain_cell, save_png, write_csv
from hemaseg.config import DatasetStats
from hemaseg.data.listing import (  # noqa: F401 - re-exported
    MASK_DIR_NAMES,
    SUSPECT,
    list_images,
    natural_key,
    natural_sorted,
)
from hemaseg.data.pixels import read_file
from hemaseg.data.images import IMAGE_SUFFIXES, MAX_PIXELS_DEFAULT, DataError, decode_image, open_image, read_image

if TYPE_CHECKING:
    from hemaseg.data.formats import Annotation

logger = logging.getLogger(__name__)

NAME_COLUMNS = ("name", "image", "filename")
GROUP_COLUMNS = ("group", "dup_group", "patient")
MANIFEST_GROUP_COLUMNS = ("group", "dup_group", "patient")

# `NAME_mask.png` and `NAME_mask_3.png`; group 1 is the image stem.
_MASK_STEM = re.compile(r"^(.+?)_mask(?:_(\d+))?$", re.IGNORECASE)
_MAX_LISTED_VALUES = 6


@dataclass(frozen=True)
class Sample:
    """One image and its mask file(s), merged with OR; or, for the annotation formats (`formats`), one
    image and the `Annotation` its mask is drawn from (then `mask_paths` is empty)."""

    name: str  # file stem of the image, e.g. "12" or "benign_0001"
    image_path: Path
    mask_paths: tuple[Path, ...] = ()
    annotation: Annotation | None = None





# --------------------------------------------------------------------------------------------- pairing


def find_dataset_dirs(root: str | os.PathLike) -> tuple[Path, Path]:
    """Return ``(images_dir, masks_dir)`` under root; the masks folder is ``mask/`` or ``masks/``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder does not exist")
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DataError(root, "no images/ folder (a dataset needs images/ and mask/ side by side)")
    found = [root / n for n in MASK_DIR_NAMES if (root / n).is_dir()]
    if not found:
        raise DataError(root, "no mask/ or masks/ folder next to images/")
    if len(found) > 1:
        raise DataError(root, "both mask/ and masks/ exist; keep one so it is clear which masks to use")
    return images_dir, found[0]


@dataclass
class _Pairing:
    samples: list[Sample]
    problems: list[DataError]
    n_images: int
    n_masks: int  # mask files, or annotation files / annotated entries (formats.Found.n_annotations)
    format: str = "folder"
    lesion_labels: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)


def _pair(root: str | os.PathLike, labels: Sequence[str] | None = None) -> _Pairing:
    """Pair images with masks (or annotations) and collect every pairing problem instead of stopping at the
    first. `labels`: which labels count as lesion, for the annotation formats only."""
    from hemaseg.data import formats

    detected = formats.detect_format(root)
    if detected.format != "folder":
        found = formats.find_cases(detected, labels)
        samples = [Sample(name, image, annotation=ann) for name, image, ann in found.cases]
        samples.sort(key=lambda s: natural_key(s.name))
        problems = sorted(found.problems, key=lambda e: natural_key(str(e.path)))
        return _Pairing(samples, problems, found.n_images, found.n_annotations, found.format,
                        found.lesion_labels, found.notes)
    if labels:
        raise DataError(root, "--label picks labels of nnU-Net, LabelMe, CVAT or COCO annotations; this is an "
                              "images/ + mask/ dataset, whose masks have one label")
    images_dir, masks_dir = find_dataset_dirs(root)
    broken: dict[Path, DataError] = {}  # links that lead nowhere: paired like files, never made samples
    images, masks = list_images(images_dir, broken), list_images(masks_dir, broken)
    problems: list[DataError] = list(broken.values())
    supported = " ".join(IMAGE_SUFFIXES)
    if not images:
        problems.append(DataError(images_dir, f"folder has no images (supported: {supported})"))
    if not masks:
        problems.append(DataError(masks_dir, f"folder has no masks (supported: {supported})"))

    by_stem: dict[str, Path] = {}
    for path in images:
        if path.stem in by_stem:
            problems.append(
                DataError(
                    path,
                    f"two images share the name {path.stem!r} "
                    f"(also {by_stem[path.stem].name}); rename or remove one",
                )
            )
            continue
        by_stem[path.stem] = path

    masks_of: dict[str, list[Path]] = {stem: [] for stem in by_stem}
    for path in masks:
        if path.stem in masks_of:  # exact stem first, so an image really called "x_mask" still pairs
            masks_of[path.stem].append(path)
            continue
        m = _MASK_STEM.match(path.stem)
        if m and m.group(1) in masks_of:
            masks_of[m.group(1)].append(path)
        elif images:  # an empty images folder is already one problem; don't add one per mask
            stem = m.group(1) if m else path.stem
            problem = f"mask without image (no {images_dir.name}/{stem}.* for it; names must match by stem)"
            problems.append(DataError(path, problem))

    samples = []
    for stem, image_path in by_stem.items():
        found = masks_of[stem]
        if image_path in broken or any(p in broken for p in found):
            continue  # its broken link is the problem; a part of a mask missing would be a wrong mask
        if found:
            samples.append(Sample(stem, image_path, tuple(sorted(found, key=lambda p: natural_key(p.name)))))
        elif masks:  # an empty mask folder is already one problem; don't add one per image
            problems.append(
                DataError(
                    image_path,
                    f"image without mask (expected {masks_dir.name}/{stem}.png "
                    f"or {masks_dir.name}/{stem}_mask.png)",
                )
            )
    # Report in file order so the first problem is the same one every run.
    problems.sort(key=lambda e: natural_key(str(e.path)))
    return _Pairing(samples, problems, len(images), len(masks))


def find_samples(root: str | os.PathLike, strict: bool = True, labels: Sequence[str] | None = None) -> list[Sample]:
    """Image/mask pairs under root, paired by file stem and sorted naturally (2 before 10).

    Supports PNG, JPEG, BMP and TIFF (.png .jpg .jpeg .bmp .tif .tiff, any case). A mask is named like
    its image (``mask/12.png`` for ``images/12.jpg``), or ``12_mask.png``, or several ``12_mask_1.png``,
    ``12_mask_2.png`` that are merged. ``strict`` raises :class:`DataError` for the first pairing problem
    (image without mask, mask without image, empty folder); otherwise only the good pairs come back and
    :func:`check_dataset` reports the rest. `root` may also be an annotation dataset (`formats`);
    `labels` then names the labels that count as lesion (default: every foreground label).
    """
    pairing = _pair(root, labels)
    fatal = [p for p in pairing.problems if p.code != SUSPECT]
    if strict and fatal:
        raise fatal[0]
    for problem in pairing.problems:
        logger.warning("%s%s", "" if problem.code == SUSPECT else "skipped: ", problem)
    return pairing.samples


# --------------------------------------------------------------------------------------------- reading


def _read_mask_raw(source: Path | bytes, max_pixels: int | None, name: Path | None = None) -> np.ndarray:
    """Raw mask values HxW, keeping the file's integer type so value sets can be reported exactly."""
    path = name if name is not None else source
    with open_image(source, max_pixels, name) as im:
        mode = im.mode
        if mode == "1":
            return np.asarray(im, dtype=np.uint8)
        if mode in ("L", "P", "I", "F") or mode.startswith("I;16"):
            # Palette masks: the index is the label (VOC style), so the palette colours are not used.
            return np.asarray(im)
        if mode in ("LA", "PA"):
            return np.asarray(im)[..., 0]
        # Colour masks: any coloured pixel counts, so a red outline is 255 rather than its luma 76.
        try:
            rgb = np.asarray(im.convert("RGB"))
        except ValueError as e:
            raise DataError(path, f"cannot convert mask mode {mode}: {e}") from None
        return rgb.max(axis=2)


def _value_max(raw: np.ndarray) -> float:
    """The value that means "fully on" for this array's type, for fractional thresholds."""
    if raw.dtype == np.uint8:
        return 255.0
    if raw.dtype.kind == "u" and raw.dtype.itemsize == 2:
        return 65535.0
    hi = float(raw.max()) if raw.size else 1.0
    if raw.dtype.kind == "f" and hi <= 1.0:
        return 1.0
    if raw.dtype.kind in "iu" and 0 <= hi <= 65535:
        return 65535.0 if hi > 255 else 255.0
    return hi if hi > 0 else 1.0


def _unique(raw: np.ndarray) -> np.ndarray:
    """Sorted unique values, fast for the usual binary mask (np.unique sorts every pixel)."""
    if not raw.size:
        return np.unique(raw)
    hi = raw.max()
    if np.logical_or(raw == 0, raw == hi).all():
        return np.unique(np.array([raw.min(), hi], dtype=raw.dtype))
    if raw.dtype.kind == "u" and raw.dtype.itemsize <= 2:
        return np.flatnonzero(np.bincount(raw.ravel())).astype(raw.dtype)
    return np.unique(raw)


def _format_values(values: Sequence) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:_MAX_LISTED_VALUES])
    if len(values) > _MAX_LISTED_VALUES:
        shown += f", ... ({len(values)} distinct values)"
    return "{" + shown + "}"


def _check_threshold(threshold: float | None) -> None:
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"mask threshold must be a fraction in (0, 1], e.g. 0.5; got {threshold}")


def _binarise(raw: np.ndarray, path: Path, threshold: float | None, values: np.ndarray | None = None):
    """bool HxW from raw values; without a threshold anything but {0, v} is an error naming the values."""
    if threshold is not None:
        return raw >= threshold * _value_max(raw)
    values = _unique(raw) if values is None else values
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        raise DataError(
            path,
            f"mask values are not binary: {_format_values(values.tolist())}; "
            f"pass --mask-threshold (e.g. 0.5) to binarise at a fraction of the maximum",
        )
    return raw != 0


def read_mask(
    path: str | os.PathLike | bytes, threshold: float | None = None, max_pixels: int | None = MAX_PIXELS_DEFAULT,
    name: str | os.PathLike | None = None,
) -> np.ndarray:
    """Read a lesion mask as bool HxW.

    Without ``threshold`` the mask must hold exactly {0, v} for one nonzero v (0/1, 0/255, 0/65535, ...),
    else :class:`DataError` lists the values found. With ``threshold`` (a fraction of the type's maximum,
    e.g. 0.5) the mask is ``value >= threshold * max``. Colour masks use the brightest channel; palette
    masks use the palette index.
    """
    _check_threshold(threshold)
    source = path if isinstance(path, bytes) else Path(path)
    where = Path(name) if name is not None else (Path("mask") if isinstance(path, bytes) else source)
    return _binarise(_read_mask_raw(source, max_pixels, where), where, threshold)


def _size_mismatch(mask_path: Path, mask_shape: tuple, image_path: Path, image_shape: tuple) -> DataError:
    (mh, mw), (ih, iw) = mask_shape[:2], image_shape[:2]
    problem = f"mask size {mw}x{mh} does not match image size {iw}x{ih} ({image_path.name})"
    return DataError(mask_path, problem)


def _check_annotated(sample: Sample, mask_threshold: float | None) -> None:
    if mask_threshold is not None and sample.annotation is not None:
        raise DataError(sample.annotation.path, f"--mask-threshold binarises mask images; this is a "
                                                f"{sample.annotation.format} annotation, whose masks are drawn "
                                                "from outlines or labels: drop it")


def load_sample(
    sample: Sample, mask_threshold: float | None = None, max_pixels: int | None = MAX_PIXELS_DEFAULT
) -> tuple[np.ndarray, np.ndarray]:
    """``(image float32 HxW in [0, 1], mask bool HxW)``; several masks are merged with OR, an annotation is
    rasterised by `formats.read_annotation`."""
    _check_threshold(mask_threshold)
    _check_annotated(sample, mask_threshold)
    image = read_image(sample.image_path, max_pixels)
    if sample.annotation is not None:
        from hemaseg.data.formats import annotation_mask

        return image, annotation_mask(sample.annotation, image.shape, max_pixels=max_pixels)
    mask = np.zeros(image.shape, dtype=bool)
    for mask_path in sample.mask_paths:
        m = read_mask(mask_path, mask_threshold, max_pixels)
        if m.shape != image.shape:
            raise _size_mismatch(mask_path, m.shape, sample.image_path, image.shape)
        mask |= m
    return image, mask


# --------------------------------------------------------------------------------------------- checking


@dataclass
class CheckReport:
    """What :func:`check_dataset` found: counts, sizes, mask value sets, lesion sizes, and every problem."""

    root: Path
    n_images: int
    n_masks: int
    n_pairs: int  # images with at least one mask, whether or not they then read cleanly
    sizes: dict[tuple[int, int], int]  # (width, height) -> number of readable images
    mask_values: dict[tuple, int]  # sorted unique raw values of one mask file -> number of mask files
    lesion_fraction_mean: float  # over pairs that loaded cleanly; nan if none
    lesion_fraction_min: float
    lesion_fraction_max: float
    n_empty_masks: int
    problems: list[DataError] = field(default_factory=list)
    format_name: str = "folder"  # formats.FORMATS key: folder, nnunet, labelme, cvat, coco
    lesion_labels: tuple[str, ...] = ()  # annotation formats: the labels counted as lesion
    label_counts: dict[str, int] = field(default_factory=dict)  # label -> shapes (nnU-Net: cases) with it
    notes: list[str] = field(default_factory=list)  # what the format's reader wants the user to know
    n_unreviewed: int = 0  # masks from LabelMe files still flagged formats.UNREVIEWED_FLAG (model proposals)

    @property
    def ok(self) -> bool:
        return not self.problems and self.n_pairs > 0

    def format(self) -> str:
        """Human-readable summary, then one ``ERROR path: problem`` line per problem."""
        lines = [f"dataset {self.root}"]
        if self.format_name == "folder":
            lines.append(f"  images {self.n_images}, masks {self.n_masks}, pairs {self.n_pairs}")
        else:
            from hemaseg.data.formats import FORMATS

            unit = "cases" if self.format_name == "nnunet" else "shapes"
            lines += [f"  format {self.format_name}: {FORMATS[self.format_name]}",
                      f"  images {self.n_images}, annotated {self.n_masks}, pairs {self.n_pairs}",
                      f"  labels ({unit}): " + (", ".join(f"{k} {v}" for k, v in self.label_counts.items()) or "none")
                      + f"; counted as lesion: {', '.join(self.lesion_labels) or 'none'}"]
            lines += [f"  note: {n}" for n in self.notes]
            if self.n_unreviewed:
                from hemaseg.data.formats import unreviewed_warning

                lines.append(f"  WARNING {unreviewed_warning(self.n_unreviewed, self.n_pairs)}")
        if self.sizes:
            common = sorted(self.sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
            widths = [w for w, _ in self.sizes]
            heights = [h for _, h in self.sizes]
            lines.append(
                f"  sizes: {len(self.sizes)} distinct, width {min(widths)}-{max(widths)}, "
                f"height {min(heights)}-{max(heights)}; most common "
                + ", ".join(f"{w}x{h} ({n})" for (w, h), n in common)
            )
        if self.mask_values:
            common = sorted(self.mask_values.items(), key=lambda kv: -kv[1])[:3]
            more = f" (+{len(self.mask_values) - 3} other sets)" if len(self.mask_values) > 3 else ""
            lines.append("  mask values: " + ", ".join(f"{_format_values(v)} x{n}" for v, n in common) + more)
        if not math.isnan(self.lesion_fraction_mean):
            lines.append(
                f"  lesion fraction: mean {self.lesion_fraction_mean:.3f}, "
                f"min {self.lesion_fraction_min:.3f}, max {self.lesion_fraction_max:.3f}; "
                f"empty masks {self.n_empty_masks}"
            )
        if self.ok:
            lines.append("OK")
        else:
            lines.append(f"{len(self.problems)} problem(s):" if self.problems else "no pairs found")
            lines.extend(f"ERROR {p}" for p in self.problems)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able summary (NaN becomes null; dict keys with tuples become lists of records)."""

        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            "root": str(self.root),
            "ok": self.ok,
            "n_images": self.n_images,
            "n_masks": self.n_masks,
            "n_pairs": self.n_pairs,
            "sizes": [{"width": w, "height": h, "count": n} for (w, h), n in sorted(self.sizes.items())],
            "mask_values": [{"values": list(v), "count": n} for v, n in sorted(self.mask_values.items())],
            "lesion_fraction_mean": num(self.lesion_fraction_mean),
            "lesion_fraction_min": num(self.lesion_fraction_min),
            "lesion_fraction_max": num(self.lesion_fraction_max),
            "n_empty_masks": self.n_empty_masks,
            "format": self.format_name,
            "lesion_labels": list(self.lesion_labels),
            "label_counts": dict(self.label_counts),
            "notes": list(self.notes),
            "n_unreviewed": self.n_unreviewed,
            "problems": [{"path": str(p.path), "problem": p.problem, "code": p.code} for p in self.problems],
        }


@dataclass
class _SampleCheck:
    size: tuple[int, int] | None = None
    mask_values: list[tuple] = field(default_factory=list)
    lesion_fraction: float | None = None
    problems: list[DataError] = field(default_factory=list)
    label_counts: Counter = field(default_factory=Counter)
    unreviewed: bool = False


def _check_sample(sample: Sample, mask_threshold: float | None, max_pixels: int | None) -> _SampleCheck:
    """Read one pair the way load_sample does, but record every problem instead of raising the first."""
    out = _SampleCheck()
    image: np.ndarray | None = None
    try:
        image = read_image(sample.image_path, max_pixels)
        out.size = (image.shape[1], image.shape[0])
    except DataError as e:
        out.problems.append(e)
    if sample.annotation is not None:
        if image is not None:
            from hemaseg.data.formats import read_annotation

            read = read_annotation(sample.annotation, image.shape, max_pixels=max_pixels)
            out.problems += read.problems
            out.label_counts = read.label_counts
            out.unreviewed = read.unreviewed
            if read.values is not None:
                out.mask_values.append(read.values)
            if read.mask is not None:
                out.lesion_fraction = float(read.mask.mean())
        return out
    merged: np.ndarray | None = None if image is None else np.zeros(image.shape, dtype=bool)
    for mask_path in sample.mask_paths:
        try:
            raw = _read_mask_raw(mask_path, max_pixels)
            values = _unique(raw)
            out.mask_values.append(tuple(values.tolist()))
            if image is not None and raw.shape != image.shape:
                raise _size_mismatch(mask_path, raw.shape, sample.image_path, image.shape)
            mask = _binarise(raw, mask_path, mask_threshold, values)
            if merged is not None:
                merged |= mask
        except DataError as e:
            out.problems.append(e)
            merged = None  # a broken pair stays out of the lesion statistics
    if merged is not None:
        out.lesion_fraction = float(merged.mean())
    return out


def check_dataset(
    root: str | os.PathLike,
    mask_threshold: float | None = None,
    max_pixels: int | None = MAX_PIXELS_DEFAULT,
    progress: bool = False,
    workers: int = 4,
    labels: Sequence[str] | None = None,
) -> CheckReport:
    """Read every pair and report every problem, rather than stopping at the first.

    Finds: unreadable or truncated images and masks, images without masks, masks without images, mask
    size != image size, non-binary mask values (unless ``mask_threshold``), empty folders and images
    larger than ``max_pixels``. A missing images/ or mask/ folder still raises :class:`DataError`.
    ``workers`` threads decode in parallel (PIL releases the GIL while decoding); results keep file order.

    An annotation dataset (`formats`) is checked the same way, with its own problems: files that are not
    valid JSON/XML, missing images, images without annotations, unknown labels, polygons with fewer than
    3 points, open or self-intersecting polygons, shapes outside the image; `labels` as for `find_samples`.
    """
    _check_threshold(mask_threshold)
    pairing = _pair(root, labels)
    if mask_threshold is not None and pairing.format != "folder":
        raise DataError(root, f"--mask-threshold binarises mask images; this is a {pairing.format} dataset: drop it")
    problems = list(pairing.problems)
    sizes: Counter[tuple[int, int]] = Counter()
    mask_values: Counter[tuple] = Counter()
    label_counts: Counter[str] = Counter()
    fractions: list[float] = []
    unreviewed = 0

    def check(sample: Sample) -> _SampleCheck:
        return _check_sample(sample, mask_threshold, max_pixels)

    n_workers = max(1, min(workers, os.cpu_count() or 1, len(pairing.samples)))
    with ThreadPoolExecutor(n_workers) as pool:
        results = pool.map(check, pairing.samples) if n_workers > 1 else map(check, pairing.samples)
        for result in tqdm(
            results, total=len(pairing.samples), desc="checking", unit="img", disable=not progress
        ):
            if result.size is not None:
                sizes[result.size] += 1
            mask_values.update(result.mask_values)
            label_counts.update(result.label_counts)
            if result.lesion_fraction is not None:
                fractions.append(result.lesion_fraction)
            problems.extend(result.problems)
            unreviewed += result.unreviewed
    nan = float("nan")
    return CheckReport(
        root=Path(root),
        n_images=pairing.n_images,
        n_masks=pairing.n_masks,
        n_pairs=len(pairing.samples),
        sizes=dict(sizes),
        mask_values=dict(mask_values),
        lesion_fraction_mean=float(np.mean(fractions)) if fractions else nan,
        lesion_fraction_min=min(fractions) if fractions else nan,
        lesion_fraction_max=max(fractions) if fractions else nan,
        n_empty_masks=sum(f == 0.0 for f in fractions),
        problems=problems,
        format_name=pairing.format,
        lesion_labels=pairing.lesion_labels,
        label_counts=dict(sorted(label_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        notes=list(pairing.notes),
        n_unreviewed=unreviewed,
    )


class _Fingerprint:
    """sha256 over names, file names and file bytes in natural name order: independent of the sample
    order and of where the dataset folder lives."""

    def __init__(self):
        self.h = hashlib.sha256()
        self.files: dict[str, str] = {}  # "folder/name" -> its bytes' short sha256: which file changed

    def add_sample(self, name: str) -> None:
        self.h.update(f"sample\0{name}\0".encode())

    def add_file(self, path: Path, data: bytes) -> None:
        self.h.update(f"file\0{path.parent.name}/{path.name}\0".encode())
        self.h.update(data)
        self.files[f"{path.parent.name}/{path.name}"] = hashlib.sha256(data).hexdigest()[:16]

    def add_annotation(self, ann: Annotation) -> None:
        """What is read from the annotation file, besides its bytes: which entry, which labels are lesion."""
        self.h.update(f"annotation\0{ann.format}\0{ann.key}\0{'|'.join(ann.labels)}\0{ann.values}\0{ann.declared}\0"
                      .encode())

    def hexdigest(self) -> str:
        return self.h.hexdigest()[:16]


def _annotation_bytes(fp: _Fingerprint, ann: Annotation, shared: dict[Path, bytes]) -> bytes:
    """The annotation file's bytes, fingerprinted: a file of one scan with that scan, a file of many
    (CVAT, COCO) once, after all scans (`_finish_shared`), however many scans it annotates."""
    fp.add_annotation(ann)
    if not ann.shared:
        data = read_file(ann.path)
        fp.add_file(ann.path, data)
        return data
    if ann.path not in shared:
        shared[ann.path] = read_file(ann.path)
    return shared[ann.path]


def _finish_shared(fp: _Fingerprint, shared: dict[Path, bytes]) -> None:
    for path in sorted(shared, key=lambda p: natural_key(str(p))):
        fp.add_file(path, shared[path])


def dataset_fingerprint(samples: Sequence[Sample]) -> str:
    """Short sha256 over names, file names and file bytes, saved with runs so the data can be matched later."""
    fp, shared = _Fingerprint(), {}
    for sample in sorted(samples, key=lambda s: natural_key(s.name)):
        fp.add_sample(sample.name)
        for path in (sample.image_path, *sample.mask_paths):
            fp.add_file(path, read_file(path))
        if sample.annotation is not None:
            _annotation_bytes(fp, sample.annotation, shared)
    _finish_shared(fp, shared)
    return fp.hexdigest()


@dataclass
class LoadedDataset:
    """Every pair of a dataset read and checked once: what training needs before its first epoch (the
    plan's statistics and the fingerprint that identifies the data). The pixels are not kept: a dataset
    may be larger than the memory; training reads them from its cache (data/cache.py), built from the
    files on first use."""

    root: Path
    samples: list[Sample]
    shapes: dict[str, tuple[int, int]]  # name -> (H, W) of the scan
    fingerprint: str
    stats: DatasetStats
    files: dict[str, str] = field(default_factory=dict)  # "folder/name" -> short sha256 of its bytes
    n_unreviewed: int = 0  # masks from LabelMe files still flagged formats.UNREVIEWED_FLAG (model proposals)


def load_dataset(root: str | os.PathLike, mask_threshold: float | None = None,
                 max_pixels: int | None = MAX_PIXELS_DEFAULT, progress: bool = False,
                 labels: Sequence[str] | None = None) -> LoadedDataset:
    """Read every pair once: its bytes feed the fingerprint and are decoded from memory. The first
    broken pair raises its DataError (training needs every scan; `hemaseg check` lists them all).
    Annotation datasets (`formats`, `labels` as for `find_samples`): the annotation's bytes feed the
    fingerprint too, and the self-intersecting or clipped shapes `check` reports are accepted (counted in
    one warning)."""
    _check_threshold(mask_threshold)
    samples = sorted(find_samples(root, labels=labels), key=lambda s: natural_key(s.name))
    fp, shapes, fractions, shared = _Fingerprint(), {}, [], {}
    suspect = unreviewed = 0
    for sample in tqdm(samples, desc="load", unit="img", disable=not progress, leave=False):
        fp.add_sample(sample.name)
        data = read_file(sample.image_path)
        fp.add_file(sample.image_path, data)
        image = decode_image(data, max_pixels, name=sample.image_path).gray
        if sample.annotation is not None:
            from hemaseg.data.formats import read_annotation

            _check_annotated(sample, mask_threshold)
            read = read_annotation(sample.annotation, image.shape, _annotation_bytes(fp, sample.annotation, shared),
                                   max_pixels)
            if read.mask is None:
                raise next(p for p in read.problems if p.code != SUSPECT)
            suspect += len(read.problems)
            unreviewed += read.unreviewed
            shapes[sample.name] = image.shape
            fractions.append(float(read.mask.mean()))
            continue
        mask = np.zeros(image.shape, dtype=bool)
        for mask_path in sample.mask_paths:
            raw = read_file(mask_path)
            fp.add_file(mask_path, raw)
            m = read_mask(raw, mask_threshold, max_pixels, name=mask_path)
            if m.shape != image.shape:
                raise _size_mismatch(mask_path, m.shape, sample.image_path, image.shape)
            mask |= m
        shapes[sample.name] = image.shape
        fractions.append(float(mask.mean()))
    _finish_shared(fp, shared)
    if suspect:
        logger.warning("%s: %d shape(s) cross themselves or reach outside their image; they are read as drawn "
                       "(`hemaseg check %s` lists them)", root, suspect, root)
    if unreviewed:
        from hemaseg.data.formats import unreviewed_warning

        logger.warning("%s: %s", root, unreviewed_warning(unreviewed, len(samples)))
    longer = sorted(max(shape) for shape in shapes.values())
    stats = DatasetStats(n_pairs=len(samples), median_longer_side=longer[len(longer) // 2] if longer else 0,
                         lesion_fraction_mean=float(np.mean(fractions)) if fractions else math.nan,
                         n_empty_masks=sum(f == 0.0 for f in fractions),
                         median_aspect=float(np.median([w / h for h, w in shapes.values()])) if shapes else 1.0)
    return LoadedDataset(Path(root), samples, shapes, fp.hexdigest(), stats, fp.files, unreviewed)


# --------------------------------------------------------------------------------------------- groups


def _name_key(value: str) -> str:
    """'benign_0001.png', 'images/benign_0001.png' and 'benign_0001' all become 'benign_0001'."""
    p = Path(value.strip())
    return p.stem if p.suffix.lower() in IMAGE_SUFFIXES else p.name


def _read_groups(path: Path, group_columns: Sequence[str]) -> dict[str, str] | None:
    """Parse the CSV; None when no group column is present (the caller decides whether that is an error)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"cannot read CSV: {e}") from None
    if not rows:
        raise DataError(path, "CSV is empty; it needs a header row")
    header = [c.strip().lower() for c in rows[0]]
    name_col = next((header.index(c) for c in NAME_COLUMNS if c in header), None)
    group_col = next((header.index(c) for c in group_columns if c in header), None)
    if group_col is None:
        return None
    if name_col is None:
        raise DataError(
            path, f"no image-name column (one of {', '.join(NAME_COLUMNS)}); header is: {', '.join(header)}"
        )
    logger.debug("%s: groups from column %r", path, header[group_col])
    groups: dict[str, str] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) <= max(name_col, group_col):
            raise DataError(path, f"line {line}: expected at least {max(name_col, group_col) + 1} columns")
        name, group = _name_key(plain_cell(row[name_col])), plain_cell(row[group_col].strip())
        if not group:
            continue  # no group: the image is its own group
        if groups.get(name, group) != group:
            raise DataError(path, f"line {line}: {name} is in two groups ({groups[name]} and {group})")
        groups[name] = group
    return groups


def read_groups(path: str | os.PathLike) -> dict[str, str]:
    """Image name (stem) -> group from a CSV with a header.

    Name column: ``name``, ``image`` or ``filename`` (with or without the file suffix). Group column:
    ``group``, ``dup_group`` or ``patient`` (first found). Raises :class:`DataError` naming the file if
    either column is missing.
    """
    path = Path(path)
    groups = _read_groups(path, GROUP_COLUMNS)
    if groups is None:
        raise DataError(path, f"no group column (one of {', '.join(GROUP_COLUMNS)})")
    return groups


def find_groups(root: str | os.PathLike) -> dict[str, str] | None:
    """Groups from ``root/manifest.csv`` when it has a ``dup_group`` or ``patient`` column, else None."""
    manifest = Path(root) / "manifest.csv"
    if not manifest.is_file():
        return None
    groups = _read_groups(manifest, MANIFEST_GROUP_COLUMNS)
    if groups is None:
        logger.info("%s has no dup_group or patient column; splitting image by image", manifest)
    return groups


# --------------------------------------------------------------------------------------------- mixtures

LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENCE", "LICENCE.txt", "SOURCE.md", "README.md")


def write_mixture(out: str | os.PathLike, roots: Sequence[str | os.PathLike], overwrite: bool = False) -> Path:
    """One dataset folder made of several: `out/images/TAG__NAME` and `out/mask/...` are symbolic links to
    the sources' files (nothing is copied but the licences; the masks of annotation datasets, drawn from
    their outlines, are written as PNG), TAG being each source folder's name, and
    `out/manifest.csv` keeps each source's groups (TAG:group; a scan without one is its own group), so a
    split of the mixture never puts one patient or one set of near-duplicates on both sides. Each
    source's licence and provenance files are copied to `out/licenses/TAG/`, as BUS-BRA asks of any copy.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(out, "the mixture folder is not empty; pass overwrite=True (--overwrite) to replace it")
    tags = [Path(r).resolve().name for r in roots]
    if len(set(tags)) != len(tags):
        raise ValueError(f"two sources share a folder name ({', '.join(tags)}); names tag the scans")
    for sub in ("images", "mask", "licenses"):
        if (out / sub).exists():
            for f in (out / sub).rglob("*"):
                if f.is_symlink() or f.is_file():
                    f.unlink()
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows = []
    for root, tag in zip(roots, tags):
        root = Path(root).resolve()
        groups = find_groups(root) or {}
        for s in find_samples(root):
            name = f"{tag}__{s.name}"
            (out / "images" / f"{name}{s.image_path.suffix.lower()}").symlink_to(s.image_path.resolve())
            if s.annotation is not None:  # drawn from an annotation: there is no mask file to link to
                save_png(out / "mask" / f"{name}.png", load_sample(s)[1].astype(np.uint8) * 255)
            for i, m in enumerate(s.mask_paths, start=1):
                stem = name if len(s.mask_paths) == 1 else f"{name}_mask_{i}"
                (out / "mask" / f"{stem}{m.suffix.lower()}").symlink_to(m.resolve())
            rows.append({"name": name, "group": f"{tag}:{groups.get(s.name, s.name)}", "source": tag})
        for licence in LICENCE_FILES:
            if (root / licence).is_file():
                (out / "licenses" / tag).mkdir(exist_ok=True)
                atomic_write_bytes(out / "licenses" / tag / licence, (root / licence).read_bytes())
    write_csv(out / "manifest.csv", rows, ("name", "group", "source"))
    logger.info("mixture of %s: %d scans in %s", ", ".join(tags), len(rows), out)
    return out


# --------------------------------------------------------------------------------------------- splits


def _grouped(names: Sequence[str], groups: Mapping[str, str] | None) -> list[list[str]]:
    """Names grouped, in an order that depends only on the set of names (so a seed means one split)."""
    if len(set(names)) != len(names):
        dup = sorted(n for n, c in Counter(names).items() if c > 1)
        raise ValueError(f"duplicate image names: {dup[:5]}")
    members: dict[tuple[int, str], list[str]] = {}
    for name in natural_sorted(names):
        # Names without a group are their own group; the tag keeps them apart from a group of that name.
        key = (0, groups[name]) if groups and name in groups else (1, name)
        members.setdefault(key, []).append(name)
    return [members[k] for k in sorted(members, key=lambda k: (k[0], natural_key(k[1])))]


def split_train_val(
    names: Sequence[str],
    val_fraction: float = 0.2,
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Seeded train/val split, whole groups on one side.

    Deterministic for the seed and the *set* of names. Groups are shuffled and moved to val until val
    holds at least ``val_fraction`` of the images; names missing from ``groups`` are their own group.
    Returns ``{"train": [...], "val": [...]}`` sorted naturally, both non-empty for two or more names
    (ValueError if all names share one group).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    grouped = _grouped(names, groups)
    if len(names) >= 2 and len(grouped) < 2:
        raise ValueError(f"all {len(names)} images are in one group; a train/val split needs two groups")
    random.Random(seed).shuffle(grouped)
    target = val_fraction * len(names)
    val: list[str] = []
    n_val_groups = 0
    for members in grouped:
        if len(val) >= target:
            break
        val.extend(members)
        n_val_groups += 1
    if n_val_groups == len(grouped) and len(grouped) >= 2:
        # The last group would leave train empty: it goes back to train.
        n_val_groups -= 1
        val = [n for members in grouped[:n_val_groups] for n in members]
    train = [n for members in grouped[n_val_groups:] for n in members]
    return {"train": natural_sorted(train), "val": natural_sorted(val)}


def kfold_split(
    names: Sequence[str], folds: int = 5, seed: int = 0, groups: Mapping[str, str] | None = None
) -> list[dict[str, list[str]]]:
    """Group-aware seeded k-fold: ``folds`` dicts ``{"train", "val"}``, each name in exactly one val.

    No group is split across folds. Folds are balanced by image count: largest groups first, each into
    the fold with fewest images; equal-sized groups are ordered by a seeded shuffle.
    """
    if folds < 2:
        raise ValueError(f"folds must be at least 2; got {folds}")
    grouped = _grouped(names, groups)
    if len(grouped) < folds:
        raise ValueError(f"{len(grouped)} groups cannot fill {folds} folds; use fewer folds")
    random.Random(seed).shuffle(grouped)
    grouped.sort(key=len, reverse=True)  # stable: equal sizes keep their shuffled order
    vals: list[list[str]] = [[] for _ in range(folds)]
    for members in grouped:
        min(vals, key=len).extend(members)  # min() returns the first smallest: lowest fold index on ties
    result = []
    for k in range(folds):
        train = [n for j in range(folds) if j != k for n in vals[j]]
        result.append({"train": natural_sorted(train), "val": natural_sorted(vals[k])})
    return result


# --------------------------------------------------------------------------------------------- split files


def _validate_split(split: object, path: Path) -> dict:
    if not isinstance(split, dict):
        raise DataError(path, "a split file must hold a JSON object with 'train' and 'val' lists")
    for key in ("train", "val"):
        if key not in split:
            raise DataError(path, f"missing key {key!r} (a split needs 'train' and 'val' lists of names)")
        value = split[key]
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise DataError(path, f"{key!r} must be a list of image names")
        if len(set(value)) != len(value):
            raise DataError(path, f"{key!r} lists a name more than once")
    both = set(split["train"]) & set(split["val"])
    if both:
        example = natural_sorted(both)[0]
        raise DataError(path, f"{len(both)} name(s) are in both train and val, e.g. {example}")
    return split


def save_split(split: Mapping, path: str | os.PathLike) -> Path:
    """Write a split (``train``/``val`` lists plus any extra keys such as the seed) as JSON, atomically."""
    path = Path(path)
    data = _validate_split(dict(split), path)
    return atomic_write_text(path, json.dumps(data, indent=1) + "\n")  # a reader never sees half a split


def load_split(path: str | os.PathLike) -> dict:
    """Read a split written by :func:`save_split`; :class:`DataError` naming the file if it is malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(path, f"cannot read split file: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON: {e}") from None
    return _validate_split(data, path)
