"""Annotation formats besides images/ + mask/: nnU-Net v2 raw (2-D), LabelMe, CVAT for images 1.1 and COCO.

Every command that takes DATA (check, train, cv, evaluate, convert) reads these through `dataset.find_samples`:
a scan whose outline comes from an annotation file is a `Sample` carrying an `Annotation` (format, file,
entry, which labels are lesion) instead of mask files, and `read_annotation` is the one function that turns
that annotation into a bool HxW mask: `load_sample`, `load_dataset` and `check_dataset` all call it, so a
scan has the same mask whichever command reads it.

Detection (`detect_format`), from the folder's contents, never from flags:

- DATA is a file: ``*.json`` is COCO, ``*.xml`` is CVAT (the way to choose one of several in a folder);
- ``dataset.json`` + ``imagesTr/``: nnU-Net v2 raw;
- ``images/`` + ``mask/`` (or ``masks/``): the folder layout (`dataset`);
- an ``*.xml`` whose root element is ``<annotations>`` (in DATA or DATA/annotations/): CVAT;
- a ``*.json`` holding ``images`` and ``annotations`` lists (in DATA or DATA/annotations/): COCO;
- ``*.json`` files beside image files (in DATA/images/ or DATA), or LabelMe files in DATA whose images are
  elsewhere (``labelme -O``, imagePath ``../images/12.png``): LabelMe.

A folder that matches two of these is refused with a message naming both (training on the masks when the
outlines were meant, or the other way round, would go unnoticed); point DATA at the annotation file, or
keep one kind of annotation in the folder. A folder that matches none is read as the folder layout, whose
errors say what is missing.

Rasterisation, the same for LabelMe, CVAT and COCO: annotation coordinates are continuous, x to the right
and y down, with pixel (column i, row j) covering [i, i+1) x [j, j+1) -- the convention of the LabelMe and
CVAT drawing canvases and of COCO. A pixel is lesion when its centre (i + 0.5, j + 0.5) lies inside a
lesion shape or on its outline (even-odd rule inside a self-intersecting polygon); shapes of one scan are
merged with OR. Rectangles (also CVAT's rotated boxes), circles and ellipses follow the same centre rule;
COCO RLE, CVAT ``<mask>`` RLE and LabelMe ``mask`` shapes are pixel masks already. (labelme's own
labelme2voc draws with PIL at integer coordinates, half a pixel off this convention: masks from it differ
by at most one pixel along an outline.)

Labels: `labels` (``--label NAME``, repeatable) names the labels that count as lesion; by default the one
foreground label, or every foreground label merged (said in the check report). Shapes of other labels are
ignored but counted. nnU-Net's labels come from dataset.json (``background`` and ``ignore`` are never
lesion); COCO's from ``categories``; CVAT's from the labels declared in ``<meta>`` (or, without any, the ones
used); LabelMe's from ``labels.txt`` beside the JSON files when present (labelme's own convention, whose
``__ignore__`` and ``_background_`` lines are skipped), else the ones used.

What is a problem (`check` lists each as one line naming the file; training refuses the first of the
fatal ones): a file that is not valid JSON/XML, a missing image, an image without any annotation entry (it
is skipped, like an image without a mask), an unknown label, a lesion polygon with fewer than 3 points, an
open shape (polyline, line strip) or a point given a lesion label, a declared image size that differs from
the image. Two are reported by `check` but do not stop training, because hand-drawn outlines often have
them and their pixels are still well defined: a self-intersecting polygon and a shape reaching more than
half a pixel outside the image (clipped) -- their `DataError.code` is `SUSPECT`. An annotation entry with no
lesion shape is a scan without a lesion (an empty mask): COCO and CVAT list every image, so a scan nobody
annotated looks the same; `check` counts the empty masks.

Writers (`convert`, `predict --format labelme`) produce files that read back through the same rules:
COCO and CVAT are written as pixel RLE per lesion (8-connected, `hemaseg.lesions`), so they read back to
exactly the mask; LabelMe as polygons for correction by hand (see `labelme_document` for the tolerance).
A model's proposal is flagged `UNREVIEWED_FLAG` in the LabelMe file; `read_annotation` says so
(`AnnotationRead.unreviewed`), and check and train count those masks until the flag is unticked.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import threading
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hemaseg.data.listing import MASK_DIR_NAMES, SUSPECT, list_images, natural_key
from hemaseg.data.images import IMAGE_SUFFIXES, MAX_PIXELS_DEFAULT, DataError, open_image
from hemaseg.data.pixels import read_file
from hemaseg.extras import MissingExtra, require

log = logging.getLogger(__name__)

FORMATS = {
    "folder": "images/ + mask/ (or masks/): one mask image per scan",
    "nnunet": "nnU-Net v2 raw, 2-D: dataset.json, imagesTr/CASE_0000.png, labelsTr/CASE.png",
    "labelme": "LabelMe JSON beside each image (polygon, rectangle, circle and mask shapes)",
    "cvat": "CVAT for images 1.1 XML (polygon, box, ellipse and mask shapes)",
    "coco": "COCO JSON (polygon or RLE segmentation)",
}
LESION_LABEL = "lesion"  # the label hemaseg writes for its one class
LABELME_TOLERANCE_PX = 1.0  # default Douglas-Peucker tolerance of the LabelMe outlines hemaseg writes
LABELME_VERSION = "5.4.1"  # written into LabelMe files; LabelMe warns only when the major version differs
# LabelMe file flag (a checkbox LabelMe shows beside the file) on outlines a model proposed: a mask read from a
# file whose flag is still true is counted as unreviewed by check and train; unticking it when saving marks it
# reviewed
UNREVIEWED_FLAG = "hemaseg_unreviewed"
_OUTSIDE_SLACK = 0.5  # px beyond the image edge before a shape counts as outside (no pixel centre is there)
_FAR_PX = 1e7  # a coordinate beyond this many px is no outline of any scan (and 1e300 overflows the fill)
_EPS = 1e-9  # slack of the centre-on-outline test: outlines through pixel centres stay exact in floating point
_AREA_SHAPES = ("polygon", "rectangle", "circle", "ellipse", "rle", "bitmap")
_OTHER_FORMAT = "other_format"  # DataError.code of valid JSON that is not the format asked (detection skips it)


@dataclass(frozen=True)
class Annotation:
    """Where a sample's mask comes from when it is not mask files: small, frozen, and fingerprinted with
    the file's bytes (so a resumed run notices an edited outline or another --label)."""

    format: str  # nnunet, labelme, cvat or coco
    path: Path  # the annotation file: LabelMe JSON, CVAT XML, COCO JSON, nnU-Net labelsTr/CASE.png
    key: str = ""  # the scan's entry in a file holding many: CVAT image name, COCO image id
    labels: tuple[str, ...] = ()  # label names that count as lesion (resolved; empty: every mask is empty)
    values: tuple[int, ...] = ()  # nnU-Net: the label-map values of `labels`
    declared: tuple[tuple[str, tuple[int, ...]], ...] = ()  # nnU-Net: every label of dataset.json, its values

    @property
    def known(self) -> tuple[int, ...]:
        """nnU-Net: the values dataset.json declares (any other value in a label map is an unknown label)."""
        return tuple(sorted({v for _, vals in self.declared for v in vals} | {0}))

    @property
    def shared(self) -> bool:
        """True when one file annotates many scans (CVAT, COCO): read once, fingerprinted once."""
        return self.format in ("cvat", "coco")


@dataclass(frozen=True)
class Detected:
    format: str  # a key of FORMATS
    root: Path  # the dataset folder (for a file DATA, its folder)
    file: Path | None = None  # the annotation file of CVAT, COCO and nnU-Net (dataset.json)
    folder: Path | None = None  # LabelMe: the folder holding images and JSON files


