"""`hemaseg demo`: the whole product on built-in synthetic scans, in a few minutes on a CPU."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import DataConfig, RunConfig, TrainConfig
from .checkpoint import atomic_write_text
from .evaluate import evaluate, json_safe, write_report
from .predict import load_model, predict_files
from .synth import write_synthetic_dataset
from .train import fit


def run_demo(out: str | Path, n: int = 300, n_test: int = 60, size: int = 128, epochs: int | None = None,
             seed: int = 0, budget_minutes: float | None = 3.0, progress: bool = True,
             precision: str = "auto") -> dict[str, Path]:
    """Synthesize -> train -> evaluate on held-out scans -> predict -> report. Returns the paths written."""
    out = Path(out)
    t0 = time.perf_counter()
    data = write_synthetic_dataset(out / "data", n, size=size, seed=seed, progress=progress)
    test = write_synthetic_dataset(out / "test", n_test, size=size, seed=seed + 10_000, progress=progress)
    cfg = RunConfig(data=DataConfig(root=str(data), size=size),
                    train=TrainConfig(epochs=epochs or 1, seed=seed, budget_minutes=budget_minutes, precision=precision))
    run = out / "run"
    train_summary = fit(cfg, run, progress=progress)
    predictor = load_model(run)
    result = evaluate(predictor, test, out / "eval", progress=progress, keep_masks=True)
    sample_inputs = sorted((test / "images").iterdir(), key=lambda p: int(p.stem))[:8]
    predict_files(predictor, sample_inputs, out / "predictions", progress=False)

    rows = result["rows"]
    summary = {**result["summary"], "train_scans": train_summary["n_train"], "val_scans": train_summary["n_val"],
               "epochs": train_summary["epochs"], "best_val_dice": train_summary["best_val_dice"],
               "wall_time_s": round(time.perf_counter() - t0, 1)}
    report = write_report(out / "report.html", "hemaseg demo: synthetic ultrasound", rows, summary, run_dir=run,
                          notes=[f"Metrics on {len(rows)} held-out synthetic scans (seed {seed + 10_000}), "
                                 f"model trained on {train_summary['n_train']} others for {train_summary['epochs']} "
                                 f"epochs at {size} px."])
    atomic_write_text(out / "demo_summary.json", json.dumps(json_safe(summary), indent=2))
    return {"data": data, "test": test, "run": run, "evaluation": out / "eval", "predictions": out / "predictions",
            "report": report}
