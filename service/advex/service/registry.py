"""Registered resources: models and datasets, with ids and sha256 digests.

Files live under <data_dir>/artifacts/{models,datasets}/<id>/; records in the SQLite store.
Uploads stream into a temporary file and are validated (parsed, run once) before they are
moved into place: a bad upload leaves nothing behind. Built-in datasets are found under the
configured data roots (never downloaded)."""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import threading
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import grpc
import torch
from google.protobuf.timestamp_pb2 import Timestamp

from advex.engine import data as data_mod
from advex.engine.data import ArrayDataset, DataError, TsiprasParams
from advex.engine.loaders import (ModelLoadError, Recorded, ShapeMismatch, check_archive, check_model, load_model,
                                  read_recorded, safetensors_bytes)
from advex.engine.models import ModelInfo, ModelWrapper, compile_model, freeze
from advex.engine.zoo import ACTIVATIONS, ARCHITECTURES, input_noise_std
from advex.service import sandbox
from advex.service.config import ServerConfig
from advex.service.errors import ServiceError, invalid, precondition
from advex.service.store import Store
from advex.service.text import quote
from advex.v1 import resources_pb2 as res

FORMAT_NAMES = {res.SAFETENSORS: "safetensors", res.TORCHSCRIPT: "torchscript", res.TORCH_EXPORT: "torch_export",
                res.ONNX: "onnx"}
FORMAT_EXT = {res.SAFETENSORS: ".safetensors", res.TORCHSCRIPT: ".pt", res.TORCH_EXPORT: ".pt2", res.ONNX: ".onnx"}
TSIPRAS = "tsipras"

# bounds on what a client declares (see validate_model_spec / register_dataset)
MAX_NAME = 128                    # names, label values, class names: printable, at most this long
MAX_DIM = 4096                    # each input dimension
MAX_INPUT_ELEMENTS = 3 * 1024 * 1024   # values per example
MAX_CLASSES = 100_000
MAX_LABELS = 64                   # ModelSpec.labels entries
MAX_CLASS_NAMES_BYTES = 1 << 20   # a dataset's class names together (its record stays well under a page)
MAX_ARCH_ARGS = 16
MAX_ZOO_PARAMS = 1 << 28          # parameters of a zoo network built from a spec (1 GiB of float32)
MAX_ZOO_ACTIVATIONS = 1 << 26     # values of its widest layer, per example
ARCH_ARGS = {"small_cnn": {"width": (1, 512)}, "mlp": {"hidden": (1, 65536), "activation": None},
             "resnet18": {}, "resnet50": {}, "linear": {}}
SPLIT_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,31}")
LABEL_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}")
MAX_ID = 128
DEFAULT_MAX_DATASET_MB = ServerConfig.max_dataset_mb     # decompressed size of an uploaded .npz (a setting)
NPZ_MEMBERS = ("x.npy", "y.npy")
NPZ_MAX_RATIO = 100               # decompressed : uploaded, beyond NPZ_RATIO_FROM bytes (zip bombs)
NPZ_RATIO_FROM = 16 << 20
X_DTYPES = ("uint8", "float32")


def check_text(value: str, field: str, *, limit: int = MAX_NAME) -> None:
    """A client-supplied name: printable (no control characters, no NUL), at most ``limit`` long."""
    if len(value) > limit:
        raise invalid(field, f"at most {limit} characters, got {len(value)}: {quote(value)}")
    if not value.isprintable():
        raise invalid(field, f"must be printable text without control characters, got {quote(value)}")


def check_split(split: str, field: str = "header.split") -> None:
    """A split name is a file-name-safe word: it never becomes a path, but is shown and compared."""
    if not SPLIT_PATTERN.fullmatch(split):
        raise invalid(field, f"must be a letter then up to 31 letters, digits, '_' or '-' "
                             f"(e.g. train, test, val), got {quote(split)}")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def derived_id(prefix: str, op_id: str) -> str:
    """The id of what operation `op_id` makes ('op-<hex>' -> '<prefix>-<hex>'): the same after a
    restart, so that a resumed operation finds (or makes) the same model or dataset, never two."""
    return f"{prefix}-{op_id.split('-', 1)[1]}"


def now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or(self, key, make: Callable):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = make()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class UploadSink:
    """Receives an upload's chunks into a temporary file, hashing as it goes."""

    def __init__(self, tmp_dir: Path, max_bytes: int, field: str = "chunk") -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.path = tmp_dir / f"upload-{uuid.uuid4().hex}"
        self._f = self.path.open("wb")
        self._hash = hashlib.sha256()
        self.size = 0
        self.max_bytes = max_bytes
        self.field = field

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise invalid(self.field, f"upload exceeds the limit of {self.max_bytes} bytes")
        self._hash.update(chunk)
        self._f.write(chunk)

    def finish(self) -> str:
        self._f.close()
        if self.size == 0:
            raise invalid(self.field, "empty upload: send the file's bytes after the first message")
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


def model_info(spec: res.ModelSpec) -> ModelInfo:
    return ModelInfo(spec.architecture, tuple(int(s) for s in spec.input_shape), int(spec.num_classes),
                     tuple(spec.mean), tuple(spec.std), dict(spec.arch_args))


