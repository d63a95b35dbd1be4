"""Pictures people look at: overlays, training curves and the run report (self-contained HTML)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from hemaseg.io import atomic_write_bytes, atomic_write_text, png_bytes
from hemaseg.render import PRED_COLOR, REF_COLOR, REPORT_CSS, figure_png, img_tag, new_figure, overlay_contours

def curves_png(history: Sequence[dict]) -> bytes:
    """Training loss and validation Dice per epoch (dicts with epoch, train_loss, val_dice) as PNG bytes."""
    epochs = [h["epoch"] for h in history]
    fig = new_figure((6, 3.5))
    ax1 = fig.add_subplot()
    ax1.plot(epochs, [h.get("train_loss", math.nan) for h in history], color="tab:blue",
             label="train loss (Dice+BCE)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(epochs, [h.get("val_dice", math.nan) for h in history], color="tab:orange", marker="o", ms=3,
             label="val Dice")
    ax2.set_ylabel("validation Dice", color="tab:orange")
    ax2.set_ylim(0, 1)
    fig.tight_layout()
    return figure_png(fig)


def plot_curves(history: Sequence[dict], path: str | Path) -> None:
    """Training loss and validation Dice per epoch, one PNG."""
    atomic_write_bytes(path, curves_png(history))


_METRIC_LABELS = {
    "dice": ("Dice", ""),
    "iou": ("IoU (Jaccard)", ""),
    "precision": ("Precision", ""),
    "recall": ("Recall (sensitivity)", ""),
    "specificity": ("Specificity", ""),
    "hd95_px": ("HD95", "px"),
    "assd_px": ("ASSD", "px"),
    "hd95_mm": ("HD95", "mm"),
    "assd_mm": ("ASSD", "mm"),
}
_COUNT_LABELS = {
    "n_images": "Images evaluated",
    "n_scored": "Images with a Dice (reference or prediction has a lesion)",
    "dice_mean_lesion": "Mean Dice over images whose reference has a lesion",
    "n_true_negative_images": "True-negative images (both masks empty)",
    "n_false_positive_images": "False-positive images (no lesion, something predicted)",
    "n_missed_images": "Missed images (lesion, nothing predicted)",
}
_DETECTION_LABELS = {
    "lesion_tp": "Lesions detected (TP)",
    "lesion_fn": "Lesions missed (FN)",
    "lesion_fp": "Spurious predicted lesions (FP)",
    "lesion_sensitivity": "Lesion sensitivity",
    "lesion_precision": "Lesion precision",
    "lesion_fp_per_image": "False positives per image",
}


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return f"[{_num(v[0], digits)}, {_num(v[1], digits)}]"
    return str(v)


def _digits(metric: str) -> int:
    return 2 if _METRIC_LABELS.get(metric, ("", ""))[1] else 3


def _missing(v) -> bool:
    return v is None or math.isnan(v)


def _finite(rows: Sequence[dict], key: str) -> np.ndarray:
    v = np.array([math.nan if r.get(key) is None else float(r[key]) for r in rows], np.float64)
    return v[~np.isnan(v)]


def distribution_png(values: np.ndarray, label: str, n_missing: int, unit_range: bool = False) -> bytes:
    """Histogram with a box plot above it, mean and median marked; n and missing count in the title."""
    from matplotlib import rc_context

    with rc_context({"font.size": 11}):
        return _distribution_png(np.asarray(values, np.float64), label, n_missing, unit_range)


def _distribution_png(v: np.ndarray, label: str, n_missing: int, unit_range: bool) -> bytes:
    fig = new_figure((5.4, 3.6))
    box_ax, hist_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 4]})
    if v.size:
        box_ax.boxplot(v, orientation="horizontal", widths=0.6, showfliers=True)
        bins = np.linspace(0, 1, 21) if unit_range else min(30, max(5, v.size // 3))
        hist_ax.hist(v, bins=bins, color="#7aa6c2", edgecolor="white")
        hist_ax.axvline(v.mean(), color="tab:red", lw=1.5, label=f"mean {v.mean():.3g}")
        hist_ax.axvline(np.median(v), color="black", ls="--", lw=1.2, label=f"median {np.median(v):.3g}")
        hist_ax.legend(frameon=False, fontsize=9)
    else:
        hist_ax.text(0.5, 0.5, "no scored images", ha="center", va="center", transform=hist_ax.transAxes)
    if unit_range:
        hist_ax.set_xlim(0, 1)
    box_ax.set_yticks([])
    box_ax.set_title(f"{label}: n = {v.size}" + (f", {n_missing} missing (empty mask)" if n_missing else ""),
                     fontsize=11)
    hist_ax.set_xlabel(label)
    hist_ax.set_ylabel("images")
    fig.tight_layout()
    return figure_png(fig)


def risk_coverage(rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, mean Dice of the scans kept) when scans are kept most confident first: what the
    confidence buys if the least confident ones go to a person. A normal scan left empty counts as
    Dice 1 (right), so the curve covers every scan."""
    conf = np.array([float(r["confidence"]) for r in rows])
    score = np.array([1.0 if _missing(r.get("dice")) else float(r["dice"]) for r in rows])
    order = np.argsort(-conf, kind="stable")
    kept = np.cumsum(score[order]) / np.arange(1, len(rows) + 1)
    return np.arange(1, len(rows) + 1) / len(rows), kept


