"""The network as ONNX: serialised in memory (for the onnxruntime backend and `hemaseg export`) and run
by ONNX Runtime."""

from __future__ import annotations

import inspect
import io
import os
import warnings

import numpy as np
import torch
from torch import nn

from hemaseg.device import cpu_threads
from hemaseg.models.fusion import fuse_conv_bn

DEFAULT_OPSET = 17


def onnx_bytes(model: nn.Module, opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None) -> bytes:
    """Serialise `model` (BN folded, eval) to ONNX with dynamic batch, height and width.

    Uses the TorchScript exporter: it needs no extra package (the torch.export one needs onnxscript)
    and handles this plain feed-forward network exactly."""
    fused = fuse_conv_bn(model).cpu().float()
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buf = io.BytesIO()
    with warnings.catch_warnings():  # tracer notes about the shape check in forward(); it is not traced
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fused, torch.zeros(1, 1, 64, 64), buf, input_names=["image"], output_names=["logits"],
            opset_version=opset, do_constant_folding=True,
            dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                          "logits": {0: "batch", 2: "height", 3: "width"}},
            **kwargs,
        )
    if not metadata:
        return buf.getvalue()
    import onnx

    proto = onnx.load_from_string(buf.getvalue())
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = metadata.get("usage", "")
    return proto.SerializeToString()


def telemetry_off(ort) -> None:
    """Turn ONNX Runtime's telemetry events off (where its build has them: on Windows they go to the
    system's event log, a store of what ran on which data): hemaseg handles patient scans and reports
    nothing to anyone."""
    disable = getattr(ort, "disable_telemetry_events", None)
    if disable is not None:
        disable()


class OnnxRuntimeBackend:
    """An ONNX model (bytes or a file path) run by ONNX Runtime with `threads` intra-op threads."""

    name = "onnxruntime"

    def __init__(self, onnx_model: bytes | str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        telemetry_off(ort)  # before the first session: it is the session that logs the events
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_threads()
        options.inter_op_num_threads = 1  # the graph is a chain: parallelism is inside each op
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads spin by default, taking the cores from whatever runs next in this process:
        # measured on 2 cores, torch-fast timed between ORT calls read 44 ms instead of 20 ms. Without
        # spinning ORT itself lost ~10 % at batch 1, and the rest of the predict path keeps its cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = onnx_model if isinstance(onnx_model, bytes) else os.fspath(onnx_model)
        self.model_bytes = onnx_model if isinstance(onnx_model, bytes) else None  # what `auto` caches
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: batch})[0])
