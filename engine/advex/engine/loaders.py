"""Loading and saving models without arbitrary pickle execution.

Formats: "safetensors" (weights for a zoo architecture), "torchscript" (torch.jit archive),
"torch_export" (torch.export program, .pt2). Plain pickled checkpoints are never unpickled
with code execution; ``load_checkpoint_weights`` uses ``torch.load(weights_only=True)``.
torch.export / TorchScript archives are checked by ``check_archive`` before torch reads them
(see the section at the end of this module for what is refused and why).
"""
from __future__ import annotations

import re
import warnings
import zipfile
import zlib
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
               layout: str = "NCHW", value_range: str = "0-1", onnx_provider: str = "auto",
               precision: str = "fp32") -> ModelWrapper:
    """A ready-to-use wrapper in eval mode on ``device``; raises ModelLoadError.
    layout / value_range: what an ONNX graph's input expects; onnx_provider / precision: the execution
    provider it asks for and the server's precision (see OnnxNet; all four ignored for torch formats)."""
    path = Path(path)
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            net = zoo.build(info.architecture, info.input_shape, info.num_classes, info.arch_args)
            state = load_file(str(path), device="cpu")
            _check_state(net, state, info)
            net.load_state_dict(state)
        elif fmt == "torchscript":
            check_archive(path, fmt)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript is deprecated from torch 2.14
                net = torch.jit.load(str(path), map_location="cpu")
        elif fmt == "torch_export":
            check_archive(path, fmt)
            net = torch.export.load(str(path)).module()
        elif fmt == "onnx":
            from advex.engine.onnx_model import OnnxNet

            net = OnnxNet(path, info.input_shape, layout or "NCHW", value_range or "0-1", device,
                          provider=onnx_provider, precision=precision)
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
            check_archive(path, fmt)
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


# ------------------------------------------------------------------ archives checked before loading
#
# torch.export.load and torch.jit.load parse more than tensors. What a .pt2 archive can make them
# do, seen in torch 2.14's torch/export/pt2_archive/_package.py and torch/_export/serde:
#   - weights / constants marked use_pickle -> torch.load(weights_only=False): any Python code;
#   - constants named opaque_obj_* -> pickle.loads; custom_obj_* -> TorchScript objects;
#   - legacy data/weights/<model>.pt, data/constants/<model>.pt and the sample inputs -> torch.load
#     with weights_only=True that falls back to weights_only=False when it fails;
#   - data/aotinductor/ -> a compiled shared library, loaded and run;
#   - expr_str of symbolic shapes -> sympy.sympify, which evaluates Python;
#   - guards_code -> exec'd when .module() is called;
#   - node targets "torch.<anything>" -> getattr from the torch module (torch.os.system, torch.save).
# A TorchScript archive's pickles go through TorchScript's own unpickler (only __torch__ classes and
# torch's tensor rebuilders), but its code may call aten::save / aten::from_file (files on the
# server). Archives with any of these are refused here, before torch sees them.

class UnsafeModel(ModelLoadError):
    """The archive holds something that would run code or touch files when loaded or run."""


MAX_MEMBER_READ = 64 << 20          # a config / program / pickle member read for checking
MAX_ARCHIVE_MEMBERS = 100_000
_NO_PICKLE_HINT = ("export without pickled parts: plain torch.Tensor parameters and buffers (no tensor "
                   "subclasses, no custom or opaque objects), saved with torch.export.save(ep, 'model.pt2')")


def check_archive(path: str | Path, fmt: str) -> None:
    """Refuse, without loading it, a torch_export / torchscript archive that would run code when
    loaded (pickled parts, compiled libraries, Python expressions) or touch files when run.
    Raises UnsafeModel (a ModelLoadError) naming what was found; other formats pass."""
    try:
        if fmt == "torch_export":
            _check_export_archive(Path(path))
        elif fmt == "torchscript":
            _check_torchscript_archive(Path(path))
    except ModelLoadError:
        raise
    except Exception as exc:  # a damaged archive (bad CRC, truncated member, ...)
        raise ModelLoadError(f"cannot load {fmt} model: the archive is damaged ({_one_line(exc)})") from exc