def risk_coverage_png(rows: Sequence[dict]) -> bytes:
    coverage, kept = risk_coverage(rows)
    fig = new_figure((5.4, 3.6))
    ax = fig.subplots()
    ax.plot(coverage, kept, color="tab:blue")
    ax.axhline(kept[-1], color="gray", ls="--", lw=1, label=f"all scans: {kept[-1]:.3f}")
    ax.set_xlabel("fraction of scans kept (most confident first)")
    ax.set_ylabel("mean Dice of the kept scans")
    ax.set_xlim(0, 1)
    ax.legend(frameon=False, fontsize=9)
    fig.tight_layout()
    return figure_png(fig)


def case_overlay(row: dict, size: int = 320) -> np.ndarray:
    """RGB overlay of one evaluated case (row with 'ref', 'pred' and optionally 'image'), resampled so
    its longer side is about `size` pixels; small scans are enlarged first so outlines stay crisp."""
    ref, pred = np.asarray(row["ref"], bool), np.asarray(row["pred"], bool)
    image = row.get("image")
    image = np.zeros(ref.shape, np.float32) if image is None else np.asarray(image)
    k = max(1, math.ceil(size / max(ref.shape)))
    if k > 1:  # nearest-neighbour enlargement: one scan pixel becomes a k x k block
        up = lambda a: np.repeat(np.repeat(a, k, axis=0), k, axis=1)  # noqa: E731
        image, ref, pred = up(image), up(ref), up(pred)
    rgb = overlay_contours(image, pred=pred, ref=ref, thickness=max(2, round(max(ref.shape) / 128)))
    if max(rgb.shape[:2]) > 1.5 * size:
        im = Image.fromarray(rgb)
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        rgb = np.asarray(im)
    return rgb


