"""OUT/manifest.jsonl: what a `hemaseg predict` into OUT has done, so an archive job can resume.

One JSON object per line. The first is the header: the settings the outputs were made with (the model's
weights fingerprint, threshold, TTA, postprocessing, output options) and the input order. Each other line
is one input finished: `done` (its output files, its rows of predictions.csv and lesions.csv) or `failed`
(its row of errors.csv), with its place in the input order and the rank that did it.

While a job runs, each process appends its lines to its own OUT/manifest.partR.jsonl (R its rank, 0 in a
single process), flushed after every input, so a killed job keeps everything it finished and two
processes never write one file. When the job ends (or is interrupted, in a single process) the parts are
merged into manifest.jsonl, written atomically, and the tables are made from it. An input's last line
wins: a rerun's answer replaces an earlier failure. A line cut short by a kill is ignored.

`--skip-existing` reads the manifest (and any parts a killed job left) and skips every input that is done
with all its output files still present; failed inputs are tried again. It refuses to mix outputs of other
settings into one folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from hemaseg.io import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
VERSION = 1


class ManifestError(ValueError):
    """A manifest that cannot be resumed from (other settings, not a manifest)."""


def part_path(out: Path, rank: int) -> Path:
    return out / f"manifest.part{rank}.jsonl"


def part_paths(out: Path) -> list[Path]:
    return sorted(out.glob("manifest.part*.jsonl"))


def weights_fingerprint(models: Iterable[torch.nn.Module]) -> str:
    """A short hash of every parameter and buffer: the same weights give the same outputs, wherever the
    checkpoint file lies or whatever it is called."""
    h = hashlib.sha256()
    for model in models:
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def predictor_settings(predictor, options) -> dict:
    """What decides a prediction's outputs, JSON-safe: the weights and inference settings of `predictor`
    (the threshold the masks are cut at: `options.threshold` or the predictor's) and the output `options`
    (`files.OutputOptions`: save_prob, frame, pixel spacing ...; not the model's name, a label)."""
    given = dataclasses.asdict(options)
    threshold = given.pop("threshold")
    given.pop("model_name")
    return {**predictor.identity(), "threshold": predictor.threshold if threshold is None else threshold,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in given.items()}}


def _plain(o):
    """json.dumps' fallback for numpy scalars in the table rows."""
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _read_lines(path: Path) -> list[dict]:
    """The complete JSON lines of `path`; a last line cut short by a kill is dropped."""
    out = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: line %d is incomplete (a job killed while writing it); ignored", path, n)
    return out


@dataclass
class Manifest:
    """The merged state of OUT: header settings and the last entry of every input (by input path)."""

    settings: dict | None
    entries: dict[str, dict]

    @classmethod
    def read(cls, out: Path) -> Manifest:
        settings, entries = None, {}
        paths = ([out / MANIFEST] if (out / MANIFEST).is_file() else []) + part_paths(out)
        for path in paths:
            lines = _read_lines(path)
            if path.name == MANIFEST:
                if not lines or lines[0].get("hemaseg_manifest") != VERSION:
                    raise ManifestError(f"{path}: not a hemaseg manifest (version {VERSION})")
                settings, lines = lines[0]["settings"], lines[1:]
            for entry in lines:
                entries[entry["input"]] = entry
        return cls(settings, entries)

    def done(self, out: Path) -> set[str]:
        """Inputs finished with every output file still there."""
        return {name for name, e in self.entries.items()
                if e["status"] == "done" and all((out / p).exists() for p in e["outputs"])}

    def check_settings(self, settings: Mapping, out: Path) -> None:
        if self.settings is None:
            if self.entries:
                raise ManifestError(f"{out}: manifest parts without {MANIFEST}; rerun without --skip-existing")
            return
        changed = [f"{k} {self.settings.get(k)!r} -> {v!r}" for k, v in settings.items() if self.settings.get(k) != v]
        if changed:
            raise ManifestError(f"{out / MANIFEST}: its outputs were made with other settings ({'; '.join(changed)}); "
                                "rerun without --skip-existing to redo every scan, or write to another --out")

    def ordered(self, order: Sequence[str]) -> list[dict]:
        """Entries in the input order given, then any others (earlier runs' inputs) in their own order."""
        place = {name: i for i, name in enumerate(order)}
        return sorted(self.entries.values(), key=lambda e: (place.get(e["input"], len(place) + e["order"]), e["input"]))


def start(out: Path, settings: Mapping, inputs: Sequence[str], resume: bool) -> Manifest:
    """Rank 0, before any process predicts: the manifest to resume from (`resume`) or a new one (the old
    manifest and parts removed); the header written with this job's settings."""
    if resume:
        manifest = Manifest.read(out)
        manifest.check_settings(settings, out)
    else:
        for path in part_paths(out):
            path.unlink()
        manifest = Manifest(None, {})
    manifest.settings = dict(settings)
    write_merged(out, manifest, inputs)
    return manifest


def write_merged(out: Path, manifest: Manifest, inputs: Sequence[str]) -> list[dict]:
    """manifest.jsonl (header + every input's last entry, in input order), atomically. Returns the entries."""
    entries = manifest.ordered(inputs)
    header = {"hemaseg_manifest": VERSION, "settings": manifest.settings, "inputs": len(inputs)}
    lines = [json.dumps(header, default=_plain)] + [json.dumps(e, default=_plain) for e in entries]
    atomic_write_text(out / MANIFEST, "\n".join(lines) + "\n")
    return entries


class PartWriter:
    """This process's manifest part, one line appended and flushed per finished input."""

    def __init__(self, out: Path, rank: int):
        self.path = part_path(out, rank)
        self.rank = rank
        self._file: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def add(self, entry: dict) -> None:
        self._file.write(json.dumps({**entry, "rank": self.rank}, default=_plain) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
