"""Loading and saving models without arbitrary pickle execution.

Formats: "safetensors" (weights for a zoo architecture), "torchscript" (torch.jit archive),
"torch_export" (torch.export program, .pt2). Plain pickled checkpoints are never unpickled
with code execution; ``load_checkpoint_weights`` uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from advex.engine import zoo
from advex.engine.models import ModelInfo, ModelWrapper

FORMATS = ("safetensors", "torchscript", "torch_export", "onnx")


class ModelLoadError(ValueError):
    """The file is not a loadable model of the declared format / architecture."""


def load_model(path: str | Path, fmt: str, info: ModelInfo, device: torch.device | str = "cpu",
               layout: str = "NCHW", value_range: str = "0-1") -> ModelWrapper:
    """A ready-to-use wrapper in eval mode on ``device``; raises ModelLoadError.
    layout / value_range: what an ONNX graph's input expects (ignored for torch formats)."""
    path = Path(path)
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            net = zoo.build(info.architecture, info.input_shape, info.num_classes, info.arch_args)
            state = load_file(str(path), device="cpu")
            _check_state(net, state, info)
            net.load_state_dict(state)
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript is deprecated from torch 2.14
                net = torch.jit.load(str(path), map_location="cpu")
        elif fmt == "torch_export":
            net = torch.export.load(str(path)).module()
        elif fmt == "onnx":
            from advex.engine.onnx_model import OnnxNet

            net = OnnxNet(path, info.input_shape, layout or "NCHW", value_range or "0-1", device)
        else:
            raise ModelLoadError(f"unknown model format {fmt!r}; expected one of {FORMATS}")
    except ModelLoadError:
        raise
    except Exception as exc:  # any parse/shape error of an untrusted file
        raise _load_error(fmt, exc) from exc
    model = ModelWrapper(net, info).to(device)
    model.eval()
    return model


def _load_error(fmt: str, exc: Exception) -> ModelLoadError:
    hint = ""
    if fmt == "onnx" and "external data" in str(exc).lower():
        hint = (" (the graph keeps its weights in a separate file; upload a single file: "
                "torch.onnx.export(..., external_data=False))")
    return ModelLoadError(f"cannot load {fmt} model: {type(exc).__name__}: {exc}{hint}")


