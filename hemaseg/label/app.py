"""The labelling page and its API: `hemaseg label SCANS --into DATASET`, or `create_app(...)` in Python.

The page (static/label.html) shows the worklist most doubtful first (`worklist`), the model's proposal
on each scan, and tools to correct it: accept, a box for LiteMedSAM (`inference.promptable.BoxPredictor`),
points to add or remove, a brush; saving writes scan + mask into DATASET (`store`); the fine-tune button
trains on the saved scans in the background (`finetune`) and swaps the model in only if it is better.

API (JSON; every /api route needs the key when one is set, as `hemaseg serve`'s /v1 routes do):

    GET  /api/worklist               the scans in doubt order, "23 of 140 labelled", model, fine-tune state
    GET  /api/scans/NAME             size, format, the DICOM's calibration, saved or not
    GET  /api/scans/NAME/image       the scan as an 8-bit gray PNG (DICOM included)
    GET  /api/scans/NAME/proposal    the model's mask (RLE) and outline, confidence, needs_review
    POST /api/scans/NAME/prepare     start computing the scan's LiteMedSAM embedding (so a box is quick)
    POST /api/scans/NAME/box         {"box": [x0, y0, x1, y1], "points": [[x, y]], "point_labels": [1|0]}
    POST /api/scans/NAME/save        JSON {"mask_rle" | "mask_png", "method", "base", "seconds",
                                     "pixel_spacing"} or multipart (file field "mask", same form fields)
    GET  /api/scans/NAME/mask        the saved mask as PNG (0/255): a saved scan reopens with it
    POST /api/finetune               start a fine-tune; GET /api/finetune: its progress and result

Masks travel as RLE: {"height": H, "width": W, "counts": [...]}, run lengths over the pixels in row-major
order, alternating background and lesion, starting with background (a zero-length first run when the
first pixel is lesion). Refusals are `{"error": {"code", "message"}}` with a 4xx, as `hemaseg serve`.

Security: served on 127.0.0.1 unless told otherwise; when `allowed_hosts` is set (the CLI sets it for a
loopback address) a request naming another Host is refused, which defeats DNS rebinding; a request whose
Origin is not this server's is refused, so another web site open in the same browser cannot save or
start anything; the same security headers and CSP as `hemaseg serve`.

The small HTTP pieces here (error format, security headers, API-key check) mirror serve/app.py: the stage
graph puts `label` below `serve`, so it cannot import them from there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, Response
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from hemaseg import __version__
from hemaseg.data.images import MAX_PIXELS_DEFAULT, DataError, read_head
from hemaseg.data.pixels import DICOM_HEAD_BYTES, is_dicom
from hemaseg.io import json_safe, png_bytes
from hemaseg.label.finetune import Busy, Finetuner, FinetuneSettings, NotEnoughScans
from hemaseg.label.store import METHODS, OutsideDataset, Store, neutral_name
from hemaseg.label.worklist import Proposal, Worklist, progress_text
from hemaseg.lesions import find_lesions
from hemaseg.spacing import Spacing, parse_pixel_spacing
from hemaseg.web import (
    MULTIPART_SLACK, SECURITY_HEADERS, ApiError, api_key_check, error_response, install_error_handlers, mount_static,
    read_body,
)

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
TYPED_SOURCE = "typed on the label page"
MAX_OUTLINES = 20  # lesion outlines sent with a proposal
LABEL_HEADERS = {**SECURITY_HEADERS, "Cache-Control": "no-store"}  # every reply describes a patient's scan
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True)
class LabelSettings:
    """The labelling service. `allowed_hosts`: Host header names accepted (None: any; the CLI gives the
    loopback names when it listens on loopback)."""

    api_key: str | None = None
    device: str = "auto"
    threshold: float | None = None
    max_pixels: int = MAX_PIXELS_DEFAULT
    max_upload_bytes: int = 20 * 1024 * 1024
    box_backend: str = "auto"  # LiteMedSAM's backend (inference.promptable.BACKENDS)
    allowed_hosts: tuple[str, ...] | None = None
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty (flag or HEMASEG_API_KEY); give a key, or leave both unset")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ValueError(f"--threshold must be between 0 and 1, got {self.threshold}")
        if self.max_pixels < 1 or self.max_upload_bytes < 1:
            raise ValueError("max_pixels and max_upload_bytes must be > 0")


# --- codecs ---------------------------------------------------------------------------------------------------


def rle_encode(mask: np.ndarray) -> dict:
    """bool HxW -> {"height", "width", "counts"} (row-major runs, background first)."""
    flat = np.asarray(mask, bool).ravel()
    h, w = np.shape(mask)
    if flat.size == 0:
        return {"height": int(h), "width": int(w), "counts": []}
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"height": int(h), "width": int(w), "counts": [int(r) for r in runs]}


def rle_decode(rle: Any, shape: tuple[int, int]) -> np.ndarray:
    """{"height", "width", "counts"} -> bool HxW; ValueError unless it is exactly a mask of `shape`."""
    if not isinstance(rle, dict) or not isinstance(rle.get("counts"), list):
        raise ValueError("mask_rle must be an object with height, width and counts")  # noqa: TRY004 - a 422
    h, w = shape
    if rle.get("height") != h or rle.get("width") != w:
        raise ValueError(f"mask_rle is {rle.get('width')}x{rle.get('height')} but the scan is {w}x{h}")
    counts = rle["counts"]
    if len(counts) > h * w + 1 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ValueError("mask_rle counts must be whole numbers >= 0")
    if sum(counts) != h * w:
        raise ValueError(f"mask_rle counts add up to {sum(counts)} pixels, not the scan's {h * w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(h, w)


_XY_SEPARATOR = re.compile(r"\s*(?:;|x|X|×|\*|,\s+|\s+)\s*")


def parse_spacing_text(text: str | None) -> Spacing | None:
    """mm per pixel as people type it -> Spacing (None for an empty field). A decimal comma is accepted:
    '0,1' is 0.1. x and y: '0.1,0.12' (a decimal point and a comma between), or any decimal mark with ';',
    'x', a space or ', ' between ('0,1;0,12', '0,1 x 0,12'). ValueError with the accepted forms otherwise."""
    t = (text or "").strip()
    if not t:
        return None
    how = "give mm per pixel as 0.1 (or 0,1), or x and y as 0.1,0.12 or 0,1;0,12"
    if _XY_SEPARATOR.search(t):
        parts = [p.replace(",", ".") for p in _XY_SEPARATOR.split(t) if p]
        joined = ",".join(parts)
    elif "." in t:  # a decimal point: a comma separates x and y
        joined = t
    elif t.count(",") <= 1:
        joined = t.replace(",", ".")
    else:
        raise ValueError(f"pixel spacing {t!r} is ambiguous; {how}")
    try:
        return parse_pixel_spacing(joined, TYPED_SOURCE)
    except ValueError:
        raise ValueError(f"pixel spacing {t!r} is not a number of mm > 0; {how}") from None


# --- the session ----------------------------------------------------------------------------------------------


def model_name(model: Any) -> str:
    """A short name for the manifest: a packaged model's name, a run folder's name."""
    if isinstance(model, (str, Path)):
        p = Path(model)
        return p.parent.name if p.suffix == ".pt" and p.parent.name else p.name or str(model)
    meta = getattr(model, "metadata", None) or {}
    if meta.get("checkpoint"):
        p = Path(meta["checkpoint"])
        return p.parent.name if p.suffix == ".pt" else p.name
    return getattr(model, "name", None) or type(model).__name__


class Session:
    """Everything one labelling session holds: the worklist, the store, the current model and LiteMedSAM,
    and the threads that score scans and fine-tune."""

    def __init__(self, worklist: Worklist, store: Store, predictor=None, predictor_name: str | None = None,
                 box_predictor=None, settings: LabelSettings = LabelSettings()):
        self.worklist, self.store, self.settings = worklist, store, settings
        self.predictor = predictor
        self.model = predictor_name or (model_name(predictor) if predictor is not None else None)
        self._box = box_predictor  # a BoxPredictor-like object, "auto" (loaded on start) or None
        self._box_future: Future | None = None
        self.box_error: str | None = None
        self._names: dict[str, str] = {}  # worklist name -> dataset name, once known
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.idle = threading.Event()  # set when the scorer has nothing left to do
        self._scorer: threading.Thread | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.finetuner = Finetuner(store.root, settings.finetune, on_better=self.swap)

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> ThreadPoolExecutor:
        with self._lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(2, thread_name_prefix="hemaseg-label")
            if self._scorer is None or not self._scorer.is_alive():
                self._stop.clear()
                self._scorer = threading.Thread(target=self._score_loop, name="hemaseg-label-scorer", daemon=True)
                self._scorer.start()
            if self._box == "auto" and self._box_future is None:
                self._box_future = Future()
                threading.Thread(target=self._load_box, name="hemaseg-litemedsam", daemon=True).start()
            return self.pool

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self.finetuner.stop(timeout=5)
        if self._scorer is not None:
            self._scorer.join(5)
        with self._lock:
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
                self.pool = None

    def _load_box(self) -> None:
        try:
            from hemaseg.inference.promptable import BoxPredictor

            box = BoxPredictor(device=self.settings.device, backend=self.settings.box_backend)
        except Exception as e:  # noqa: BLE001 - no LiteMedSAM: the page works without boxes
            self.box_error = f"LiteMedSAM is not available here ({type(e).__name__}: {e})"
            log.warning("%s; boxes are off, the brush still works", self.box_error)
            self._box = None
            self._box_future.set_result(None)
            return
        self._box = box
        self._box_future.set_result(box)

    def box_predictor(self, wait: bool = True):
        """LiteMedSAM (or the object given), waiting for it to load; None when there is none."""
        if self._box == "auto" and self._box_future is not None:
            return self._box_future.result() if wait else None
        return None if self._box == "auto" else self._box

    @property
    def box_state(self) -> str:
        if self._box == "auto":
            return "loading"
        return "ready" if self._box is not None else "off"

    @property
    def box_name(self) -> str | None:
        box = self._box if self._box != "auto" else None
        return None if box is None else getattr(box, "name", "litemedsam")

    def _score_loop(self) -> None:
        """Resolve dataset names, then score every scan with the current model; again after a swap."""
        while not self._stop.is_set():
            self.idle.clear()
            predictor, model = self.predictor, self.model
            try:
                self._score_pass(predictor, model)
            except Exception:  # the page still works: a scan opened is scored then
                log.exception("scoring the worklist failed")
            if predictor is self.predictor:
                self.idle.set()
                self._wake.wait()
                self._wake.clear()

    def _score_pass(self, predictor, model: str | None) -> None:
        for name in self.worklist.names:
            if self._stop.is_set():
                return
            try:
                self.dataset_name(name)
            except (DataError, OSError) as e:  # an unreadable scan: the list says why
                self.worklist.mark_failed(name, str(e))
        if predictor is not None:
            saved = self.saved()  # saved scans keep the proposal they were labelled against
            self.worklist.score_all(predictor, model, stop=self._stop,
                                    skip=lambda n: n in saved and self._has_proposal(n))

    def _has_proposal(self, name: str) -> bool:
        return name in self.worklist.proposals

    def wait_idle(self, timeout: float = 60) -> bool:
        """Block until every scan has been scored by the current model (tests, benchmarks)."""
        return self.idle.wait(timeout)

    def swap(self, predictor, name: str, result: dict | None = None) -> None:
        """Use `predictor` for the scans not saved yet (called when a fine-tune beat the old model)."""
        saved = self.saved()
        with self._lock:
            self.predictor, self.model = predictor, name
        self.worklist.forget([n for n in self.worklist.names if n not in saved])
        log.info("now proposing with %s", name)
        self.idle.clear()
        self._wake.set()

    # --- names and saved state ---------------------------------------------------------------------------

    def dataset_name(self, name: str) -> str:
        """The scan's name in DATASET (`store.neutral_name`)."""
        known = self._names.get(name)
        if known is not None:
            return known
        path = self.worklist.paths[name]
        if not is_dicom(read_head(path, DICOM_HEAD_BYTES)):
            out = path.stem
        else:
            decoded = self.worklist.decoded(name)
            out = neutral_name(path.stem, decoded.gray, path, is_dicom=True)
        self._names[name] = out
        return out

    def saved(self) -> dict[str, str | None]:
        """Worklist names already saved in DATASET -> how their mask was made."""
        rows = self.store.manifest()
        on_disk = self.store.saved_names()
        out = {}
        for name in self.worklist.names:
            ds = self._names.get(name)
            if ds is None and self.worklist.paths[name].suffix.lower() not in (".dcm", ".dicom"):
                ds = self.worklist.paths[name].stem
            if ds is not None and ds in on_disk:
                out[name] = (rows.get(f"{ds}.png") or {}).get("method") or None
        return out

    def scan(self, name: str):
        if name not in self.worklist:
            raise ApiError(404, "unknown_scan", f"No scan named {name!r} in this worklist.")
        try:
            return self.worklist.decoded(name)
        except DataError as e:
            raise ApiError(422, "unreadable_scan", f"{self.worklist.paths[name].name}: {e.problem}.") from None

    def proposal(self, name: str) -> Proposal | None:
        p = self.worklist.proposals.get(name)
        if p is None and self.predictor is not None and name not in self.worklist.failed:
            self.scan(name)
            p = self.worklist.score(name, self.predictor, self.model)
        return p


