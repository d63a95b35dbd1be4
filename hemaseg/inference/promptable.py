"""Box-prompted segmentation with LiteMedSAM (`models.litemedsam`): draw a box around a lesion, get its mask.

`BoxPredictor.embed(scan)` runs the image encoder once per scan (cached by the scan's bytes, a small LRU);
`predict(scan, box)` then costs only the prompt encoder and mask decoder, fast enough to follow a mouse.
Boxes and points are in the scan's own pixels; prob and mask come back at the scan's own size.

Preprocessing is LiteMedSAM's own (its authors' inference script, which the model was trained with): 3
channels (a gray scan repeated; RGB kept), resize so the longer side is 256 with area interpolation (the
weights of OpenCV's INTER_AREA, exact in both directions, here as two small matrix products), min-max to
[0, 1], zero-pad bottom/right to 256x256; a box is scaled into that frame and truncated to whole pixels
as that script does. (The wheel's own `inference.py` instead stretches every scan to 256x256 and divides
by 255: not what the model was trained on, so not used.) Back: the decoder's 256x256 logits (already the
padded frame, 4x the 64x64 embedding) are cropped to the resized scan, resized bilinearly to the scan's
HxW, then the sigmoid.

Backends, chosen per stage: `torch` (BN folded into the convolutions: the same numbers), `onnxruntime`
(encoder image -> embedding and decoder embedding + points -> logits, exported in memory by
torch.onnx.export), `auto`: on the CPU measures both once on a sample scan and keeps, for the encoder and
for the decoder separately, the faster one whose probabilities stay within PARITY_ATOL of eager PyTorch.
That costs 15-20 s on 2 idle cores (the exports and the timed calls), so the choice is remembered per stage,
with the exported ONNX of what won, in `data.cache.default_cache_dir()`/backends/ keyed as the UNet's
(`backends.choose_backend_cached`: weights, device, CPU/GPU model, library versions); a later `auto` load
of the same weights on the same machine neither exports nor times anything (`choose_runners_cached`).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import os
import statistics
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hemaseg.data.images import to_gray
from hemaseg.device import select_device
from hemaseg.inference.backends import _choice_key
from hemaseg.inference.manifest import weights_fingerprint
from hemaseg.inference.onnx import DEFAULT_OPSET, OnnxRuntimeBackend
from hemaseg.inference.prediction import Prediction
from hemaseg.io import atomic_write_bytes, atomic_write_text
from hemaseg.models.fusion import fuse_conv_bn
from hemaseg.models.litemedsam import (
    EMBED_DIM,
    EMBED_SIZE,
    IMAGE_SIZE,
    LiteMedSAM,
    load_litemedsam,
    prompt_points,
)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
# On probabilities, as hemaseg's other backends. Measured on 2 AVX2 cores (AMD EPYC) against eager PyTorch:
# ONNX Runtime's encoder 7e-6 (through the decoder; the embedding itself 3e-6), its decoder 7e-6 (logits
# 9e-5), the BN-folded torch encoder 3e-6; no mask pixel differed (tests/test_litemedsam.py asserts it).
PARITY_ATOL = 1e-3
AUTO_ROUNDS = {"encoder": 3, "decoder": 10}  # timed calls per candidate, interleaved, after a warm-up
CACHE_SIZE = 8  # embeddings kept (4 MiB each): a few scans open at once


# ------------------------------------------------------------------------------------------- preprocessing


def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) resampling weights: output pixel i covers [i, i+1) * n_in / n_out of the input and
    takes each input pixel by its overlap. Those are OpenCV's INTER_AREA weights, LiteMedSAM's resize,
    when shrinking and when enlarging alike."""
    step = n_in / n_out
    lo = np.arange(n_out)[:, None] * step
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(lo + step, j + 1) - np.maximum(lo, j), 0.0, None)
    return (overlap / step).astype(np.float32)


