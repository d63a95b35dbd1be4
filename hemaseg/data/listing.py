"""Files on disk: the natural order of scan names, the images of a folder (broken links included, as
problems), and the names a mask folder may have. Shared by `dataset` and `formats` below both of them."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from pathlib import Path

from hemaseg.data.images import IMAGE_SUFFIXES
from hemaseg.data.pixels import DataError

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