def _check_state(net: nn.Module, state: dict, info: ModelInfo) -> None:
    """Keys and shapes of the file against the architecture, reported briefly."""
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"{k} missing" for k in want if k not in have]
    problems += [f"{k} unexpected" for k in have if k not in want]
    problems += [f"{k} is {list(have[k])} in the file, {list(want[k])} in the architecture"
                 for k in want if k in have and have[k] != want[k]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelLoadError(f"weights do not match architecture {info.architecture!r} with input "
                             f"{list(info.input_shape)}, {info.num_classes} classes, arch_args {info.arch_args}: "
                             + "; ".join(problems[:3]) + more)


class ShapeMismatch(ModelLoadError):
    """The declared input_shape / num_classes do not fit the model; ``field`` names which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_model(model: ModelWrapper, device: torch.device | str = "cpu") -> int:
    """Run a dummy batch of two through the model: it must give logits [2, num_classes]
    (a batch of two also catches programs exported with a static batch size of 1). Returns the
    number of logits per example; info.num_classes 0 means "not known yet": any count >= 2 passes.
    Raises ShapeMismatch (field "input_shape" or "num_classes") when the declaration is at fault."""
    info = model.info
    x = torch.rand((2, *info.input_shape), device=device)
    try:
        with torch.no_grad():
            out = model.logits(x)
    except Exception as exc:
        text = str(exc).strip()
        if "size()[0]" in text:  # torch.export's guard on the batch dim
            raise ModelLoadError(
                f"model fails on a batch of two: {text} (the batch dimension must be dynamic: export with "
                "dynamic_shapes={'x': {0: torch.export.Dim('batch')}})") from exc
        raise ShapeMismatch("input_shape", f"the model fails on a batch of two examples of the declared "
                                           f"input_shape {list(info.input_shape)}: {_last_line(exc)} "
                                           "(check the input shape)") from exc
    if out.dim() != 2:
        raise ModelLoadError(f"model returns shape {list(out.shape)} for a batch of two; "
                             "advex needs logits [batch, num_classes]")
    if out.shape[0] != 2:
        raise ModelLoadError(f"model returns shape {list(out.shape)} for a batch of two: the batch dimension must "
                             "be dynamic (torch.export: dynamic_shapes={'x': {0: torch.export.Dim('batch')}})")
    found = int(out.shape[1])
    if info.num_classes and found != info.num_classes:
        raise ShapeMismatch("num_classes", f"{info.num_classes} given, but the model returns {found} logits per "
                                           f"example: pass --num-classes {found}, or leave it out to read it "
                                           "from the model")
    if found < 2:
        raise ShapeMismatch("num_classes", f"the model returns {found} logit per example; advex needs a "
                                           "classifier with 2 or more classes")
    return found


def _last_line(exc: Exception) -> str:
    """An exception in one line: TorchScript's carry their interpreter traceback first."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if re.match(r"^\w+(Error|Exception):", last) else f"{type(exc).__name__}: {last}"


@dataclass
class Recorded:
    """What a model file itself records about its input and output; None where it does not.
    input_shape is one example without the batch, in advex's order (C,H,W); the *_where texts
    say where in the file each came from; why_no_input says why the input shape is not there."""
    input_shape: Optional[tuple[int, ...]] = None
    input_where: str = ""
    num_classes: Optional[int] = None
    classes_where: str = ""
    why_no_input: str = "the file does not record it"
    input_channels: Optional[int] = None   # partial knowledge: image channels (zoo CNN weights)
    input_size: Optional[int] = None       # partial knowledge: values per example (zoo MLP / linear weights)
    layout_hint: str = ""                  # ONNX: the graph's input looks channels-last but NCHW is assumed
    static_batch: str = ""                 # the input's batch dim is a fixed number: what to do about it


def _dims(shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else "batch" if i == 0 else str(d)
                           for i, d in enumerate(shape)) + "]"


def read_recorded(path: str | Path, fmt: str, architecture: str = "", layout: str = "") -> Recorded:
    """Read, without running the model, the input shape and number of classes a file records:
    ONNX graphs (input and output shapes, in the declared layout), torch.export programs (the
    input placeholder's example shape, the output's shape), zoo safetensors weights (classes from
    the head, channels or input size from the first layer). TorchScript records neither.
    Raises ModelLoadError when the file does not parse."""
    path = Path(path)
    try:
        if fmt == "onnx":
            return _read_onnx(path, layout)
        if fmt == "torch_export":
            return _read_export(path)
        if fmt == "safetensors":
            return _read_safetensors(path, architecture)
    except ModelLoadError:
        raise
    except Exception as exc:  # an untrusted file that does not parse
        raise _load_error(fmt, exc) from exc
    if fmt == "torchscript":
        return Recorded(why_no_input="the file does not record it")
    raise ModelLoadError(f"unknown model format {fmt!r}; expected one of {FORMATS}")


def _read_onnx(path: Path, layout: str) -> Recorded:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    rec = Recorded()
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) == 1:
        shape, name = list(inputs[0].shape), inputs[0].name
        example = shape[1:]
        shown = f"the graph's input {name!r} is {_dims(shape)}" + (f" (layout {layout})" if layout else "")
        if shape and isinstance(shape[0], int):
            rec.static_batch = (f"{shown}: its batch dimension is fixed at {shape[0]}; advex needs it dynamic "
                                "(torch.onnx.export(..., dynamic_shapes={'x': {0: torch.export.Dim('batch')}}) "
                                "or dynamic_axes={'x': {0: 'batch'}})")
        if not example or len(example) > 3:
            rec.why_no_input = f"{shown}, not a batch of examples of 1 to 3 dims"
        elif all(isinstance(d, int) and d > 0 for d in example):
            if layout == "NHWC" and len(example) == 3:
                example = [example[2], example[0], example[1]]
            elif not layout and len(example) == 3 and example[0] > 4 and example[2] in (1, 3, 4):
                rec.layout_hint = (f"{shown}, which looks channels-last: declare --layout NHWC "
                                   "(or --layout NCHW if it really has that many channels)")
            rec.input_shape, rec.input_where = tuple(example), shown
        else:
            rec.why_no_input = f"{shown}: its example dims are not fixed numbers"
    else:
        rec.why_no_input = f"the graph has {len(inputs)} inputs"
    if outputs:
        out = list(outputs[0].shape)
        if len(out) == 2 and isinstance(out[1], int) and out[1] > 0:
            rec.num_classes = out[1]
            rec.classes_where = f"the graph's output {outputs[0].name!r} is {_dims(out)}"
    return rec