def validate_model_spec(spec: res.ModelSpec, field: str = "spec", *, complete: bool = True,
                        endpoint: bool = False) -> None:
    """complete=False: an upload's spec, where input_shape (empty) and num_classes (0) may be
    left for the server to read from the file; what is given is still checked. endpoint=True: a
    RegisterEndpoint spec (format ENDPOINT; its endpoint part is endpoints.check_spec's). Every
    number and name a client sends is bounded here (see the MAX_* constants)."""
    if endpoint != (spec.format == res.ENDPOINT):
        raise invalid(f"{field}.format", "must be ENDPOINT (RegisterEndpoint registers served models)" if endpoint
                      else "ENDPOINT models are registered with RegisterEndpoint, not uploaded")
    if spec.format not in FORMAT_NAMES and not endpoint:
        raise invalid(f"{field}.format", "required: SAFETENSORS, TORCHSCRIPT, TORCH_EXPORT or ONNX")
    if spec.HasField("endpoint") and not endpoint:
        raise invalid(f"{field}.endpoint", "only for format ENDPOINT (RegisterEndpoint)")
    check_text(spec.name, f"{field}.name")
    check_text(spec.architecture, f"{field}.architecture", limit=64)
    if spec.layout not in ("", "NCHW", "NHWC"):
        raise invalid(f"{field}.layout", f"must be NCHW or NHWC, got {quote(spec.layout)}")
    if spec.value_range not in ("", "0-1", "0-255"):
        raise invalid(f"{field}.value_range", f"must be '0-1' or '0-255', got {quote(spec.value_range)}")
    _check_labels(spec, field)
    if spec.num_classes > MAX_CLASSES:
        raise invalid(f"{field}.num_classes", f"at most {MAX_CLASSES}, got {spec.num_classes}")
    if len(spec.input_shape) > 3 or any(s <= 0 or s > MAX_DIM for s in spec.input_shape):
        raise invalid(f"{field}.input_shape", f"need 1 to 3 dims without the batch dim, each in [1, {MAX_DIM}], "
                                              f"got {quote(list(spec.input_shape))}")
    if spec.input_shape and _numel(spec.input_shape) > MAX_INPUT_ELEMENTS:
        raise invalid(f"{field}.input_shape", f"{list(spec.input_shape)} is {_numel(spec.input_shape)} values per "
                                              f"example; at most {MAX_INPUT_ELEMENTS} are accepted")
    for name in ("mean", "std"):
        values = list(getattr(spec, name))
        if len(values) > MAX_DIM:
            raise invalid(f"{field}.{name}", f"at most {MAX_DIM} values (one per channel), got {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise invalid(f"{field}.{name}", f"values must be finite numbers, got {quote(values)}")
    if (spec.layout or spec.value_range) and spec.format not in (res.ONNX, res.ENDPOINT):
        raise invalid(f"{field}.layout", "layout and value_range are declared for ONNX graphs and endpoints only")
    if spec.format == res.SAFETENSORS and spec.architecture not in ARCHITECTURES:
        raise invalid(f"{field}.architecture", f"SAFETENSORS weights need a zoo architecture, one of {sorted(ARCHITECTURES)}")
    if spec.num_classes < 2 and (complete or spec.num_classes != 0):
        raise invalid(f"{field}.num_classes", f"must be >= 2, got {spec.num_classes}")
    if complete and not spec.input_shape:
        raise invalid(f"{field}.input_shape", "required: 1 to 3 positive dims without the batch dim, e.g. [3, 32, 32]")
    if any(s <= 0 for s in spec.std):
        raise invalid(f"{field}.std", "values must be > 0")
    _check_arch_args(spec, field)
    if not spec.input_shape:
        return  # mean / std are checked against the channels once the shape is known
    channels = spec.input_shape[0] if len(spec.input_shape) == 3 else 1
    for name in ("mean", "std"):
        values = list(getattr(spec, name))
        if values and len(values) not in (1, channels):
            raise invalid(f"{field}.{name}", f"need 1 or {channels} values (one per channel), got {len(values)}")
    if len(spec.mean) != len(spec.std) and spec.mean and spec.std:
        raise invalid(f"{field}.std", "mean and std must have the same length")


def _check_labels(spec: res.ModelSpec, field: str) -> None:
    if len(spec.labels) > MAX_LABELS:
        raise invalid(f"{field}.labels", f"at most {MAX_LABELS} labels, got {len(spec.labels)}")
    for key, value in spec.labels.items():
        if not LABEL_KEY_PATTERN.fullmatch(key):
            raise invalid(f"{field}.labels", f"a key is a letter or digit then up to 62 of letters, digits, "
                                             f"'_', '.', '-', '/', got {quote(key)}")
        check_text(value, f"{field}.labels[{key}]")


def _check_arch_args(spec: res.ModelSpec, field: str) -> None:
    """Bounded for every format; for a zoo architecture the server builds (safetensors weights,
    training) the known arguments within their ranges, and the network within MAX_ZOO_* ."""
    args = dict(spec.arch_args)
    if len(args) > MAX_ARCH_ARGS:
        raise invalid(f"{field}.arch_args", f"at most {MAX_ARCH_ARGS} entries, got {len(args)}")
    for key, value in args.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", key):
            raise invalid(f"{field}.arch_args", f"keys are identifiers of up to 64 characters, got {quote(key)}")
        check_text(value, f"{field}.arch_args[{key}]", limit=MAX_NAME)
    if spec.format != res.SAFETENSORS or spec.architecture not in ARCH_ARGS:
        return  # informative only: nothing is built from them
    known = ARCH_ARGS[spec.architecture]
    for key, value in args.items():
        if key == "input_noise_std":  # every zoo architecture: a randomized defense
            try:
                input_noise_std({key: value})
            except ValueError as exc:
                raise invalid(f"{field}.arch_args[{key}]", str(exc)) from None
            continue
        if key not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise invalid(f"{field}.arch_args", f"{spec.architecture} takes no argument {quote(key)} (it takes: {allowed})")
        bounds = known[key]
        if bounds is None:  # mlp activation
            if value not in ACTIVATIONS:
                raise invalid(f"{field}.arch_args[{key}]", f"must be one of {sorted(ACTIVATIONS)}, got {quote(value)}")
            continue
        try:
            number = int(value)
        except ValueError:
            raise invalid(f"{field}.arch_args[{key}]", f"must be an integer, got {quote(value)}") from None
        if not bounds[0] <= number <= bounds[1]:
            raise invalid(f"{field}.arch_args[{key}]", f"must be in [{bounds[0]}, {bounds[1]}] for "
                                                       f"{spec.architecture}, got {number}")
    if spec.input_shape and spec.num_classes > 0:
        params, widest = _zoo_size(spec.architecture, [int(s) for s in spec.input_shape], int(spec.num_classes), args)
        if params > MAX_ZOO_PARAMS:
            raise invalid(f"{field}.arch_args", f"{spec.architecture} with input {list(spec.input_shape)}, "
                                                f"{spec.num_classes} classes and {args or 'default arguments'} has "
                                                f"about {params} parameters; at most {MAX_ZOO_PARAMS} are accepted")
        if widest > MAX_ZOO_ACTIVATIONS:
            raise invalid(f"{field}.input_shape", f"{spec.architecture} on input {list(spec.input_shape)} "
                                                  f"{'with ' + str(args) if args else ''} has layers of about {widest} "
                                                  f"values per example; at most {MAX_ZOO_ACTIVATIONS} are accepted")


def _zoo_size(arch: str, shape: list[int], classes: int, args: dict) -> tuple[int, int]:
    """(parameters, values of the widest layer per example) of a zoo network, estimated."""
    numel = _numel(shape)
    pixels = shape[1] * shape[2] if len(shape) == 3 else numel
    channels = shape[0] if len(shape) == 3 else 1
    if arch == "small_cnn":
        w = int(args.get("width", 32))
        params = 9 * (channels * w + w * w + 2 * w * w + 4 * w * w + 8 * w * w) + 4 * w * (classes + 1)
        return params, w * pixels
    if arch in ("resnet18", "resnet50"):
        base, feat, widest = (11_200_000, 512, 64) if arch == "resnet18" else (23_600_000, 2048, 256)
        return base + 27 * 64 * channels + feat * (classes + 1), widest * pixels
    if arch == "mlp":
        h = int(args.get("hidden", 64))
        return numel * h + h * (classes + 1), max(numel, h)
    return numel * classes + classes, numel  # linear


def _flag(values) -> str:
    return ",".join(str(int(v)) for v in values)


def complete_model_spec(spec: res.ModelSpec, file: Path, field: str = "spec") -> None:
    """Fill an upload's missing input_shape / num_classes from what the file records, and check
    given values against it. What is needed and not recorded is INVALID_ARGUMENT naming the
    field and the fix. (num_classes the file does not record is measured by one run later.)"""
    fmt = FORMAT_NAMES[spec.format]
    try:
        rec: Recorded = read_recorded(file, fmt, spec.architecture, spec.layout)
    except ModelLoadError as exc:
        raise invalid("chunk", str(exc)) from exc
    kind = f"safetensors weights of {spec.architecture}" if fmt == "safetensors" else f"{fmt} models"
    if rec.static_batch:
        raise invalid("chunk", rec.static_batch)
    given = [int(v) for v in spec.input_shape]
    if not given:
        if rec.layout_hint:
            raise invalid(f"{field}.layout", rec.layout_hint)
        if rec.input_shape is None:
            example = ("C,H,W" if rec.input_channels is None else f"{rec.input_channels},H,W")
            if rec.input_size is not None:
                example = f"{rec.input_size} (or C,H,W with {rec.input_size} values)"
            raise invalid(f"{field}.input_shape", f"required for {kind} ({rec.why_no_input}): "
                                                  f"pass --input-shape {example}")
        spec.input_shape[:] = list(rec.input_shape)
    elif rec.input_shape is not None and tuple(given) != rec.input_shape:
        order = " in layout NHWC" if spec.layout == "NHWC" else ""
        raise invalid(f"{field}.input_shape", f"{given} given, but {rec.input_where}, which means input_shape "
                                              f"{list(rec.input_shape)}{order}: pass --input-shape "
                                              f"{_flag(rec.input_shape)}, or leave it out to read it from the file")
    elif rec.input_channels is not None and (len(given) != 3 or given[0] != rec.input_channels):
        plural = "s" if rec.input_channels != 1 else ""
        raise invalid(f"{field}.input_shape", f"{given} given, but {rec.input_where}: it takes images of "
                                              f"{rec.input_channels} channel{plural}, input_shape "
                                              f"[{rec.input_channels}, H, W]")
    elif rec.input_size is not None and _numel(given) != rec.input_size:
        raise invalid(f"{field}.input_shape", f"{given} given ({_numel(given)} values), but {rec.input_where}: it "
                                              f"takes {rec.input_size} values per example")
    if rec.num_classes is not None:
        if spec.num_classes == 0:
            spec.num_classes = rec.num_classes
        elif spec.num_classes != rec.num_classes:
            raise invalid(f"{field}.num_classes", f"{spec.num_classes} given, but {rec.classes_where}: "
                                                  f"{rec.num_classes} classes; pass --num-classes {rec.num_classes}, "
                                                  "or leave it out to read it from the file")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


_ANSWER_CODES = {"INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
                 "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION}


def check_upload(spec_hex: str, path: str) -> dict:
    """Complete and check an upload's spec against its file, load the model and run a batch of two
    (on the CPU). spec_hex: the serialized ModelSpec in hex. Runs in a sandbox child for programs,
    so it answers a JSON-able dict: input_shape,
    num_classes, found (logits per example), has_features, has_gradients; or error (the message,
    field included) and code; or limit "memory" when an allocation failed."""
    spec = res.ModelSpec.FromString(bytes.fromhex(spec_hex))
    file = Path(path)
    try:
        given_shape, given_classes = bool(spec.input_shape), spec.num_classes != 0
        complete_model_spec(spec, file)
        if spec.format == res.SAFETENSORS and spec.num_classes == 0:
            raise invalid("spec.num_classes", f"required: the weights of {spec.architecture} do not record it "
                                              "(no 'head.weight'); pass --num-classes N")
        validate_model_spec(spec, complete=spec.num_classes != 0)
        info = model_info(spec)
        try:
            model = load_model(file, FORMAT_NAMES[spec.format], info, "cpu", spec.layout, spec.value_range)
            found = check_model(model, "cpu")
        except ShapeMismatch as exc:
            if sandbox.is_memory_error(exc):
                raise
            given = given_shape if exc.field == "input_shape" else given_classes
            raise invalid(f"spec.{exc.field}" if given else "chunk", str(exc)) from exc
        except ModelLoadError as exc:
            if sandbox.is_memory_error(exc):
                raise
            raise invalid("chunk", str(exc)) from exc
    except ServiceError as exc:
        return {"error": exc.message, "code": exc.code.name}
    except Exception as exc:
        if sandbox.is_memory_error(exc):
            return {"limit": "memory", "detail": " ".join(str(exc).split())[:300]}
        raise
    return {"input_shape": [int(v) for v in spec.input_shape], "num_classes": int(spec.num_classes), "found": found,
            "has_features": bool(model.has_features), "has_gradients": bool(model.has_gradients)}


def check_npz(path: Path, max_bytes: int, field: str = "chunk") -> None:
    """An uploaded .npz, from its zip directory and its two .npy headers only (nothing is
    decompressed beyond the headers): exactly x.npy and y.npy, stored or deflated, not encrypted;
    each header's shape x dtype matching the member's size; no object dtypes; all of it at most
    max_bytes decompressed. A zip bomb or a header that lies is refused before it costs memory."""
    limit_mb = max_bytes >> 20
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            names = sorted(i.filename for i in infos)
            if names != sorted(NPZ_MEMBERS):
                shown = quote(names[:10]) + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")
                raise invalid(field, f".npz must hold exactly the arrays 'x' and 'y' (members x.npy, y.npy); "
                                     f"found {len(names)} members: {shown}")
            total = sum(i.file_size for i in infos)
            if total > max_bytes:
                raise invalid(field, f".npz holds {total} bytes decompressed; at most {max_bytes} ({limit_mb} MiB) "
                                     "are accepted")
            packed = max(1, path.stat().st_size)
            if total > NPZ_RATIO_FROM and total > NPZ_MAX_RATIO * packed:
                raise invalid(field, f".npz expands from {packed} to {total} bytes ({total // packed}:1); at most "
                                     f"{NPZ_MAX_RATIO}:1 is accepted beyond {NPZ_RATIO_FROM >> 20} MiB (a zip bomb?)")
            for info in infos:
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise invalid(field, f"{info.filename}: compression {info.compress_type} is not accepted "
                                         "(np.savez or np.savez_compressed)")
                if info.flag_bits & 0x1:
                    raise invalid(field, f"{info.filename}: encrypted members are not accepted")
                with zf.open(info) as f:
                    shape, dtype, offset = _npy_header(f, info.filename, field)
                need = _numel(shape) * dtype.itemsize
                if offset + need != info.file_size:
                    raise invalid(field, f"{info.filename}: its header says {list(shape)} {dtype} ({need} bytes), "
                                         f"but the member holds {info.file_size - offset} bytes of data")
                if info.filename == "x.npy" and dtype.name not in X_DTYPES:
                    raise invalid(field, f"x: dtype must be uint8 or float32, got {dtype}")
                if info.filename == "y.npy" and dtype.kind not in "iu":
                    raise invalid(field, f"y: expected integer labels [N], got {dtype}")
    except ServiceError:
        raise
    except Exception as exc:  # a damaged zip or .npy header (numpy raises anything from ValueError to TokenError)
        raise invalid(field, f"not a readable .npz: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from exc


def _npy_header(f, name: str, field: str):
    """(shape, dtype, data offset) from a .npy header; object dtypes refused."""
    import numpy as np
    from numpy.lib import format as npy

    version = npy.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = npy.read_array_header_1_0(f, max_header_size=10000)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = npy.read_array_header_2_0(f, max_header_size=10000)
    else:
        raise invalid(field, f"{name}: unknown .npy version {version}")
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise invalid(field, f"{name}: dtype {dtype} is not accepted (pickled objects and records are refused)")
    if len(shape) > 8 or any(int(d) < 0 for d in shape):
        raise invalid(field, f"{name}: shape {quote(list(shape))} is not an array's")
    return tuple(int(d) for d in shape), dtype, f.tell()


class Registry:
    def __init__(self, store: Store, artifacts: Path, data_roots: list[str], device: torch.device, *,
                 check_limits: Optional[sandbox.Limits] = None,
                 max_dataset_mb: int = DEFAULT_MAX_DATASET_MB, config: Optional[ServerConfig] = None) -> None:
        """check_limits: time and memory for checking an uploaded program (sandbox.Limits:
        upload_check_timeout_s, upload_check_memory_mb); max_dataset_mb: the decompressed size of an
        uploaded .npz; config: the server's settings for inference endpoints (allow-list,
        credentials; none = no endpoint can be registered or queried)."""
        self.config = config or ServerConfig()
        self.check_limits = check_limits or sandbox.Limits()
        self.max_dataset_bytes = int(max_dataset_mb) << 20
        self.store = store
        self.models_dir = artifacts / "models"
        self.datasets_dir = artifacts / "datasets"
        self.tmp_dir = artifacts / "tmp"
        for d in (self.models_dir, self.datasets_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp_dir.iterdir():  # uploads interrupted by a crash
            stale.unlink(missing_ok=True)
        self.data_roots = data_roots
        self.device = device
        self._lock = threading.Lock()
        self._models = _LRU(4)
        self._datasets = _LRU(6)
        self.builtins: dict[str, res.Dataset] = self._discover_builtins()

    # ------------------------------------------------------------------ models
    def register_model(self, spec: res.ModelSpec, file: Path, sha256: str, size: int, *, source: str,
                       lineage: Optional[dict] = None, model_id: str = "") -> res.Model:
        """Validate (load and run once), then move ``file`` into place and record it. An empty
        input_shape or a num_classes of 0 is read from the file where it records them. Programs
        (torch_export, TorchScript, ONNX) are checked for code they would run before anything
        loads them, then loaded and run in a child process under self.check_limits."""
        validate_model_spec(spec, complete=False)
        fmt = FORMAT_NAMES[spec.format]
        if spec.format == res.SAFETENSORS:
            checked = check_upload(spec.SerializeToString().hex(), str(file))
        else:
            try:
                check_archive(file, fmt)  # pickles, compiled code, Python expressions: refused unloaded
            except ModelLoadError as exc:
                raise invalid("chunk", str(exc)) from exc
            checked = self._check_in_child(spec, file)
        if "crash" in checked:
            raise invalid("chunk", f"checking the uploaded model failed: {str(checked['crash'])[:500]}")
        if checked.get("limit") == "memory":
            raise invalid("chunk", f"checking the uploaded model ran out of memory: {str(checked.get('detail'))[:300]}")
        if "error" in checked:
            raise ServiceError(_ANSWER_CODES.get(checked.get("code"), grpc.StatusCode.INVALID_ARGUMENT),
                               str(checked.get("error"))[:2000])
        try:
            shape = [int(v) for v in checked["input_shape"]]
            found, num_classes = int(checked["found"]), int(checked["num_classes"])
            has_features, has_gradients = bool(checked["has_features"]), bool(checked["has_gradients"])
        except (KeyError, TypeError, ValueError) as exc:
            raise invalid("chunk", "the check of the model gave no usable answer") from exc
        spec.input_shape[:] = shape
        spec.num_classes = num_classes or found
        validate_model_spec(spec)  # what the check filled in, bounded again here
        model_id = model_id or new_id("m")
        folder = self.models_dir / model_id
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / ("model" + FORMAT_EXT[spec.format])
        shutil.move(str(file), dest)
        if not spec.name:
            spec.name = model_id
        record = res.Model(id=model_id, spec=spec, sha256=sha256, size_bytes=size, create_time=now(),
                           source=source, lineage_json=json.dumps(lineage or {}, sort_keys=True),
                           has_features=has_features, has_gradients=has_gradients,
                           execution_provider=self._provider(has_gradients))
        self.store.put_resource("models", model_id, str(dest), record)
        return record

    def _check_in_child(self, spec: res.ModelSpec, file: Path) -> dict:
        limits = self.check_limits
        try:
            return sandbox.run(f"{__name__}:check_upload", [spec.SerializeToString().hex(), str(file)], limits)
        except sandbox.LimitExceeded as exc:
            setting = "upload_check_timeout_s" if exc.limit == "timeout" else "upload_check_memory_mb"
            raise invalid("chunk", f"checking the uploaded model (load and a batch of two) {exc} "
                                   f"(the server's {setting}); the model is refused") from exc
        except sandbox.CheckCrashed as exc:
            raise invalid("chunk", f"checking the uploaded model failed: {exc}") from exc

    def _provider(self, has_gradients: bool) -> str:
        """The execution provider an ONNX graph is to get on this server (onnx_provider, device; '' for
        torch); the one a loaded graph got is its OnnxNet's `provider` (a fallback logs a warning)."""
        if has_gradients:
            return ""
        from advex.engine.onnx_model import onnxruntime, provider_chain

        return provider_chain(self.config.onnx_provider, self.device, onnxruntime().get_available_providers())[0][0]

    def register_bytes(self, spec: res.ModelSpec, data: bytes, *, source: str, lineage: dict,
                       model_id: str = "") -> res.Model:
        path = self.tmp_dir / f"model-{uuid.uuid4().hex}"
        path.write_bytes(data)
        try:
            return self.register_model(spec, path, hashlib.sha256(data).hexdigest(), len(data), source=source,
                                       lineage=lineage, model_id=model_id)
        finally:
            path.unlink(missing_ok=True)

    def save_trained(self, net: torch.nn.Module, spec: res.ModelSpec, source: str, lineage: dict,
                     model_id: str = "") -> res.Model:
        """Record a trained network; with model_id (a resumed operation's), the model already
        recorded under that id is returned instead of a second one."""
        if model_id:
            found = self.store.get_resource("models", model_id, res.Model)
            if found is not None:
                return found[0]
        return self.register_bytes(spec, safetensors_bytes(net), source=source, lineage=lineage, model_id=model_id)

    def register_endpoint(self, spec: res.ModelSpec, field: str = "spec", *,
                          before_update: Callable[[str], None] = lambda model_id: None) -> res.Model:
        """A model served by an inference endpoint: the spec checked, the endpoint asked what it
        serves (endpoints.describe), and the record made, or updated under the same id when this
        url, model and version are registered already (its creation time, and so its place in the
        lists, kept); before_update(model_id) may refuse that (raise)."""
        from advex.service import endpoints

        validate_model_spec(spec, field, endpoint=True)
        endpoints.check_spec(spec, self.config, field)
        model_id = endpoints.model_id(spec)
        if self.store.get_resource("models", model_id, res.Model) is not None:
            before_update(model_id)
        resolved, identity, sha = endpoints.describe(spec, self.config, field)
        old = self.store.get_resource("models", model_id, res.Model)
        record = res.Model(id=model_id, spec=resolved, sha256=sha, size_bytes=0, source="endpoint",
                           has_features=False, has_gradients=False, endpoint_metadata_json=identity,
                           lineage_json=json.dumps({"registered": "RegisterEndpoint"}))
        record.create_time.CopyFrom(old[0].create_time if old else now())
        self.store.put_resource("models", model_id, "", record)
        return record

    def get_model(self, model_id: str, field: str = "model_id") -> res.Model:
        if not model_id:
            raise invalid(field, "required")
        found = self.store.get_resource("models", model_id, res.Model) if len(model_id) <= MAX_ID else None
        if found is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"{field}: model {quote(model_id)} not found")
        return found[0]

    def load_model(self, model_id: str) -> tuple[res.Model, ModelWrapper]:
        """The record and a module to run; an ENDPOINT model gets a fresh client each time (an
        operation's own, whose counts are that operation's)."""
        record = self.get_model(model_id)
        if record.spec.format == res.ENDPOINT:
            from advex.service import endpoints

            return record, ModelWrapper(endpoints.build_net(record, self.config), model_info(record.spec))
        path = self.store.get_resource("models", model_id, res.Model)[1]

        def make() -> ModelWrapper:  # frozen: for attacks and inference only (training builds its own)
            model = freeze(load_model(path, FORMAT_NAMES[record.spec.format], model_info(record.spec), self.device,
                                      record.spec.layout, record.spec.value_range, self.config.onnx_provider,
                                      self.config.precision))
            model.set_precision(self.config.precision, self.device)
            return compile_model(model, self.config.compile, self.device, name=model_id)  # lazy: at the first call

        with self._lock:
            return record, self._models.get_or(model_id, make)

    def list_models(self, page_size: int = 100, page_token: str = "") -> tuple[list[res.Model], str]:
        """One page of models, oldest first, and the next page's token ("" after the last page);
        see paging. page_size: already checked (paging.page_size)."""
        from advex.service import paging

        return paging.list_page(self.store, "models", res.Model, page_size, page_token)

    def delete_model(self, model_id: str) -> None:
        model_id = self.get_model(model_id).id  # the stored id (server-made) names the folder
        self.store.delete_resource("models", model_id)
        with self._lock:
            self._models.pop(model_id, None)
        shutil.rmtree(self.models_dir / model_id, ignore_errors=True)

    # ------------------------------------------------------------------ datasets
    def _discover_builtins(self) -> dict[str, res.Dataset]:
        found: dict[str, res.Dataset] = {}
        for name, src in data_mod.BUILTINS.items():
            folder = data_mod.find_builtin(name, self.data_roots)
            if folder is None:
                continue
            found[name] = res.Dataset(id=name, name=name, kind="builtin", splits=src.splits,
                                      example_shape=src.example_shape, num_classes=10, domain=res.IMAGE,
                                      dtype="uint8", class_names=src.class_names,
                                      lineage_json=json.dumps({"folder": str(folder)}))
        params = TsiprasParams()
        found[TSIPRAS] = res.Dataset(
            id=TSIPRAS, name="Tsipras et al. (2019) synthetic", kind="builtin",
            splits={k: v[0] for k, v in data_mod.TSIPRAS_SPLITS.items()}, example_shape=[params.d + 1],
            num_classes=2, domain=res.REAL, dtype="float32", class_names=["-1", "+1"],
            lineage_json=json.dumps({"d": params.d, "p": params.p, "eta": params.eta_value}))
        return found

    def register_dataset(self, header: res.UploadDatasetHeader, file: Path, sha256: str, size: int) -> res.Dataset:
        """An uploaded .npz: every client string bounded, the archive's directory and array headers
        checked against self.max_dataset_bytes before anything is decompressed, and the file stored
        under a name the server chooses (the split is only recorded)."""
        split = header.split or "train"
        check_split(split)
        check_text(header.name, "header.name")
        if header.num_classes < 0 or header.num_classes > MAX_CLASSES:
            raise invalid("header.num_classes", f"must be in [2, {MAX_CLASSES}] (or 0: from the labels), "
                                                f"got {header.num_classes}")
        if len(header.class_names) > MAX_CLASSES:
            raise invalid("header.class_names", f"at most {MAX_CLASSES} names, got {len(header.class_names)}")
        for k, name in enumerate(header.class_names):
            check_text(name, f"header.class_names[{k}]")
        names_bytes = sum(len(name.encode("utf-8")) for name in header.class_names)
        if names_bytes > MAX_CLASS_NAMES_BYTES:  # the record travels whole in every Get/List of it
            raise invalid("header.class_names", f"{names_bytes} bytes of names; at most {MAX_CLASS_NAMES_BYTES} "
                                                "in all")
        check_npz(file, self.max_dataset_bytes)
        try:
            arrays = data_mod.load_npz(file.read_bytes())
        except DataError as exc:
            raise invalid("chunk", str(exc)) from exc
        if len(arrays):
            low, high = int(arrays.y.min()), int(arrays.y.max())
            if low < 0:
                raise invalid("chunk", f"y: labels must be >= 0, got {low}")
            if high >= MAX_CLASSES:
                raise invalid("chunk", f"y: labels go up to {high}; at most {MAX_CLASSES} classes "
                                       f"(labels 0..{MAX_CLASSES - 1}) are accepted")
        num_classes = header.num_classes or arrays.num_classes
        if num_classes < 2:
            raise invalid("header.num_classes", "need at least 2 classes (set it, or upload labels of 2+ classes)")
        if len(arrays) and int(arrays.y.max()) >= num_classes:
            raise invalid("header.num_classes", f"labels go up to {int(arrays.y.max())}, beyond num_classes={num_classes}")
        if header.class_names and len(header.class_names) != num_classes:
            raise invalid("header.class_names", f"need {num_classes} names, got {len(header.class_names)}")
        dataset_id, folder = self.new_dataset_folder()
        dest = folder / "data.npz"  # a server-chosen name: the split is recorded, never a path
        shutil.move(str(file), dest)
        domain = res.REAL if arrays.domain == "real" else res.IMAGE
        record = res.Dataset(id=dataset_id, name=header.name or dataset_id, kind="upload", splits={split: len(arrays)},
                             example_shape=list(arrays.example_shape), num_classes=num_classes, domain=domain,
                             dtype=str(arrays.x.dtype).replace("torch.", ""), sha256=sha256, size_bytes=size,
                             create_time=now(), class_names=list(header.class_names))
        return self.record_dataset(record, dest)

    def new_dataset_folder(self, dataset_id: str = "") -> tuple[str, Path]:
        dataset_id = dataset_id or new_id("ds")
        folder = self.datasets_dir / dataset_id
        folder.mkdir(parents=True, exist_ok=True)
        return dataset_id, folder

    def recorded_dataset(self, dataset_id: str) -> Optional[res.Dataset]:
        found = self.store.get_resource("datasets", dataset_id, res.Dataset)
        return found[0] if found else None

    def record_dataset(self, record: res.Dataset, path: Path) -> res.Dataset:
        if not record.name:
            record.name = record.id
        if not record.HasField("create_time"):
            record.create_time.CopyFrom(now())
        self.store.put_resource("datasets", record.id, str(path), record)
        return record

    def dataset_file(self, dataset_id: str, split: str) -> Path:
        """The stored .npz of an uploaded or generated dataset's split."""
        record = self.get_dataset(dataset_id)
        if record.kind == "builtin":
            raise precondition(f"dataset {quote(dataset_id)} is built in: it is read from its source files, "
                               "not stored as an .npz")
        return Path(self.store.get_resource("datasets", dataset_id, res.Dataset)[1])

    def get_dataset(self, dataset_id: str, field: str = "dataset_id") -> res.Dataset:
        if not dataset_id:
            raise invalid(field, "required")
        if dataset_id in self.builtins:
            return self.builtins[dataset_id]
        found = self.store.get_resource("datasets", dataset_id, res.Dataset) if len(dataset_id) <= MAX_ID else None
        if found is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"dataset {quote(dataset_id)} not found")
        return found[0]

    @staticmethod
    def resolve_split(record: res.Dataset, split: str, default: str, field: str = "split") -> str:
        """'' -> default, or the only split a dataset has."""
        if not split:
            split = default if default in record.splits or len(record.splits) != 1 else next(iter(record.splits))
        if split not in record.splits:
            raise invalid(field, f"dataset {quote(record.id)} has no split {quote(split)}; it has {sorted(record.splits)}")
        return split

    def load_dataset(self, dataset_id: str, split: str) -> ArrayDataset:
        record = self.get_dataset(dataset_id)

        def make() -> ArrayDataset:
            if dataset_id == TSIPRAS:
                n, seed = data_mod.TSIPRAS_SPLITS[split]
                return data_mod.tsipras(n, TsiprasParams(), seed)
            if record.kind == "builtin":
                return data_mod.load_builtin(dataset_id, split, self.data_roots)
            path = self.store.get_resource("datasets", dataset_id, res.Dataset)[1]
            arrays = data_mod.load_npz(Path(path).read_bytes())
            arrays.num_classes = record.num_classes
            arrays.class_names = list(record.class_names)
            return arrays

        try:
            with self._lock:
                return self._datasets.get_or((dataset_id, split), make)
        except DataError as exc:
            raise precondition(f"dataset {quote(dataset_id)} cannot be read: {exc}") from exc

    def list_datasets(self, page_size: int = 100, page_token: str = "") -> tuple[list[res.Dataset], str]:
        """One page of datasets, the built-ins first (by id), then the stored ones oldest first, and
        the next page's token ("" after the last page); see paging."""
        from advex.service import paging

        first = [(paging.Position(0.0, d.id), d) for d in sorted(self.builtins.values(), key=lambda d: d.id)]
        return paging.list_page(self.store, "datasets", res.Dataset, page_size, page_token, first=first)

    def delete_dataset(self, dataset_id: str) -> None:
        record = self.get_dataset(dataset_id)
        dataset_id = record.id  # the stored id (server-made) names the folder
        if record.kind == "builtin":
            raise precondition(f"dataset {quote(dataset_id)} is built in and cannot be deleted")
        self.store.delete_resource("datasets", dataset_id)
        with self._lock:
            for key in [k for k in self._datasets if k[0] == dataset_id]:
                self._datasets.pop(key)
        shutil.rmtree(self.datasets_dir / dataset_id, ignore_errors=True)

    # ------------------------------------------------------------------ crash recovery
    def reclaim(self, jobs_dir: Path, unfinished_ops: set[str], scratch: tuple[Path, ...] = ()) -> tuple[int, int]:
        """At start: remove what a crash left behind: model and dataset folders that no record
        names (half-moved uploads, half-written builds), job folders of operations that are
        not unfinished, and whatever is in the `scratch` folders (temporary files). What an
        unfinished (resumable) operation makes is kept. Returns (entries removed, bytes freed)."""
        keep = {"models": {derived_id("m", op) for op in unfinished_ops},
                "datasets": {derived_id("ds", op) for op in unfinished_ops}}
        recorded = {table: self.store.resource_ids(table) for table in ("models", "datasets")}
        orphans = [p for table, folder in (("models", self.models_dir), ("datasets", self.datasets_dir))
                   for p in folder.iterdir() if p.name not in recorded[table] and p.name not in keep[table]]
        if jobs_dir.exists():
            orphans += [p for p in jobs_dir.iterdir() if p.name not in unfinished_ops]
        orphans += [p for folder in scratch if folder.is_dir() for p in folder.iterdir()]
        removed = freed = 0
        for path in orphans:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed, freed = removed + 1, freed + size
        return removed, freed
