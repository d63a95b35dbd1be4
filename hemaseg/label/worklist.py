"""The scans to label, most doubtful first, and the model's proposal for each.

Order: scans the model flags for review (lowest confidence first), then the rest of the scans it proposed
an outline for (lowest confidence first), then scans with no proposal (no model, not scored yet, or the
model failed on them), in the folder's natural order. Ties keep the natural order. Saved scans keep their
place and are marked, so "next" and "previous" do not jump while someone works through the list.

A proposal is the model's answer for the whole scan, an empty mask included ("no lesion found" is an
answer too, and a doubtful one comes first). Scans are PNG, JPEG, BMP, TIFF or DICOM (frame 0), decoded by
`data.images.decode_image`, the project's one decoder; a few decoded scans are kept in memory.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hemaseg.data.images import MAX_PIXELS_DEFAULT, Decoded, decode_image
from hemaseg.data.listing import collect_inputs, natural_key

log = logging.getLogger(__name__)

DECODED_CACHE = 8  # decoded scans kept (a 1000x800 scan is 3 MB as float32)


@dataclass(frozen=True)
class Proposal:
    """The model's answer for one scan."""

    mask: np.ndarray  # bool HxW at the scan's size
    confidence: float  # 0..1 (`Prediction.confidence`)
    needs_review: bool  # the model's own review rule (`Predictor.needs_review`)
    finding: str  # 'lesion found' / 'no lesion found', ' - review' when flagged
    model: str  # which model proposed it

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())


def proposal_from(predictor, gray: np.ndarray, model: str) -> Proposal:
    """Run `predictor` (anything with hemaseg's Predictor API: predict -> a Prediction with its `finding`)."""
    pred = predictor.predict(gray)
    return Proposal(np.asarray(pred.mask, bool), float(pred.confidence), bool(pred.finding.needs_review),
                    pred.finding.text, model)


def doubt_key(proposal: Proposal | None, position: int) -> tuple:
    """Sort key: review first, then other proposals, then none; lower confidence first; then folder order."""
    if proposal is None:
        return (2, 0.0, position)
    return (0 if proposal.needs_review else 1, proposal.confidence, position)


class Worklist:
    """The scans of SCANS (files, or folders of them: an `images/` subfolder if there is one), by name.

    `name` is the file's stem (unique: two files with one stem are refused, as `hemaseg predict` does)."""

    def __init__(self, scans: str | os.PathLike | Iterable[str | os.PathLike],
                 max_pixels: int | None = MAX_PIXELS_DEFAULT):
        inputs = [scans] if isinstance(scans, (str, os.PathLike)) else list(scans)
        paths = collect_inputs(inputs)
        if not paths:
            raise FileNotFoundError(f"{', '.join(map(str, inputs))}: no scans to label")
        self.paths: dict[str, Path] = {p.stem: p for p in sorted(paths, key=lambda p: natural_key(p.name))}
        self.names: list[str] = list(self.paths)
        self.position = {n: i for i, n in enumerate(self.names)}
        self.max_pixels = max_pixels
        self.proposals: dict[str, Proposal] = {}
        self.failed: dict[str, str] = {}  # name -> why it could not be decoded or scored
        self._decoded: OrderedDict[str, Decoded] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, name: object) -> bool:
        return name in self.paths

    def __len__(self) -> int:
        return len(self.names)

    def folders(self) -> set[Path]:
        return {p.parent.resolve() for p in self.paths.values()}

    def decoded(self, name: str) -> Decoded:
        """The scan NAME decoded (frame 0 of a DICOM cine), from the small cache when it is there.
        KeyError for a name that is not in the list; DataError when the file cannot be read."""
        path = self.paths[name]
        with self._lock:
            if name in self._decoded:
                self._decoded.move_to_end(name)
                return self._decoded[name]
        decoded = decode_image(path, self.max_pixels, name=path.name)
        with self._lock:
            self._decoded[name] = decoded
            while len(self._decoded) > DECODED_CACHE:
                self._decoded.popitem(last=False)
        return decoded

    def score(self, name: str, predictor, model: str) -> Proposal | None:
        """The model's proposal for NAME, computed and kept (None, with the reason in `failed`, when the
        scan cannot be read or the model fails on it)."""
        try:
            proposal = proposal_from(predictor, self.decoded(name).gray, model)
        except Exception as e:  # noqa: BLE001 - a broken scan or a failing model: no proposal for this one
            log.warning("%s: no proposal (%s: %s)", self.paths[name].name, type(e).__name__, e)
            self.mark_failed(name, str(e))
            return None
        with self._lock:
            self.proposals[name] = proposal
            self.failed.pop(name, None)
        return proposal

    def mark_failed(self, name: str, why: str) -> None:
        with self._lock:
            self.failed[name] = why

    def score_all(self, predictor, model: str, skip: Callable[[str], bool] = lambda name: False,
                  stop: threading.Event | None = None) -> int:
        """Score every scan that has no proposal from `model` yet (and is not skipped); returns how many."""
        done = 0
        for name in self.names:
            if stop is not None and stop.is_set():
                break
            current = self.proposals.get(name)
            if (current is not None and current.model == model) or skip(name):
                continue
            self.score(name, predictor, model)
            done += 1
        return done

    def forget(self, names: Sequence[str]) -> None:
        """Drop these scans' proposals (a new model will propose again)."""
        with self._lock:
            for n in names:
                self.proposals.pop(n, None)

    def ordered(self) -> list[str]:
        with self._lock:
            proposals = dict(self.proposals)
        return sorted(self.names, key=lambda n: doubt_key(proposals.get(n), self.position[n]))

    def items(self, saved: Mapping[str, str | None]) -> list[dict]:
        """The list the page shows, in doubt order: `saved` maps a saved scan's name to how its mask was
        made (or None when unknown)."""
        with self._lock:
            proposals = dict(self.proposals)
            failed = dict(self.failed)
        out = []
        for n in self.ordered():
            p = proposals.get(n)
            item = {"name": n, "saved": n in saved, "method": saved.get(n), "has_proposal": p is not None,
                    "needs_review": p.needs_review if p else None,
                    "confidence": round(p.confidence, 4) if p else None,
                    "finding": p.finding if p else None, "problem": failed.get(n)}
            out.append(item)
        return out


def progress_text(done: int, total: int) -> str:
    return f"{done} of {total} labelled"
