"""Registered resources: models and datasets, with ids and sha256 digests.

Files live under <data_dir>/artifacts/{models,datasets}/<id>/; records in the SQLite store.
Uploads stream into a temporary file and are validated (parsed, run once) before they are
moved into place: a bad upload leaves nothing behind. Built-in datasets are found under the
configured data roots (never downloaded)."""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import grpc
import torch
from google.protobuf.timestamp_pb2 import Timestamp

from advex.engine import data as data_mod
from advex.engine.data import ArrayDataset, DataError, TsiprasParams
from advex.engine.loaders import (ModelLoadError, Recorded, ShapeMismatch, check_model, load_model,
                                  read_recorded, safetensors_bytes)
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.zoo import ARCHITECTURES
from advex.service.errors import ServiceError, invalid, not_found, precondition
from advex.service.store import Store
from advex.v1 import resources_pb2 as res

FORMAT_NAMES = {res.SAFETENSORS: "safetensors", res.TORCHSCRIPT: "torchscript", res.TORCH_EXPORT: "torch_export",
                res.ONNX: "onnx"}
FORMAT_EXT = {res.SAFETENSORS: ".safetensors", res.TORCHSCRIPT: ".pt", res.TORCH_EXPORT: ".pt2", res.ONNX: ".onnx"}
TSIPRAS = "tsipras"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


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


def validate_model_spec(spec: res.ModelSpec, field: str = "spec", *, complete: bool = True) -> None:
    """complete=False: an upload's spec, where input_shape (empty) and num_classes (0) may be
    left for the server to read from the file; what is given is still checked."""
    if spec.format not in FORMAT_NAMES:
        raise invalid(f"{field}.format", "required: SAFETENSORS, TORCHSCRIPT, TORCH_EXPORT or ONNX")
    if spec.layout not in ("", "NCHW", "NHWC"):
        raise invalid(f"{field}.layout", f"must be NCHW or NHWC, got {spec.layout!r}")
    if spec.value_range not in ("", "0-1", "0-255"):
        raise invalid(f"{field}.value_range", f"must be '0-1' or '0-255', got {spec.value_range!r}")
    if (spec.layout or spec.value_range) and spec.format != res.ONNX:
        raise invalid(f"{field}.layout", "layout and value_range are declared for ONNX graphs only")
    if spec.format == res.SAFETENSORS and spec.architecture not in ARCHITECTURES:
        raise invalid(f"{field}.architecture", f"SAFETENSORS weights need a zoo architecture, one of {sorted(ARCHITECTURES)}")
    if spec.num_classes < 2 and (complete or spec.num_classes != 0):
        raise invalid(f"{field}.num_classes", f"must be >= 2, got {spec.num_classes}")
    if complete and not spec.input_shape:
        raise invalid(f"{field}.input_shape", "required: 1 to 3 positive dims without the batch dim, e.g. [3, 32, 32]")
    if any(s <= 0 for s in spec.input_shape) or len(spec.input_shape) > 3:
        raise invalid(f"{field}.input_shape", f"need 1 to 3 positive dims without the batch dim, got {list(spec.input_shape)}")
    if not spec.input_shape:
        return  # mean / std are checked against the channels once the shape is known
    channels = spec.input_shape[0] if len(spec.input_shape) == 3 else 1
    for name in ("mean", "std"):
        values = list(getattr(spec, name))
        if values and len(values) not in (1, channels):
            raise invalid(f"{field}.{name}", f"need 1 or {channels} values (one per channel), got {len(values)}")
    if len(spec.mean) != len(spec.std) and spec.mean and spec.std:
        raise invalid(f"{field}.std", "mean and std must have the same length")
    if any(s <= 0 for s in spec.std):
        raise invalid(f"{field}.std", "values must be > 0")


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


