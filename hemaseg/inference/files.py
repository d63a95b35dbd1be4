"""Files in, files out: `hemaseg predict` over a list of scans and folders.

A bad scan never stops the others: its problem is one line in `errors.csv` and on the log, and the
rest are segmented. A scan's outputs (mask, overlay, probabilities) are encoded in memory first and then
written, each atomically; if a write fails, the ones already written for that scan are removed, so a
scan's outputs appear whole or not at all. `predictions.csv` lists exactly the scans whose outputs
were written, and is written (with `errors.csv`) even when the run is interrupted.

With `labelme_tolerance` each scan also gets NAME.json beside it (not in the output folder: LabelMe opens
a folder and finds each image's JSON next to it): its lesions as LabelMe polygons, imageData null, for a
clinician to correct and save; `hemaseg train` then reads the corrected outlines as masks
(`data.formats`). Each file is flagged `formats.UNREVIEWED_FLAG` (a checkbox in LabelMe) until someone
unticks it, so check and train can count the proposals nobody reviewed. A DICOM scan, which LabelMe cannot
open, goes to OUT/labelme/ instead, never beside the DICOM: NAME.png (its decoded pixels only, no header),
NAME.json and NAME.calibration.json (the spacing used and its source, or why there is none); NAME is the
file's stem unless that holds the Patient ID or Name (`data.dicom.neutral_name`). A JSON already there is
never overwritten, since it may hold corrections.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hemaseg.data.images import (
    MAX_PIXELS_DEFAULT,
    DataError,
    Decoded,
)
from hemaseg.render import overlay_contours
from hemaseg.data.listing import collect_inputs, read_frames
from hemaseg.inference import manifest
from hemaseg.inference.predictor import Predictor
from hemaseg.io import atomic_write_bytes, gray_to_png, png_bytes, remove_stale_temps
from hemaseg.spacing import Spacing
from hemaseg.measure.tables import PredictResult, write_tables
from hemaseg.measure.scan import IMAGE_COLUMNS, measure_scan

log = logging.getLogger(__name__)

TABLES_EVERY_S = 30.0  # the tables follow a job at most this far behind (and after its first batch)
PREDICTION_COLUMNS = ("image", "width", "height", "lesion_area_px", "lesion_fraction", "n_lesions", "max_prob",
                      "confidence", "needs_review", "finding", "review_reason", "frame") + tuple(c for c in IMAGE_COLUMNS
                                                                              if c != "n_lesions")


@dataclass(frozen=True)
class OutputOptions:
    """How predict reads each scan and what it writes for it (predict_files' arguments of the same names);
    all but `model_name` are settings a resumed job must keep (`manifest.predictor_settings`)."""

    save_prob: bool = False
    threshold: float | None = None  # None: the predictor's
    max_pixels: int | None = MAX_PIXELS_DEFAULT
    pixel_spacing: Spacing | None = None
    frame: int | None = 0
    dicom_sr: bool = False
    dicom_seg: bool = False
    model_name: str | None = None
    labelme_tolerance: float | None = None


def _write_outputs(files: dict[Path, bytes]) -> None:
    """Every file or none: on a failure the ones already written are removed and the error re-raised."""
    done = []
    try:
        for path, data in files.items():
            atomic_write_bytes(path, data)
            done.append(path)
    except BaseException:
        for path in done:
            path.unlink(missing_ok=True)
        raise


LABELME_DIR = "labelme"  # OUT/labelme/: DICOM scans as PNG + LabelMe JSON + calibration sidecar


def _labelme_target(path: Path, name: str, decoded: Decoded, out: Path) -> tuple[Path | None, str | None]:
    """Where a scan's LabelMe file goes (beside it, NAME.json; a DICOM's in OUT/labelme/), or why it gets
    none."""
    if decoded.dicom is not None:
        from hemaseg.data.dicom import neutral_name

        name = neutral_name(name, decoded.gray, path, is_dicom=True)
        return out / LABELME_DIR / f"{name}.json", None
    if name != path.stem:
        return None, f"{path}: one LabelMe file beside a scan cannot hold the outlines of several frames"
    return path.with_suffix(".json"), None


def _dicom_for_labelme(json_path: Path, decoded: Decoded, measured, frame: int | None) -> dict[Path, bytes]:
    """NAME.png (the decoded pixels, nothing from the header) and NAME.calibration.json beside a DICOM
    scan's LabelMe file: an allow-list of the spacing, its source, the calibration note and whether text
    may be burned into the pixels; no identifier, UID or date."""
    sp = measured.measurement.spacing
    h, w = decoded.gray.shape
    sidecar = {"image": json_path.with_suffix(".png").name, "width": int(w), "height": int(h), "frame": frame,
               "pixel_spacing": None if sp is None else sp.to_dict(), "calibration_note": measured.calibration_note,
               "burned_in_annotation": decoded.dicom.burned_in_annotation,
               "note": "the spacing hemaseg chose for the lesions it predicted (an ultrasound region holds them)"}
    return {json_path.with_suffix(".png"): gray_to_png(decoded.gray),
            json_path.with_suffix(".calibration.json"): (json.dumps(sidecar, indent=2) + "\n").encode()}


def predict_files(predictor: Predictor, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  save_prob: bool = False, threshold: float | None = None, batch_size: int = 8,
                  progress: bool = True, fail_fast: bool = False,
                  max_pixels: int | None = MAX_PIXELS_DEFAULT, pixel_spacing: Spacing | None = None,
                  frame: int | None = 0, dicom_sr: bool = False, dicom_seg: bool = False,
                  model_name: str | None = None, labelme_tolerance: float | None = None,
                  skip_existing: bool = False) -> PredictResult:
    """Write `<stem>_mask.png`, `<stem>_overlay.png` (and `<stem>_prob.png`) per image at its original
    size, `predictions.csv` with per-image figures (in mm where the scan is calibrated: see
    `measure.scan`), `lesions.csv` with each lesion's measurements and, when any scan failed, `errors.csv`.
    `frame` picks a DICOM cine's frame; None segments every frame (outputs NAME_frameNNN_*).
    `dicom_sr` / `dicom_seg`: for DICOM inputs also NAME_sr.dcm / NAME_seg.dcm (`measure.dicom_out`,
    `model_name` recorded in them); one that cannot be made (no mm, a cine's SEG) is a logged note.
    `labelme_tolerance` (px, e.g. `formats.LABELME_TOLERANCE_PX`): also NAME.json beside each scan, each
    lesion's outline as a LabelMe polygon simplified to that tolerance (`formats.lesion_outlines`), flagged
    unreviewed (`formats.UNREVIEWED_FLAG`), `model_name` in each shape's description; a DICOM scan's (each
    frame's) goes to OUT/labelme/ with NAME.png and NAME.calibration.json (module docstring); not for the
    frames of a PNG/TIFF, and never over an existing file.

    A scan that cannot be read is recorded and skipped (`fail_fast` raises its DataError instead). OS
    errors while writing (a full disk) stop the run: they would fail every later scan too.

    OUT/manifest.jsonl records every input done (`inference.manifest`); `skip_existing` skips the inputs a
    previous job into OUT finished, so an interrupted archive job resumes where it stopped. Under torchrun
    (WORLD_SIZE > 1) the inputs are dealt out across the processes, each input to one, and rank 0 writes
    the manifest and the tables of all of them at the end; it returns them all, the other ranks their own."""
    import torch

    from hemaseg import distributed

    if labelme_tolerance is not None and labelme_tolerance < 0:
        raise ValueError(f"the LabelMe outline tolerance must be >= 0 px, got {labelme_tolerance}")
    files = collect_inputs(inputs)  # before anything is created: a wrong argument leaves no empty folder
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: --out is a file, not a folder")
    order = [str(p) for p in files]
    options = OutputOptions(save_prob, threshold, max_pixels, pixel_spacing, frame, dicom_sr, dicom_seg, model_name,
                            labelme_tolerance)
    # the processes only coordinate (gloo on the CPU), whatever device the model runs on, and one whose
    # shard is done waits for the slowest
    with distributed.session(torch.device("cpu"), timeout_s=distributed.wait_timeout_s()) as dist:
        with dist.agreed("opening the output folder"):
            done: set[str] = set()
            if dist.is_main:
                out.mkdir(parents=True, exist_ok=True)
                remove_stale_temps(out)  # the halves of writes an earlier job was killed in
                done = manifest.start(out, manifest.predictor_settings(predictor, options), order,
                                      skip_existing).done(out)
        done = dist.broadcast(done)
        todo = [(i, p) for i, p in enumerate(files) if str(p) not in done]
        mine = todo[dist.rank::dist.world_size]
        if dist.is_main and done:
            log.info("%s: %d of %d input(s) already done (--skip-existing)", out, len(files) - len(todo), len(files))
        part = manifest.PartWriter(out, dist.rank)
        result = PredictResult(out_dir=out)
        finished = False
        listed: set[str] = set()  # inputs the tables on disk list
        last_tables = None

        def follow() -> None:
            """After a batch, in a single process: rewrite the tables when they are TABLES_EVERY_S behind, so
            that a job stopped by a full disk keeps tables listing all but its last few scans."""
            nonlocal last_tables
            if dist.active or (last_tables is not None and time.monotonic() - last_tables < TABLES_EVERY_S):
                return
            listed.update(_merge(out, order, PredictResult(out_dir=out), remove_parts=False))
            last_tables = time.monotonic()

        try:
            with dist.agreed("predicting"):
                _predict_shard(predictor, mine, out, part, result, options, batch_size, progress and dist.is_main,
                               fail_fast, follow)
            finished = True
        finally:
            part.close()
            if result.labelme_kept:
                log.warning("kept %d LabelMe file(s) already beside their scans (e.g. %s): they may hold "
                            "corrections; delete them to predict new outlines", len(result.labelme_kept),
                            result.labelme_kept[0])
            # what was done is recorded even when the run stops early (an OS error, Ctrl-C, --fail-fast); the
            # parts of other processes are merged only once they have all finished
            if dist.is_main:
                try:
                    _merge(out, order, result, remove_parts=finished or not dist.active)
                except OSError:  # the disk is still full: the tables stay as last written ...
                    if dist.active:
                        raise
                    _drop_unlisted(out, {p for _, p in todo}, listed)  # ... and list what is kept
                    if finished:
                        raise
                    # else the error that stopped the job goes on, naming the output it could not write
        dist.barrier()  # every process returns once the tables are written
    result.skipped = len(files) - len(todo)
    return result


def _drop_unlisted(out: Path, mine: set[Path], listed: set[str]) -> None:
    """Remove the outputs of this job's inputs (`mine`) that the tables on disk do not list (`listed`), so
    that predictions.csv lists exactly the scans whose outputs are there; the manifest still calls them
    done, but with their files gone --skip-existing predicts them again."""
    mine = {str(p) for p in mine}
    state = manifest.Manifest.read(out)
    for name, entry in state.entries.items():
        if name in mine and name not in listed and entry["status"] == "done":
            for p in entry["outputs"]:
                (out / p).unlink(missing_ok=True)  # `out / absolute` is the absolute path (LabelMe files)


def _merge(out: Path, order: list[str], result: PredictResult, remove_parts: bool) -> set[str]:
    """Rank 0: the parts into manifest.jsonl, and the tables from it (every input done by any process of
    this job or, with --skip-existing, of the jobs before it). Returns the inputs the tables list."""
    state = manifest.Manifest.read(out)
    entries = manifest.write_merged(out, state, order)
    if remove_parts:
        for path in manifest.part_paths(out):
            path.unlink()
    result.rows = [row for e in entries if e["status"] == "done" for row in e["rows"]]
    result.lesions = [row for e in entries if e["status"] == "done" for row in e["lesions"]]
    result.errors = [e["error"] for e in entries if e["status"] == "failed"]
    write_tables(result, "predictions.csv", PREDICTION_COLUMNS)
    return {e["input"] for e in entries if e["status"] == "done"}


def _predict_shard(predictor: Predictor, items: list[tuple[int, Path]], out: Path, part: manifest.PartWriter,
                   result: PredictResult, options: OutputOptions, batch_size: int, progress: bool,
                   fail_fast: bool, after_batch=lambda: None) -> None:
    """This process's inputs, each recorded in `part` once its outputs are written (or it failed);
    `after_batch()` is called after each batch."""
    from tqdm import tqdm

    o = options

    noted: set[str] = set()  # notes already logged: once per job, not once per scan or frame

    def note(message: str, *args, key: str | None = None) -> None:
        """Log a warning once per job (keyed by its text, or `key`)."""
        key = key or message % args
        if key not in noted:
            noted.add(key)
            log.warning(message, *args)
    bar = tqdm(total=len(items), desc="predict", unit="img", disable=not progress)
    try:
        for start in range(0, len(items), batch_size):
            chunk = []  # (input order, path, output name, frame, Decoded)
            for i, path in items[start:start + batch_size]:
                try:
                    chunk += [(i, path, *item) for item in read_frames(path, o.frame, o.max_pixels)]
                except DataError as e:
                    if fail_fast:
                        raise
                    log.warning("skipped: %s", e)
                    error = {"image": str(path), "code": e.code, "problem": e.problem}
                    result.errors.append(error)
                    part.add({"input": str(path), "order": i, "status": "failed", "error": error})
            probs = predictor.predict_proba_batch([d.gray for *_, d in chunk], batch_size,
                                                  names=[name for _, _, name, *_ in chunk])
            entries: dict[Path, dict] = {}  # one per input, its frames' rows together
            frames_left = Counter(path for _, path, *_ in chunk)
            for (i, path, name, index, decoded), prob in zip(chunk, probs):
                image = decoded.gray
                pred = predictor.prediction(prob, o.threshold)
                measured = measure_scan(decoded, pred.mask, o.pixel_spacing)
                outputs = {out / f"{name}_mask.png": png_bytes(pred.mask.astype(np.uint8) * 255),
                           out / f"{name}_overlay.png": png_bytes(overlay_contours(image, pred=pred.mask))}
                if o.save_prob:
                    outputs[out / f"{name}_prob.png"] = png_bytes(np.round(prob * 255).astype(np.uint8))
                if (o.dicom_sr or o.dicom_seg) and decoded.dicom is not None:
                    from hemaseg.measure.dicom_out import dicom_outputs

                    files_, skipped = dicom_outputs(path, pred.mask, measured, index, out / name, sr=o.dicom_sr,
                                                    seg=o.dicom_seg, model=o.model_name, finding=pred.finding)
                    outputs.update(files_)
                    for why in skipped:
                        note("no DICOM output: %s", why)
                elif o.dicom_sr or o.dicom_seg:  # said, not silent: an SR or SEG references the scanner's file
                    note("no DICOM output: %s", f"{path}: not a DICOM file, so no DICOM SR/SEG (they reference "
                                                "the scan's own DICOM file)")
                labelme = None
                if o.labelme_tolerance is not None:
                    labelme, why = _labelme_target(path, name, decoded, out)
                    if why is not None:
                        note("no LabelMe output: %s", why)
                    if labelme is not None and (labelme.exists() or labelme.is_symlink()):
                        result.labelme_kept.append(labelme)
                        labelme = None
                    if labelme is not None:
                        from hemaseg.data.formats import labelme_document

                        image_path = path.name
                        if decoded.dicom is not None:
                            image_path = labelme.with_suffix(".png").name
                            outputs.update(_dicom_for_labelme(labelme, decoded, measured, index))
                            labelme.parent.mkdir(exist_ok=True)
                            if decoded.dicom.burned_in_annotation:
                                note("%s: the DICOM does not say its pixels are free of burned-in text "
                                     "(BurnedInAnnotation not NO); check the PNGs in %s before sharing them",
                                     path, labelme.parent, key="burned")
                        doc = labelme_document(pred.mask, image_path, o.labelme_tolerance, proposal=True,
                                               model=o.model_name)
                        outputs[labelme] = (json.dumps(doc, indent=2) + "\n").encode()
                _write_outputs(outputs)
                if labelme is not None:
                    result.labelme.append(labelme)
                row = {
                    "image": str(path), "frame": index, "width": image.shape[1], "height": image.shape[0],
                    "lesion_area_px": pred.area_px, "lesion_fraction": round(pred.area_px / image.size, 6),
                    "max_prob": round(float(prob.max()), 4), **pred.finding.row(),
                    **measured.image_row(),
                }
                lesions = measured.lesion_rows(str(path), index)
                result.rows.append(row)
                result.lesions += lesions
                entry = entries.setdefault(path, {"input": str(path), "order": i, "status": "done", "outputs": [],
                                                  "rows": [], "lesions": []})
                entry["outputs"] += [str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for p in outputs]
                entry["rows"].append(row)
                entry["lesions"] += lesions
                frames_left[path] -= 1
                if not frames_left[path]:  # the input's last frame: it is done
                    part.add(entries.pop(path))
            bar.update(len(items[start:start + batch_size]))
            after_batch()
    finally:
        bar.close()