def scan_channels(image: np.ndarray) -> np.ndarray:
    """Any image hemaseg accepts -> float32 (H, W, C), C = 3 for RGB(A) (alpha dropped; LiteMedSAM saw
    colour images as they are), else 1 (gray through `to_gray`). Intensity scale does not matter: the
    resized scan is min-max scaled."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        rgb = a[..., :3].astype(np.float32)
        if rgb.size and not np.isfinite(rgb).all():
            raise ValueError("the image holds NaN or infinite values")
    else:
        rgb = to_gray(a)[..., None]  # validates the shape and the values
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"the image is empty: shape {a.shape}")
    return rgb


def resized_size(height: int, width: int) -> tuple[int, int]:
    """The scan's size inside the 256 frame, longer side 256 (rounded as LiteMedSAM does)."""
    scale = IMAGE_SIZE / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def preprocess(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """A scan -> ((1, 3, 256, 256) float32 encoder input, (h, w) of the scan inside it, (H, W) of the scan)."""
    a = scan_channels(image)  # (H, W, C)
    size = a.shape[:2]
    h, w = resized_size(*size)
    wy, wx = area_weights(size[0], h), area_weights(size[1], w)
    resized = np.einsum("yi,ijc,xj->cyx", wy, a, wx, optimize=True)  # (C, h, w)
    lo, hi = float(resized.min()), float(resized.max())
    resized = (resized - lo) / max(hi - lo, 1e-8)
    x = np.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    x[0, :, :h, :w] = resized  # a gray scan (C = 1) broadcasts to 3 equal channels
    return x, (h, w), size


def check_box(box: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """(x0, y0, x1, y1) in the scan's pixels, clipped to the image -> float64 (4,); ValueError if not a box."""
    height, width = size
    b = np.asarray(box, dtype=np.float64).reshape(-1) if box is not None else np.array([])
    if b.size != 4 or not np.isfinite(b).all() or b[2] <= b[0] or b[3] <= b[1]:
        raise ValueError(f"box must be 4 finite numbers (x0, y0, x1, y1) with x1 > x0 and y1 > y0; got {box!r}")
    b = np.clip(b, 0, [width - 1, height - 1, width - 1, height - 1])
    if b[2] <= b[0] or b[3] <= b[1]:
        raise ValueError(f"box {tuple(np.asarray(box).tolist())} lies outside the {width}x{height} image")
    return b


def check_points(points, labels, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) points (x, y) inside the scan and (N,) labels, 1 positive / 0 negative; ValueError if not."""
    height, width = size
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2) if np.size(points) % 2 == 0 else None
    lab = np.asarray(labels if labels is not None else [], dtype=np.float64).reshape(-1)
    if p is None or not len(p) or not np.isfinite(p).all() or lab.shape != (len(p),) or not np.isin(lab, (0, 1)).all():
        raise ValueError("points must be N finite (x, y) pairs with N point_labels, each 1 (lesion) or 0 (not)")
    if (p < 0).any() or (p[:, 0] > width - 1).any() or (p[:, 1] > height - 1).any():
        raise ValueError(f"points {p.tolist()} must lie inside the {width}x{height} image")
    return p, lab


# ------------------------------------------------------------------------------------------------- ONNX


class _DecoderGraph(nn.Module):
    """The decoder as one graph: embedding + point sequence (box corners included) -> logits, IoU."""

    def __init__(self, model: LiteMedSAM):
        super().__init__()
        self.model = model

    def forward(self, embedding, point_coords, point_labels):
        return self.model.decode_points(embedding, point_coords, point_labels)


def _export(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], dynamic: dict) -> bytes:
    """ONNX bytes through the TorchScript exporter (no onnxscript needed), as `inference.onnx` exports."""
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buf = io.BytesIO()
    with warnings.catch_warnings():  # tracer notes about shapes read in forward(); fixed here but n_points
        warnings.simplefilter("ignore")
        torch.onnx.export(module.cpu().float().eval(), args, buf, input_names=inputs, output_names=outputs,
                          opset_version=DEFAULT_OPSET, do_constant_folding=True, dynamic_axes=dynamic, **kwargs)
    return buf.getvalue()


def encoder_onnx(model: LiteMedSAM) -> bytes:
    """image (1, 3, 256, 256) -> embedding (1, 256, 64, 64); BN folded."""
    encoder = fuse_conv_bn(model.image_encoder)
    return _export(encoder, (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),), ["image"], ["embedding"], {})


def decoder_onnx(model: LiteMedSAM) -> bytes:
    """embedding (1, 256, 64, 64), point_coords (B, N, 2) and point_labels (B, N) float in the 256 frame
    (labels: -1 pad, 0 negative, 1 positive, 2/3 box corners; `litemedsam.prompt_points`) -> logits
    (B, 1, 256, 256), iou (B, 1). B and N are dynamic."""
    coords, labels = prompt_points(torch.tensor([[32.0, 32.0, 200.0, 200.0]]))
    embedding = torch.zeros(1, EMBED_DIM, EMBED_SIZE, EMBED_SIZE)
    graph = _DecoderGraph(model.cpu())
    dynamic = {"point_coords": {0: "prompts", 1: "points"}, "point_labels": {0: "prompts", 1: "points"},
               "logits": {0: "prompts"}, "iou": {0: "prompts"}}
    return _export(graph, (embedding, coords, labels), ["embedding", "point_coords", "point_labels"],
                   ["logits", "iou"], dynamic)


# --------------------------------------------------------------------------------------------- runners


class TorchRunner:
    """Eager PyTorch on `device`. `fast`: the encoder with BN folded and channels_last (the 1x1 convs at
    256x256 and the token permutes: ~20 % faster on 2 AVX2 cores, the same numbers to ~1e-6); else the
    modules as loaded (the parity reference)."""

    def __init__(self, model: LiteMedSAM, device: torch.device, fast: bool = True):
        self.name = "torch" if fast else "torch-eager"
        self.device = device
        self.model = model
        self.fast = fast
        self.encoder = (fuse_conv_bn(model.image_encoder).to(device, memory_format=torch.channels_last) if fast
                        else model.image_encoder)

    @torch.inference_mode()
    def encode(self, x: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(x).to(self.device)
        if self.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.encoder(x).contiguous()  # (1, 256, 64, 64)

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, coords: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, float]:
        c, lab = torch.from_numpy(coords).to(self.device), torch.from_numpy(labels).to(self.device)
        logits, iou = self.model.decode_points(embedding.to(self.device), c, lab)
        return logits.float().cpu(), float(iou[0, 0])


class OnnxRunner:
    """Both graphs in ONNX Runtime on the CPU, with hemaseg's session settings (`inference.onnx`): exported
    from `model`, or from the ONNX bytes given (a cached `auto` choice; a stage given none cannot run)."""

    name = "onnxruntime"

    def __init__(self, model: LiteMedSAM | None = None, encoder: bytes | None = None, decoder: bytes | None = None):
        if model is not None:
            encoder, decoder = encoder_onnx(model), decoder_onnx(model)
        self.onnx = {"encoder": encoder, "decoder": decoder}  # what `auto` caches
        self.encoder = OnnxRuntimeBackend(encoder).session if encoder is not None else None
        self.decoder = OnnxRuntimeBackend(decoder).session if decoder is not None else None

    def encode(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.encoder.run(None, {"image": x})[0])

    def decode(self, embedding: torch.Tensor, coords: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, float]:
        feed = {"embedding": embedding.detach().cpu().numpy(), "point_coords": coords, "point_labels": labels}
        logits, iou = self.decoder.run(None, feed)
        return torch.from_numpy(logits), float(iou[0, 0])


def _sample_prompt() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fixed speckle-like scan (dark disc on bright noise) and a box around the disc, for `auto`."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:200, :300]
    image = rng.rayleigh(1.0, (200, 300)) * np.where((yy - 100) ** 2 + (xx - 150) ** 2 < 50 ** 2, 0.3, 1.0)
    x, _, _ = preprocess(image.astype(np.float32))
    coords, labels = prompt_points(torch.tensor([[80.0, 40.0, 176.0, 130.0]]))  # in the 256 frame
    return x, coords.numpy(), labels.numpy()


def choose_runners(model: LiteMedSAM, device: torch.device) -> tuple[dict, dict]:
    """`auto`: for the encoder and the decoder separately, the fastest candidate whose probabilities
    (through the eager decoder, for the encoder) are within PARITY_ATOL of eager PyTorch on a sample scan.
    Returns ({"encoder": runner, "decoder": runner}, record of the timings, parity and choices)."""
    reference = TorchRunner(model, device, fast=False)
    x, coords, labels = _sample_prompt()
    ref_emb = reference.encode(x)
    ref_prob = torch.sigmoid(reference.decode(ref_emb, coords, labels)[0])
    candidates: dict[str, object] = {"torch": TorchRunner(model, device)}
    record: dict = {"parity_atol": PARITY_ATOL, "max_abs_diff": {"encoder": {}, "decoder": {}},
                    "ms": {"encoder": {}, "decoder": {}}, "skipped": {}}
    if device.type == "cpu":  # ONNX Runtime runs here on the CPU only
        try:
            candidates["onnxruntime"] = OnnxRunner(model)
        except Exception as e:  # noqa: BLE001 - a backend that cannot run here is simply not chosen
            record["skipped"]["onnxruntime"] = f"{type(e).__name__}: {e}"
    passed: dict[str, dict] = {"encoder": {}, "decoder": {}}
    for name, runner in candidates.items():  # the parity calls are also each candidate's warm-up
        emb = runner.encode(x)
        diffs = {"encoder": float((torch.sigmoid(reference.decode(emb, coords, labels)[0]) - ref_prob).abs().max()),
                 "decoder": float((torch.sigmoid(runner.decode(ref_emb, coords, labels)[0]) - ref_prob).abs().max())}
        for stage, diff in diffs.items():
            record["max_abs_diff"][stage][name] = diff
            if diff <= PARITY_ATOL:
                passed[stage][name] = runner
    chosen = {}
    for stage, runners in passed.items():
        if not runners:
            log.warning("no backend matched eager PyTorch for the %s; using eager torch", stage)
            chosen[stage] = reference
            continue
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(AUTO_ROUNDS[stage] if len(runners) > 1 else 0):  # interleaved: a busy moment costs all
            for name, runner in runners.items():
                t = time.perf_counter()
                runner.encode(x) if stage == "encoder" else runner.decode(ref_emb, coords, labels)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append((time.perf_counter() - t) * 1000)
        record["ms"][stage] = {n: round(statistics.median(ts), 2) for n, ts in times.items() if ts}
        best = min(record["ms"][stage], key=record["ms"][stage].get) if record["ms"][stage] else next(iter(runners))
        chosen[stage] = runners[best]
    record["chosen"] = {stage: runner.name for stage, runner in chosen.items()}
    return chosen, record


def _auto_facts(device: torch.device) -> list[str]:
    """What else decides `auto`'s choice besides the weights and the machine (`backends._choice_key`)."""
    candidates = ["torch", "onnxruntime"] if device.type == "cpu" else ["torch"]
    return ["litemedsam-auto-1", *candidates, f"parity_atol={PARITY_ATOL:g}",
            "rounds=" + ",".join(f"{k}:{v}" for k, v in sorted(AUTO_ROUNDS.items()))]


def _cached_runners(model: LiteMedSAM, device: torch.device, chosen: dict, folder: Path, key: str) -> dict:
    """The runners of a remembered choice {stage: name}, ONNX from `folder`/`key`.STAGE.onnx; raises on
    anything missing or unknown (the caller measures again)."""
    if not isinstance(chosen, dict) or set(chosen) != {"encoder", "decoder"}:
        raise ValueError(f"bad choice {chosen!r}")
    made: dict[str, object] = {}
    for name in set(chosen.values()):
        if name == "onnxruntime":
            onnx = {s: (folder / f"{key}.{s}.onnx").read_bytes() for s, n in chosen.items() if n == name}
            made[name] = OnnxRunner(None, onnx.get("encoder"), onnx.get("decoder"))
        elif name in ("torch", "torch-eager"):
            made[name] = TorchRunner(model, device, fast=name == "torch")
        else:
            raise ValueError(f"unknown backend {name!r}")
    return {stage: made[name] for stage, name in chosen.items()}


def choose_runners_cached(model: LiteMedSAM, device: torch.device, cache_dir: str | Path | None) -> tuple[dict, dict]:
    """`choose_runners`, remembered in `cache_dir`/backends/ (the UNet's folder and key,
    `backends.choose_backend_cached`) with the exported ONNX of each stage ONNX Runtime won: loading the
    same weights again on this machine neither exports nor times anything; the record says `cached: true`.
    A damaged or incomplete entry is measured again and rewritten; without `cache_dir`, or when the cache
    cannot be written, it measures as `choose_runners` does."""
    if cache_dir is None:
        return choose_runners(model, device)
    folder = Path(cache_dir) / "backends"
    key = "litemedsam-" + _choice_key(model, device, IMAGE_SIZE, _auto_facts(device))
    try:
        record = json.loads((folder / f"{key}.json").read_text())
        return _cached_runners(model, device, record["chosen"], folder, key), {**record, "cached": True}
    except FileNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001 - a damaged or stale cache entry is measured again
        log.debug("backend cache %s: %s; measuring again", key, e)
    chosen, record = choose_runners(model, device)
    try:
        onnx = {stage: getattr(r, "onnx", {}).get(stage) for stage, r in chosen.items() if r.name == "onnxruntime"}
        if all(b is not None for b in onnx.values()):
            for stage, data in onnx.items():
                atomic_write_bytes(folder / f"{key}.{stage}.onnx", data, fsync=False)
            atomic_write_text(folder / f"{key}.json", json.dumps(record))  # last: its presence means complete
    except OSError as e:  # a read-only or full cache folder costs speed, not the load
        log.debug("backend cache %s not written: %s", folder, e)
    return chosen, record


def make_runners(model: LiteMedSAM, backend: str, device: torch.device) -> tuple[dict, dict]:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":  # remembered per weights, machine and libraries in the user's cache folder
        from hemaseg.data.cache import default_cache_dir  # here: data.cache imports MONAI (~2 s)

        return choose_runners_cached(model, device, default_cache_dir())
    if backend == "onnxruntime":
        if device.type != "cpu":
            log.warning("backend onnxruntime runs on the CPU; device %s is not used", device)
        runner = OnnxRunner(model)
    else:
        runner = TorchRunner(model, device)
    return {"encoder": runner, "decoder": runner}, {"chosen": {"encoder": runner.name, "decoder": runner.name}}


# ------------------------------------------------------------------------------------------- predictor


@dataclass(frozen=True)
class Embedded:
    """One scan's encoder output and the geometry to map prompts in and masks back."""

    embedding: torch.Tensor  # (1, 256, 64, 64)
    resized: tuple[int, int]  # (h, w) of the scan inside the 256 frame
    size: tuple[int, int]  # (H, W) of the scan


def image_key(image: np.ndarray) -> str:
    """The cache key of a scan: a hash of its bytes, shape and dtype."""
    a = np.ascontiguousarray(image)
    h = hashlib.blake2b(a.tobytes(), digest_size=16)
    h.update(f"{a.shape}|{a.dtype.str}".encode())
    return h.hexdigest()


class BoxPredictor:
    """LiteMedSAM for one box (or points) at a time: `predict(scan, box=(x0, y0, x1, y1))` -> Prediction.

    `device` auto/cpu/cuda (`device.select_device`); `backend` torch, onnxruntime or auto (see the module
    docstring; `backend_record` keeps what auto measured); `model` an already loaded LiteMedSAM."""

    def __init__(self, device: str | torch.device = "auto", backend: str = "auto", cache_size: int = CACHE_SIZE,
                 model: LiteMedSAM | None = None):
        self.device = select_device(device)
        self.model = (model or load_litemedsam(self.device)).to(self.device).eval()
        runners, self.backend_record = make_runners(self.model, backend, self.device)
        self._encoder, self._decoder = runners["encoder"], runners["decoder"]
        self.backend = {stage: r.name for stage, r in runners.items()}  # what runs, never "auto"
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Embedded] = OrderedDict()
        self._lock = threading.Lock()
        self.encoder_calls = 0  # how often the encoder really ran (the cache's misses)

    def embed(self, image: np.ndarray) -> Embedded:
        """The scan's embedding, from the cache when this exact scan was embedded lately."""
        key = image_key(image)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        x, resized, size = preprocess(image)
        embedding = self._encoder.encode(x)
        embedded = Embedded(embedding, resized, size)
        with self._lock:
            self.encoder_calls += 1
            self._cache[key] = embedded
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return embedded

    @staticmethod
    def prompt(size: tuple[int, int], box=None, points=None, point_labels=None) -> tuple[np.ndarray, np.ndarray]:
        """A box/points in the pixels of a scan of `size` (H, W), checked -> the decoder's (1, M, 2) coords
        and (1, M) labels in the 256 frame."""
        boxes = pts = labs = None
        if box is None and points is None:
            raise ValueError("give a box (x0, y0, x1, y1) or points with point_labels")
        scale = IMAGE_SIZE / max(size)
        if box is not None:
            # truncated to whole pixels of the 256 frame, as LiteMedSAM's inference script does
            boxes = torch.from_numpy(np.floor(check_box(box, size) * scale)[None])
        if points is not None:
            p, lab = check_points(points, point_labels, size)
            pts, labs = torch.from_numpy(p[None] * scale), torch.from_numpy(lab[None])
        coords, labels = prompt_points(boxes, pts, labs)
        return coords.numpy().astype(np.float32), labels.numpy().astype(np.float32)

    def predict_proba(self, image: np.ndarray, box=None, points=None, point_labels=None) -> tuple[np.ndarray, float]:
        """(probability HxW float32 at the scan's own size, the decoder's predicted IoU)."""
        if np.ndim(image) not in (2, 3):
            raise ValueError(f"expected an HxW or HxWxC image; got shape {np.shape(image)}")
        coords, labels = self.prompt(tuple(np.shape(image)[:2]), box, points, point_labels)  # before any work
        embedded = self.embed(image)
        logits, iou = self._decoder.decode(embedded.embedding, coords, labels)  # (1, 1, 256, 256) on the CPU
        h, w = embedded.resized
        logits = F.interpolate(logits[:, :, :h, :w], size=embedded.size, mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)[0, 0].numpy(), iou

    def predict(self, image: np.ndarray, box=None, points=None, point_labels=None,
                threshold: float = 0.5) -> Prediction:
        """One scan (HxW or HxWxC, any dtype) + a box (x0, y0, x1, y1) in its pixels (and/or points (N, 2)
        with point_labels 1 lesion / 0 not) -> Prediction(prob, mask) at the scan's own size."""
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        prob, _ = self.predict_proba(image, box, points, point_labels)
        return Prediction(prob, prob >= threshold, threshold)


# ------------------------------------------------------------------------------------ boxes from a table

BOX_COLUMNS = ("image", "x0", "y0", "x1", "y1")
Box = tuple[float, float, float, float]


def read_boxes(path: str | os.PathLike) -> dict[str, list[Box]]:
    """boxes.csv -> {scan name: its boxes}. One row per box, columns `image,x0,y0,x1,y1` in the scan's pixels;
    `image` a scan's file name or stem (a DICOM cine's frame: NAME_frameNNN, or NAME for all its frames).
    A bad row is a ValueError naming the file and the line."""
    import csv

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in BOX_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (the columns are "
                                 f"{','.join(BOX_COLUMNS)}, one row per box)")
            boxes: dict[str, list[Box]] = {}
            for line, row in enumerate(reader, start=2):
                name = Path((row["image"] or "").strip()).name
                try:
                    box = tuple(float(row[c]) for c in BOX_COLUMNS[1:])
                except (TypeError, ValueError):
                    raise ValueError(f"{path}: line {line}: x0, y0, x1, y1 must be numbers") from None
                if not name or not all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
                    raise ValueError(f"{path}: line {line}: needs an image name and a box with x1 > x0 and y1 > y0")
                boxes.setdefault(name, []).append(box)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 CSV file") from None
    if not boxes:
        raise ValueError(f"{path}: no boxes (one row per box: {','.join(BOX_COLUMNS)})")
    return boxes


def box_index(boxes: dict[str, list[Box]]) -> dict[str, list[Box]]:
    """A boxes table keyed by file name and by stem, so each scan's lookup is one dict access."""
    return {**{Path(name).stem: b for name, b in boxes.items()}, **boxes}


def find_boxes(index: dict[str, list[Box]], name: str) -> list[Box] | None:
    """The boxes of the scan (or cine frame NAME_frameNNN) called `name` in a `box_index`: by its name, else
    its cine's stem; None when the table has none."""
    found = index.get(name)
    if found is None and "_frame" in name:
        found = index.get(name.rsplit("_frame", 1)[0])
    return found


class BoxedScans:
    """A BoxPredictor prompted from a table of boxes, behind the interface `hemaseg predict` runs
    (`inference.files`): each scan's probability is the highest over its boxes (several boxes on one scan:
    the union of their outlines). Its findings have no fitted review cut: `inference.review.decide`'s rule
    of last resort (an empty answer inside a drawn box goes to review)."""

    tta = False

    def __init__(self, box_predictor: BoxPredictor, boxes: dict[str, list[Box]], threshold: float = 0.5):
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        self.box_predictor, self.boxes, self.threshold = box_predictor, boxes, float(threshold)
        self.index = box_index(boxes)
        self.backend = "encoder {encoder}, decoder {decoder}".format(**box_predictor.backend)
        self.device = box_predictor.device

    def boxes_for(self, name: str) -> list[Box]:
        """The boxes of the scan (or cine frame) called `name` (`find_boxes`)."""
        found = find_boxes(self.index, name)
        if found is None:
            raise ValueError(f"no box for {name} in the boxes table (its `image` column names scans by file "
                             "name or stem)")
        return found

    def identity(self) -> dict:
        """What decides the outputs (the manifest's record): the weights and the boxes."""
        digest = hashlib.sha256(repr(sorted(self.boxes.items())).encode()).hexdigest()[:16]
        return {"weights": weights_fingerprint([self.box_predictor.model]), "model": "litemedsam", "boxes": digest}

    def predict_proba_batch(self, images: Sequence[np.ndarray], batch_size: int = 8, tta: bool | None = None,
                            names: Sequence[str] | None = None) -> list[np.ndarray]:
        if names is None or len(names) != len(images):
            raise ValueError("a box-prompted model needs each scan's name to find its boxes")
        out = []
        for image, name in zip(images, names):
            probs = [self.box_predictor.predict_proba(image, box=box)[0] for box in self.boxes_for(name)]
            out.append(np.maximum.reduce(probs) if len(probs) > 1 else probs[0])
        return out

    def prediction(self, prob: np.ndarray, threshold: float | None = None) -> Prediction:
        thr = self.threshold if threshold is None else threshold
        return Prediction(prob, prob >= thr, thr)