class Registry:
    def __init__(self, store: Store, artifacts: Path, data_roots: list[str], device: torch.device) -> None:
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
                       lineage: Optional[dict] = None) -> res.Model:
        """Validate (load and run once), then move ``file`` into place and record it. An empty
        input_shape or a num_classes of 0 is read from the file where it records them."""
        validate_model_spec(spec, complete=False)
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
            given = given_shape if exc.field == "input_shape" else given_classes
            raise invalid(f"spec.{exc.field}" if given else "chunk", str(exc)) from exc
        except ModelLoadError as exc:
            raise invalid("chunk", str(exc)) from exc
        if spec.num_classes == 0:  # not recorded (TorchScript, dynamic outputs): measured by the run
            spec.num_classes = found
        model_id = new_id("m")
        folder = self.models_dir / model_id
        folder.mkdir(parents=True)
        dest = folder / ("model" + FORMAT_EXT[spec.format])
        shutil.move(str(file), dest)
        if not spec.name:
            spec.name = model_id
        record = res.Model(id=model_id, spec=spec, sha256=sha256, size_bytes=size, create_time=now(),
                           source=source, lineage_json=json.dumps(lineage or {}, sort_keys=True),
                           has_features=model.has_features, has_gradients=model.has_gradients,
                           execution_provider=self._provider(model))
        self.store.put_resource("models", model_id, str(dest), record)
        return record

    def _provider(self, model: ModelWrapper) -> str:
        """The execution provider an ONNX graph gets on this server's device ('' for torch)."""
        if model.has_gradients:
            return ""
        import onnxruntime as ort

        cuda = self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
        return "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"

    def register_bytes(self, spec: res.ModelSpec, data: bytes, *, source: str, lineage: dict) -> res.Model:
        path = self.tmp_dir / f"model-{uuid.uuid4().hex}"
        path.write_bytes(data)
        try:
            return self.register_model(spec, path, hashlib.sha256(data).hexdigest(), len(data), source=source,
                                       lineage=lineage)
        finally:
            path.unlink(missing_ok=True)

    def save_trained(self, net: torch.nn.Module, spec: res.ModelSpec, source: str, lineage: dict) -> res.Model:
        return self.register_bytes(spec, safetensors_bytes(net), source=source, lineage=lineage)

    def get_model(self, model_id: str, field: str = "model_id") -> res.Model:
        if not model_id:
            raise invalid(field, "required")
        found = self.store.get_resource("models", model_id, res.Model)
        if found is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"{field}: model {model_id!r} not found")
        return found[0]

    def load_model(self, model_id: str) -> tuple[res.Model, ModelWrapper]:
        record = self.get_model(model_id)
        path = self.store.get_resource("models", model_id, res.Model)[1]

        def make() -> ModelWrapper:
            return load_model(path, FORMAT_NAMES[record.spec.format], model_info(record.spec), self.device,
                              record.spec.layout, record.spec.value_range)

        with self._lock:
            return record, self._models.get_or(model_id, make)

    def list_models(self) -> list[res.Model]:
        return list(self.store.list_resources("models", res.Model))

    def delete_model(self, model_id: str) -> None:
        self.get_model(model_id)
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
        try:
            arrays = data_mod.load_npz(file.read_bytes())
        except DataError as exc:
            raise invalid("chunk", str(exc)) from exc
        split = header.split or "train"
        num_classes = header.num_classes or arrays.num_classes
        if num_classes < 2:
            raise invalid("header.num_classes", "need at least 2 classes (set it, or upload labels of 2+ classes)")
        if len(arrays) and int(arrays.y.max()) >= num_classes:
            raise invalid("header.num_classes", f"labels go up to {int(arrays.y.max())}, beyond num_classes={num_classes}")
        if header.class_names and len(header.class_names) != num_classes:
            raise invalid("header.class_names", f"need {num_classes} names, got {len(header.class_names)}")
        dataset_id, folder = self.new_dataset_folder()
        dest = folder / f"{split}.npz"
        shutil.move(str(file), dest)
        domain = res.REAL if arrays.domain == "real" else res.IMAGE
        record = res.Dataset(id=dataset_id, name=header.name or dataset_id, kind="upload", splits={split: len(arrays)},
                             example_shape=list(arrays.example_shape), num_classes=num_classes, domain=domain,
                             dtype=str(arrays.x.dtype).replace("torch.", ""), sha256=sha256, size_bytes=size,
                             create_time=now(), class_names=list(header.class_names))
        return self.record_dataset(record, dest)

    def new_dataset_folder(self) -> tuple[str, Path]:
        dataset_id = new_id("ds")
        folder = self.datasets_dir / dataset_id
        folder.mkdir(parents=True)
        return dataset_id, folder

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
            raise precondition(f"dataset {dataset_id!r} is built in: it is read from its source files, "
                               "not stored as an .npz")
        return Path(self.store.get_resource("datasets", dataset_id, res.Dataset)[1])

    def get_dataset(self, dataset_id: str, field: str = "dataset_id") -> res.Dataset:
        if not dataset_id:
            raise invalid(field, "required")
        if dataset_id in self.builtins:
            return self.builtins[dataset_id]
        found = self.store.get_resource("datasets", dataset_id, res.Dataset)
        if found is None:
            raise not_found("dataset", dataset_id)
        return found[0]

    @staticmethod
    def resolve_split(record: res.Dataset, split: str, default: str, field: str = "split") -> str:
        """'' -> default, or the only split a dataset has."""
        if not split:
            split = default if default in record.splits or len(record.splits) != 1 else next(iter(record.splits))
        if split not in record.splits:
            raise invalid(field, f"dataset {record.id!r} has no split {split!r}; it has {sorted(record.splits)}")
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
            raise precondition(f"dataset {dataset_id!r} cannot be read: {exc}") from exc

    def list_datasets(self) -> list[res.Dataset]:
        return list(self.builtins.values()) + list(self.store.list_resources("datasets", res.Dataset))

    def delete_dataset(self, dataset_id: str) -> None:
        record = self.get_dataset(dataset_id)
        if record.kind == "builtin":
            raise precondition(f"dataset {dataset_id!r} is built in and cannot be deleted")
        self.store.delete_resource("datasets", dataset_id)
        with self._lock:
            for key in [k for k in self._datasets if k[0] == dataset_id]:
                self._datasets.pop(key)
        shutil.rmtree(self.datasets_dir / dataset_id, ignore_errors=True)