def _read_export(path: Path) -> Recorded:
    program = torch.export.load(str(path))
    rec = Recorded()
    signature = program.graph_signature
    nodes = {n.name: n for n in program.graph.nodes}
    user_inputs = [n for n in signature.user_inputs if isinstance(n, str)]
    if len(user_inputs) == 1 and user_inputs[0] in nodes:
        val = nodes[user_inputs[0]].meta.get("val")
        shape = list(getattr(val, "shape", ()))
        example = shape[1:]
        shown = f"the program's input {user_inputs[0]!r} is {_dims(shape)}"
        if shape and type(shape[0]) is int:
            rec.static_batch = (f"{shown}: its batch dimension is fixed at {shape[0]}; advex needs it dynamic: "
                                "export with dynamic_shapes={'x': {0: torch.export.Dim('batch')}}")
        if not shape:
            rec.why_no_input = "the program does not record its input's shape"
        elif not example or len(example) > 3:
            rec.why_no_input = f"{shown}, not a batch of examples of 1 to 3 dims"
        elif all(type(d) is int for d in example):
            rec.input_shape, rec.input_where = tuple(example), shown
        else:
            rec.why_no_input = f"{shown}: its example dims are dynamic"
    else:
        rec.why_no_input = f"the program takes {len(user_inputs)} inputs"
    outputs = [n for n in program.graph.nodes if n.op == "output"]
    user_outputs = list(signature.user_outputs)
    if outputs and len(user_outputs) >= 1:
        flat = [a for a in outputs[0].args[0]] if isinstance(outputs[0].args[0], (list, tuple)) else []
        first = next((a for a in flat if getattr(a, "name", None) == user_outputs[0]), None)
        shape = list(getattr(first.meta.get("val"), "shape", ())) if first is not None else []
        if len(shape) == 2 and type(shape[1]) is int and shape[1] > 0:
            rec.num_classes = shape[1]
            rec.classes_where = f"the program's output {user_outputs[0]!r} is {_dims(shape)}"
    return rec


def _read_safetensors(path: Path, architecture: str) -> Recorded:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    rec = Recorded(why_no_input="they do not record the input's shape")
    head = shapes.get("head.weight")
    if head is not None and len(head) == 2:
        rec.num_classes, rec.classes_where = head[0], f"the file's final layer 'head.weight' is {list(head)}"
    first = {"small_cnn": "body.0.weight", "resnet18": "body.conv1.weight", "resnet50": "body.conv1.weight",
             "mlp": "body.1.weight", "linear": "head.weight"}.get(architecture)
    w = shapes.get(first) if first else None
    if w is not None and len(w) == 4:
        rec.input_channels, rec.input_where = w[1], f"the file's first layer {first!r} is {list(w)}"
        rec.why_no_input = f"they record the channels, {w[1]}, but not the height and width"
    elif w is not None and len(w) == 2:
        rec.input_size, rec.input_where = w[1], f"the file's first layer {first!r} is {list(w)}"
        rec.why_no_input = f"they record only the number of input values, {w[1]}, not their shape"
    return rec


def safetensors_bytes(net: nn.Module) -> bytes:
    """Weights of a zoo network as a safetensors file's bytes (contiguous CPU tensors)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})


def save_safetensors(net: nn.Module, path: str | Path) -> None:
    Path(path).write_bytes(safetensors_bytes(net))


def load_checkpoint_weights(path: str | Path) -> dict:
    """A plain PyTorch checkpoint's tensors, with pickle restricted to tensors and containers."""
    return torch.load(str(path), map_location="cpu", weights_only=True)
