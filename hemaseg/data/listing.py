"""Files on disk: the natural order of scan names, the images of a folder (broken links included, as
problems), the names a mask folder may have, and the inputs of a command (`collect_inputs`, `read_frames`).
Shared by `dataset` and `formats` below both of them."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from pathlib import Path

from hemaseg.data.images import IMAGE_SUFFIXES, Decoded, decode_image, read_head
from hemaseg.data.pixels import DICOM_HEAD_BYTES, DataError, is_dicom

MASK_DIR_NAMES = ("mask", "masks")
SUSPECT = "suspect"  # DataError.code of a problem `check` reports but reading accepts (formats: a polygon
# that crosses itself, a shape reaching outside its image, a miscounted numTraining)


def natural_key(text: str) -> tuple:
    """Sort key so that "img2" < "img10"; the raw string breaks ties ("a01" vs "a1") to stay deterministic."""
    parts = re.split(r"(\d+)", text.lower())
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), text


def natural_sorted(items: Iterable[str]) -> list[str]:
    return sorted(items, key=natural_key)


def list_images(folder: Path, broken: dict[Path, DataError] | None = None) -> list[Path]:
    """Supported image files (any suffix case), skipping hidden files such as macOS ``._12.png``.

    A symbolic link that leads nowhere (dangling, or a loop) is listed too, with its problem put in
    `broken`: skipping it would hide the file from `check`, or misreport its image as having no mask."""
    files = []
    for p in folder.iterdir():
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
            continue
        if p.is_file():
            files.append(p)
        elif p.is_symlink() and (problem := _broken_link(p)) is not None:
            files.append(p)
            if broken is not None:
                broken[p] = problem
    return sorted(files, key=lambda p: natural_key(p.name))


def _broken_link(path: Path) -> DataError | None:
    """Why the symbolic link `path` leads to no file, or None when it leads to something (e.g. a folder)."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return DataError(path, "symbolic link loop (it leads back to itself; point it at the real file)",
                             "unreadable")
        if isinstance(e, FileNotFoundError | NotADirectoryError):
            problem = f"broken symbolic link (points to {os.readlink(path)}, which does not exist)"
            return DataError(path, problem, "missing")
        return DataError(path, f"cannot read: {e.strerror or e}", "unreadable")
    return None


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to the images inside (an `images/` subfolder if present)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            folder = item / "images" if (item / "images").is_dir() else item
            found = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
            if not found:
                raise FileNotFoundError(f"{item}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            files.extend(sorted(found, key=lambda p: natural_key(p.name)))
        elif item.exists() or item.is_symlink():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    unique = list(dict.fromkeys(p.absolute() for p in files))
    stems: dict[str, Path] = {}
    for p in unique:
        if p.stem in stems:
            raise ValueError(f"{p}: same name as {stems[p.stem]}; outputs would overwrite each other")
        stems[p.stem] = p
    return unique


def read_frames(path: Path, frame: int | None, max_pixels: int | None) -> list[tuple[str, int | None, Decoded]]:
    """(output name, frame index, Decoded) for one input: its one image, the asked-for frame of a DICOM
    cine, or (`frame` None) every frame as NAME_frameNNN."""
    if frame is not None:
        decoded = decode_image(path, max_pixels, frame=frame)
        return [(path.stem, decoded.dicom.frame_index if decoded.dicom else None, decoded)]
    if not is_dicom(read_head(path, DICOM_HEAD_BYTES)):
        return [(path.stem, None, decode_image(path, max_pixels))]
    from hemaseg.data.dicom import read_dicom

    scan = read_dicom(path, None, max_pixels)  # every frame, the file read once
    names = [path.stem] if scan.n_frames == 1 else [f"{path.stem}_frame{i:03d}" for i in range(scan.n_frames)]
    return [(name, i, Decoded(scan.frames[i], "DICOM", scan.photometric, scan)) for i, name in enumerate(names)]