def _pick_cases(rows: Sequence[dict]) -> list[tuple[dict, list[str]]]:
    """Worst, median and best Dice among scored rows, then every row flagged needs_review; each once."""
    picks: dict[int, list[str]] = {}
    scored = [i for i, r in enumerate(rows) if not _missing(r.get("dice"))]
    scored.sort(key=lambda i: rows[i]["dice"])
    if scored:
        for label, i in (("best Dice", scored[-1]), ("median Dice", scored[(len(scored) - 1) // 2]),
                         ("worst Dice", scored[0])):
            picks.setdefault(i, []).append(label)
    for i, r in enumerate(rows):
        if r.get("needs_review"):
            picks.setdefault(i, []).append("flagged for review")
    return [(rows[i], labels) for i, labels in picks.items()]


def _summary_tables(summary: dict) -> tuple[str, set[str]]:
    used: set[str] = {"empty_rule"}
    body, missing = [], []
    for m, (label, unit) in _METRIC_LABELS.items():
        if f"{m}_mean" not in summary:
            continue
        used.update(f"{m}_{s}" for s in ("mean", "sd", "median", "n", "ci95"))
        n = summary.get(f"{m}_n")
        if n == 0:
            missing.append(f"{label} ({unit})" if unit else label)
            continue
        d = _digits(m)
        cells = [summary.get(f"{m}_{s}") for s in ("mean", "sd", "median", "ci95", "n")]
        name = f"{label} ({unit})" if unit else label
        body.append(f"<tr><th scope=\"row\">{html.escape(name)}</th>"
                    + "".join(f'<td class="num">{html.escape(_num(c, d))}</td>' for c in cells) + "</tr>")
    n_images = summary.get("n_images", "?")
    out = (f"<table><caption>Per-image metrics, {n_images} images</caption>"
           "<thead><tr><th scope=\"col\">Metric</th><th scope=\"col\">Mean</th><th scope=\"col\">SD</th>"
           "<th scope=\"col\">Median</th><th scope=\"col\">95 % CI of mean</th><th scope=\"col\">n</th></tr>"
           "</thead><tbody>" + "".join(body) + "</tbody></table>"
           '<p class="muted">Mean, sample SD, median and 95 % percentile-bootstrap CI of the mean, each over '
           "the n images where the metric is defined (see the empty-mask rule below).</p>")
    if missing:
        out += (f'<p class="muted">Not available (no image where it is defined, e.g. no pixel spacing '
                f"given): {html.escape(', '.join(missing))}.</p>")
    for caption, labels in (("Images and empty masks", _COUNT_LABELS),
                            ("Lesion-level detection (8-connected components)", _DETECTION_LABELS)):
        present = [k for k in labels if k in summary]
        if not present:
            continue
        used.update(present)
        out += (f"<table><caption>{html.escape(caption)}</caption><tbody>" + "".join(
            f'<tr><th scope="row">{html.escape(labels[k])}</th>'
            f'<td class="num">{html.escape(_num(summary[k]))}</td></tr>' for k in present)
            + "</tbody></table>")
    return out, used


def _per_image_table(rows: Sequence[dict], limit: int = 1000) -> str:
    cols = [k for k in ("name", "dice", "iou", "precision", "recall", "hd95_px", "hd95_mm", "assd_px",
                        "ref_area_px", "pred_area_px", "confidence", "needs_review")
            if any(k in r and not (k.endswith("_mm") and _finite(rows, k).size == 0) for r in rows)]
    if not cols:
        return ""
    order = sorted(range(len(rows)),
                   key=lambda i: (_missing(rows[i].get("dice")), rows[i].get("dice") or 0.0))
    head = "".join(f'<th scope="col">{html.escape(c)}</th>' for c in cols)
    body = "".join("<tr>" + "".join(
        f'<td class="{"" if c == "name" else "num"}">{html.escape(_num(rows[i].get(c), _digits(c)))}</td>'
        for c in cols) + "</tr>" for i in order[:limit])
    more = f" (first {limit} of {len(rows)})" if len(rows) > limit else ""
    return (f"<details><summary>Per-image table, worst Dice first{more}</summary><table>"
            f"<caption>Per-image metrics; n/a = undefined under the empty-mask rule</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></details>")


def write_run_report(path: str | Path, *, title: str, summary: dict, rows: Sequence[dict],
                     history: Sequence[dict] | None = None, notes: Sequence[str] = (),
                     credits: Sequence[str] = ()) -> None:
    """One self-contained HTML report of an evaluated run: no network, no scripts, images inlined.

    `summary` as from `metrics.summarize_metrics`; `rows` per-image metric dicts (from
    `metrics.per_image_metrics`), optionally carrying 'image', 'ref', 'pred' arrays, 'name',
    'confidence' and 'needs_review'; `history` per-epoch dicts (epoch, train_loss, val_dice).
    Shows the summary tables, Dice and HD95 distributions, training curves, and overlays of the best,
    median and worst case and of every case flagged needs_review. Written atomically.
    """
    esc = html.escape
    tables, used = _summary_tables(summary)
    extra = {k: v for k, v in summary.items()
             if k not in used and not isinstance(v, (dict, list, np.ndarray))}
    if extra:
        tables += ("<table><caption>Other figures</caption><tbody>" + "".join(
            f'<tr><th scope="row">{esc(str(k))}</th><td class="num">{esc(_num(v))}</td></tr>'
            for k, v in extra.items()) + "</tbody></table>")
    rule = summary.get("empty_rule")
    parts = [f"<header><h1>{esc(title)}</h1></header><main>",
             '<section id="summary"><h2>Summary</h2>', tables,
             f'<p class="rule"><strong>Empty-mask rule:</strong> {esc(rule)}.</p>' if rule else "",
             "</section>"]

    plots = []
    d = _finite(rows, "dice")
    box = " (histogram with a box plot above)"
    plots.append(("Distribution of per-image Dice", distribution_png(d, "Dice", len(rows) - d.size, True), box))
    hd_key = "hd95_mm" if _finite(rows, "hd95_mm").size else "hd95_px"
    hd = _finite(rows, hd_key)
    if any(hd_key in r for r in rows):
        unit = hd_key.split("_")[1]
        plots.append((f"Distribution of per-image HD95 in {unit}",
                      distribution_png(hd, f"HD95 ({unit})", len(rows) - hd.size), box))
    if rows and all("confidence" in r for r in rows):
        plots.append(("Risk-coverage: mean Dice of the scans kept when the least confident go to review",
                      risk_coverage_png(rows), " (a line falling from left to right)"))
    parts.append('<section id="distributions"><h2>Metric distributions</h2><div class="plots">' + "".join(
        f"<figure>{img_tag(png, alt + kind)}<figcaption>{esc(alt)}</figcaption></figure>"
        for alt, png, kind in plots) + "</div></section>")

    if history:
        parts.append('<section id="training"><h2>Training curves</h2><figure>'
                     + img_tag(curves_png(history), "Training loss and validation Dice per epoch")
                     + "<figcaption>Training loss (left axis) and validation Dice (right axis) per epoch."
                     "</figcaption></figure></section>")

    cases = [(r, labels) for r, labels in _pick_cases(rows) if "ref" in r and "pred" in r]
    legend = ('<p class="legend">Outlines:'
              f'<span class="swatch" style="background:rgb{REF_COLOR}"></span>reference (expert)'
              f'<span class="swatch" style="background:rgb{PRED_COLOR}"></span>model prediction'
              " (drawn on top where they coincide)</p>")
    figs = []
    for r, labels in cases:
        name = str(r.get("name", "unnamed"))
        dice_txt = _num(r.get("dice"))
        facts = [f"Dice {dice_txt}"]
        for key, unit, digits in (("hd95_mm", "mm", 2), ("hd95_px", "px", 1)):
            if not _missing(r.get(key)):
                facts.append(f"HD95 {_num(r[key], digits)} {unit}")
                break
        if r.get("confidence") is not None:
            facts.append(f"confidence {_num(r['confidence'], 2)}")
        alt = (f"{name}: scan with reference outline in cyan and predicted outline in yellow; "
               f"{', '.join(labels)}; Dice {dice_txt}")
        tags = "".join(f'<span class="tag{" review" if "review" in lab else ""}">{esc(lab)}</span>'
                       for lab in labels)
        figs.append(f'<figure class="case">{img_tag(png_bytes(case_overlay(r)), alt)}<figcaption>{tags}'
                    f"<strong>{esc(name)}</strong> — {esc(', '.join(facts))}</figcaption></figure>")
    if figs:
        cases_html = legend + '<div class="cases">' + "".join(figs) + "</div>"
    else:
        cases_html = '<p class="muted">No case images: the rows carry no image, reference or prediction.</p>'
    parts.append(f'<section id="cases"><h2>Cases ({len(figs)} shown)</h2>'
                 "<p>Best, median and worst Dice, and every case flagged for review.</p>"
                 f"{cases_html}{_per_image_table(rows)}</section>")

    if notes:
        parts.append('<section id="notes"><h2>Notes</h2><ul>' + "".join(f"<li>{esc(n)}</li>" for n in notes)
                     + "</ul></section>")
    parts.append("</main>")
    if credits:
        parts.append('<footer id="credits"><h2>Credits</h2><ul>'
                     + "".join(f"<li>{esc(c)}</li>" for c in credits) + "</ul></footer>")
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{REPORT_CSS}</style></head>\n<body>\n" + "\n".join(parts)
            + "\n</body></html>\n")
    atomic_write_text(path, page)
