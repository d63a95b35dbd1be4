"""`hemaseg demo`: the whole product on built-in synthetic scans, in a few minutes on a CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .config import DataConfig, RunConfig, TrainConfig
from .evaluate import evaluate
from .predict import load_model, predict_files
from .report import overlay_contours, overlay_grid, png_bytes, write_html_report
from .synth import write_synthetic_dataset
from .train import fit


def run_demo(out: str | Path, n: int = 300, n_test: int = 60, size: int = 128, epochs: int = 12, seed: int = 0,
             progress: bool = True) -> dict[str, Path]:
    """Synthesize -> train -> evaluate on held-out scans -> predict -> report. Returns the paths written."""
    out = Path(out)
    t0 = time.perf_counter()
    data = write_synthetic_dataset(out / "data", n, size=size, seed=seed, progress=progress)
    test = write_synthetic_dataset(out / "test", n_test, size=size, seed=seed + 10_000, progress=progress)
    cfg = RunConfig(data=DataConfig(root=str(data), size=size), train=TrainConfig(epochs=epochs, seed=seed))
    run = out / "run"
    train_summary = fit(cfg, run, progress=progress)
    predictor = load_model(run)
    result = evaluate(predictor, test, out / "eval", progress=progress, keep_masks=True)
    sample_inputs = sorted((test / "images").iterdir(), key=lambda p: int(p.stem))[:8]
    predict_files(predictor, sample_inputs, out / "predictions", progress=False)

    rows = result["rows"]
    scored = [r for r in rows if np.isfinite(r["dice"])]
    scored.sort(key=lambda r: r["dice"])
    picks = scored[:4] + scored[-4:] if len(scored) > 8 else scored
    grid = overlay_grid([overlay_contours(r["image"], pred=r["pred"], ref=r["ref"]) for r in picks])
    summary = {**{k: v for k, v in result["summary"].items() if k != "empty_rule"},
               "train_scans": train_summary["n_train"], "val_scans": train_summary["n_val"],
               "epochs": train_summary["epochs"], "best_val_dice": train_summary["best_val_dice"],
               "wall_time_s": round(time.perf_counter() - t0, 1)}
    report = out / "report.html"
    write_html_report(
        report, "hemaseg demo: synthetic ultrasound", summary,
        {"Training curves": (run / "curves.png").read_bytes(),
         "Worst four and best four held-out scans (cyan: reference, yellow: prediction)": png_bytes(grid)},
        notes=[f"Metrics on {len(rows)} held-out synthetic scans (seed {seed + 10_000}). Empty-mask rule: "
               + result["summary"]["empty_rule"] + "."],
    )
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return {"data": data, "test": test, "run": run, "evaluation": out / "eval", "predictions": out / "predictions",
            "report": report}
