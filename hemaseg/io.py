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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), fsync)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def write_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    """A CSV of `rows` (dicts; missing keys empty, None empty) with exactly `columns`, written atomically."""
    import csv

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="raise")
    writer.writeheader()
    writer.writerows(rows)
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
