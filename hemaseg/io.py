"""Writing files so that a crash, a full disk or a kill never leaves half of one.

Every output hemaseg writes (checkpoints, configs, CSVs, PNGs, reports) goes through `atomic_write`:
a temp file in the target's folder, fsync, then a rename over the target, so a reader sees the old
file or the new one, never a mix. A write killed midway leaves only its temp file, which
`remove_stale_temps` clears at the next start. Files get the permissions the user's umask gives: the
temp file is created with mode 0666 and the kernel applies the umask (and any default ACL) as it does
for every new file. (mkstemp's 0600 would need a chmod with the umask, and the umask can only be read by
setting it, which races with every other thread that creates a file meanwhile.)
"""

from __future__ import annotations

import io
import math
import os
import re
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

# `.NAME.XXXXXXXX.tmp`: what _create_temp makes, and what mkstemp(prefix=".NAME.", suffix=".tmp") made
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


def _create_temp(path: Path) -> tuple[int, str]:
    """A new, empty temp file beside `path`: (fd, name). Mode 0666 before the umask, so the file ends up
    with the permissions any new file of this user gets; O_EXCL, so it is never someone else's file."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name beside {path}")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], fsync: bool = True) -> Path:
    """Call `write(file)` on a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write(): say which file (a full disk)
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), fsync)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


# What makes a spreadsheet read a cell as a formula (or, for tab and CR, hide a formula after them)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_FLAG = re.compile(r"^--[a-z][a-z-]*$")  # a flag name hemaseg writes as a source ("--pixel-spacing"): no call


def csv_cell(value: Any) -> Any:
    """A value as `write_csv` writes it: numbers (int, float, numpy) and None as they are, text beginning
    with = + - @ tab or CR behind a ' so that a spreadsheet shows it instead of running it as a formula
    (a file name or a table cell such as =HYPERLINK(...) comes from whoever named the file)."""
    if value is None or isinstance(value, (bool, int, float, np.number)):
        return value
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) and not _FLAG.match(text) else text


def plain_cell(text: str) -> str:
    """The text `csv_cell` was given, from what it wrote (for hemaseg's readers of its own tables)."""
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_START) else text


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    """A CSV of `rows` (dicts; missing keys empty, None empty) with exactly `columns`, written atomically;
    text cells that a spreadsheet would run as a formula are neutralised (`csv_cell`). Every CSV hemaseg
    writes goes through here."""
    import csv

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="raise")
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    return atomic_write_text(path, buf.getvalue())


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files of writes that were killed before their rename (none of them is ever a
    finished file). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if _TEMP.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    """A uint8 HxW (gray) or HxWx3 (RGB) array as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def gray_to_png(gray: np.ndarray) -> bytes:
    """float32 HxW in [0, 1] -> PNG bytes that decode to the same floats: 8-bit when every pixel is k/255
    (8-bit sources, RGB through to_gray's luma), else 16-bit (DICOM with more bits stored)."""
    g = np.clip(np.asarray(gray, np.float64), 0, 1)
    as8 = np.round(g * 255)
    if np.abs(g * 255 - as8).max(initial=0) < 1e-3:
        return png_bytes(as8.astype(np.uint8))
    return png_bytes(np.round(g * 65535).astype(np.uint16))


def save_png(path: str | os.PathLike, array: np.ndarray, compress_level: int = 6, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, png_bytes(array, compress_level), fsync)


def json_safe(v: Any) -> Any:
    """A copy JSON can hold: NaN and infinities -> null, numpy scalars and arrays -> Python numbers and
    lists, tuples -> lists, keys -> strings, recursively (a checkpoint's metrics may hold NaN, e.g. the
    Dice of two empty masks, and json.dumps would write the invalid token NaN)."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, np.ndarray):
        return json_safe(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return str(v)