def _open_archive(path: Path, fmt: str):
    import zipfile

    try:
        zf = zipfile.ZipFile(path)
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ModelLoadError(f"cannot load {fmt} model: not a zip archive ({exc})") from exc
    if not infos:
        raise ModelLoadError(f"cannot load {fmt} model: the archive is empty")
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise UnsafeModel(f"the {fmt} archive has {len(infos)} members; at most {MAX_ARCHIVE_MEMBERS} are accepted")
    members: dict[str, object] = {}
    root = infos[0].filename.split("/", 1)[0]
    for info in infos:
        name = info.filename
        parts = name.split("/")
        if (len(parts) < 2 or parts[0] != root or "\\" in name or "\x00" in name or name.startswith("/")
                or any(p in ("", ".", "..") for p in parts[:-1])):
            raise UnsafeModel(f"the {fmt} archive has a member {_short(name)} outside its single top folder "
                              f"{_short(root)}; save it again with torch's own writer")
        rel = name[len(root) + 1:]
        if rel in members:
            raise UnsafeModel(f"the {fmt} archive names member {_short(name)} twice")
        if info.flag_bits & 0x1:
            raise UnsafeModel(f"the {fmt} archive's member {_short(name)} is encrypted")
        members[rel] = info
    return zf, members


def _read_member(zf, info, what: str) -> bytes:
    if info.file_size > MAX_MEMBER_READ:
        raise UnsafeModel(f"{what} ({_short(info.filename)}) is {info.file_size} bytes; at most "
                          f"{MAX_MEMBER_READ} are accepted")
    try:
        with zf.open(info) as f:
            data = f.read(MAX_MEMBER_READ + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:  # damaged member
        raise UnsafeModel(f"{what} ({_short(info.filename)}) cannot be read: the archive is damaged "
                          f"({type(exc).__name__})") from None
    if len(data) > MAX_MEMBER_READ:
        raise UnsafeModel(f"{what} ({_short(info.filename)}) is larger than it says")
    return data


def _short(value, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"...(+{len(text) - limit} chars)"


_EXPORT_MEMBERS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d{1,9}"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d{1,9}"
    r"|data/sample_inputs/model\.pt|extra/[A-Za-z0-9_.-]{1,128}")


def _check_export_archive(path: Path) -> None:
    import io
    import json

    zf, members = _open_archive(path, "torch_export")
    with zf:
        for rel, info in members.items():
            if _EXPORT_MEMBERS.fullmatch(rel):
                continue
            if rel.startswith("data/aotinductor/"):
                why = "AOTInductor-compiled code (a shared library that would be loaded and run)"
            elif "custom_obj_" in rel or "opaque_obj_" in rel:
                why = "a pickled Python / TorchScript object, which would be unpickled with code execution"
            elif rel.endswith(".pt"):
                why = "pickled weights or constants (legacy layout), which may be unpickled with code execution"
            else:
                why = "a part advex does not load"
            raise UnsafeModel(f"refused: the torch_export archive holds {_short(rel)}: {why}; {_NO_PICKLE_HINT}")
        fmt_member = members.get("archive_format")
        if fmt_member is not None and _read_member(zf, fmt_member, "archive_format").strip() != b"pt2":
            raise ModelLoadError("cannot load torch_export model: archive_format is not 'pt2' "
                                 "(save it with torch.export.save)")
        if "models/model.json" not in members:
            raise ModelLoadError("cannot load torch_export model: the archive has no models/model.json "
                                 "(save it with torch.export.save)")
        for kind, config, prefix in (("weight", "data/weights/model_weights_config.json", "weight_"),
                                     ("constant", "data/constants/model_constants_config.json", "tensor_")):
            if config in members:
                _check_payload_config(_read_member(zf, members[config], config), kind, prefix, config)
        sample = members.get("data/sample_inputs/model.pt")
        if sample is not None and sample.file_size:
            # torch loads it with weights_only=True and, when that fails, again with weights_only=False
            try:
                loaded = torch.load(io.BytesIO(_read_member(zf, sample, "sample inputs")), map_location="cpu",
                                    weights_only=True)
            except Exception as exc:
                raise UnsafeModel(f"refused: the torch_export archive's sample inputs (data/sample_inputs/model.pt) "
                                  f"are a pickle that loads only with code execution ({_one_line(exc)}); "
                                  f"{_NO_PICKLE_HINT}") from exc
            if not isinstance(loaded, (tuple, dict)):
                raise UnsafeModel("refused: the torch_export archive's sample inputs are not a tuple of tensors")
        try:
            program = json.loads(_read_member(zf, members["models/model.json"], "models/model.json"))
        except (ValueError, RecursionError) as exc:
            raise ModelLoadError(f"cannot load torch_export model: models/model.json is not JSON ({exc})") from exc
    _check_program_json(program)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


def _check_payload_config(raw: bytes, kind: str, prefix: str, where: str) -> None:
    import json

    try:
        config = json.loads(raw)
        entries = config["config"]
        if not isinstance(entries, dict):
            raise TypeError("'config' is not an object")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ModelLoadError(f"cannot load torch_export model: {where} is not a payload config ({exc})") from exc
    for fqn, meta in entries.items():
        if not isinstance(meta, dict):
            raise ModelLoadError(f"cannot load torch_export model: {where}: entry {_short(fqn)} is not an object")
        if meta.get("use_pickle"):
            raise UnsafeModel(f"refused: the torch_export archive stores {kind} {_short(fqn)} as a pickle "
                              f"({where} says use_pickle), which torch.export.load unpickles with code execution; "
                              f"{_NO_PICKLE_HINT}")
        name = meta.get("path_name")
        if not isinstance(name, str) or not re.fullmatch(re.escape(prefix) + r"\d{1,9}", name):
            raise UnsafeModel(f"refused: {where}: {kind} {_short(fqn)} is stored as {_short(name)}, not a raw "
                              f"tensor file {prefix}N; {_NO_PICKLE_HINT}")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise UnsafeModel(f"refused: {where}: {kind} {_short(fqn)} has no tensor_meta (not a plain tensor); "
                              f"{_NO_PICKLE_HINT}")


# operators a torch.export program may call: torch's own, never Python functions reached through
# torch's namespace (torch.save, torch.os.system, ...) nor file access
_OP_TARGET = re.compile(r"torch\.ops\.(aten|prims|higher_order|quantized_decomposed|quantized|torchvision)"
                        r"\.([A-Za-z_][A-Za-z0-9_]*)(\.[A-Za-z_][A-Za-z0-9_]*)?")
_DENIED_OPS = {"save", "from_file", "_save", "load", "load_tensor"}
_PY_TARGETS = ({f"_operator.{n}" for n in (
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt",
    "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift", "index", "truth")}
               | {f"math.{n}" for n in ("ceil", "floor", "trunc", "sqrt", "exp", "log", "log2", "pow", "fabs", "isnan",
                                        "isinf", "sin", "cos", "tan", "tanh")}
               | {f"torch.{n}" for n in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite",
                                         "sym_sqrt", "_sym_sqrt", "sym_sum", "sym_and", "sym_or", "_check",
                                         "_check_is_size", "_assert", "_assert_async")})
