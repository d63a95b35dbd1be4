"""Export a trained model to ONNX that carries everything a consumer needs to use it.

The graph takes (batch, 1, height, width) float32 normalised scans (height and width multiples of
`size_multiple`, all three dynamic) and returns (batch, 1, height, width) logits; probability =
sigmoid(logits). How to get from a scan to that input (letterbox to `input_size`, normalisation) and
back is written into the model's metadata_props, so no hemaseg code or config file is needed beside it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hemaseg import __version__
from hemaseg.config import format_size
from hemaseg.inference.onnx import DEFAULT_OPSET, OnnxRuntimeBackend, onnx_bytes
from hemaseg.inference.predictor import Predictor
from hemaseg.io import atomic_write_bytes
from hemaseg.models.pretrained import WEIGHTS_DIR

log = logging.getLogger(__name__)

PARITY_ATOL = 1e-3  # on logits; fp32 kernels differ in summation order only (~1e-5 seen)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float  # largest |ONNX Runtime - PyTorch| over the logits of the parity input
    metadata: dict[str, str]
    n_bytes: int


def onnx_metadata(predictor) -> dict[str, str]:
    """What a consumer needs besides the graph, as ONNX metadata_props (string to string)."""
    cfg = predictor.config
    size_multiple = cfg.model.size_multiple
    height, width = cfg.data.hw
    return {
        "producer": "hemaseg",
        "hemaseg_version": __version__,
        "model_arch": cfg.model.arch,
        "model_config": json.dumps(cfg.to_dict()["model"]),
        "input_policy": "letterbox",
        "input_size": format_size(cfg.data.size),  # "256" (square) or "224x320" (height x width)
        "input_height": str(height),
        "input_width": str(width),
        "size_multiple": str(size_multiple),
        "normalization": cfg.data.normalize,
        "threshold": str(predictor.threshold),
        "output": "logits",
        "usage": (
            f"Gray scan in [0,1] (h x w) -> resize by s = min({height}/h, {width}/w) (bilinear, antialiased "
            f"when shrinking, aspect kept) -> centre on a zero canvas of height {height} and width {width} "
            f"(top=({height}-round(s*h))//2, left=({width}-round(s*w))//2) -> normalize "
            + ("with the mean/std of the unpadded region (zscore)" if cfg.data.normalize == "zscore"
               else "as (x-0.5)/0.25 (unit)")
            + f" -> input (N,1,{height},{width}) float32; any H,W multiple of {size_multiple} also runs. "
            f"prob = sigmoid(logits); crop the pad, resize back; mask = prob >= {predictor.threshold}, then the "
            "steps in 'postprocessing'."
        ),
        "postprocessing": json.dumps(dataclasses.asdict(predictor.plan)),
        "checkpoint_epoch": str(predictor.metadata.get("epoch")),
        "checkpoint_metrics": json.dumps(predictor.metadata.get("metrics"), default=str),
    }


def export_onnx(predictor_or_run, out_path: str | Path | None = None, opset: int = DEFAULT_OPSET,
                atol: float = PARITY_ATOL) -> ExportResult:
    """Write `out_path` (default RUN/model.onnx; for a shipped model NAME.onnx here) from a Predictor or a run
    folder / checkpoint / shipped model's name.

    Before anything is written, ONNX Runtime runs the export on a random (2, 1, H, W) input and its
    logits are compared with eager PyTorch; a difference above `atol` raises RuntimeError. The file is
    replaced atomically."""
    if isinstance(predictor_or_run, Predictor):
        predictor = predictor_or_run
    else:
        predictor = Predictor.from_checkpoint(predictor_or_run, device="cpu", backend="torch")
    if len(predictor.models) > 1:
        raise ValueError(f"{predictor.metadata.get('checkpoint')}: a cross-validation ensemble of "
                         f"{len(predictor.models)} models; export one fold's run folder (RUN/fold_K)")
    if out_path is None:
        ckpt = Path(predictor.metadata.get("checkpoint") or "")
        if not ckpt.name:
            raise ValueError("this Predictor did not come from a checkpoint; pass out_path")
        # a run's folder; a model shipped in the package goes to the working folder, not into the install
        out_path = Path(f"{ckpt.stem}.onnx") if ckpt.parent == WEIGHTS_DIR else ckpt.parent / "model.onnx"
    out_path = Path(out_path)
    metadata = onnx_metadata(predictor)
    data = onnx_bytes(predictor.model, opset, metadata)

    model = copy.deepcopy(predictor.model).cpu().float().eval()  # the reference: eager fp32, unfolded
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 1, *predictor.config.data.hw), dtype=np.float32))
    with torch.inference_mode():
        expected = model(x)
    got = OnnxRuntimeBackend(data)(x)
    diff = float((got - expected).abs().max())
    if not diff <= atol:
        raise RuntimeError(f"ONNX export parity check failed: max |onnxruntime - torch| = {diff:.3g} "
                           f"> {atol:g} on logits; nothing written")
    atomic_write_bytes(out_path, data)
    log.info("wrote %s (%d bytes); parity max abs diff %.3g", out_path, len(data), diff)
    return ExportResult(out_path, diff, metadata, len(data))
