"""Pictures people look at: overlays, training curves and the run report (self-contained HTML)."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from .checkpoint import atomic_write_bytes, atomic_write_text

PRED_COLOR = (255, 215, 0)  # yellow: the model's outline
REF_COLOR = (0, 200, 255)  # cyan: the reference outline


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | Path, array: np.ndarray) -> None:
    atomic_write_bytes(path, png_bytes(array))


def contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Outer boundary pixels of a bool mask, `thickness` pixels wide."""
    mask = np.asarray(mask, bool)
    inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    return mask & ~inner


def overlay_contours(image: np.ndarray, pred: np.ndarray | None = None, ref: np.ndarray | None = None) -> np.ndarray:
    """Gray scan (HxW in [0, 1] or uint8) -> RGB uint8 with the reference (cyan) and predicted
    (yellow) outlines drawn on it; outline width scales with the image so it stays visible."""
    gray = np.asarray(image)
    if gray.dtype != np.uint8:
        gray = np.clip(np.round(gray * 255), 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    thickness = max(1, round(max(gray.shape) / 256))
    for mask, color in ((ref, REF_COLOR), (pred, PRED_COLOR)):
        if mask is not None:
            rgb[contour(mask, thickness)] = color
    return rgb


def plot_curves(history: Sequence[dict], path: str | Path) -> None:
    """Training loss and validation Dice per epoch, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax1 = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax1.plot(epochs, [h["train_loss"] for h in history], color="tab:blue", label="train loss (Dice+BCE)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [h["val_dice"] for h in history], color="tab:orange", marker="o", ms=3, label="val Dice")
    ax2.set_ylabel("validation Dice", color="tab:orange")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def overlay_grid(tiles: Sequence[np.ndarray], tile: int = 192, columns: int = 4) -> np.ndarray:
    """Arrange RGB overlays (any sizes) into one RGB grid image, each fitted into tile x tile."""
    rows = max(1, math.ceil(len(tiles) / columns))
    grid = np.full((rows * tile, columns * tile, 3), 32, np.uint8)
    for i, t in enumerate(tiles):
        im = Image.fromarray(t)
        im.thumbnail((tile, tile))
        r, c = divmod(i, columns)
        y, x = r * tile + (tile - im.height) // 2, c * tile + (tile - im.width) // 2
        grid[y:y + im.height, x:x + im.width] = np.asarray(im)
    return grid


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def write_html_report(path: str | Path, title: str, summary: dict, images: dict[str, bytes], notes: Sequence[str] = ()) -> None:
    """One self-contained HTML file (images inlined) that opens without a network."""
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in summary.items()
    )
    figures = "".join(f"<figure>{_img_tag(png, cap)}<figcaption>{html.escape(cap)}</figcaption></figure>"
                      for cap, png in images.items())
    notes_html = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    atomic_write_text(path, f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1000px;color:#222}}
table{{border-collapse:collapse}}th,td{{border:1px solid #ccc;padding:4px 10px;text-align:left}}
figure{{margin:1.5em 0}}img{{max-width:100%}}figcaption{{color:#555}}</style></head>
<body><h1>{html.escape(title)}</h1><table>{rows}</table>{notes_html}{figures}</body></html>
""")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4f}"
    return str(v)