_SYMPY_NAMES = {
    "Symbol", "Integer", "Float", "Rational", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or",
    "Not", "Piecewise", "Mul", "Add", "Pow", "floor", "ceiling", "sqrt", "oo", "zoo", "nan", "true", "false",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
    "Identity", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "BitwiseFn_bitwise_xor"}
_SYMBOL = re.compile(r"[a-z]{1,6}\d{1,9}")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_TENSOR_METHODS = {"size", "stride", "storage_offset", "dim", "numel", "shape"}
_MAX_EXPR = 10_000


def _check_program_json(program) -> None:
    if not isinstance(program, dict):
        raise ModelLoadError("cannot load torch_export model: models/model.json is not an exported program")
    guards = program.get("guards_code") or []
    if not isinstance(guards, list):
        raise UnsafeModel("refused: the program's guards_code is not a list of guards")
    for guard in guards:
        _check_expr(guard, "guard")
    ranges = program.get("range_constraints") or {}
    if isinstance(ranges, dict):
        for name in ranges:
            if not (isinstance(name, str) and _SYMBOL.fullmatch(name)):
                _check_expr(name, "range constraint")
    stack = [program]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            target = node.get("target")
            if isinstance(target, str) and "inputs" in node and "outputs" in node:
                _check_target(target)
            for key, value in node.items():
                if key == "expr_str":
                    _check_expr(value, "symbolic shape")
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))


def _check_target(target: str) -> None:
    m = _OP_TARGET.fullmatch(target)
    if m is not None and m.group(2) not in _DENIED_OPS:
        return
    if target in _PY_TARGETS:
        return
    why = "file access" if m is not None else "not a torch operator"
    raise UnsafeModel(f"refused: the program calls {_short(target)} ({why}); advex runs programs made of "
                      "torch.ops.aten / prims / higher_order operators only")


