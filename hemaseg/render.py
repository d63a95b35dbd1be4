"""What every page and picture shares: outline overlays, matplotlib figures as PNG, inline images and the
pages' CSS. The base of the stage graph: reports, predictions, tracking pages and the service all draw
through here, so a scan looks the same wherever a clinician sees it."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from scipy import ndimage

PRED_COLOR = (255, 215, 0)  # yellow: the model's outline
REF_COLOR = (0, 200, 255)  # cyan: the reference outline


def contour(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Outer boundary pixels of a bool mask, `thickness` pixels wide."""
    mask = np.asarray(mask, bool)
    inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    return mask & ~inner


def overlay_contours(image: np.ndarray, pred: np.ndarray | None = None, ref: np.ndarray | None = None,
                     thickness: int | None = None) -> np.ndarray:
    """Gray scan (HxW in [0, 1] or uint8) -> RGB uint8 with the reference (cyan) and predicted
    (yellow) outlines drawn on it; outline width scales with the image so it stays visible."""
    gray = np.asarray(image)
    if gray.ndim == 3:  # an RGB(A) scan: outlines go on its gray version
        gray = gray[..., :3].mean(-1).astype(gray.dtype)
    if gray.dtype != np.uint8:
        gray = np.clip(np.round(gray * 255), 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    thickness = thickness or max(1, round(max(gray.shape) / 256))
    for mask, color in ((ref, REF_COLOR), (pred, PRED_COLOR)):
        if mask is not None:
            rgb[contour(mask, thickness)] = color
    return rgb


def new_figure(figsize: tuple[float, float]):
    # A bare Figure (no pyplot): no global backend state, safe in servers and threads.
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=100)


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


REPORT_CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;min-width:26em}
caption{text-align:left;font-weight:600;padding:.3em 0;color:#444}
th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
thead th{background:#f3f4f6}tbody th{font-weight:normal}
.plots,.cases{display:grid;gap:1em;grid-template-columns:repeat(auto-fill,minmax(440px,1fr))}
#training figure{max-width:640px}
.cases{grid-template-columns:repeat(auto-fill,minmax(250px,1fr))}
figure{margin:0}figure img{width:100%;height:auto;display:block;border:1px solid #ddd}
figcaption{color:#444;font-size:.92em;margin-top:.3em}
.tag{display:inline-block;background:#eef;border-radius:3px;padding:0 .4em;margin-right:.3em;font-size:.85em}
.tag.review{background:#fde2c8}
.legend .swatch{display:inline-block;width:1.6em;height:.5em;vertical-align:middle;margin:0 .4em 0 1em}
.rule{background:#f8f8f8;border-left:4px solid #bbb;padding:.5em .8em}.muted{color:#666}
details summary{cursor:pointer;margin:.5em 0}"""
