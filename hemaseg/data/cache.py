"""The training cache: every scan of a dataset letterboxed once to the run's input shape, in memory-mapped
files on disk, so training needs little memory of its own however large the data is.

A float32 copy of each letterboxed scan and mask in memory (what training kept before) costs 0.5 MB per
256 px scan: 50,000 scans would need 26 GB in every process. Here a scan costs 3 bytes per pixel on disk
(image and mask, 192 KB at 256 px), read through np.memmap: the operating system pages it in as the
epochs touch it, shares those pages between every process of a torchrun job on the machine, and can drop
them again under memory pressure, so a cache larger than the memory still trains (more slowly, from
disk). Images are stored as round(65535 x the letterboxed [0, 1] image): an 8-bit scan exactly, a 12- or
16-bit one to 1/65535 (a uint8 store left a 12-bit-in-16 scan ~17 grey levels while inference saw them
all). Training normalises a stored scan with `transforms.normalize`, the function inference's
`preprocess` calls on the same letterboxed pixels: one preprocessing, so one cache serves every
normalisation.

CACHE_DIR/<key>/ is one cache: images.u16 (N, H, W), masks.u8 (N, H, W) in {0, 1}, originals.u8 (each scan's
mask at its original size, bit-packed, for the validation Dice at full resolution) and index.json (names,
letterbox geometry). The key is a hash of the dataset's fingerprint (every image and mask
byte), the size and the mask settings, so any run, fold or process on the same data and size reuses the
cache, and changed data or settings get a new one. A cache is built in a temp folder and renamed into
place when complete: a killed build leaves no cache, and of two processes building the same one, the
first rename wins and the other's copy is discarded.

Where: `cache_dir` (a setting) or env HEMASEG_CACHE_DIR, else $XDG_CACHE_HOME/hemaseg or ~/.cache/hemaseg
(the temp folder, with a warning, when that cannot be written).
Old caches are never removed automatically; delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hemaseg.config import format_size, input_hw
from hemaseg.data.transforms import Letterbox, letterbox

log = logging.getLogger(__name__)

IMAGE_SCALE = 65535  # stored image = round(IMAGE_SCALE x the [0, 1] letterboxed scan)
CACHE_VERSION = 3  # bump when the stored layout or the letterbox changes


def default_cache_dir() -> Path:
    if os.environ.get("HEMASEG_CACHE_DIR"):
        return Path(os.environ["HEMASEG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hemaseg"


def cache_key(fingerprint: str, size: int | tuple[int, int], mask_threshold: float | None,
              labels: Sequence[str] | None) -> str:
    parts = json.dumps([CACHE_VERSION, fingerprint, input_hw(size), mask_threshold, sorted(labels) if labels else None])
    return f"s{format_size(size)}-" + hashlib.sha256(parts.encode()).hexdigest()[:20]


@dataclass
class ScanCache:
    """An opened cache: memory maps of the letterboxed scans plus their index."""

    path: Path
    names: list[str]
    images: np.ndarray  # (N, H, W) uint16, memory-mapped: round(65535 x letterboxed image)
    masks: np.ndarray  # (N, H, W) uint8 in {0, 1}, memory-mapped
    boxes: list[Letterbox]
    _originals: np.ndarray  # flat uint8, bit-packed original masks
    _offsets: np.ndarray  # (N + 1,) start of each scan's packed mask in _originals

    @classmethod
    def open(cls, path: Path) -> ScanCache:
        index = json.loads((path / "index.json").read_text())
        shape = (len(index["names"]), *input_hw(index["size"]))

        def mapped(name: str, shape_, dtype=np.uint8) -> np.ndarray:
            if not np.prod(shape_):
                return np.zeros(shape_, dtype)
            return np.memmap(path / name, dtype, "r", shape=shape_)

        offsets = np.asarray(index["offsets"], np.int64)
        return cls(path, list(index["names"]), mapped("images.u16", shape, np.uint16),
                   mapped("masks.u8", shape), [Letterbox(*b) for b in index["boxes"]],
                   mapped("originals.u8", (int(offsets[-1]),)), offsets)

    def __len__(self) -> int:
        return len(self.names)

    def __reduce__(self):
        """Pickled as its path (a data-loader worker started by spawn maps the files again): pickling the
        memory maps themselves would copy every scan into each worker."""
        return ScanCache.open, (self.path,)

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes + self.masks.nbytes + self._originals.nbytes)

    def original_mask(self, i: int) -> np.ndarray:
        """Scan i's mask at its original size, bool HxW."""
        box = self.boxes[i]
        bits = np.unpackbits(np.asarray(self._originals[self._offsets[i]:self._offsets[i + 1]]))
        return bits[:box.orig_h * box.orig_w].reshape(box.orig_h, box.orig_w).astype(bool)


