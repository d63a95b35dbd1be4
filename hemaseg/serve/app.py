"""The HTTP service: decode an upload -> predict off the event loop -> encode JSON or PNG.

No model or preprocessing code lives here. Pixels become gray with the same conversion `read_image` uses,
and go through `Predictor.predict_proba_batch`, so the service and `hemaseg predict` give the same mask
for the same file. Every refusal of bad input is a 4xx with `{"error": {"code", "message"}}`.

Privacy: the upload is parsed into memory (never a temp file), is not logged, and is written to disk only
when `Settings.keep_uploads` names a folder (then as `<request id>.<format>`, never the client's file name,
which may carry a patient's name).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware.trustedhost import TrustedHostMiddleware

from hemaseg import __version__
from hemaseg.data.images import DataError, Decoded, decode_image
from hemaseg.render import overlay_contours
from hemaseg.inference.predictor import Prediction, Predictor, load_model
from hemaseg.io import atomic_write_bytes, json_safe, png_bytes
from hemaseg.spacing import Spacing, parse_pixel_spacing
from hemaseg.web import (
    MULTIPART_SLACK, SECURITY_HEADERS, ApiError, api_key_check, install_error_handlers, mount_static, read_body,
)
from hemaseg.lesions import find_lesions
from hemaseg.measure.scan import measure_scan

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # decoders PIL may try, chosen by the file's magic bytes
# Magic bytes of the allowed formats, to tell a damaged scan (422) from something else entirely (415).
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
MAX_LISTED_LESIONS = 100  # outlines in a reply; the count covers all
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class Settings:
    """Service limits and behaviour. The last five apply when `create_app` loads a run itself."""

    api_key: str | None = None  # when set, every /v1 route needs it (X-API-Key or Authorization: Bearer)
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 16_000_000  # width x height, checked from the header before any pixel is decoded
    keep_uploads: Path | None = None  # folder to keep raw uploads in (off: nothing touches the disk)
    workers: int = 2  # threads that decode, encode and (without batching) run the model
    max_batch: int = 1  # > 1: one model thread groups concurrent requests into batches of up to this many
    batch_wait_ms: float = 2.0  # how long the model thread waits for more requests to fill a batch
    max_pending: int = 32  # requests in flight beyond this get 503 instead of queueing without bound
    device: str = "auto"
    threshold: float | None = None
    backend: str = "auto"  # how the network runs (config.BACKENDS)
    tta: bool = False
    postprocess: bool = True
    box_backend: str = "auto"  # LiteMedSAM's backend for requests with a box (inference.promptable.BACKENDS)
    # Host header names served besides LOCAL_HOSTS (the CLI adds its --host): any other name is refused, so a
    # web page that rebinds its own DNS name to 127.0.0.1 cannot read this service from the user's browser
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"--max-upload-mb and --max-pixels must be > 0, got {self.max_upload_bytes} bytes, "
                             f"{self.max_pixels} pixels")
        if self.workers < 1 or self.max_batch < 1 or self.max_pending < 1:
            raise ValueError(f"--workers, max_batch and max_pending must be >= 1, got {self.workers}, "
                             f"{self.max_batch}, {self.max_pending}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ValueError(f"--threshold must be between 0 and 1, got {self.threshold}")
        for host in self.allowed_hosts:
            if not isinstance(host, str) or not host.strip() or "*" in host[1:] or \
                    (host.startswith("*") and host != "*" and not host.startswith("*.")) or "/" in host:
                raise ValueError(f"--allowed-hosts: {host!r} is not a host name (e.g. scanner.local, 10.0.0.5, "
                                 "*.example.org, or * for any)")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty (flag or HEMASEG_API_KEY); give a key, or leave both unset "
                             "to serve without one")
        if self.keep_uploads is not None and Path(self.keep_uploads).exists() and not Path(self.keep_uploads).is_dir():
            raise ValueError(f"{self.keep_uploads}: --keep-uploads must name a folder, and this is a file")


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # the names of this machine, always served


def host_patterns(extra: tuple[str, ...] = ()) -> list[str]:
    """The Host header values served: LOCAL_HOSTS and `extra`, IPv6 literals also in brackets (as a Host
    header writes them)."""
    hosts = dict.fromkeys(h.strip().lower() for h in (*LOCAL_HOSTS, *extra))
    return list(dict.fromkeys([*hosts, *(f"[{h}]" for h in hosts if ":" in h and not h.startswith("["))]))


# --- response schema (documentation for /openapi.json; replies are built as plain dicts for speed) -----------


class ErrorBody(BaseModel):
    code: str = Field(description="stable machine-readable reason, e.g. unsupported_type, image_too_large")
    message: str = Field(description="what went wrong and what to do, in plain words")


class ErrorReply(BaseModel):
    error: ErrorBody


class BBox(BaseModel):
    x: int
    y: int
    width: int
    height: int


class LesionReply(BaseModel):
    area_px: int
    area_fraction: float = Field(description="lesion pixels / image pixels")
    bbox: BBox
    centroid: list[float] = Field(description="[x, y] in pixels")
    contour: list[list[int]] = Field(description="outer border as [x, y] pixel centres, clockwise, closed")


class ImageReply(BaseModel):
    width: int
    height: int
    format: str = Field(description="PNG, JPEG, BMP, TIFF or DICOM, as detected from the file's content")
    mode: str = Field(description="PIL mode of the file (DICOM: its photometric interpretation); colour, "
                                  "palette and CMYK are converted to gray")
    bytes: int


class SegmentReply(BaseModel):
    request_id: str
    image: ImageReply
    threshold: float
    n_lesions: int
    area_px: int = Field(description="pixels in the predicted mask (all lesions)")
    area_fraction: float
    bbox: BBox | None = Field(description="box around all lesions; null when none was found")
    lesions: list[LesionReply] = Field(description=f"largest first, at most {MAX_LISTED_LESIONS}")
    confidence: float = Field(description="how sure the answer is, 0..1, the number `hemaseg predict` writes: "
                                          "with a lesion, 1 - mean binary entropy over the pixels that matter; "
                                          "with none, 1 - max(p) / threshold (a near miss scores near 0)")
    needs_review: bool = Field(description="confidence at or below the model's fitted review cut; without one, "
                                           "every 'no lesion' and any lesion below the margin rule's 0.5")
    finding: str = Field(description="'lesion found' or 'no lesion found', with ' - review' when flagged")
    review_reason: str = Field(description="the rule that decided needs_review, in words")
    prompt: dict[str, Any] | None = Field(None, description="with a `box` parameter: the box and the model that "
                                                             "outlined it (litemedsam); null otherwise")
    max_prob: float
    measurements: dict[str, Any] = Field(
        description="per scan and per lesion: area, longest and perpendicular diameter, thickness, depth below "
                    "the skin line, perimeter, circularity, echogenicity; in mm when the scan is calibrated "
                    "(DICOM ultrasound regions or pixel spacing, else the pixel_spacing parameter), with "
                    "`spacing.source`, else in pixels with `calibration_note` saying why")
    latency_ms: float = Field(description="time in the service from receiving the upload to the reply")
    mask_png: str = Field(description="base64 PNG, 0/255, at the image's size")
    overlay_png: str = Field(description="base64 PNG: the scan in gray with the predicted outline in yellow")


class ModelReply(BaseModel):
    name: str
    architecture: dict[str, Any]
    parameters: int | None
    version: str | None = Field(description="hemaseg version that trained the model")
    epoch: int | None
    data_fingerprint: str | None = Field(description="fingerprint of the training data")
    metrics: dict[str, Any]
    input_size: int | list[int] = Field(description="network input: a square side, or [height, width] for a "
                                                    "model planned on non-square scans")
    input_height: int
    input_width: int
    normalize: str
    threshold: float
    device: str
    hemaseg_version: str
    n_models: int = Field(description="models averaged (a cross-validation ensemble has one per fold)")
    tta: bool = Field(description="flip test-time augmentation on")
    backend: str = Field(description="how the network runs: torch, torch-fast, torch-bf16 or onnxruntime")
    backend_auto: dict | None = Field(None, description="with backend auto: the candidates' measured ms per scan "
                                                        "and parity errors that decided it")
    postprocessing: dict[str, Any] = Field(description="mask postprocessing steps the run chose")


_ERRORS = {s: {"model": ErrorReply} for s in (401, 413, 415, 422, 503)}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {
            "schema": {"type": "object", "required": ["file"],
                       "properties": {"file": {"type": "string", "format": "binary",
                                               "description": "a PNG, JPEG, BMP, TIFF or DICOM scan"}}},
        }},
    }
}


# --- decoding -------------------------------------------------------------------------------------------------


_STATUS_OF = {"too_large": 413, "unsupported_type": 415}  # every other DataError code is 422
_API_CODE = {"empty": "empty_file", "corrupt": "corrupt_image", "unreadable": "corrupt_image",
             "too_large": "image_too_large"}


def decode_upload(data: bytes, max_pixels: int, frame: int = 0) -> Decoded:
    """Image bytes -> Decoded(gray float32 HxW in [0, 1], format, mode) through the one decoder
    (`data.images.decode_image`: format recognised from the content, pixel count checked from the header
    before decoding), or an ApiError saying why not."""
    try:
        return decode_image(data, max_pixels, name="upload", frame=frame)
    except DataError as e:
        code = _API_CODE.get(e.code, e.code)
        raise ApiError(_STATUS_OF.get(e.code, 422), code, e.problem[:1].upper() + e.problem[1:] + ".") from None


# --- inference ------------------------------------------------------------------------------------------------


class _Batcher:
    """One model thread that runs requests arriving together as one batch (one forward pass)."""

    def __init__(self, predictor: Predictor, max_batch: int, wait_s: float):
        self.predictor, self.max_batch, self.wait_s = predictor, max_batch, wait_s
        self.queue: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="hemaseg-batcher", daemon=True)
        self.thread.start()

    def submit(self, gray: np.ndarray) -> Future:
        future: Future = Future()
        self.queue.put((gray, future))
        return future

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            batch = [item]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(deadline - time.monotonic(), 1e-4))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # finish this batch, then stop
                    break
                batch.append(nxt)
            try:
                probs = self.predictor.predict_proba_batch([g for g, _ in batch], batch_size=len(batch))
            except Exception as e:  # noqa: BLE001 - handed to each waiting request
                for _, f in batch:
                    f.set_exception(e)
                continue
            for (_, f), p in zip(batch, probs):
                f.set_result(p)


class Service:
    """The model (loaded once), the threads that run it, and readiness."""

    def __init__(self, predictor: Predictor, settings: Settings):
        self.predictor, self.settings = predictor, settings
        self.pool: ThreadPoolExecutor | None = None
        self.batcher: _Batcher | None = None
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.warmup_error: str | None = None
        self.pending = 0
        self.model_info = _model_info(predictor)
        self._box_model = None  # LiteMedSAM, loaded by the first request with a box

    def box_model(self):
        """The box-prompted model (`inference.promptable.BoxPredictor`), loaded once, on first use."""
        with self._lock:
            if self._box_model is None:
                from hemaseg.inference.promptable import BoxPredictor

                self._box_model = BoxPredictor(device=self.settings.device, backend=self.settings.box_backend)
            return self._box_model

    def start(self) -> ThreadPoolExecutor:
        """Threads up (idempotent): the lifespan starts them, a request finds them, and a restarted
        lifespan (as test clients do) gets fresh ones."""
        with self._lock:
            s = self.settings
            if self.pool is None:
                self.pool = ThreadPoolExecutor(max(s.workers, s.max_batch), thread_name_prefix="hemaseg-serve")
            if s.max_batch > 1 and self.batcher is None:
                self.batcher = _Batcher(self.predictor, s.max_batch, s.batch_wait_ms / 1000)
            return self.pool

    def probabilities(self, gray: np.ndarray) -> np.ndarray:
        """Float32 HxW probabilities; called from a pool thread."""
        batcher = self.batcher
        if batcher is not None:
            return batcher.submit(gray).result()
        return self.predictor.predict_proba_batch([gray])[0]

    def warm_up(self) -> None:
        """One inference on a blank scan, so the first real request does not pay for lazy initialisation."""
        try:
            t = time.perf_counter()
            self.probabilities(np.zeros((self.predictor.size, self.predictor.size), np.float32))
            log.info("model warmed up in %.0f ms; ready", (time.perf_counter() - t) * 1000)
            self.ready.set()
        except Exception as e:  # reported by /readyz instead of killing the process
            self.warmup_error = f"{type(e).__name__}: {e}"
            log.exception("warm-up inference failed")

    def close(self) -> None:
        with self._lock:
            if self.batcher is not None:
                self.batcher.close()
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool, self.batcher = None, None

    def segment(self, data: bytes, threshold: float, fmt: str, request_id: str, t_start: float,
                pixel_spacing: Spacing | None = None, frame: int = 0,
                box: tuple[float, ...] | None = None) -> tuple[Any, dict]:
        """Bytes -> (reply body: dict for JSON or PNG bytes, numbers for the log line); runs in a pool thread."""
        s = self.settings
        decoded = None
        try:
            decoded = decode_upload(data, s.max_pixels, frame)
        finally:
            if s.keep_uploads is not None:
                # named by an id made here, never by anything the client sent: no client can overwrite
                # another's kept upload; the log line ties it to the request id
                suffix = {"JPEG": "jpg"}.get(decoded.format, decoded.format.lower()) if decoded else "bin"
                kept = f"{uuid.uuid4().hex}.{suffix}"
                atomic_write_bytes(Path(s.keep_uploads) / kept, data)
                log.info("request %s upload kept as %s", request_id, kept)
        gray = decoded.gray
        t_decoded = time.perf_counter()
        if box is None:
            prob = self.probabilities(gray)
            pred = self.predictor.prediction(prob, threshold)  # threshold + the run's postprocessing
        else:  # the lesion inside the client's box, outlined by LiteMedSAM (no postprocessing: one drawn box)
            try:
                prob, _ = self.box_model().predict_proba(gray, box=box)
            except ValueError as e:
                raise ApiError(422, "invalid_box", f"{str(e)[:1].upper()}{str(e)[1:]}.") from None
            pred = Prediction(prob, prob >= threshold, threshold)
        t_inferred = time.perf_counter()
        mask = pred.mask
        h, w = mask.shape
        numbers = {"image": f"{w}x{h}", "decode_ms": (t_decoded - t_start) * 1000,
                   "inference_ms": (t_inferred - t_decoded) * 1000}
        if fmt == "png":
            return png_bytes(mask.astype(np.uint8) * 255), numbers
        overlay = png_bytes(overlay_contours(gray, pred=mask))
        if fmt == "overlay":
            return overlay, numbers
        n_lesions, lesions = find_lesions(mask, MAX_LISTED_LESIONS)
        area = int(mask.sum())
        bbox = None
        if area:
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            bbox = {"x": int(cols[0]), "y": int(rows[0]), "width": int(cols[-1] - cols[0] + 1),
                    "height": int(rows[-1] - rows[0] + 1)}
        numbers["n_lesions"] = n_lesions
        return {
            "request_id": request_id,
            "image": {"width": w, "height": h, "format": decoded.format, "mode": decoded.mode, "bytes": len(data)},
            "threshold": threshold,
            "n_lesions": n_lesions,
            "area_px": area,
            "area_fraction": round(area / mask.size, 6),
            "bbox": bbox,
            "lesions": [{
                "area_px": les.area_px, "area_fraction": round(les.area_px / mask.size, 6),
                "bbox": dict(zip(("x", "y", "width", "height"), les.bbox)), "centroid": list(les.centroid),
                "contour": [list(p) for p in les.contour],
            } for les in lesions],
            **pred.finding.row(),
            "prompt": None if box is None else {"box": list(box), "model": "litemedsam"},
            "max_prob": round(float(prob.max()), 4),
            "measurements": json_safe(measure_scan(decoded, mask, pixel_spacing).to_dict()),
            "latency_ms": 0.0,  # filled in on the way out
            "mask_png": base64.b64encode(png_bytes(mask.astype(np.uint8) * 255)).decode(),
            "overlay_png": base64.b64encode(overlay).decode(),
        }, numbers


def _model_info(predictor: Predictor) -> dict:
    cfg, meta = predictor.config, predictor.metadata
    model, plan = getattr(predictor, "model", None), getattr(predictor, "plan", None)
    params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else None
    return json_safe({
        "name": cfg.model.arch, "architecture": dataclasses.asdict(cfg.model), "parameters": params,
        "version": meta.get("version"), "epoch": meta.get("epoch"), "data_fingerprint": meta.get("data_fingerprint"),
        "metrics": meta.get("metrics") or {}, "input_size": cfg.data.size, "input_height": cfg.data.hw[0],
        "input_width": cfg.data.hw[1], "normalize": cfg.data.normalize,
        "threshold": predictor.threshold, "device": str(predictor.device), "hemaseg_version": __version__,
        "n_models": meta.get("n_models", 1), "tta": bool(getattr(predictor, "tta", False)),
        "backend": str(getattr(predictor, "backend", "torch")),
        "backend_auto": meta.get("backend_auto"),
        "postprocessing": dataclasses.asdict(plan) if dataclasses.is_dataclass(plan) else {},
    })


# --- HTTP -----------------------------------------------------------------------------------------------------


class _RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-ID when it is a sane token) and sets it, plus
    security headers, on every response. Pure ASGI, so streaming bodies are not buffered."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _read_upload(request: Request, limit: int) -> bytes:
    """The `file` field of a multipart body, held in memory and refused (413) as soon as it grows past
    `limit`, whatever Content-Length claims."""
    mb = limit / 1024 / 1024
    too_large = ApiError(413, "file_too_large", f"The upload is larger than the limit of {mb:.3g} MB.")
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(422, "missing_file", "Send the scan as multipart/form-data in a field named 'file'.")
    body = await read_body(request, limit, too_large)

    async def once() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, once(), max_files=1, max_fields=16, max_part_size=MULTIPART_SLACK)
    parser.spool_max_size = len(body) + 1  # the file part stays in memory: never rolls over to a temp file
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ApiError(422, "bad_multipart", f"The multipart body cannot be read: {e}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "missing_file", "No file in the field named 'file'; send the scan there.")
        upload.file.seek(0)
        data = upload.file.read()
    finally:
        await form.close()
    if len(data) > limit:
        raise too_large
    return data


def create_app(predictor_or_run: Predictor | str | Path, settings: Settings | None = None) -> FastAPI:
    """A FastAPI app serving one model: a Predictor, or a run folder / checkpoint loaded here once."""
    settings = settings or Settings()
    if isinstance(predictor_or_run, Predictor):
        predictor = predictor_or_run
    else:
        predictor = load_model(predictor_or_run, device=settings.device, threshold=settings.threshold,
                               tta=settings.tta, postprocess=settings.postprocess, backend=settings.backend)
    if settings.keep_uploads is not None:
        try:
            Path(settings.keep_uploads).mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file (or a dangling link) appeared there after Settings checked
            raise ValueError(f"{settings.keep_uploads}: --keep-uploads must name a folder, and this is a "
                             "file") from None
        log.warning("keeping every upload in %s (--keep-uploads); these files may hold patient data",
                    settings.keep_uploads)
    service = Service(predictor, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        threading.Thread(target=service.warm_up, name="hemaseg-warmup", daemon=True).start()
        yield
        service.close()

    app = FastAPI(
        title="hemaseg", version=__version__, lifespan=lifespan,
        description="Segment lesions in 2-D ultrasound scans. Upload a scan to `POST /v1/segment`; "
                    "the page at `/` does this for people.",
        docs_url=None, redoc_url=None,  # both would load their scripts from a CDN; /openapi.json stays
    )
    app.state.service = service
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=host_patterns(settings.allowed_hosts))
    app.add_middleware(_RequestIdMiddleware)  # added last, so outermost: the 400 of a bad Host gets its headers
    install_error_handlers(app)
    require_key = api_key_check(settings.api_key)

    @app.post(
        "/v1/segment", dependencies=[Depends(require_key)], openapi_extra=_UPLOAD_BODY, tags=["v1"],
        summary="Segment one scan",
        responses={200: {"model": SegmentReply, "description": "JSON (default), or a PNG for format=png|overlay",
                         "content": {"image/png": {}}}, **_ERRORS},
    )
    async def segment(
        request: Request,
        fmt: Literal["json", "png", "overlay"] = Query(
            "json", alias="format", description="json: measurements + inline PNGs; png: the mask PNG (0/255); "
                                                "overlay: the scan with the outline drawn"),
        threshold: float | None = Query(None, gt=0, lt=1, description="probability threshold (default: the "
                                                                       "model's)"),
        pixel_spacing: str | None = Query(None, max_length=64, description="mm per pixel, 'MM' or 'X,Y', for "
                                          "scans without their own calibration (a DICOM file's wins)"),
        frame: int = Query(0, ge=0, le=100_000, description="frame of a multi-frame (cine) DICOM, from 0"),
        box: str | None = Query(None, max_length=128, description="x0,y0,x1,y1 in the scan's pixels: outline the "
                                "lesion in this box with LiteMedSAM (box-prompted, no training) instead of the "
                                "served model"),
    ) -> Response:
        """Upload a PNG, JPEG, BMP, TIFF or DICOM scan as multipart field `file`; the mask is at the scan's size."""
        t_start = time.perf_counter()
        request_id = request.state.request_id
        if service.pending >= settings.max_pending:
            raise ApiError(503, "busy", "The service is busy; try again in a moment.", headers={"Retry-After": "1"})
        service.pending += 1  # only touched on the event loop, so no lock
        try:
            spacing = None
            if pixel_spacing is not None:
                try:
                    spacing = parse_pixel_spacing(pixel_spacing, "pixel_spacing parameter")
                except ValueError as e:
                    raise ApiError(422, "invalid_pixel_spacing", str(e)[:1].upper() + str(e)[1:] + ".") from None
            corners = None
            if box is not None:
                try:
                    corners = tuple(float(v) for v in box.replace(";", ",").split(","))
                except ValueError:
                    corners = ()
                if len(corners) != 4 or not all(np.isfinite(corners)):
                    raise ApiError(422, "invalid_box", "The box must be four numbers x0,y0,x1,y1 in the scan's pixels.")
            data = await _read_upload(request, settings.max_upload_bytes)
            thr = predictor.threshold if threshold is None else threshold
            body, numbers = await asyncio.get_running_loop().run_in_executor(
                service.start(), service.segment, data, thr, fmt, request_id, t_start, spacing, frame, corners)
        finally:
            service.pending -= 1
        latency_ms = (time.perf_counter() - t_start) * 1000
        log.info("request %s segment bytes=%d image=%s lesions=%s decode_ms=%.1f inference_ms=%.1f "
                 "latency_ms=%.1f", request_id, len(data), numbers["image"], numbers.get("n_lesions", "-"),
                 numbers["decode_ms"], numbers["inference_ms"], latency_ms)
        no_store = {"Cache-Control": "no-store"}  # replies describe a patient's scan
        if isinstance(body, bytes):
            return Response(body, media_type="image/png", headers={**no_store, "X-Latency-Ms": f"{latency_ms:.1f}"})
        body["latency_ms"] = round(latency_ms, 1)
        return JSONResponse(body, headers=no_store)

    @app.get("/v1/model", dependencies=[Depends(require_key)], response_model=ModelReply, tags=["v1"],
             summary="The model being served", responses={401: {"model": ErrorReply}})
    async def model() -> dict:
        """Architecture, training version, data fingerprint, the run's metrics, input size and threshold."""
        return service.model_info

    @app.get("/healthz", tags=["ops"], summary="The process is alive")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="The model is loaded and a warm-up inference has run",
             responses={503: {"description": "still warming up, or the warm-up failed"}})
    async def readyz() -> JSONResponse:
        if service.ready.is_set():
            return JSONResponse({"status": "ready"})
        status = "failed: " + service.warmup_error if service.warmup_error else "warming up"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    mount_static(app, STATIC_DIR)
    return app
