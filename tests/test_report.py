import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from hemaseg.evaluation.metrics import per_image_metrics, summarize_metrics
from hemaseg.evaluation.report import case_overlay, write_run_report
from hemaseg.render import overlay_contours

CHROMIUM = Path("/usr/bin/chromium")


def _ellipse(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def synthetic_case(rng: np.random.Generator, size: int = 96, quality: float = 1.0) -> dict:
    """A speckled scan with a dark lesion (or none), its reference and a prediction that is worse as
    `quality` drops: shifted, resized, and sometimes with a spurious blob."""
    has_lesion = rng.random() > 0.15
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    ry, rx = rng.uniform(0.08, 0.2, 2) * size
    ref = _ellipse(size, cy, cx, ry, rx) if has_lesion else np.zeros((size, size), bool)
    speckle = ndimage.gaussian_filter(rng.gamma(1.0, 1.0, (size, size)), 1.0)
    depth = np.linspace(1.0, 0.55, size)[:, None]
    image = np.clip(0.55 * speckle * depth * np.where(ref, 0.35, 1.0), 0, 1).astype(np.float32)
    err = 1.0 - quality
    pred = np.zeros_like(ref)
    if has_lesion and rng.random() > 0.1 * err:
        pred = _ellipse(size, cy + rng.normal(0, 6 * err), cx + rng.normal(0, 6 * err),
                        ry * (1 + rng.normal(0, err / 2)), rx * (1 + rng.normal(0, err / 2)))
    if rng.random() < 0.4 * err:  # a spurious blob
        pred |= _ellipse(size, *rng.uniform(0.15, 0.85, 2) * size, 3, 4)
    return {"image": image, "ref": ref, "pred": pred}


def synthetic_rows(n: int = 24, size: int = 96, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        case = synthetic_case(rng, size, quality=rng.uniform(0.2, 1.0))
        row = {"name": f"scan_{i:03d}", **per_image_metrics(case["pred"], case["ref"], spacing=(0.2, 0.25)),
               **case, "confidence": float(rng.uniform(0.5, 1.0))}
        row["needs_review"] = row["confidence"] < 0.6
        rows.append(row)
    return rows


def build_report(path: Path, n: int = 24, seed: int = 0) -> list[dict]:
    rows = synthetic_rows(n, seed=seed)
    history = [{"epoch": e, "train_loss": 1.2 * 0.85 ** e + 0.1, "val_dice": 0.8 - 0.6 * 0.8 ** e}
               for e in range(1, 16)]
    write_run_report(path, title="hemaseg evaluation: synthetic test set", summary=summarize_metrics(rows),
                     rows=rows, history=history, notes=["Synthetic scans made by the test suite."],
                     credits=["MONAI metrics", "Test data: synthetic speckle"])
    return rows


def _expected_cases(rows: list[dict]) -> int:
    scored = sorted((r for r in rows if not np.isnan(r["dice"])), key=lambda r: r["dice"])
    picked = {id(scored[0]), id(scored[-1]), id(scored[(len(scored) - 1) // 2])}
    picked |= {id(r) for r in rows if r["needs_review"]}
    return len(picked)


def test_report_is_self_contained_with_sections_and_overlays(tmp_path):
    path = tmp_path / "report.html"
    rows = build_report(path)
    text = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<script" not in text.lower() and "@import" not in text
    for heading in ("Summary", "Metric distributions", "Training curves", "Cases", "Notes", "Credits"):
        assert f"<h2>{heading}" in text
    assert "95 % CI of mean" in text and "Empty-mask rule:" in text and "Lesion sensitivity" in text
    assert "HD95 (mm)" in text  # spacing was given
    n_cases = _expected_cases(rows)
    assert text.count('<figure class="case">') == n_cases and f"Cases ({n_cases} shown)" in text
    imgs = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', text)
    assert len(imgs) == n_cases + 4 and all(imgs)  # + Dice and HD95 distributions, risk-coverage, training curves
    assert text.count("flagged for review") >= sum(r["needs_review"] for r in rows)


def test_report_without_arrays_history_or_spacing(tmp_path):
    rows = [{k: v for k, v in r.items() if k not in ("image", "ref", "pred", "hd95_mm", "assd_mm")}
            for r in synthetic_rows(5, size=32, seed=1)]
    path = tmp_path / "r.html"
    write_run_report(path, title="t <&>", summary=summarize_metrics(rows), rows=rows)
    text = path.read_text()
    assert "<title>t &lt;&amp;&gt;</title>" in text and "Training curves" not in text
    assert "No case images" in text and "HD95 (px)" in text and "HD95 (mm)" not in text


def test_case_overlay_enlarges_small_scans_and_draws_both_outlines():
    ref = np.zeros((40, 40), bool); ref[10:30, 10:30] = True
    pred = np.zeros((40, 40), bool); pred[14:34, 14:34] = True
    rgb = case_overlay({"image": np.full((40, 40), 0.5), "ref": ref, "pred": pred}, size=160)
    assert rgb.shape == (160, 160, 3)
    colors = {tuple(c) for c in rgb.reshape(-1, 3)}
    assert {(0, 200, 255), (255, 215, 0)} <= colors
    assert overlay_contours(np.zeros((8, 8)), ref=ref[:8, :8]).shape == (8, 8, 3)


def screenshot(html: Path, out: Path, size: str = "1200,2000") -> Path:
    profile = out.parent / "chromium-profile"
    shot = out
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update", "--no-first-run",
                    "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={shot}",
                    f"--window-size={size}", html.resolve().as_uri()],
                   check=True, capture_output=True, timeout=90)
    shutil.rmtree(profile, ignore_errors=True)
    return shot


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (Debian package chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    path = tmp_path / "report.html"
    build_report(path, n=12)
    shot = screenshot(path, tmp_path / "shot.png")
    assert shot.is_file()
    gray = np.asarray(Image.open(shot).convert("L"), np.float64)
    assert gray.shape == (2000, 1200)
    assert gray.std() > 20, "the page rendered blank"
    assert (gray < 128).mean() > 0.02  # text, plots and scans, not an empty white page


def test_risk_coverage_keeps_the_most_confident_scans_first():
    from hemaseg.evaluation.report import risk_coverage

    rows = [{"confidence": 0.9, "dice": 0.8}, {"confidence": 0.2, "dice": 0.0},
            {"confidence": 0.7, "dice": float("nan")}]  # a normal scan left empty: right
    coverage, kept = risk_coverage(rows)
    assert coverage.tolist() == [1 / 3, 2 / 3, 1.0]
    np.testing.assert_allclose(kept, [0.8, 0.9, 0.6])