@dataclass
class Found:
    """What a format's finder saw: the cases, every problem, and what the check report says about them."""

    format: str
    cases: list[tuple[str, Path, Annotation]] = field(default_factory=list)  # (name, image, annotation)
    problems: list[DataError] = field(default_factory=list)
    n_images: int = 0  # image files, or image entries of a CVAT/COCO file
    n_annotations: int = 0  # annotation files (LabelMe, nnU-Net) or annotated image entries (CVAT, COCO)
    lesion_labels: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)


@dataclass
class AnnotationRead:
    """One scan's annotation read: the mask (None when a fatal problem makes it unknowable), every problem,
    and how many shapes of each label it has (nnU-Net: each label present counts once)."""

    mask: np.ndarray | None
    problems: list[DataError]
    label_counts: Counter
    values: tuple | None = None  # nnU-Net: the label map's distinct values, for the check report
    unreviewed: bool = False  # LabelMe: the file's UNREVIEWED_FLAG is still true (a model's proposal)


# --------------------------------------------------------------------------------------------- detection


def detect_format(root: str | os.PathLike) -> Detected:
    """Which format DATA is in (rules in the module docstring); DataError naming DATA when it matches two."""
    root = Path(root)
    if root.is_file():
        suffix = root.suffix.lower()
        if suffix == ".json":
            return Detected("coco", root.parent, root)
        if suffix == ".xml":
            return Detected("cvat", root.parent, root)
        raise DataError(root, "DATA is a file: give a dataset folder, a COCO .json file or a CVAT .xml file")
    if not root.is_dir():
        raise DataError(root, "dataset folder does not exist")
    matches: list[Detected] = []
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        matches.append(Detected("nnunet", root, root / "dataset.json"))
    if (root / "images").is_dir() and any((root / n).is_dir() for n in MASK_DIR_NAMES):
        matches.append(Detected("folder", root))
    places = [root] + ([root / "annotations"] if (root / "annotations").is_dir() else [])
    candidates = sorted((p for d in places for p in d.iterdir() if p.is_file() and not p.name.startswith(".")),
                        key=lambda p: natural_key(str(p)))
    coco, broken = [], []
    for p in candidates:
        if p.suffix.lower() == ".xml" and _looks_like_cvat(p):
            matches.append(Detected("cvat", root, p))
        elif p.suffix.lower() == ".json" and p != root / "dataset.json":
            try:
                _coco_doc(p)
            except DataError as e:
                if e.code == "corrupt":  # not JSON at all: said if nothing else is found
                    broken.append(e)
                elif e.code != _OTHER_FORMAT:  # COCO, but malformed (no categories, say): the finder reports it
                    coco.append(p)
                    matches.append(Detected("coco", root, p))
                continue
            coco.append(p)
            matches.append(Detected("coco", root, p))
    folder = _labelme_folder(root, set(coco))
    if folder is not None:
        matches.append(Detected("labelme", root, None, folder))
    if not matches and broken:
        raise broken[0]  # e.g. a truncated COCO file: its own message beats "no mask/ folder"
    if not matches:
        return Detected("folder", root)
    if len(matches) > 1:
        what = "; ".join(f"{m.format} ({_describe_match(m)})" for m in matches)
        raise DataError(root, f"matches more than one dataset format: {what}. Point DATA at the annotation file "
                              f"(a COCO .json or CVAT .xml) or keep one kind of annotation in the folder")
    return matches[0]


def _labelme_jsons(folder: Path, skip: set[Path] = frozenset()) -> list[Path]:
    return sorted((p for p in folder.glob("*.json") if not p.name.startswith(".") and p not in skip
                   and p.name != "dataset.json"), key=lambda p: natural_key(p.name))


def _labelme_folder(root: Path, coco: set[Path]) -> Path | None:
    """Where LabelMe files are: JSON files beside images (in DATA/images/ or DATA), or LabelMe files in DATA
    whose images are elsewhere (labelme -O, imagePath ../images/NAME.png). Beside images any JSON counts
    (a truncated one is a problem to report); in DATA without images only real LabelMe files do, so a
    splits.json kept next to images/ + mask/ is not mistaken for annotations."""
    for folder in ([root / "images"] if (root / "images").is_dir() else []) + [root]:
        if _labelme_jsons(folder, coco) and list_images(folder):
            return folder
    for p in _labelme_jsons(root, coco):
        try:
            _labelme_doc(p)
            return root
        except DataError:
            continue
    return None


def _describe_match(m: Detected) -> str:
    if m.format == "folder":
        return "images/ + mask/"
    if m.format == "labelme":
        return f"JSON files in {m.folder.name}/" if m.folder != m.root else "JSON files beside the images"
    return m.file.relative_to(m.root).as_posix()


def _looks_like_cvat(path: Path) -> bool:
    """The root element is <annotations> (read from the first 4 KiB: the file may be large or broken)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    head = re.sub(r"<\?.*?\?>|<!--.*?-->|<!DOCTYPE[^>]*>", "", head, flags=re.DOTALL).lstrip()
    return head.startswith("<annotations")


# --------------------------------------------------------------------------------------------- documents

_CACHE: dict[tuple, object] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def _stat_key(kind: str, path: Path) -> tuple:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(path, "file does not exist", "missing") from None
    except OSError as e:
        raise DataError(path, f"cannot read: {e.strerror or e}", "unreadable") from None
    return kind, str(path), st.st_mtime_ns, st.st_size, st.st_ino


def _cached(kind: str, path: Path, data: bytes | None, parse) -> object:
    """`parse(bytes)` of a file, kept while the file is unchanged: a CVAT or COCO file annotates every scan,
    and reading it once per scan would make a dataset quadratic to load. Given `data`, the key is its
    content (bytes cache their hash, so one file's bytes passed for every scan cost one hash); otherwise
    the file's mtime, size and inode."""
    key = (kind, str(path), len(data), hash(data)) if data is not None else _stat_key(kind, path)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        if data is None:
            data = read_file(path)
        try:
            value = parse(data)
        except RecursionError:  # JSON nested thousands deep: no annotation file looks like that
            raise DataError(path, "nested too deeply to be an annotation file (thousands of brackets within "
                                  "brackets): the file is damaged or not an annotation", "corrupt") from None
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = value
        return value


def _parse_json(data: bytes, path: Path) -> object:
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(path, f"not a UTF-8 text file ({e.reason} at byte {e.start})", "corrupt") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): the file is "
                              "damaged or incomplete", "corrupt") from None


def _json_document(kind: str, path: Path, data: bytes | None = None) -> object:
    return _cached(f"json:{kind}", path, data, lambda b: _parse_json(b, path))


# --------------------------------------------------------------------------------------------- labels


def _choose_labels(available: Sequence[str], requested: Sequence[str] | None, where: Path,
                   found: Found) -> tuple[str, ...]:
    """The labels that count as lesion: the requested ones, else every available one (merged, noted)."""
    available = list(dict.fromkeys(available))
    if requested:
        requested = list(dict.fromkeys(requested))
        missing = [r for r in requested if r not in available]
        for name in missing:
            found.problems.append(DataError(where, f"--label {name}: no such label (labels: "
                                                   f"{', '.join(available) or 'none'})"))
        chosen = tuple(r for r in requested if r in available)
    else:
        chosen = tuple(available)
        if len(chosen) > 1:
            found.notes.append(f"labels {', '.join(chosen)} are all counted as lesion (merged); choose with --label")
    if not chosen and not requested:
        found.notes.append("no foreground label found: every mask is empty")
    found.lesion_labels = chosen
    return chosen


# --------------------------------------------------------------------------------------------- finders


def find_cases(detected: Detected, labels: Sequence[str] | None = None) -> Found:
    """Every case of a detected annotation format, with every problem found without reading pixels."""
    if detected.format == "nnunet":
        return _find_nnunet(detected, labels)
    if detected.format == "labelme":
        return _find_labelme(detected, labels)
    return _find_shared(detected, labels, detected.format)