def _check_expr(text, what: str) -> None:
    """A symbolic-shape expression (sympy.sympify evaluates it as Python) or a guard (exec'd by
    torch.export): only names of symbols and of sympy / shape functions, numbers and arithmetic."""
    import ast

    if not isinstance(text, str) or len(text) > _MAX_EXPR or any(c in text for c in "\"\\\n\r\x00;"):
        raise UnsafeModel(f"refused: the program's {what} {_short(text)} is not a plain shape expression")
    try:
        tree = ast.parse(text, mode="eval")
        nodes = list(ast.walk(tree))
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise UnsafeModel(f"refused: the program's {what} {_short(text)} does not parse as an expression") from exc
    guard = what == "guard"
    plain = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Tuple, ast.keyword, ast.Load,
             ast.operator, ast.unaryop, ast.boolop, ast.cmpop)
    for n in nodes:
        ok = isinstance(n, plain)
        if isinstance(n, ast.Constant):
            v = n.value
            ok = v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and bool(_IDENT.fullmatch(v)))
        elif isinstance(n, ast.Name):
            ok = n.id in _SYMPY_NAMES or bool(_SYMBOL.fullmatch(n.id)) or (guard and n.id in ("L", "math"))
        elif isinstance(n, ast.Call):
            f = n.func
            ok = ((isinstance(f, ast.Name) and f.id in _SYMPY_NAMES)
                  or (guard and isinstance(f, ast.Attribute) and (f.attr in _TENSOR_METHODS
                                                                   or f"math.{f.attr}" in _PY_TARGETS)))
        elif isinstance(n, ast.Attribute):
            ok = guard and not n.attr.startswith("_") and (
                n.attr in _TENSOR_METHODS or (isinstance(n.value, ast.Name) and n.value.id == "math"
                                              and f"math.{n.attr}" in _PY_TARGETS))
        elif isinstance(n, ast.Subscript):
            ok = guard
        if not ok:
            raise UnsafeModel(f"refused: the program's {what} {_short(text)} is not a plain shape expression "
                              f"({type(n).__name__} {_short(getattr(n, 'id', getattr(n, 'attr', '')))} is not "
                              "allowed): torch would evaluate it as Python")


# TorchScript: its unpickler resolves only these (anything else fails in torch.jit.load anyway)
_TS_GLOBAL_MODULES = {"torch", "torch._utils", "torch.jit._pickle", "collections", "builtins"}
_TS_DENIED_CODE = re.compile(r"\b(?:torch|aten|ops\s*\.\s*aten)\s*\.\s*(?:save|from_file|_save)\b"
                             r"|\bops\s*\.\s*(?:debugprims|_c10d_functional|c10d|symm_mem)\b")


def _check_torchscript_archive(path: Path) -> None:
    import pickletools

    zf, members = _open_archive(path, "torchscript")
    with zf:
        if "data.pkl" not in members:
            raise ModelLoadError("cannot load torchscript model: the archive has no data.pkl "
                                 "(save it with torch.jit.save)")
        for rel, info in members.items():
            if rel.endswith(".pkl") or rel.endswith(".debug_pkl"):
                data = _read_member(zf, info, rel)
                for op_name in (b"aten::save", b"aten::from_file"):
                    if op_name in data:
                        raise UnsafeModel(f"refused: the torchscript archive's {_short(rel)} names "
                                          f"{op_name.decode()}, which reads or writes files on the server")
                try:
                    for op, arg, _ in pickletools.genops(data):
                        if op.name in ("GLOBAL", "INST"):
                            module, _, name = str(arg).partition(" ")
                            if not _ts_global_ok(module, name):
                                raise UnsafeModel(
                                    f"refused: the torchscript archive's {_short(rel)} names the Python global "
                                    f"{_short(module + '.' + name)}: TorchScript archives hold only __torch__ "
                                    "classes and tensors; save the module with torch.jit.save(torch.jit.script(m))")
                        elif op.name in ("STACK_GLOBAL", "OBJ", "EXT1", "EXT2", "EXT4"):
                            raise UnsafeModel(f"refused: the torchscript archive's {_short(rel)} uses pickle opcode "
                                              f"{op.name}, which torch.jit.save never writes")
                except UnsafeModel:
                    raise
                except Exception as exc:
                    raise ModelLoadError(f"cannot load torchscript model: {_short(rel)} is not a valid pickle "
                                         f"({_one_line(exc)})") from exc
            elif rel.startswith("code/") and rel.endswith(".py"):
                code = _read_member(zf, info, rel).decode("utf-8", "replace")
                found = _TS_DENIED_CODE.search(code)
                if found:
                    raise UnsafeModel(f"refused: the torchscript program's code ({_short(rel)}) calls "
                                      f"{_short(found.group(0))}, which reads or writes files on the server")


def _ts_global_ok(module: str, name: str) -> bool:
    if not _IDENT.fullmatch(name or "") or name.startswith("__"):
        return False
    if module == "__torch__" or module.startswith("__torch__."):
        return True
    if module == "collections":
        return name == "OrderedDict"
    if module == "builtins":
        return name in ("set", "frozenset", "complex", "slice")
    return module in _TS_GLOBAL_MODULES