# --- HTTP plumbing (mirrors serve/app.py) ---------------------------------------------------------------------


class _HeadersMiddleware:
    """Security headers on every response; Host and Origin checks on every request (pure ASGI)."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] | None):
        self.app = app
        self.allowed = {h.lower() for h in allowed_hosts} if allowed_hosts else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host", "")
        problem = None
        if self.allowed is not None and urlsplit(f"//{host}").hostname not in \
                {h.strip("[]") for h in self.allowed}:
            problem = (421, "wrong_host", f"This server answers to {', '.join(sorted(self.allowed))} only.")
        origin = headers.get("origin")
        if problem is None and origin not in (None, "null") and urlsplit(origin).netloc.lower() != host.lower():
            problem = (403, "cross_origin", "Requests from other web sites are refused.")
        if problem is not None:
            response = error_response(*problem)
            response.headers.update(LABEL_HEADERS)
            return await response(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                for k, v in LABEL_HEADERS.items():
                    h.setdefault(k, v)
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _save_fields(request: Request, limit: int) -> dict:
    """The save request as a dict: JSON, or multipart with the mask PNG in file field `mask` (kept in
    memory, never a temp file)."""
    body = await read_body(request, limit, ApiError(
        413, "too_large", f"The request is larger than the limit of {limit / 2 ** 20:.3g} MB."))
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        async def once() -> AsyncIterator[bytes]:
            yield body

        parser = MultiPartParser(request.headers, once(), max_files=1, max_fields=16, max_part_size=MULTIPART_SLACK)
        parser.spool_max_size = len(body) + 1
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise ApiError(422, "bad_multipart", f"The multipart body cannot be read: {e}") from None
        try:
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            upload = form.get("mask")
            if isinstance(upload, UploadFile):
                upload.file.seek(0)
                fields["mask_png_bytes"] = upload.file.read()
        finally:
            await form.close()
        return fields
    try:
        data = json.loads(body or b"null")
    except ValueError:
        raise ApiError(422, "bad_json", "The body is not JSON; send the mask as JSON or multipart.") from None
    if not isinstance(data, dict):
        raise ApiError(422, "bad_json", "The body must be a JSON object.")
    return data


def _mask_from(fields: dict, shape: tuple[int, int], max_pixels: int) -> np.ndarray:
    from hemaseg.data.dataset import read_mask

    if fields.get("mask_rle") is not None:
        try:
            return rle_decode(fields["mask_rle"], shape)
        except ValueError as e:
            raise ApiError(422, "bad_mask", str(e)[:1].upper() + str(e)[1:] + ".") from None
    raw = fields.get("mask_png_bytes")
    if raw is None and fields.get("mask_png") is not None:
        try:
            raw = base64.b64decode(str(fields["mask_png"]), validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "bad_mask", "mask_png is not base64.") from None
    if raw is None:
        raise ApiError(422, "missing_mask", "Send the mask as mask_rle, mask_png (base64) or a multipart file "
                                            "field named mask.")
    try:
        mask = read_mask(raw, None, max_pixels, name="mask")
    except DataError as e:
        raise ApiError(422, "bad_mask", f"The mask PNG cannot be used: {e.problem}.") from None
    if mask.shape != shape:
        raise ApiError(422, "bad_mask", f"The mask is {mask.shape[1]}x{mask.shape[0]} but the scan is "
                                        f"{shape[1]}x{shape[0]}.")
    return mask


def _float_or_none(value: Any, what: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        v = float(str(value).replace(",", "."))
    except ValueError:
        raise ApiError(422, "invalid_parameter", f"{what} must be a number; got {value!r}.") from None
    if not np.isfinite(v) or v < 0:
        raise ApiError(422, "invalid_parameter", f"{what} must be a finite number >= 0; got {value!r}.")
    return v


# --- the app ----------------------------------------------------------------------------------------------------


def create_app(scans, dataset: str | Path, model=None, settings: LabelSettings | None = None,
               box_predictor: Any = "auto", predictor_name: str | None = None) -> FastAPI:
    """The labelling app for the scans in `scans` (files or folders), saving into `dataset`.

    `model`: a run folder, checkpoint, packaged model name ("ultrasound") or a loaded Predictor (anything
    with its predict/needs_review/finding API), or None for no proposals. `box_predictor`: "auto" (load
    LiteMedSAM in the background when the app starts; boxes are off if it cannot load), an object with
    BoxPredictor's `predict(image, box=, points=, point_labels=)`, or None."""
    settings = settings or LabelSettings()
    worklist = Worklist(scans, settings.max_pixels)
    dataset = Path(dataset)
    images_dir = (dataset / "images").resolve()
    if images_dir in worklist.folders() or dataset.resolve() in worklist.folders():
        raise ValueError(f"{dataset}: DATASET holds the scans being labelled; save into another folder")
    store = Store(dataset)
    predictor = model
    if isinstance(model, (str, Path)):
        from hemaseg.inference.predictor import load_model

        predictor = load_model(model, device=settings.device, threshold=settings.threshold)
        predictor_name = predictor_name or model_name(model)
    session = Session(worklist, store, predictor, predictor_name, box_predictor, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        session.start()
        yield
        session.close()

    app = FastAPI(title="hemaseg label", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Label scans on a page; learn from the corrections.")
    app.state.session = session
    app.add_middleware(_HeadersMiddleware, allowed_hosts=settings.allowed_hosts)

    install_error_handlers(app)
    keyed = [Depends(api_key_check(settings.api_key))]

    async def off_loop(fn, *args):
        """Blocking work (decoding, the models, the disk) in the session's threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(session.start(), fn, *args)

    @app.get("/api/worklist", dependencies=keyed)
    async def worklist_() -> dict:
        saved = session.saved()
        total = len(worklist)
        return json_safe({
            "items": worklist.items(saved), "labelled": len(saved), "total": total,
            "progress": progress_text(len(saved), total),
            "scoring": {"done": sum(1 for n in worklist.names if n in worklist.proposals or n in worklist.failed),
                        "total": total, "idle": session.idle.is_set()},
            "model": session.model, "box": {"state": session.box_state, "model": session.box_name,
                                            "problem": session.box_error},
            "finetune": session.finetuner.status(),
        })

    @app.get("/api/scans/{name}", dependencies=keyed)
    async def scan_info(name: str) -> dict:
        decoded = await off_loop(session.scan, name)
        spacing, note, burned = None, None, None
        if decoded.dicom is not None:
            spacing, note = decoded.dicom.spacing_for(None)
            burned = decoded.dicom.burned_in_annotation
        ds_name = await off_loop(session.dataset_name, name)
        h, w = decoded.gray.shape
        return json_safe({
            "name": name, "width": w, "height": h, "format": decoded.format, "dataset_name": ds_name,
            "spacing": spacing.to_dict() if spacing else None, "spacing_note": note,
            "burned_in_annotation": burned, "saved": store.row(ds_name) if store.is_saved(ds_name) else None,
        })

    @app.get("/api/scans/{name}/image", dependencies=keyed)
    async def scan_image(name: str) -> Response:
        decoded = await off_loop(session.scan, name)
        gray8 = np.clip(np.round(decoded.gray * 255), 0, 255).astype(np.uint8)
        return Response(png_bytes(gray8, compress_level=1), media_type="image/png")

    @app.get("/api/scans/{name}/proposal", dependencies=keyed)
    async def proposal(name: str) -> dict:
        await off_loop(session.scan, name)
        p = await off_loop(session.proposal, name)
        if p is None:
            why = worklist.failed.get(name) or ("no model was given" if session.predictor is None else "not scored")
            return {"available": False, "reason": why, "model": session.model}
        _, lesions = find_lesions(p.mask, MAX_OUTLINES)
        return json_safe({"available": True, "model": p.model, "confidence": round(p.confidence, 4),
                          "needs_review": p.needs_review, "finding": p.finding, "area_px": p.area_px,
                          "outlines": [[list(pt) for pt in les.contour] for les in lesions],
                          "mask_rle": rle_encode(p.mask)})

    @app.post("/api/scans/{name}/prepare", dependencies=keyed, status_code=202)
    async def prepare(name: str) -> dict:
        decoded = await off_loop(session.scan, name)
        box = session.box_predictor(wait=False)
        if box is not None and hasattr(box, "embed"):
            session.start().submit(box.embed, decoded.gray)
        return {"box": session.box_state}

    @app.post("/api/scans/{name}/box", dependencies=keyed)
    async def box_mask(name: str, request: Request) -> dict:
        decoded = await off_loop(session.scan, name)
        try:
            body = json.loads(await read_body(request, 1024 * 1024, ApiError(413, "too_large", "A prompt is at most 1 MB."))
                              or b"{}")
        except ValueError:
            raise ApiError(422, "bad_json", "Send the box as JSON: {\"box\": [x0, y0, x1, y1]}.") from None
        if not isinstance(body, dict):
            raise ApiError(422, "bad_json", "The body must be a JSON object.")
        box, points, labels = body.get("box"), body.get("points") or None, body.get("point_labels")
        if box is None and points is None:
            raise ApiError(422, "missing_prompt", "Draw a box (or add a point) first.")
        predictor = await off_loop(session.box_predictor)
        if predictor is None:
            raise ApiError(503, "box_unavailable", session.box_error or "Box prompting is off on this page; "
                                                                       "use the brush.")
        try:
            pred = await off_loop(lambda: predictor.predict(decoded.gray, box=box, points=points,
                                                             point_labels=labels))
        except (ValueError, TypeError) as e:
            raise ApiError(422, "bad_prompt", str(e)[:1].upper() + str(e)[1:] + ".") from None
        mask = np.asarray(pred.mask, bool)
        return {"mask_rle": rle_encode(mask), "area_px": int(mask.sum()), "model": session.box_name}

    @app.post("/api/scans/{name}/save", dependencies=keyed)
    async def save(name: str, request: Request) -> dict:
        decoded = await off_loop(session.scan, name)
        fields = await _save_fields(request, settings.max_upload_bytes)
        mask = _mask_from(fields, decoded.gray.shape, settings.max_pixels)
        method = fields.get("method") or "edited"
        if method not in METHODS:
            raise ApiError(422, "invalid_parameter", f"method must be one of {', '.join(METHODS)}; got {method!r}.")
        base = fields.get("base") or {"accepted": "proposal", "box": "box"}.get(method, "none")
        seconds = _float_or_none(fields.get("seconds"), "seconds")
        spacing, note, burned = None, None, None
        if decoded.dicom is not None:  # the file's own calibration wins, as in `hemaseg predict` and serve
            spacing, note = decoded.dicom.spacing_for(None)
            burned = decoded.dicom.burned_in_annotation
        if spacing is None:
            try:
                typed = parse_spacing_text(fields.get("pixel_spacing"))
            except ValueError as e:
                raise ApiError(422, "invalid_pixel_spacing", str(e)[:1].upper() + str(e)[1:] + ".") from None
            if typed is not None:
                spacing, note = typed, None
        proposal_ = worklist.proposals.get(name)
        used = {"proposal": proposal_.model if proposal_ else session.model, "box": session.box_name}.get(base)
        ds_name = await off_loop(session.dataset_name, name)
        try:
            saved_ = await off_loop(lambda: store.save(ds_name, decoded.gray, mask, method, seconds, spacing, note,
                                                       used, burned, decoded.format))
        except OutsideDataset as e:
            raise ApiError(403, "outside_dataset", str(e)) from None
        except FileExistsError as e:
            raise ApiError(409, "name_taken", str(e)) from None
        except OSError as e:
            raise ApiError(507, "not_saved", f"The scan was not saved ({e.strerror or e}); nothing was left "
                                             "half-written. Free some space and save again.") from None
        labelled = len(session.saved())
        return json_safe({"saved": {"name": name, "dataset_name": ds_name, "image": saved_.image,
                                    "mask": saved_.mask, "calibration": saved_.calibration, "area_px": saved_.area_px,
                                    "row": saved_.row},
                          "labelled": labelled, "total": len(worklist),
                          "progress": progress_text(labelled, len(worklist))})

    @app.get("/api/scans/{name}/mask", dependencies=keyed)
    async def saved_mask(name: str) -> Response:
        await off_loop(session.scan, name)
        ds_name = await off_loop(session.dataset_name, name)
        mask = await off_loop(store.saved_mask, ds_name)
        if mask is None:
            raise ApiError(404, "not_saved", f"{name} has not been saved yet.")
        return Response(png_bytes(mask.astype(np.uint8) * 255), media_type="image/png")

    @app.post("/api/finetune", dependencies=keyed, status_code=202)
    async def finetune_start() -> dict:
        try:
            return session.finetuner.start(sorted(store.saved_names()), session.predictor, session.model)
        except Busy as e:
            raise ApiError(409, "busy", str(e)[:1].upper() + str(e)[1:] + ".") from None
        except NotEnoughScans as e:
            raise ApiError(422, "not_enough_scans", str(e)[:1].upper() + str(e)[1:] + ".") from None

    @app.get("/api/finetune", dependencies=keyed)
    async def finetune_status() -> dict:
        return {**session.finetuner.status(), "model": session.model}

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "label.html", media_type="text/html")

    mount_static(app, STATIC_DIR)
    return app


def loopback(host: str) -> bool:
    """Whether `host` (as given to --host) is this machine only."""
    return host in LOOPBACK_HOSTS