def _unannotated(folders: Iterable[Path], used: set[Path], found: Found, why: str) -> None:
    """Image files in the folders the annotations point into that no annotation mentions: each a problem
    (it is skipped, like an image without a mask)."""
    for folder in sorted(set(folders), key=lambda p: natural_key(str(p))):
        for p in list_images(folder):
            if p not in used and p.resolve() not in used:
                found.problems.append(DataError(p, f"image without annotation ({why})", "missing"))


def _add_case(found: Found, names: dict[str, Path], name: str, image: Path, ann: Annotation, where: Path) -> None:
    if name in names:
        found.problems.append(DataError(where, f"two images share the name {name!r} ({names[name].name} and "
                                               f"{image}); hemaseg names scans by file stem: rename one"))
        return
    names[name] = image
    found.cases.append((name, image, ann))


# nnU-Net ---------------------------------------------------------------------------------------------

_CHANNEL = re.compile(r"^(.+)_(\d{4})$")


def _find_nnunet(d: Detected, labels: Sequence[str] | None) -> Found:
    found = Found("nnunet")
    spec = d.file
    doc = _json_document("nnunet", spec)
    if not isinstance(doc, dict):
        found.problems.append(DataError(spec, "dataset.json must hold a JSON object"))
        return found
    missing = [k for k in ("channel_names", "labels", "file_ending") if k not in doc]
    if missing:
        found.problems.append(DataError(spec, f"missing key(s) {', '.join(missing)} (nnU-Net v2 dataset.json needs "
                                              "channel_names, labels, numTraining and file_ending)"))
        return found
    ending = doc["file_ending"]
    if not isinstance(ending, str) or ending.lower() not in IMAGE_SUFFIXES:
        found.problems.append(DataError(spec, f"file_ending {ending!r}: hemaseg reads 2-D images "
                                              f"({' '.join(IMAGE_SUFFIXES)}), not 3-D volumes"))
        return found
    channels = doc["channel_names"]
    label_map = doc["labels"]
    if not isinstance(channels, dict) or not channels:
        found.problems.append(DataError(spec, "channel_names must be an object such as {\"0\": \"ultrasound\"}"))
        return found
    values_of: dict[str, tuple[int, ...]] = {}
    for name, value in label_map.items() if isinstance(label_map, dict) else ():
        vals = value if isinstance(value, list) else [value]  # a list: an nnU-Net region (a union of values)
        if not vals or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals):
            found.problems.append(DataError(spec, f"label {name!r}: value {value!r} is not a non-negative integer "
                                                  "(or a list of them)"))
            return found
        values_of[name] = tuple(vals)
    if not values_of:
        found.problems.append(DataError(spec, "labels must be an object such as {\"background\": 0, \"lesion\": 1}"))
        return found
    foreground = [n for n, v in values_of.items() if n not in ("background", "ignore") and v != (0,)]
    chosen = _choose_labels(foreground, labels, spec, found)
    lesion_values = tuple(sorted({v for n in chosen for v in values_of[n]}))
    declared = tuple(values_of.items())
    found.notes.append("labels (dataset.json): " + ", ".join(f"{n} {'/'.join(map(str, v))}"
                                                             for n, v in values_of.items()))

    images_dir, labels_dir = d.root / "imagesTr", d.root / "labelsTr"
    n = len(ending)
    by_case: dict[str, dict[int, Path]] = {}
    image_files = [p for p in sorted(images_dir.iterdir(), key=lambda p: natural_key(p.name))
                   if p.name.lower().endswith(ending.lower()) and not p.name.startswith(".")]
    for p in image_files:
        m = _CHANNEL.match(p.name[:-n])
        if m is None:
            found.problems.append(DataError(p, f"not named CASE_0000{ending} (nnU-Net names each channel "
                                               "CASE_XXXX)"))
            continue
        by_case.setdefault(m.group(1), {})[int(m.group(2))] = p
    rgb = len(channels) == 3 and all(set(c) == {0} for c in by_case.values())
    if len(channels) > 1 and not rgb:
        names = ", ".join(str(v) for v in channels.values())
        found.problems.append(DataError(spec, f"{len(channels)} channels per case ({names}); hemaseg segments "
                                              f"one-channel scans, or one RGB CASE_0000{ending} per case: keep one "
                                              "channel per case"))
        return found
    if rgb:
        found.notes.append("RGB scans (3 channel names, one _0000 file per case) are read as luminance gray")
    label_files = {} if not labels_dir.is_dir() else {
        p.name[:-n]: p for p in labels_dir.iterdir()
        if p.name.lower().endswith(ending.lower()) and not p.name.startswith(".")}
    if not labels_dir.is_dir():
        found.problems.append(DataError(labels_dir, "no labelsTr/ folder next to imagesTr/", "missing"))
    found.n_images, found.n_annotations = len(by_case), len(label_files)
    names: dict[str, Path] = {}
    for case in sorted(set(by_case) | set(label_files), key=natural_key):
        chans = by_case.get(case, {})
        label = label_files.get(case)
        if label is None:
            if chans:
                found.problems.append(DataError(chans.get(0, next(iter(chans.values()))),
                                                f"image without label (no labelsTr/{case}{ending})", "missing"))
            continue
        if 0 not in chans:
            found.problems.append(DataError(label, f"label without image (no imagesTr/{case}_0000{ending})",
                                            "missing"))
            continue
        if set(chans) != {0}:
            extra = sorted(k for k in chans if k)
            found.problems.append(DataError(chans[extra[0]], f"case {case} has {len(chans)} channel files; hemaseg "
                                                             "segments one-channel scans (only _0000)"))
            continue
        ann = Annotation("nnunet", label, "", chosen, lesion_values, declared)
        _add_case(found, names, case, chans[0], ann, label)
    n_training = doc.get("numTraining")
    if isinstance(n_training, int) and n_training != len(label_files):
        found.problems.append(DataError(spec, f"numTraining is {n_training} but labelsTr/ holds {len(label_files)} "
                                              "label files (nnU-Net refuses this; correct numTraining)", SUSPECT))
    tests = d.root / "imagesTs"
    if tests.is_dir():
        n_test = sum(1 for p in tests.iterdir() if p.name.endswith(f"_0000{ending}"))
        found.notes.append(f"imagesTs/: {n_test} test case(s) without labels (segment them with hemaseg predict)")
    return found


# LabelMe ---------------------------------------------------------------------------------------------


