"""The tables `hemaseg predict` and `hemaseg measure` write: one row per scan, lesions.csv, errors.csv."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hemaseg.io import write_csv
from hemaseg.measure.scan import LESION_COLUMNS

ERROR_COLUMNS = ("image", "code", "problem")


@dataclass
class PredictResult:
    rows: list[dict] = field(default_factory=list)  # one per scan segmented, as in predictions.csv
    errors: list[dict] = field(default_factory=list)  # one per scan that failed, as in errors.csv
    lesions: list[dict] = field(default_factory=list)  # one per measured lesion, as in lesions.csv
    out_dir: Path | None = None
    labelme: list[Path] = field(default_factory=list)  # LabelMe files written beside their scans
    labelme_kept: list[Path] = field(default_factory=list)  # LabelMe files already there, left untouched
    skipped: int = 0  # inputs a previous job into the folder had done (skip_existing)


def write_tables(result: PredictResult, name: str, columns: Sequence[str]) -> None:
    """The per-scan table `name`, lesions.csv and errors.csv (only when some scan failed: a rerun that
    succeeded leaves no stale error list) of predict and measure, each written atomically."""
    out = result.out_dir
    write_csv(out / name, result.rows, columns)
    write_csv(out / "lesions.csv", result.lesions, LESION_COLUMNS)
    if result.errors:
        write_csv(out / "errors.csv", result.errors, ERROR_COLUMNS)
    elif (out / "errors.csv").is_file():
        (out / "errors.csv").unlink()