def _writable(root: Path) -> bool:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(root, os.W_OK | os.X_OK)


def open_or_build(samples, fingerprint: str, size: int | tuple[int, int], mask_threshold: float | None, labels, max_pixels: int | None,
                  cache_dir: str | os.PathLike | None = None, progress: bool = False, wait: bool = False,
                  poll_s: float = 0.5) -> ScanCache:
    """The cache of these samples at `size` (a square side or (height, width)), built if no process has built it yet. `samples` are the
    dataset's (`find_samples`), each decoded once here (`load_sample`) when the cache is built.

    `wait`: another process of the job is building it (torchrun's other ranks on a machine): wait for it
    to appear instead, by watching the folder, not in a collective whose timeout a large dataset's build
    would outlast (if the builder fails, torchrun stops the job)."""
    from hemaseg.data.dataset import load_sample

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    if not cache_dir and not _writable(root):  # a read-only home: the temp folder rather than no training
        fallback = Path(tempfile.gettempdir()) / f"hemaseg-cache-{os.getuid() if hasattr(os, 'getuid') else 0}"
        log.warning("%s: cannot write the training cache there; using %s (set HEMASEG_CACHE_DIR or --cache-dir)",
                    root, fallback)
        root = fallback
    final = root / cache_key(fingerprint, size, mask_threshold, labels)
    if wait and not (final / "index.json").is_file():
        log.info("waiting for %s, built by another process", final)
        while not (final / "index.json").is_file():
            time.sleep(poll_s)
    if (final / "index.json").is_file():
        cache = ScanCache.open(final)
        if cache.names == [s.name for s in samples]:
            return cache
        log.warning("%s: its scans are not the dataset's; building it again", final)
        shutil.rmtree(final, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        n = len(samples)
        shape = (n, *input_hw(size))
        images = np.memmap(tmp / "images.u16", np.uint16, "w+", shape=shape) if n else np.zeros(shape, np.uint16)
        masks = np.memmap(tmp / "masks.u8", np.uint8, "w+", shape=shape) if n else np.zeros(shape, np.uint8)
        boxes, offsets = [], [0]
        with open(tmp / "originals.u8", "wb") as originals:
            for i, sample in enumerate(tqdm(samples, desc="cache", unit="img", disable=not progress, leave=False)):
                image, mask = load_sample(sample, mask_threshold, max_pixels)
                boxed, boxed_mask, box = letterbox(image, size, mask)
                images[i] = np.clip(np.rint(boxed * IMAGE_SCALE), 0, IMAGE_SCALE).astype(np.uint16)
                masks[i] = boxed_mask.astype(np.uint8)
                packed = np.packbits(mask.ravel())
                originals.write(packed.tobytes())
                offsets.append(offsets[-1] + packed.size)
                boxes.append(list(astuple(box)))
            originals.flush()
            os.fsync(originals.fileno())
        for mapped in (images, masks):
            if isinstance(mapped, np.memmap):
                mapped.flush()
        del images, masks
        index = {"version": CACHE_VERSION, "size": input_hw(size), "fingerprint": fingerprint, "names": [s.name for s in samples],
                 "boxes": boxes, "offsets": offsets}
        (tmp / "index.json").write_text(json.dumps(index))
        try:
            os.rename(tmp, final)  # the cache appears complete or not at all
        except OSError:  # another process renamed its copy first: use that one
            if not (final / "index.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache = ScanCache.open(final)
    log.info("cached %d scans at %s px in %s (%.0f MB)", len(cache), format_size(size), final, cache.nbytes / 1e6)
    return cache