def _labelme_declared(folder: Path) -> list[str] | None:
    path = folder / "labels.txt"
    if not path.is_file():
        return None
    lines = [line.strip() for line in read_file(path).decode("utf-8-sig", "replace").splitlines()]
    return [n for n in lines if n and n not in ("__ignore__", "_background_")]


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path`, resolved (links followed, .. applied), lies in `folder` (resolved too)."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def _outside_problem(ann: Path, what: str, folder: Path) -> DataError:
    return DataError(ann, f"{what} names a file outside the dataset folder {folder}: an annotation may only name "
                          "images inside it", "invalid")


def _labelme_image(doc: dict, path: Path, root: Path) -> Path | None:
    """The image a LabelMe file annotates: imagePath relative to the JSON's folder, else (a file written on
    another computer, imagePath C:\\scans\\12.png) that file name beside the JSON or in images/ there;
    only files inside the dataset folder `root` (an annotation must not open any file it names)."""
    image_path = doc.get("imagePath")
    if not isinstance(image_path, str) or not image_path:
        return None
    name = re.split(r"[\\/]", image_path)[-1]
    for candidate in (path.parent / image_path, path.parent / name, path.parent / "images" / name):
        if _inside(candidate, root) and candidate.is_file():
            return candidate
    return None


def _find_labelme(d: Detected, labels: Sequence[str] | None) -> Found:
    found = Found("labelme")
    folder = d.folder
    declared = _labelme_declared(folder)
    seen: list[str] = []
    entries = []
    ignored = []
    for path in _labelme_jsons(folder):
        try:
            doc = _labelme_doc(path)
        except DataError as e:
            if e.code == _OTHER_FORMAT:  # valid JSON without shapes (a splits.json, a config): not an annotation
                ignored.append(path.name)
            else:  # not JSON (truncated, say): surely meant as an annotation
                found.problems.append(e)
            continue
        found.n_annotations += 1
        image = _labelme_image(doc.raw, path, d.root)
        if image is None and not _inside(path.parent / str(doc.raw.get("imagePath")), d.root):
            found.problems.append(_outside_problem(path, f"imagePath {doc.raw.get('imagePath')!r}", d.root))
            continue
        if image is None:
            found.problems.append(DataError(path, f"image {doc.raw.get('imagePath')!r} (imagePath, relative to this "
                                                  "file) does not exist", "missing"))
            continue
        seen.extend(s.label for s in doc.entries[""].shapes)
        entries.append((image, path))
    if ignored:
        found.notes.append(f"not LabelMe files, ignored: {', '.join(ignored)}")
    available = declared if declared is not None else seen
    where = folder / "labels.txt" if declared is not None else folder
    chosen = _choose_labels(available, labels, where, found)
    if declared is not None:
        found.notes.append(f"labels declared in {folder.name}/labels.txt: {', '.join(declared)}")
    names: dict[str, Path] = {}
    used: set[Path] = set()
    for image, path in entries:
        used.add(image)
        used.add(image.resolve())
        _add_case(found, names, image.stem, image, Annotation("labelme", path, "", chosen), path)
    folders = {image.parent for image, _ in entries} | ({folder} if list_images(folder) else set())
    found.n_images = sum(len(list_images(f)) for f in folders)
    _unannotated(folders, used, found, "no LabelMe file names it")
    return found


# CVAT and COCO ---------------------------------------------------------------------------------------


def _image_dirs(file: Path, coco: bool) -> list[Path]:
    """Where the images of a CVAT/COCO file are looked for, in this order (first hit wins per image)."""
    base = file.parent
    dirs = [base / "images", base]
    if coco and base.name == "annotations":  # the COCO layout: DATA/annotations/*.json, images beside it
        dirs += [base.parent / "images", base.parent]
    return dirs


def _locate(name: str, dirs: Sequence[Path]) -> Path | None:
    """The first `dir / name` that is a file inside the dataset folder (the last of `dirs`)."""
    for d in dirs:
        p = d / name
        if _inside(p, dirs[-1]) and p.is_file():
            return p
    return None


def _find_shared(d: Detected, labels: Sequence[str] | None, fmt: str) -> Found:
    found = Found(fmt)
    try:
        doc = _cvat_doc(d.file) if fmt == "cvat" else _coco_doc(d.file)
    except DataError as e:
        found.problems.append(e)
        return found
    found.problems.extend(doc.problems)
    found.notes.extend(doc.notes)
    chosen = _choose_labels(doc.labels, labels, d.file, found)
    dirs = _image_dirs(d.file, fmt == "coco")
    names: dict[str, Path] = {}
    used: set[Path] = set()
    folders = []
    found.n_images = len(doc.entries)
    for key, entry in doc.entries.items():
        image = _locate(entry.image, dirs)
        if image is None and not all(_inside(folder / entry.image, dirs[-1]) for folder in dirs):
            found.problems.append(_outside_problem(d.file, f"image {entry.image}{entry.label}", dirs[-1]))
            continue
        if image is None:
            where = ", ".join(str(p) for p in dirs)
            found.problems.append(DataError(d.file, f"image {entry.image}{entry.label}: the image file does not "
                                                    f"exist (looked in {where})", "missing"))
            continue
        used.add(image)
        used.add(image.resolve())
        folders.append(image.parent)
        found.n_annotations += bool(entry.shapes)
        _add_case(found, names, Path(entry.image).stem, image, Annotation(fmt, d.file, key, chosen), d.file)
    _unannotated(folders, used, found, f"{d.file.name} does not list it")
    return found


# --------------------------------------------------------------------------------------------- parsing


@dataclass
class _Shape:
    label: str
    kind: str  # polygon, rectangle, circle, ellipse, rle, bitmap, open, point, or the format's own word
    data: object  # points (n, 2) float array, ellipse parameters, RLE, or the raw value to complain about
    where: str  # how a message names it: "shape 3 (lesion)", "annotation 17 (lesion)"
    rotation: float = 0.0  # degrees, clockwise on screen (CVAT boxes and ellipses)


@dataclass
class _Entry:
    """One scan's part of an annotation file."""

    image: str  # as the file names it
    width: int | None
    height: int | None
    shapes: list[_Shape] = field(default_factory=list)
    problems: list[DataError] = field(default_factory=list)  # fatal: unknown labels, malformed shapes
    label: str = ""  # " (id 3)": what names the entry in a message besides its image


@dataclass
class _Doc:
    entries: dict[str, _Entry]
    labels: list[str]
    problems: list[DataError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: object = None


def _as_size(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _points(value, where: str, path: Path, problems: list[DataError]) -> np.ndarray | None:
    """[[x, y], ...] -> float (n, 2); None (and a problem) when it is not a list of finite pairs."""
    try:
        pts = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        pts = None
    if pts is None or pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        problems.append(DataError(path, f"{where}: points must be a list of [x, y] number pairs"))
        return None
    return pts


# LabelMe --------------------------------------------------------------------------------------------

_LABELME_KINDS = {"polygon": "polygon", "rectangle": "rectangle", "circle": "circle", "mask": "bitmap",
                  "linestrip": "open", "line": "open", "point": "point", "points": "point"}


def _labelme_doc(path: Path, data: bytes | None = None) -> _Doc:
    return _cached("labelme", path, data, lambda b: _parse_labelme(b, path))


def _parse_labelme(data: bytes, path: Path) -> _Doc:
    doc = _parse_json(data, path)
    if not isinstance(doc, dict) or not isinstance(doc.get("shapes"), list):
        raise DataError(path, "not a LabelMe file (a JSON object with a \"shapes\" list)", _OTHER_FORMAT)
    entry = _Entry(str(doc.get("imagePath")), _as_size(doc.get("imageWidth")), _as_size(doc.get("imageHeight")))
    for i, s in enumerate(doc["shapes"], start=1):
        if not isinstance(s, dict) or not isinstance(s.get("label"), str):
            entry.problems.append(DataError(path, f"shape {i}: not an object with a \"label\" string"))
            continue
        kind_name = s.get("shape_type") or "polygon"  # LabelMe 3 wrote null for polygons
        kind = _LABELME_KINDS.get(kind_name, kind_name)
        where = f"shape {i} ({s['label']}, {kind_name})"
        pts = _points(s.get("points"), where, path, entry.problems)
        if pts is None:
            continue
        entry.shapes.append(_Shape(s["label"], kind, (pts, s.get("mask")) if kind == "bitmap" else pts, where))
    return _Doc({"": entry}, [s.label for s in entry.shapes], raw=doc)


# CVAT -------------------------------------------------------------------------------------------------

_CVAT_KINDS = {"polygon": "polygon", "box": "rectangle", "ellipse": "ellipse", "mask": "rle", "polyline": "open",
               "points": "point", "cuboid": "cuboid", "skeleton": "skeleton"}


def _cvat_doc(path: Path, data: bytes | None = None) -> _Doc:
    return _cached("cvat", path, data, lambda b: _parse_cvat(b, path))


def _float(el: ET.Element, name: str) -> float:
    value = float(el.attrib[name])
    if not math.isfinite(value):
        raise ValueError(name)
    return value


def _parse_cvat(data: bytes, path: Path) -> _Doc:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DataError(path, f"not valid XML ({e}): the file is damaged or incomplete", "corrupt") from None
    if root.tag != "annotations":
        raise DataError(path, f"not a CVAT for images 1.1 file (root element <{root.tag}>, expected <annotations>)")
    declared = [el.text.strip() for el in root.findall("./meta//labels/label/name") if el.text and el.text.strip()]
    declared = list(dict.fromkeys(declared))
    doc = _Doc({}, [])
    if root.find("track") is not None:
        doc.problems.append(DataError(path, "holds <track> elements (CVAT for video): tracks are not read; export "
                                            "the task as CVAT for images 1.1", SUSPECT))
    seen: list[str] = []
    for n, im in enumerate(root.iter("image"), start=1):
        name = im.get("name")
        if not name:
            doc.problems.append(DataError(path, f"<image> number {n} has no name attribute"))
            continue
        try:
            width, height = _as_size(int(im.get("width", ""))), _as_size(int(im.get("height", "")))
        except ValueError:
            width = height = None
        entry = _Entry(name, width, height, label=f" (id {im.get('id')})" if im.get("id") is not None else "")
        if name in doc.entries:
            doc.problems.append(DataError(path, f"image {name} is listed twice; merge its shapes into one <image>"))
            continue
        counts: Counter = Counter()
        for el in im:
            if el.tag == "tag" or el.tag not in _CVAT_KINDS:
                continue
            label = el.get("label", "")
            counts[el.tag] += 1
            where = f"image {name}: {el.tag} {counts[el.tag]} ({label})"
            if declared and label not in declared:
                entry.problems.append(DataError(path, f"{where}: unknown label {label!r} (labels declared in <meta>: "
                                                      f"{', '.join(declared)})"))
                continue
            seen.append(label)
            entry.shapes.append(_cvat_shape(el, label, where, path, entry))
        doc.entries[name] = entry
    doc.labels = declared or list(dict.fromkeys(seen))
    return doc


def _cvat_shape(el: ET.Element, label: str, where: str, path: Path, entry: _Entry) -> _Shape:
    kind = _CVAT_KINDS[el.tag]
    rotation = 0.0
    try:
        rotation = float(el.get("rotation", 0) or 0)
        if kind == "rectangle":
            x0, y0, x1, y1 = (_float(el, k) for k in ("xtl", "ytl", "xbr", "ybr"))
            data: object = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        elif kind == "ellipse":
            data = tuple(_float(el, k) for k in ("cx", "cy", "rx", "ry"))
        elif kind == "rle":
            counts = [int(c) for c in el.attrib["rle"].replace(" ", "").split(",") if c]
            data = (counts, *(int(el.attrib[k]) for k in ("left", "top", "width", "height")))
        elif kind in ("polygon", "open", "point"):
            text = el.attrib["points"].strip()
            data = np.array([[float(v) for v in pair.split(",")] for pair in text.split(";") if pair], dtype=np.float64)
            if data.ndim != 2 or (data.size and data.shape[1] != 2) or not np.isfinite(data).all():
                raise ValueError("points")
            data = data.reshape(-1, 2)
        else:
            data = None
    except (KeyError, ValueError) as e:
        entry.problems.append(DataError(path, f"{where}: malformed or missing attribute ({e}); CVAT writes "
                                              "points=\"x,y;x,y;...\" (polygon), xtl/ytl/xbr/ybr (box), "
                                              "cx/cy/rx/ry (ellipse), rle/left/top/width/height (mask)"))
        return _Shape(label, "broken", None, where)
    return _Shape(label, kind, data, where, rotation)


# COCO -------------------------------------------------------------------------------------------------


def _coco_doc(path: Path, data: bytes | None = None) -> _Doc:
    return _cached("coco", path, data, lambda b: _parse_coco(_parse_json(b, path), path))


def _parse_coco(doc: object, path: Path) -> _Doc:
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise DataError(path, "not a COCO file (a JSON object with \"images\", \"annotations\" and \"categories\")",
                        _OTHER_FORMAT)
    cats = doc.get("categories")
    if not isinstance(cats, list):
        raise DataError(path, "no \"categories\" list: COCO names each category_id there")
    out = _Doc({}, [])
    category: dict[object, str] = {}
    for c in cats:
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            out.problems.append(DataError(path, f"category {c!r}: needs an id and a name"))
            continue
        category[c["id"]] = c["name"]
    out.labels = list(dict.fromkeys(category.values()))
    for im in doc["images"]:
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            out.problems.append(DataError(path, f"image entry {str(im)[:60]}: needs an id and a file_name"))
            continue
        key = str(im["id"])
        if key in out.entries:
            out.problems.append(DataError(path, f"image id {key} is used twice ({out.entries[key].image} and "
                                                f"{im['file_name']})"))
            continue
        out.entries[key] = _Entry(im["file_name"], _as_size(im.get("width")), _as_size(im.get("height")),
                                  label=f" (id {key})")
    for n, a in enumerate(doc["annotations"], start=1):
        if not isinstance(a, dict):
            out.problems.append(DataError(path, f"annotation number {n} is not an object"))
            continue
        aid = a.get("id", f"number {n}")
        entry = out.entries.get(str(a.get("image_id")))
        if entry is None:
            out.problems.append(DataError(path, f"annotation {aid}: image_id {a.get('image_id')!r} is not in "
                                                "images"))
            continue
        name = category.get(a.get("category_id"))
        if name is None:
            known = ", ".join(f"{k} {v}" for k, v in category.items()) or "none"
            entry.problems.append(DataError(path, f"image {entry.image}{entry.label}: annotation {aid}: unknown "
                                                  f"label: category_id {a.get('category_id')!r} is not in "
                                                  f"categories ({known})"))
            continue
        where = f"image {entry.image}{entry.label}: annotation {aid} ({name})"
        seg = a.get("segmentation")
        if isinstance(seg, dict):
            entry.shapes.append(_Shape(name, "rle", seg, where))
        elif isinstance(seg, list) and seg:
            for k, poly in enumerate(seg, start=1):
                part = f"{where}, polygon {k}" if len(seg) > 1 else where
                try:
                    flat = np.asarray(poly, dtype=np.float64)
                except (TypeError, ValueError):
                    flat = np.zeros(1)
                if flat.ndim != 1 or flat.size % 2 or not np.isfinite(flat).all():
                    entry.problems.append(DataError(path, f"{part}: a polygon must be a flat list [x1, y1, x2, y2, "
                                                          "...]"))
                    continue
                entry.shapes.append(_Shape(name, "polygon", flat.reshape(-1, 2), part))
        else:
            entry.shapes.append(_Shape(name, "none", seg, where))
    return out


# --------------------------------------------------------------------------------------------- geometry


def fill_polygon(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bool HxW: pixels whose centre (i + 0.5, j + 0.5) is inside the polygon (even-odd) or on its outline.

    `points` is float (n, 2) of (x, y) in the continuous convention of the module docstring, implicitly
    closed. Parts outside the image are clipped. A polygon through pixel centres (what hemaseg writes)
    includes those centres however it runs, which is what makes its outlines read back exactly."""
    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not len(pts) or not h or not w:
        return mask
    x0, y0 = pts[:, 0], pts[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    lo = max(0, math.ceil(y0.min() - 0.5 - _EPS))
    hi = min(h - 1, math.floor(y0.max() - 0.5 + _EPS))
    for j in range(lo, hi + 1):  # interior, scanline by scanline through the pixel centres
        yc = j + 0.5
        crossing = (y0 <= yc) != (y1 <= yc)  # half-open: a vertex on the scanline counts once
        if not crossing.any():
            continue
        xa, ya, xb, yb = x0[crossing], y0[crossing], x1[crossing], y1[crossing]
        xs = np.sort(xa + (yc - ya) * (xb - xa) / (yb - ya))
        for a, b in zip(xs[0::2], xs[1::2]):
            i0, i1 = max(0, math.ceil(a - 0.5 - _EPS)), min(w - 1, math.floor(b - 0.5 + _EPS))
            if i0 <= i1:
                mask[j, i0:i1 + 1] = True
    for ax, ay, bx, by in zip(x0, y0, x1, y1):  # the outline itself (horizontal edges, bottom vertices)
        if abs(ay - by) <= _EPS:
            j = ay - 0.5
            if abs(j - round(j)) <= _EPS and 0 <= round(j) < h:
                i0 = max(0, math.ceil(min(ax, bx) - 0.5 - _EPS))
                i1 = min(w - 1, math.floor(max(ax, bx) - 0.5 + _EPS))
                if i0 <= i1:
                    mask[round(j), i0:i1 + 1] = True
            continue
        js = np.arange(max(0, math.ceil(min(ay, by) - 0.5 - _EPS)), min(h - 1, math.floor(max(ay, by) - 0.5 + _EPS)) + 1)
        if not js.size:
            continue
        xc = ax + (js + 0.5 - ay) * (bx - ax) / (by - ay) - 0.5
        on = np.abs(xc - np.round(xc)) <= _EPS
        cols = np.round(xc[on]).astype(np.int64)
        inside = (cols >= 0) & (cols < w)
        mask[js[on][inside], cols[inside]] = True
    return mask


def _fill_ellipse(cx: float, cy: float, rx: float, ry: float, rotation: float, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside or on the ellipse (a circle when rx == ry), rotated clockwise."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    t = math.radians(rotation)
    dx, dy = xs - cx, ys - cy
    u, v = dx * math.cos(t) + dy * math.sin(t), -dx * math.sin(t) + dy * math.cos(t)
    if rx <= 0 or ry <= 0:
        return np.zeros((h, w), dtype=bool)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1 + _EPS


def _rotate(points: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the centre of the points' bounding box, clockwise on screen (CVAT's rotated boxes)."""
    if not degrees:
        return points
    c = (points.min(axis=0) + points.max(axis=0)) / 2
    t = math.radians(degrees)
    r = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return (points - c) @ r.T + c


def self_intersects(points: np.ndarray) -> bool:
    """True when two non-adjacent edges of the closed polygon properly cross. Touching, and running back
    along an edge (an outline around a one-pixel-wide spur), is not crossing: the fill is unambiguous."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    n = len(p)
    if n < 4:
        return False
    a, b = p, np.roll(p, -1, axis=0)
    for i in range(n - 2):
        j = np.arange(i + 2, n - 1 if i == 0 else n)
        if not j.size:
            continue
        c, d = a[j], b[j]
        e = b[i] - a[i]
        d1 = e[0] * (c[:, 1] - a[i, 1]) - e[1] * (c[:, 0] - a[i, 0])
        d2 = e[0] * (d[:, 1] - a[i, 1]) - e[1] * (d[:, 0] - a[i, 0])
        f = d - c
        d3 = f[:, 0] * (a[i, 1] - c[:, 1]) - f[:, 1] * (a[i, 0] - c[:, 0])
        d4 = f[:, 0] * (b[i, 1] - c[:, 1]) - f[:, 1] * (b[i, 0] - c[:, 0])
        if np.any((d1 * d2 < 0) & (d3 * d4 < 0)):
            return True
    return False


def _outside(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, int]) -> bool:
    h, w = shape
    return bool(lo[0] < -_OUTSIDE_SLACK or lo[1] < -_OUTSIDE_SLACK or hi[0] > w + _OUTSIDE_SLACK
                or hi[1] > h + _OUTSIDE_SLACK)


def _rle_decode(rle: dict, shape: tuple[int, int]) -> np.ndarray:
    coco_mask = require("pycocotools.mask", "reading COCO RLE masks")  # only COCO RLE needs it

    counts = rle.get("counts")
    size = rle.get("size")
    if isinstance(counts, list):
        rle = coco_mask.frPyObjects({"counts": counts, "size": size}, *size)
    elif isinstance(counts, str):
        rle = {"counts": counts.encode("ascii"), "size": size}
    with warnings.catch_warnings():  # pycocotools 2.0.x under numpy 2 warns about its own __array__
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(rle).astype(bool)


def coco_rle(mask: np.ndarray) -> dict:
    """Bool HxW -> COCO compressed RLE {"size": [h, w], "counts": str} (column-major, as COCO defines it)."""
    coco_mask = require("pycocotools.mask", "writing COCO RLE masks")
    rle = coco_mask.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def cvat_rle(mask: np.ndarray) -> tuple[list[int], int, int, int, int]:
    """Bool HxW of one shape -> (counts, left, top, width, height) of a CVAT <mask>: runs over the shape's
    bounding box row by row, starting with a (possibly empty) run of background."""
    ys, xs = np.nonzero(mask)
    top, left = int(ys.min()), int(xs.min())
    box = np.asarray(mask[top:ys.max() + 1, left:xs.max() + 1], dtype=bool).ravel()
    change = np.flatnonzero(np.diff(box.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], change, [box.size]])).tolist()
    if box[0]:
        runs = [0] + runs
    return runs, left, top, int(xs.max() - left + 1), int(ys.max() - top + 1)


# --------------------------------------------------------------------------------------------- reading


def read_annotation(ann: Annotation, shape: tuple[int, int], data: bytes | None = None,
                    max_pixels: int | None = MAX_PIXELS_DEFAULT) -> AnnotationRead:
    """The one function from an annotation to a mask: bool HxW for an image of `shape` (H, W), every problem
    (fatal ones make `mask` None), and the shapes per label. `data`: the file's bytes when the caller has
    them already (`load_dataset` fingerprints them)."""
    if ann.format == "nnunet":
        return _read_nnunet(ann, shape, data, max_pixels)
    try:
        if ann.format == "labelme":
            doc = _labelme_doc(ann.path, data)
        elif ann.format == "cvat":
            doc = _cvat_doc(ann.path, data)
        else:
            doc = _coco_doc(ann.path, data)
    except DataError as e:
        return AnnotationRead(None, [e], Counter())
    entry = doc.entries.get(ann.key)
    if entry is None:
        return AnnotationRead(None, [DataError(ann.path, f"no entry {ann.key!r} any more (the file changed while it "
                                                          "was read)")], Counter())
    problems = list(entry.problems)
    h, w = shape
    what = {"labelme": "imageWidth x imageHeight", "cvat": "width x height", "coco": "width x height"}[ann.format]
    name = f"image {entry.image}{entry.label}: " if ann.shared else ""
    if entry.width is not None and entry.height is not None and (entry.width, entry.height) != (w, h):
        problems.append(DataError(ann.path, f"{name}{what} {entry.width}x{entry.height} does not match the image "
                                            f"({w}x{h})"))
    mask = np.zeros(shape, dtype=bool)
    counts = Counter(s.label for s in entry.shapes)
    for s in entry.shapes:
        if s.label in ann.labels:
            part = _shape_mask(s, ann.path, shape, problems, max_pixels)
            if part is not None:
                mask |= part
    fatal = any(p.code != SUSPECT for p in problems)
    unreviewed = ann.format == "labelme" and is_unreviewed(doc.raw)
    return AnnotationRead(None if fatal else mask, problems, counts, unreviewed=unreviewed)


def is_unreviewed(labelme: object) -> bool:
    """Whether a LabelMe document (the parsed JSON) still carries UNREVIEWED_FLAG ticked."""
    flags = labelme.get("flags") if isinstance(labelme, dict) else None
    return isinstance(flags, dict) and flags.get(UNREVIEWED_FLAG) is True


def unreviewed_warning(n_unreviewed: int, n_masks: int) -> str:
    """The line check and train print when masks come from LabelMe files nobody has reviewed."""
    return (f"{n_unreviewed} of {n_masks} masks are model proposals nobody has reviewed (LabelMe flag "
            f"{UNREVIEWED_FLAG}): untick it in LabelMe after checking each")


def _shape_mask(s: _Shape, path: Path, shape: tuple[int, int], problems: list[DataError],
                max_pixels: int | None) -> np.ndarray | None:
    """One lesion shape's pixels, or None with its problem recorded."""
    h, w = shape
    if s.kind == "broken":
        return None  # its problem was recorded when the file was parsed
    if s.kind == "open":
        problems.append(DataError(path, f"{s.where}: an open line cannot be a lesion outline; draw it as a polygon "
                                        "or give it another label"))
        return None
    if s.kind == "point":
        problems.append(DataError(path, f"{s.where}: points have no area; draw the lesion as a polygon or give "
                                        "them another label"))
        return None
    if s.kind == "none":
        problems.append(DataError(path, f"{s.where}: no segmentation (a bounding box alone is not an outline)"))
        return None
    if s.kind not in _AREA_SHAPES:
        problems.append(DataError(path, f"{s.where}: shape type {s.kind!r} is not read (polygon, rectangle, circle, "
                                        "ellipse and mask are)"))
        return None
    if s.kind == "rle" and isinstance(s.data, dict):
        return _coco_rle_mask(s, path, shape, problems)
    if s.kind == "rle":
        return _cvat_mask(s, path, shape, problems)
    if s.kind == "bitmap":
        return _labelme_bitmap(s, path, shape, problems, max_pixels)
    if s.kind in ("polygon", "rectangle", "circle", "ellipse"):
        far = float(np.abs(np.asarray(s.data, dtype=np.float64)).max(initial=0.0))
        if far > _FAR_PX:
            problems.append(DataError(path, f"{s.where}: a coordinate or radius of {far:g} px, beyond {_FAR_PX:,.0f}: "
                                            "not an outline of this image"))
            return None
    if s.kind == "ellipse":
        cx, cy, rx, ry = s.data
        r = max(rx, ry)
        if _outside(np.array([cx - r, cy - r]), np.array([cx + r, cy + r]), shape):
            problems.append(DataError(path, f"{s.where}: reaches outside the {w}x{h} image (clipped)", SUSPECT))
        return _fill_ellipse(cx, cy, rx, ry, s.rotation, shape)
    pts = s.data
    if s.kind == "circle":
        if len(pts) != 2:
            problems.append(DataError(path, f"{s.where}: a circle needs 2 points (centre, a point on it); "
                                            f"got {len(pts)}"))
            return None
        (cx, cy), (px, py) = pts
        r = math.hypot(px - cx, py - cy)
        if _outside(np.array([cx - r, cy - r]), np.array([cx + r, cy + r]), shape):
            problems.append(DataError(path, f"{s.where}: reaches outside the {w}x{h} image (clipped)", SUSPECT))
        return _fill_ellipse(cx, cy, r, r, 0.0, shape)
    if s.kind == "rectangle":
        if len(pts) == 2:  # LabelMe: two opposite corners
            (ax, ay), (bx, by) = pts
            pts = np.array([[ax, ay], [bx, ay], [bx, by], [ax, by]])
        if len(pts) != 4:
            problems.append(DataError(path, f"{s.where}: a rectangle needs 2 corners; got {len(pts)} points"))
            return None
        pts = _rotate(pts, s.rotation)
    elif len(pts) < 3:
        problems.append(DataError(path, f"{s.where}: polygon with {len(pts)} point(s); a polygon needs at least 3"))
        return None
    elif self_intersects(pts):
        problems.append(DataError(path, f"{s.where}: the polygon crosses itself (filled by the even-odd rule: the "
                                        "parts it wraps twice are left out)", SUSPECT))
    if _outside(pts.min(axis=0), pts.max(axis=0), shape):
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        problems.append(DataError(path, f"{s.where}: reaches outside the {w}x{h} image (x {lo[0]:g} to {hi[0]:g}, "
                                        f"y {lo[1]:g} to {hi[1]:g}; clipped)", SUSPECT))
    return fill_polygon(pts, shape)


def _coco_rle_mask(s: _Shape, path: Path, shape: tuple[int, int], problems: list[DataError]) -> np.ndarray | None:
    size = s.data.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)) \
            or not isinstance(s.data.get("counts"), (str, list)):
        problems.append(DataError(path, f"{s.where}: an RLE segmentation needs \"size\": [h, w] and \"counts\""))
        return None
    if tuple(size) != tuple(shape):
        problems.append(DataError(path, f"{s.where}: RLE size {size[1]}x{size[0]} does not match the image "
                                        f"({shape[1]}x{shape[0]})"))
        return None
    try:
        return _rle_decode(s.data, shape)
    except MissingExtra as e:
        problems.append(DataError(path, f"{s.where}: {e}"))
    except Exception as e:  # noqa: BLE001 - pycocotools raises bare exceptions for malformed counts
        problems.append(DataError(path, f"{s.where}: RLE counts cannot be decoded ({e})"))
    return None


def _cvat_mask(s: _Shape, path: Path, shape: tuple[int, int], problems: list[DataError]) -> np.ndarray | None:
    counts, left, top, width, height = s.data
    h, w = shape
    if width < 1 or height < 1 or sum(counts) != width * height or any(c < 0 for c in counts):
        problems.append(DataError(path, f"{s.where}: its RLE covers {sum(counts)} pixels but its box is {width}x"
                                        f"{height} = {width * height}"))
        return None
    box = np.repeat(np.arange(len(counts)) % 2 == 1, counts).reshape(height, width)
    if left < 0 or top < 0 or left + width > w or top + height > h:
        problems.append(DataError(path, f"{s.where}: the mask's box reaches outside the {w}x{h} image (clipped)",
                                  SUSPECT))
    mask = np.zeros(shape, dtype=bool)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, h), min(left + width, w)
    if y0 < y1 and x0 < x1:
        mask[y0:y1, x0:x1] = box[y0 - top:y1 - top, x0 - left:x1 - left]
    return mask


def _labelme_bitmap(s: _Shape, path: Path, shape: tuple[int, int], problems: list[DataError],
                    max_pixels: int | None) -> np.ndarray | None:
    """A LabelMe >= 5.3 "mask" shape: a base64 PNG covering pixels points[0] to points[1], both included."""
    pts, encoded = s.data
    if len(pts) != 2 or not isinstance(encoded, str):
        problems.append(DataError(path, f"{s.where}: a mask shape needs 2 corner points and a base64 PNG \"mask\""))
        return None
    (x0, y0), (x1, y1) = np.round(pts).astype(int)
    try:
        with open_image(base64.b64decode(encoded), max_pixels, name=path) as im:
            bits = np.asarray(im.convert("L")) > 0
    except (ValueError, TypeError):
        problems.append(DataError(path, f"{s.where}: its \"mask\" is not a base64 PNG"))
        return None
    if bits.shape != (y1 - y0 + 1, x1 - x0 + 1):
        problems.append(DataError(path, f"{s.where}: its mask is {bits.shape[1]}x{bits.shape[0]} but its corners "
                                        f"span {x1 - x0 + 1}x{y1 - y0 + 1} pixels"))
        return None
    h, w = shape
    if x0 < 0 or y0 < 0 or x1 >= w or y1 >= h:
        problems.append(DataError(path, f"{s.where}: reaches outside the {w}x{h} image (clipped)", SUSPECT))
    mask = np.zeros(shape, dtype=bool)
    ya, xa, yb, xb = max(y0, 0), max(x0, 0), min(y1 + 1, h), min(x1 + 1, w)
    if ya < yb and xa < xb:
        mask[ya:yb, xa:xb] = bits[ya - y0:yb - y0, xa - x0:xb - x0]
    return mask


def _read_nnunet(ann: Annotation, shape: tuple[int, int], data: bytes | None,
                 max_pixels: int | None) -> AnnotationRead:
    """An nnU-Net label map: one channel of integer labels; unknown values are a problem, never guessed."""
    try:
        with open_image(data if data is not None else ann.path, max_pixels, name=ann.path) as im:
            if im.mode not in ("L", "P", "1", "I") and not im.mode.startswith("I;16"):
                return AnnotationRead(None, [DataError(ann.path, f"a label map must hold one channel of integer "
                                                                 f"labels; this one is mode {im.mode}")], Counter())
            raw = np.asarray(im)
    except DataError as e:
        return AnnotationRead(None, [e], Counter())
    if raw.shape != tuple(shape):
        problem = f"label size {raw.shape[1]}x{raw.shape[0]} does not match the image ({shape[1]}x{shape[0]})"
        return AnnotationRead(None, [DataError(ann.path, problem)], Counter())
    values = np.unique(raw)
    unknown = [int(v) for v in values if int(v) not in ann.known]
    problems = []
    if unknown:
        problems.append(DataError(ann.path, f"unknown label value(s) {', '.join(map(str, unknown[:6]))} (dataset.json "
                                            f"labels have {', '.join(map(str, ann.known))})"))
    present = {int(v) for v in values}
    counts = Counter({name: 1 for name, vals in ann.declared if name != "background" and present & set(vals)})
    mask = np.isin(raw, np.asarray(ann.values, dtype=np.int64)) if ann.values else np.zeros(shape, dtype=bool)
    return AnnotationRead(None if problems else mask, problems, counts, tuple(int(v) for v in values))


def annotation_mask(ann: Annotation, shape: tuple[int, int], data: bytes | None = None,
                    max_pixels: int | None = MAX_PIXELS_DEFAULT) -> np.ndarray:
    """`read_annotation`'s mask, raising its first fatal problem; the SUSPECT ones are logged at debug level
    (`hemaseg check` lists them)."""
    result = read_annotation(ann, shape, data, max_pixels)
    for p in result.problems:
        if p.code != SUSPECT:
            raise p
        log.debug("%s", p)
    return result.mask


# --------------------------------------------------------------------------------------------- writing


def simplify_outline(points: Sequence[Sequence[float]], tolerance: float) -> list[tuple[float, float]]:
    """Douglas-Peucker on a closed outline: the fewest of its vertices such that every dropped vertex lies
    within `tolerance` px of the simplified outline (distance to the segment, so a spur that runs out and
    back is kept). Tolerance 0 drops only vertices exactly on the segment between their neighbours."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    n = len(pts)
    if n <= 3:
        return [tuple(p) for p in pts.tolist()]
    far = int(np.argmax(((pts - pts[0]) ** 2).sum(axis=1)))
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[far] = True
    ring = np.vstack([pts, pts[:1]])  # the second half ends back at the start
    stack = [(0, far), (far, n)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        a, b = ring[i], ring[j]
        seg = ring[i + 1:j]
        ab = b - a
        denom = float(ab @ ab)
        if denom == 0.0:
            d = np.sqrt(((seg - a) ** 2).sum(axis=1))
        else:
            t = np.clip(((seg - a) @ ab) / denom, 0.0, 1.0)
            d = np.sqrt(((seg - (a + t[:, None] * ab)) ** 2).sum(axis=1))
        k = int(np.argmax(d))
        if d[k] > tolerance:
            m = i + 1 + k
            keep[m % n] = True
            stack += [(i, m), (m, j)]
    return [tuple(p) for p in pts[keep].tolist()]


def _pixel_squares(pixels: list[tuple[int, int]]) -> list[tuple[float, float]]:
    """The outline along the pixel edges of a lesion of 1 or 2 pixels (too small for a polygon through
    pixel centres), clockwise on screen: it encloses exactly their centres."""
    (px, py), *rest = sorted(pixels, key=lambda p: (p[1], p[0]))  # p: the upper (then left) pixel
    if not rest:
        return [(px, py), (px + 1, py), (px + 1, py + 1), (px, py + 1)]
    qx, qy = rest[0]
    if qx == px or qy == py:  # side by side: one rectangle
        return [(px, py), (qx + 1, py), (qx + 1, qy + 1), (px, qy + 1)]
    # two pixels touching at a corner: two squares joined there (the outline passes that corner twice)
    if qx > px:
        return [(px, py), (px + 1, py), (px + 1, py + 1), (qx + 1, qy), (qx + 1, qy + 1), (qx, qy + 1),
                (qx, qy), (px, py + 1)]
    return [(px, py), (px + 1, py), (px + 1, py + 1), (px, py + 1), (qx + 1, qy + 1), (qx, qy + 1), (qx, qy),
            (px, py + 1)]


def lesion_outlines(mask: np.ndarray, tolerance: float = LABELME_TOLERANCE_PX) -> list[list[tuple[float, float]]]:
    """Each lesion of a bool HxW mask (`hemaseg.lesions`, largest first) as a polygon in annotation
    coordinates: its traced outline (`Lesion.contour`, through border pixel centres, i.e. +0.5) simplified
    by `simplify_outline` at `tolerance` px, halving the tolerance while the result would cross itself.

    Read back by `fill_polygon`, tolerance 0 gives exactly the mask with its holes filled (polygons have
    none); a larger tolerance moves the outline by at most that many pixels. A lesion of 1 or 2 pixels is
    outlined along its pixel edges instead (exact too)."""
    from hemaseg.lesions import find_lesions

    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 px, got {tolerance}")
    _, lesions = find_lesions(mask)
    outlines = []
    for lesion in lesions:
        contour = lesion.contour
        if lesion.area_px <= 2:  # its contour lists its pixels: too few for a polygon through their centres
            outlines.append([(float(x), float(y)) for x, y in _pixel_squares(list(dict.fromkeys(contour)))])
            continue
        tol = tolerance
        while True:
            poly = simplify_outline(contour, tol)
            if len(poly) >= 3 and not self_intersects(np.asarray(poly)):
                break
            if tol == 0:
                poly = [tuple(map(float, p)) for p in contour]
                break
            tol = tol / 2 if tol > 0.05 else 0.0
        outlines.append([(x + 0.5, y + 0.5) for x, y in poly])
    return outlines


def labelme_document(mask: np.ndarray, image_path: str, tolerance: float = LABELME_TOLERANCE_PX,
                     label: str = LESION_LABEL, proposal: bool = False, model: str | None = None) -> dict:
    """A LabelMe file (as a dict) with each lesion of `mask` as a polygon shape of `label` (see
    `lesion_outlines` for the tolerance), imageData null (LabelMe loads the image from `image_path`,
    relative to the JSON file), so a clinician can open it in LabelMe, correct the outlines and save.
    `proposal`: the mask is a model's (named `model`, in each shape's description), so the file is flagged
    UNREVIEWED_FLAG until someone unticks it in LabelMe."""
    h, w = mask.shape
    description = (f"hemaseg proposal ({model})" if model else "hemaseg proposal") if proposal else ""
    shapes = [{"label": label, "points": [[round(x, 3), round(y, 3)] for x, y in outline], "group_id": None,
               "description": description, "shape_type": "polygon", "flags": {}, "mask": None}
              for outline in lesion_outlines(mask, tolerance)]
    flags = {UNREVIEWED_FLAG: True} if proposal else {}
    return {"version": LABELME_VERSION, "flags": flags, "shapes": shapes, "imagePath": image_path, "imageData": None,
            "imageHeight": int(h), "imageWidth": int(w)}
