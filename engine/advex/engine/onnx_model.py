"""ONNX models through onnxruntime: outputs, no gradients.

`OnnxNet` is a torch module around an InferenceSession. It takes what every advex model takes,
float32 NCHW in [0,1] (normalized by the wrapper when mean/std were declared), and converts to
the graph's declared layout and value range. The graph's input is checked against the
declaration when the model is loaded.

Execution providers (the server's onnx_provider setting, see `provider_chain`): auto = the CUDA
provider when the engine runs on a CUDA GPU and onnxruntime has it, else the CPU provider; cpu;
cuda; tensorrt (TensorRT with the CUDA and CPU providers behind it, as onnxruntime recommends, in
fp16 when the server's precision resolves to fp16 or bf16 on the GPU, else fp32). A provider
onnxruntime lacks, or cannot start a session with, falls back to the next one with a WARNING
(logger advex.onnx) naming both; `OnnxNet.provider` is the one actually used.

Batches go through IO binding, on the CPU too: the graph reads the torch input's memory and writes
into a torch tensor allocated here, with no numpy array and, on the GPU, no copy through the host.
On CUDA the torch stream that produced the input is synchronised before the run (onnxruntime runs
on its own stream), and onnxruntime synchronises its stream before the run returns
(`synchronize_outputs` makes that explicit), so the output is complete when torch reads it.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from advex.engine.blackbox import check_layout, layout_shape, layout_tensor

log = logging.getLogger("advex.onnx")

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


ONNX_PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")  # the server's onnx_provider setting
CPU_EP, CUDA_EP, TRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
_ASKED = {"cpu": (CPU_EP,), "cuda": (CUDA_EP, CPU_EP), "tensorrt": (TRT_EP, CUDA_EP, CPU_EP)}
_GPU_EPS = (TRT_EP, CUDA_EP)
_FLOAT = 1  # ONNX TensorProto.FLOAT: what advex feeds
# a graph output's type -> (ONNX TensorProto element type, the torch dtype that holds it)
_ELEMENTS = {"tensor(float)": (1, torch.float32), "tensor(uint8)": (2, torch.uint8), "tensor(int8)": (3, torch.int8),
             "tensor(int16)": (5, torch.int16), "tensor(int32)": (6, torch.int32), "tensor(int64)": (7, torch.int64),
             "tensor(bool)": (9, torch.bool), "tensor(float16)": (10, torch.float16),
             "tensor(double)": (11, torch.float64), "tensor(bfloat16)": (16, torch.bfloat16)}

def check_provider(setting: str) -> str:
    if setting not in ONNX_PROVIDERS:
        raise ValueError(f"onnx_provider must be one of {', '.join(ONNX_PROVIDERS)}, got {setting!r}")
    return setting


def provider_chain(setting: str, device: torch.device | str, available: Sequence[str]) -> tuple[list[str], list[str]]:
    """The execution providers to ask onnxruntime for, best first (the CPU provider last), for the
    onnx_provider `setting` on the engine's `device`, and why providers the setting names are left
    out. The GPU providers run on the engine's CUDA device: on a CPU engine they are left out."""
    check_provider(setting)
    device = torch.device(device)
    on_gpu = device.type == "cuda" and torch.cuda.is_available()
    if setting == "auto":
        return ([CUDA_EP, CPU_EP] if on_gpu and CUDA_EP in available else [CPU_EP]), []
    chain, why = [], []
    for ep in _ASKED[setting]:
        if ep in _GPU_EPS and not on_gpu:
            if not why:
                why.append(f"the GPU providers need the server's device to be a CUDA GPU (it is {device}"
                           + (", but torch finds none)" if device.type == "cuda" else ")"))
        elif ep not in available:
            why.append(f"this onnxruntime has no {ep} (it has {', '.join(available)})")
        else:
            chain.append(ep)
    return (chain if CPU_EP in chain else [*chain, CPU_EP]), why


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:400]


