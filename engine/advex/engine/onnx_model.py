"""ONNX models through onnxruntime: outputs, no gradients.

`OnnxNet` is a torch module around an InferenceSession (the CUDA provider when the engine runs on
a GPU and onnxruntime has it, else the CPU provider). It takes what every advex model takes,
float32 NCHW in [0,1] (normalized by the wrapper when mean/std were declared), and converts to
the graph's declared layout and value range. The graph's input is checked against the
declaration when the model is loaded.
"""
from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advex.engine.blackbox import check_layout, layout_shape, to_layout

# onnxruntime's telemetry (the 1DS provider of recent releases on Linux and macOS) uploads events to
# Microsoft (measured with 1.31.1: a DNS lookup of mobile.events.data.microsoft.com about 10 s
# after the first session) and keeps a device id and an event cache in
# ~/.cache/Microsoft/DeveloperTools/.onnxruntime (XDG_CACHE_HOME) and $TMPDIR/.ses.
# ORT_DISABLE_TELEMETRY=1 turns all of it off, but onnxruntime reads it once, when it is imported;
# disable_telemetry_events() called after that leaves both the uploads and the files (measured).
# So it is set when this module loads, before engine code imports onnxruntime, and it passes to
# the processes the server starts (the upload checks).
TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"
_IMPORTED_WITH_TELEMETRY = "onnxruntime" in sys.modules and os.environ.get(TELEMETRY_ENV) != "1"
os.environ[TELEMETRY_ENV] = "1"


def disable_telemetry() -> bool:
    """Turn onnxruntime's telemetry off for this process and the processes it starts. False when
    onnxruntime was imported before ORT_DISABLE_TELEMETRY was set (before this module loaded):
    its uploads can then no longer be stopped in this process (disable_telemetry_events() is
    still called)."""
    os.environ[TELEMETRY_ENV] = "1"
    ort = sys.modules.get("onnxruntime")
    if ort is None:
        return True
    getattr(ort, "disable_telemetry_events", lambda: None)()
    return not _IMPORTED_WITH_TELEMETRY


def onnxruntime():
    """The onnxruntime module, imported with its telemetry off (see TELEMETRY_ENV)."""
    os.environ[TELEMETRY_ENV] = "1"
    import onnxruntime as ort

    ort.disable_telemetry_events()  # the API's own switch too: it drops the events after this
    return ort


class OnnxNet(nn.Module):
    has_gradients = False

    def __init__(self, source: str | Path | bytes, input_shape: tuple[int, ...], layout: str = "NCHW",
                 value_range: str = "0-1", device: torch.device | str = "cpu") -> None:
        super().__init__()
        ort = onnxruntime()
        check_layout(layout, value_range)
        want_cuda = torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_profiling = False  # a profile would be a JSON file in the working directory
        self.session = ort.InferenceSession(source if isinstance(source, bytes) else str(source),
                                            sess_options=options, providers=providers)
        self.provider = self.session.get_providers()[0]
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"the graph has {len(inputs)} inputs; advex needs exactly one (the batch of images)")
        self.input_name = inputs[0].name
        self.layout, self.value_range = layout, value_range
        declared = layout_shape(input_shape, layout)
        graph = list(inputs[0].shape)[1:]
        if len(graph) != len(declared) or any(isinstance(g, int) and g != d for g, d in zip(graph, declared)):
            raise ValueError(f"the graph's input {inputs[0].name!r} has shape {list(inputs[0].shape)}, but the declared "
                             f"input_shape {list(input_shape)} in layout {layout} means [batch, {', '.join(map(str, declared))}]")
        if "float" not in inputs[0].type:
            raise ValueError(f"the graph's input is {inputs[0].type}; advex feeds float32")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: to_layout(x, self.layout, self.value_range)})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """An ONNX graph of `model` (the whole wrapper, normalization included: it takes NCHW in
    [0,1]) with a dynamic batch dimension, through torch.onnx's exporter. The model itself is left
    as it is (a copy goes to the CPU, in fp32)."""
    model = copy.deepcopy(model).eval().cpu()
    if hasattr(model, "set_precision"):
        model.set_precision("fp32", "cpu")
    example = torch.rand((2, *input_shape))
    batch = torch.export.Dim("batch", min=1)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (example,), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}}, dynamo=True, verbose=False, external_data=False)
        return path.read_bytes()
