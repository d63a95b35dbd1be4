"""Pack a dataset folder small enough to travel to a GPU machine (the device tool carries 64 MiB).

    python benchmarks/pack_data.py ../shared/data/busi .pack/busi --max-side 384

Scans are shrunk (never enlarged) so their longer side is at most --max-side, masks with the same
geometry (bilinear, then >= 50 %), and manifest.csv / SOURCE.md are copied. A model trained at that
input size sees the same pixels either way (hemaseg letterboxes to it); scores computed on the packed
copy are at its resolution, which the results must say.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def pack(src: Path, dst: Path, max_side: int) -> int:
    from hemaseg.data.dataset import find_samples, load_sample

    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "mask").mkdir(parents=True, exist_ok=True)
    samples = find_samples(src)
    for s in samples:
        gray, merged = load_sample(s)  # the scan as hemaseg reads it, its masks merged with OR
        image = Image.fromarray(np.round(gray * 255).astype(np.uint8))
        mask = Image.fromarray((merged * 255).astype(np.uint8))
        scale = min(1.0, max_side / max(image.size))
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if scale < 1:
            image = image.resize(size, Image.Resampling.LANCZOS)
            mask = Image.fromarray(((np.asarray(mask.resize(size, Image.Resampling.BILINEAR)) >= 128) * 255)
                                   .astype(np.uint8))
        image.save(dst / "images" / f"{s.name}.png", optimize=True)
        mask.save(dst / "mask" / f"{s.name}.png", optimize=True)
    for extra in ("manifest.csv", "SOURCE.md"):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)
    return len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--max-side", type=int, default=384)
    args = parser.parse_args()
    n = pack(Path(args.src), Path(args.dst), args.max_side)
    print(f"packed {n} pairs into {args.dst}")


if __name__ == "__main__":
    main()