class OnnxNet(nn.Module):
    """A graph as a torch module (no gradients). provider / precision: the onnx_provider setting
    and the server's precision (TensorRT runs in fp16 when it resolves to fp16 or bf16).
    `provider` (the attribute): the execution provider the session actually got."""

    has_gradients = False

    def __init__(self, source: str | Path | bytes, input_shape: tuple[int, ...], layout: str = "NCHW",
                 value_range: str = "0-1", device: torch.device | str = "cpu", provider: str = "auto",
                 precision: str = "fp32") -> None:
        super().__init__()
        ort = onnxruntime()
        check_layout(layout, value_range)
        self.requested = check_provider(provider)
        self.session = self._start(ort, source, torch.device(device), precision)
        self.provider: str = self.session.get_providers()[0]
        # where bound tensors live when the input is on a GPU: the session's device (None: the CPU)
        self._gpu = torch.device("cuda", self._device_id) if self.provider in _GPU_EPS else None
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
        output = self.session.get_outputs()[0]  # the logits (session.run(None, ...)[0] before)
        self.output_name, self._output_type = output.name, output.type
        self._element = _ELEMENTS.get(output.type)
        dims = list(output.shape)[1:]
        # one example's output shape when the graph fixes it; else learned from the first batch
        self._out_tail: Optional[tuple[int, ...]] = (tuple(dims) if all(isinstance(d, int) and d >= 0 for d in dims)
                                                     else None)

    def _start(self, ort, source: str | Path | bytes, device: torch.device, precision: str):
        """The session, on the first provider of the chain that starts; a WARNING when that is not
        the one asked for. onnxruntime's own fallback (which prints to stdout) is off."""
        chain, why = provider_chain(self.requested, device, ort.get_available_providers())
        asked = chain[0] if self.requested == "auto" else _ASKED[self.requested][0]
        self._device_id = 0
        fp16 = False
        if chain[0] in _GPU_EPS:
            self._device_id = device.index if device.index is not None else torch.cuda.current_device()
            if TRT_EP in chain:
                from advex.engine.models import resolve_precision

                fp16 = resolve_precision(precision, device) in ("fp16", "bf16")
        ep_options = {CPU_EP: {}, CUDA_EP: {"device_id": str(self._device_id)},
                      TRT_EP: {"device_id": str(self._device_id), "trt_fp16_enable": str(fp16)}}
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_profiling = False  # a profile would be a JSON file in the working directory
        graph = source if isinstance(source, bytes) else str(source)
        for i, ep in enumerate(chain):
            try:
                session = ort.InferenceSession(graph, sess_options=options, enable_fallback=0,
                                               providers=[(p, ep_options[p]) for p in chain[i:]])
                break
            except Exception as exc:  # the CPU provider's error is the graph's: raised as it is
                if i == len(chain) - 1:
                    raise
                why.append(f"{ep} could not start a session ({_one_line(exc)})")
        used = session.get_providers()[0]
        if used != asked:
            log.warning("ONNX model: onnx_provider %s asked for %s, but %s runs it: %s", self.requested, asked, used,
                        "; ".join(why) or f"onnxruntime did not enable {asked} (its log says why)")
        return session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits as float32 on x's device: x's memory bound as the graph's input (on the session's
        GPU when x is on a GPU and the session runs there, else on the CPU), the output written
        into a torch tensor bound in its place."""
        if self._element is None:
            raise ValueError(f"the graph's output {self.output_name!r} is {self._output_type}; advex needs logits "
                             "[batch, num_classes] as a tensor of numbers")
        where = self._gpu if self._gpu is not None and x.is_cuda else torch.device("cpu")
        v = layout_tensor(x, self.layout, self.value_range)
        v = v.to(device=where, dtype=torch.float32).contiguous()  # kept alive (bound) until the run ends
        return self._run(v, where).to(device=x.device, dtype=torch.float32)

    def _run(self, v: torch.Tensor, where: torch.device) -> torch.Tensor:
        n = v.shape[0]
        shape = (n, *self._out_tail) if self._out_tail is not None and n else None
        if shape is not None:
            try:
                return self._bound_run(v, where, shape)
            except Exception:
                found = self._probe(v, where)  # raises what onnxruntime raises for this batch
                if found == shape:
                    raise
        else:
            found = self._probe(v, where)
        if 0 in found:  # nothing to write (onnxruntime takes no null buffer)
            return torch.empty(found, dtype=self._element[1], device=where)
        if found and found[0] == n:
            self._out_tail = found[1:]
        return self._bound_run(v, where, found)

    def _binding(self, v: torch.Tensor, where: torch.device):
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, where.type, where.index or 0, _FLOAT, list(v.shape), v.data_ptr())
        return binding

    def _execute(self, binding, where: torch.device) -> None:
        if where.type == "cuda":
            # onnxruntime reads the input on its own stream: the torch work that wrote it (and last
            # used the output's memory) must be done first
            torch.cuda.current_stream(where).synchronize()
        self.session.run_with_iobinding(binding)
        if where.type == "cuda":
            binding.synchronize_outputs()  # onnxruntime syncs at the end of a run already; explicit

    def _bound_run(self, v: torch.Tensor, where: torch.device, shape: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty(shape, dtype=self._element[1], device=where)
        binding = self._binding(v, where)
        binding.bind_output(self.output_name, where.type, where.index or 0, self._element[0], list(shape),
                            out.data_ptr())
        self._execute(binding, where)
        return out

    def _probe(self, v: torch.Tensor, where: torch.device) -> tuple[int, ...]:
        """The output's shape for this batch, from a run into a buffer onnxruntime allocates (graphs
        whose class count is not fixed: once; an empty batch)."""
        binding = self._binding(v, where)
        binding.bind_output(self.output_name, where.type, where.index or 0)
        self._execute(binding, where)
        return tuple(int(d) for d in binding.get_outputs()[0].shape())


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
