"""Saving a labelled scan into DATASET, in hemaseg's folder layout, so `hemaseg train DATASET` reads it as is.

    DATASET/images/NAME.png         the scan's gray pixels (8-bit when they are, else 16-bit), nothing else
    DATASET/mask/NAME.png           the mask, 0/255, at the scan's size
    DATASET/calibration/NAME.json   pixel spacing and where it came from (or why there is none)
    DATASET/label_manifest.csv      one row per saved scan: how its mask was made, the seconds spent,
                                    the spacing and its source, the model used

A save is all or nothing. The scan and the mask are written to temp names first (fsynced), then renamed,
the mask last; a journal (`.label_pending.json`) written before the renames lets the next start finish or
undo a save a crash cut short, and a failed write (a full disk) is undone on the spot. So `images/` never
holds a scan without its mask from this tool, and `mask/NAME.png` is never half a file.

Privacy. Every scan is re-encoded from its decoded pixels (text chunks, EXIF and DICOM headers are
dropped); the manifest and sidecar hold no name, ID, date or path from the source. NAME is the source
file's stem, because that is what a labeller recognises, except for a DICOM file whose stem contains its
Patient ID or a part of its Patient Name (read only to compare, never stored): that scan is saved as
`scan-<hash of its pixels>`. A PNG or JPEG named after a patient keeps that name: rename such files before
labelling. A DICOM scan may also carry burned-in text (BurnedInAnnotation not "NO"); its sidecar says so.

Confinement. Names are file names (no separators, not "." or ".."), and every path is resolved and must lie
inside DATASET, whose images/, mask/ and calibration/ may not be links leading elsewhere: nothing is
written outside DATASET.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hemaseg.data.dicom import neutral_name  # noqa: F401 - the labelling page imports it from here
from hemaseg.io import atomic_write_text, gray_to_png, plain_cell, png_bytes, remove_stale_temps, write_csv
from hemaseg.spacing import Spacing

log = logging.getLogger(__name__)

IMAGES, MASKS, CALIBRATION = "images", "mask", "calibration"
MANIFEST = "label_manifest.csv"
JOURNAL = ".label_pending.json"
MANIFEST_COLUMNS = ("image", "mask", "method", "seconds", "pixel_spacing_x_mm", "pixel_spacing_y_mm",
                    "spacing_source", "model")
METHODS = ("accepted", "box", "edited")  # the model's proposal as is; LiteMedSAM's mask from a box; hand-edited
_BAD_NAME = re.compile(r"[/\\\x00-\x1f]")
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


class OutsideDataset(ValueError):
    """A name or path that would lead outside DATASET."""


@dataclass(frozen=True)
class SavedScan:
    """What one save wrote (paths relative to DATASET) and its manifest row."""

    name: str
    image: str
    mask: str
    calibration: str
    row: dict
    area_px: int


def check_name(name: str) -> str:
    """A dataset name must be a plain file name: no separators, no control characters, not . or ..."""
    if not isinstance(name, str) or not name or len(name) > 200 or _BAD_NAME.search(name) \
            or name in (".", "..") or name.startswith("."):
        raise OutsideDataset(f"{name!r} is not a plain file name (no / or \\, not starting with a dot)")
    return name


def mask_to_png(mask: np.ndarray) -> bytes:
    return png_bytes(np.asarray(mask, bool).astype(np.uint8) * 255)


def _write_temp(path: Path, data: bytes) -> Path:
    """`data` in a new temp file beside `path` (the name `io.remove_stale_temps` clears), fsynced."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, _TEMP_FLAGS, 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temp file name beside {path}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class Store:
    """DATASET as the labelling page writes it. Thread-safe: one save at a time."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self._real = self.root.resolve()
        if (self.root / "masks").is_dir():
            raise ValueError(f"{self.root}: has a masks/ folder; the label tool writes mask/ (hemaseg reads one "
                             "of them, not both): rename masks/ to mask/ first")
        for sub in (IMAGES, MASKS, CALIBRATION):
            self._folder(sub).mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self.recover()

    # --- paths -----------------------------------------------------------------------------------------

    def _folder(self, sub: str) -> Path:
        folder = self.root / sub
        real = folder.resolve()
        if real.parent != self._real:  # images/ etc. a link to elsewhere, or DATASET moved under us
            raise OutsideDataset(f"{folder} leads outside {self.root} (a symbolic link?); refusing to write there")
        return folder

    def path(self, sub: str, name: str, suffix: str) -> Path:
        """DATASET/sub/NAME+suffix, refused (OutsideDataset) unless it resolves to a file right there."""
        folder = self._folder(sub)
        path = folder / f"{check_name(name)}{suffix}"
        if path.resolve().parent != folder.resolve():
            raise OutsideDataset(f"{name!r} leads outside {folder}")
        if path.is_symlink():
            raise OutsideDataset(f"{path} is a symbolic link; refusing to write through it")
        return path

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # --- reading ---------------------------------------------------------------------------------------

    def is_saved(self, name: str) -> bool:
        try:
            return self.path(MASKS, name, ".png").is_file() and self.path(IMAGES, name, ".png").is_file()
        except OutsideDataset:
            return False

    def saved_names(self) -> set[str]:
        images = {p.stem for p in self._folder(IMAGES).glob("*.png")}
        return {p.stem for p in self._folder(MASKS).glob("*.png") if p.stem in images}

    def saved_mask(self, name: str) -> np.ndarray | None:
        """The saved mask (bool HxW), or None when NAME was not saved."""
        from hemaseg.data.dataset import read_mask

        path = self.path(MASKS, name, ".png")
        return read_mask(path) if path.is_file() else None

    def manifest(self) -> dict[str, dict]:
        """image file name -> its manifest row."""
        path = self.root / MANIFEST
        if not path.is_file():
            return {}
        with open(path, newline="", encoding="utf-8") as f:
            rows = [{k: plain_cell(v) if isinstance(v, str) else v for k, v in row.items()}
                    for row in csv.DictReader(f)]  # as written: write_csv neutralises formula-like text
        return {row["image"]: row for row in rows}

    def row(self, name: str) -> dict | None:
        return self.manifest().get(f"{name}.png")

    # --- writing ---------------------------------------------------------------------------------------

    def save(self, name: str, gray: np.ndarray, mask: np.ndarray, method: str, seconds: float | None,
             spacing: Spacing | None, spacing_note: str | None = None, model: str | None = None,
             burned_in_annotation: bool | None = None, source_format: str | None = None) -> SavedScan:
        """Write scan + mask (+ sidecar, + manifest row) for NAME, all or nothing. `gray` float32 HxW in
        [0, 1], `mask` bool HxW of the same size; `method` one of METHODS."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        mask = np.asarray(mask, bool)
        if mask.shape != gray.shape:
            raise ValueError(f"the mask is {mask.shape[1]}x{mask.shape[0]} but the scan is "
                             f"{gray.shape[1]}x{gray.shape[0]}; send a mask at the scan's size")
        image_path, mask_path = self.path(IMAGES, name, ".png"), self.path(MASKS, name, ".png")
        side_path = self.path(CALIBRATION, name, ".json")
        self._check_no_namesake(name)
        image_bytes, mask_bytes = gray_to_png(gray), mask_to_png(mask)
        row = {"image": image_path.name, "mask": mask_path.name, "method": method,
               "seconds": None if seconds is None else round(float(seconds), 1),
               "pixel_spacing_x_mm": spacing.x_mm if spacing else None,
               "pixel_spacing_y_mm": spacing.y_mm if spacing else None,
               "spacing_source": spacing.source if spacing else None, "model": model or None}
        sidecar = {"image": image_path.name, "pixel_spacing": spacing.to_dict() if spacing else None,
                   "note": None if spacing else (spacing_note or "no calibration: measurements stay in pixels"),
                   "source_format": source_format, "burned_in_annotation": burned_in_annotation}
        with self._lock:
            journal = {"name": name, "had_image": image_path.exists(), "had_mask": mask_path.exists(),
                       "mask_sha256": hashlib.sha256(mask_bytes).hexdigest(), "row": row, "sidecar": sidecar}
            self._commit_pair(image_path, image_bytes, mask_path, mask_bytes, journal)
            try:
                self._finish(name, row, sidecar)
            except BaseException:
                if not journal["had_mask"]:  # a new pair: undo it, so the page's "not saved" is the truth
                    mask_path.unlink(missing_ok=True)
                    side_path.unlink(missing_ok=True)
                    if not journal["had_image"]:
                        image_path.unlink(missing_ok=True)
                    (self.root / JOURNAL).unlink(missing_ok=True)
                raise  # a re-save keeps its journal: the next start finishes it
        log.info("saved %s (%s, %d mask pixels)", name, method, int(mask.sum()))
        return SavedScan(name, self.relative(image_path), self.relative(mask_path), self.relative(side_path),
                         row, int(mask.sum()))

    def _check_no_namesake(self, name: str) -> None:
        """hemaseg pairs by stem: another images/NAME.jpg, or a mask/NAME_mask.png, would make two."""
        from hemaseg.data.listing import list_images

        others = [p for p in list_images(self._folder(IMAGES)) if p.stem == name and p.suffix != ".png"]
        others += [p for p in list_images(self._folder(MASKS)) if p.stem.startswith(f"{name}_mask")]
        if others:
            raise FileExistsError(f"{others[0]} is already in the dataset under the same name; saving {name} "
                                  "beside it would pair two files with one scan (rename one of them)")

    def _commit_pair(self, image_path: Path, image_bytes: bytes, mask_path: Path, mask_bytes: bytes,
                     journal: dict) -> None:
        temps: list[Path] = []
        renamed_image = False
        try:
            temps.append(_write_temp(image_path, image_bytes))
            temps.append(_write_temp(mask_path, mask_bytes))
            atomic_write_text(self.root / JOURNAL, json.dumps(journal))
            _replace(temps[0], image_path)
            renamed_image = True
            _replace(temps[1], mask_path)  # the mask last: from here on the pair is complete
        except BaseException:
            for t in temps:
                t.unlink(missing_ok=True)
            if renamed_image and not journal["had_image"]:
                image_path.unlink(missing_ok=True)  # no mask to pair with: the scan goes too
            (self.root / JOURNAL).unlink(missing_ok=True)
            raise

    def _finish(self, name: str, row: dict, sidecar: dict) -> None:
        """After the pair is in place: the sidecar, the manifest row, then the journal goes."""
        atomic_write_text(self.path(CALIBRATION, name, ".json"), json.dumps(sidecar, indent=2))
        rows = self.manifest()
        rows[row["image"]] = row
        write_csv(self.root / MANIFEST, [{c: r.get(c) for c in MANIFEST_COLUMNS} for r in rows.values()],
                  MANIFEST_COLUMNS)
        (self.root / JOURNAL).unlink(missing_ok=True)

    def recover(self) -> None:
        """Finish or undo a save that a crash interrupted, and clear stray temp files."""
        journal_path = self.root / JOURNAL
        with self._lock:
            if journal_path.is_file():
                try:
                    journal = json.loads(journal_path.read_text())
                    name = check_name(journal["name"])
                    image_path, mask_path = self.path(IMAGES, name, ".png"), self.path(MASKS, name, ".png")
                    if _sha256(mask_path) == journal["mask_sha256"]:
                        log.warning("%s: finishing the save of %s that was interrupted", self.root, name)
                        self._finish(name, journal["row"], journal["sidecar"])
                    elif not mask_path.exists():
                        log.warning("%s: undoing the save of %s that was interrupted", self.root, name)
                        if not journal["had_image"]:
                            image_path.unlink(missing_ok=True)
                except (ValueError, KeyError, TypeError, OSError) as e:
                    log.warning("%s: cannot read %s (%s); leaving the dataset as it is", self.root, JOURNAL, e)
                journal_path.unlink(missing_ok=True)
            for sub in (IMAGES, MASKS, CALIBRATION):
                remove_stale_temps(self._folder(sub))
            remove_stale_temps(self.root)
