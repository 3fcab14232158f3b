#!/usr/bin/env python3
"""Seeded fuzzing of every RPC of advex.v1.Robustness: the service must answer every bad input
with a precise status, never INTERNAL or UNKNOWN, and stay up.

The requests mix
- random bytes as the serialized request (and byte-level mutations of valid requests: flips,
  truncations, invalid UTF-8, runaway varints, deep group nesting);
- valid messages with random or extreme field values, built from the descriptors (huge and
  negative ints, NaN/inf floats, long and odd strings with NUL, '/', '../', unicode; repeated
  fields with many elements; unknown enum values);
- near-valid requests against real fixtures (a model and dataset that fit) with one or two
  fields mutated, so that validation deep inside each handler is reached;
- tensors with lying shapes and dtypes (overflowing, negative, too many dims, wrong byte count);
- client-streaming uploads of hostile files: truncated zips, random bytes as .npz / .pt2 /
  .onnx / .safetensors / TorchScript, valid headers with garbage, pickles in zips, streams out of
  order (chunks first, the spec twice, nothing at all).

Accepted long operations are cancelled at once. The generator is deterministic for a seed (ids
the server makes up are referred to by position). tests/test_fuzz.py runs it against an
in-process server; this script runs it at any size and writes a report:

    python bench/fuzz.py --count 10000 --seed 20240611 --out bench/results/fuzz-10000

Needs ADVEX_DATA_ROOT only for the MNIST fixtures (tsipras and an uploaded dataset always work).
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import pickle
import platform
import random
import struct
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import grpc
import numpy as np
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory, text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from advex.v1 import operation_pb2 as op_pb
from advex.v1 import resources_pb2 as res
from advex.v1 import results_pb2 as results
from advex.v1 import robustness_pb2 as rpc
from advex.v1.wire import to_tensor

SERVICE = rpc.DESCRIPTOR.services_by_name["Robustness"]
METHODS = [m.name for m in SERVICE.methods]
FD = pb_descriptor.FieldDescriptor
BAD_CODES = ("INTERNAL", "UNKNOWN")
ROOT = Path(__file__).resolve().parent
MAX_MESSAGE = 64 << 20

# Server settings the fuzz is sized for: small limits keep accepted work short on 2 CPU cores.
SERVER_SETTINGS = dict(max_batch=8, max_steps=5, max_restarts=1, max_queue=4, max_upload_mb=2, workers=1)

INTS32 = [0, 1, -1, 2, 3, 4, 7, 10, 255, 256, 1000, 4096, 4097, 100000, 2**31 - 1, -2**31]
INTS64 = INTS32 + [2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, -2**63, -2**62]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 0.1, 0.03, 8 / 255, 2.0, 10.0, 1e-30, 5e-324, 1e30, 1e308, -1e308,
          math.nan, -math.nan, math.inf, -math.inf, 3.4e38]
WORDS = ["pgd", "fgsm", "square", "PGD", "Square", "train", "test", "val", "linear", "mlp", "small_cnn",
         "resnet18", "resnet50", "quick", "cifar10_standard", "cifar10_l2_robust", "step", "cosine", "constant",
         "image", "noise", "NCHW", "NHWC", "0-1", "0-255", "tsipras", "mnist", "cifar10", "fashion-mnist",
         "width", "hidden", "activation", "relu", "evaluate", "train", "transfer", "export"]
WEIRD = ["", " ", "\x00", "a\x00b", "/", "//", "../", "..", ".", "../../../../etc/passwd", "/etc/passwd", "a/b",
         "..\\..\\x", "\\", "C:\\x", "ünïcödé", "Ω≈ç√∫", "😀" * 40, "\u202e\u0000\ufeff", "\t\n\r", "%s%n%x",
         "' OR 1=1; --", "${jndi:x}", "x" * 5000, "é" * 3000, "-1", "NaN", "inf", "1e999", "0x10", "[]", "{}",
         "train\x00", "train/../test", "m-", "ds-", "op-", "m-000000000000", "op-zzzzzzzzzzzz"]


def _repeated(f) -> bool:
    rep = getattr(f, "is_repeated", None)
    return bool(rep) if rep is not None else f.label == FD.LABEL_REPEATED


def _is_map(f) -> bool:
    return f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _npz(**arrays) -> bytes:
    return _zip({f"{k}.npy": _npy_bytes(v) for k, v in arrays.items()})


def _zip(entries: dict[str, bytes], compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():  # a fixed timestamp: the same bytes for the same seed
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data,
                        compress_type=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
    return buf.getvalue()


class _Harmless:
    """Pickled as a call of builtins.len: a pickle that would run code if it were unpickled."""

    def __reduce__(self):
        return (len, ((1, 2, 3),))


# ---------------------------------------------------------------------------------- fixtures

@dataclass
class Fixtures:
    """Valid resources to aim near-valid requests at; grows with what the fuzz itself creates."""
    pairs: list[tuple[str, str, tuple[int, ...], int, str]] = field(default_factory=list)  # model, dataset, shape, classes, domain
    models: list[str] = field(default_factory=list)
    feature_models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # valid model files by format
    file_specs: dict[str, res.ModelSpec] = field(default_factory=dict)
    npz: bytes = b""
    ops: list[str] = field(default_factory=list)  # operations the fuzz started
    created_models: list[str] = field(default_factory=list)  # what the fuzz uploaded (fair game for Delete)
    created_datasets: list[str] = field(default_factory=list)
    page_tokens: list[str] = field(default_factory=list)  # next_page_tokens the server issued (any list)

    def protected(self) -> set[str]:
        return set(self.models) | set(self.datasets)


def make_fixture_files() -> tuple[dict[str, bytes], dict[str, res.ModelSpec], bytes]:
    """Small valid model files of every format, and a small image dataset (.npz)."""
    import torch

    from advex.engine.loaders import safetensors_bytes
    from advex.engine.models import ModelInfo, ModelWrapper
    from advex.engine.onnx_model import export_onnx
    from advex.engine.zoo import Linear, SmallCNN

    torch.manual_seed(0)
    cnn = SmallCNN(1, 10, width=4).eval()
    lin = Linear(101, 2).eval()
    files = {"safetensors": safetensors_bytes(cnn), "safetensors_linear": safetensors_bytes(lin)}
    specs = {
        "safetensors": res.ModelSpec(format=res.SAFETENSORS, architecture="small_cnn", num_classes=10,
                                     input_shape=[1, 28, 28], arch_args={"width": "4"}),
        "safetensors_linear": res.ModelSpec(format=res.SAFETENSORS, architecture="linear", num_classes=2,
                                            input_shape=[101]),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated, and still uploaded
        scripted = torch.jit.trace(lin, torch.rand(2, 101))
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    files["torchscript"] = buf.getvalue()
    specs["torchscript"] = res.ModelSpec(format=res.TORCHSCRIPT, num_classes=2, input_shape=[101])
    program = torch.export.export(lin, (torch.rand(2, 101),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    buf = io.BytesIO()
    torch.export.save(program, buf)
    files["torch_export"] = buf.getvalue()
    specs["torch_export"] = res.ModelSpec(format=res.TORCH_EXPORT, num_classes=2, input_shape=[101])
    wrapper = ModelWrapper(cnn, ModelInfo("small_cnn", (1, 28, 28), 10, (), (), {"width": "4"}))
    files["onnx"] = export_onnx(wrapper, (1, 28, 28))
    specs["onnx"] = res.ModelSpec(format=res.ONNX, num_classes=10, input_shape=[1, 28, 28])
    rng = np.random.default_rng(0)
    npz = _npz(x=rng.integers(0, 256, (12, 1, 28, 28), dtype=np.uint8), y=np.arange(12, dtype=np.int64) % 10)
    return files, specs, npz


def prepare(channel: grpc.Channel, metadata=()) -> Fixtures:
    """Upload the fixture models and dataset; find which built-ins are there."""
    from advex.v1 import robustness_pb2_grpc as rpc_grpc

    stub = rpc_grpc.RobustnessStub(channel)
    files, specs, npz = make_fixture_files()
    fx = Fixtures(files=files, file_specs=specs, npz=npz)

    def upload(kind: str) -> res.Model:
        parts = [res.UploadModelRequest(spec=specs[kind]), res.UploadModelRequest(chunk=files[kind])]
        return stub.UploadModel(iter(parts), metadata=metadata, timeout=120)

    cnn, lin, onnx = upload("safetensors"), upload("safetensors_linear"), upload("onnx")
    ds = stub.UploadDataset(iter([res.UploadDatasetRequest(header=res.UploadDatasetHeader(name="fuzz", split="test")),
                                  res.UploadDatasetRequest(chunk=npz)]), metadata=metadata, timeout=60)
    builtins = {d.id for d in stub.ListDatasets(res.ListDatasetsRequest(), metadata=metadata, timeout=30).datasets}
    for listed in (stub.ListModels(res.ListModelsRequest(page_size=1), metadata=metadata, timeout=30),
                   stub.ListDatasets(res.ListDatasetsRequest(page_size=1), metadata=metadata, timeout=30)):
        if listed.next_page_token:
            fx.page_tokens.append(listed.next_page_token)
    fx.models = [cnn.id, lin.id, onnx.id]
    fx.feature_models = [cnn.id]
    fx.datasets = [ds.id, "tsipras"] + (["mnist"] if "mnist" in builtins else [])
    fx.pairs = [(cnn.id, ds.id, (1, 28, 28), 10, "image"), (lin.id, "tsipras", (101,), 2, "real"),
                (onnx.id, ds.id, (1, 28, 28), 10, "image")]
    if "mnist" in builtins:
        fx.pairs.append((cnn.id, "mnist", (1, 28, 28), 10, "image"))
    return fx


# ---------------------------------------------------------------------------------- generator

@dataclass
class Case:
    index: int
    method: str
    kind: str  # bytes | random | near | upload
    payload: object  # bytes (unary request) or list[bytes] (client stream)
    describe: str

    def short(self, limit: int = 240) -> str:
        text = f"#{self.index} {self.method} [{self.kind}] {self.describe}"
        return text if len(text) <= limit else text[:limit] + "..."


def _brief(msg) -> str:
    text = text_format.MessageToString(msg, as_one_line=True, print_unknown_fields=True)
    return text if len(text) <= 300 else text[:300] + "..."


class Generator:
    def __init__(self, seed: int, fx: Fixtures) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.fx = fx

    # ------------------------------------------------------------------ values
    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def string(self, for_delete: bool = False) -> str:
        r = self.rng.random()
        pool = self.fx.created_models + self.fx.created_datasets
        if not for_delete:
            pool = pool + self.fx.models + self.fx.datasets
        pool = pool + self.fx.ops
        if r < 0.3 and pool:
            return self.pick(pool)
        if r < 0.5:
            return self.pick(WORDS)
        if r < 0.9:
            return self.pick(WEIRD)
        n = self.rng.choice([1, 8, 64, 300])
        return "".join(chr(self.rng.choice([self.rng.randrange(1, 0x80), self.rng.randrange(0x80, 0xD800),
                                            self.rng.randrange(0xE000, 0x110000)])) for _ in range(n))

    def scalar(self, f, for_delete: bool = False):
        t = f.cpp_type
        if t == FD.CPPTYPE_INT32:
            return self.pick(INTS32) if self.rng.random() < 0.8 else self.rng.randrange(-2**31, 2**31)
        if t == FD.CPPTYPE_INT64:
            return self.pick(INTS64) if self.rng.random() < 0.8 else self.rng.randrange(-2**63, 2**63)
        if t == FD.CPPTYPE_UINT32:
            return self.rng.choice([0, 1, 2**32 - 1, self.rng.randrange(2**32)])
        if t == FD.CPPTYPE_UINT64:
            return self.rng.choice([0, 1, 2**64 - 1, self.rng.randrange(2**64)])
        if t in (FD.CPPTYPE_DOUBLE, FD.CPPTYPE_FLOAT):
            v = self.pick(FLOATS) if self.rng.random() < 0.8 else self.rng.uniform(-5, 5)
            return min(max(v, -3.4e38), 3.4e38) if t == FD.CPPTYPE_FLOAT and math.isfinite(v) else v
        if t == FD.CPPTYPE_BOOL:
            return self.rng.random() < 0.5
        if t == FD.CPPTYPE_ENUM:
            values = [v.number for v in f.enum_type.values]
            return self.pick(values) if self.rng.random() < 0.8 else self.pick([-1, 99, 2**31 - 1, -2**31])
        if t == FD.CPPTYPE_STRING:
            if f.type == FD.TYPE_BYTES:
                return self.rng.randbytes(self.rng.choice([0, 1, 16, 300]))
            return self.string(for_delete)
        raise AssertionError(f.cpp_type)

    def page_token(self) -> str:
        """"" (the first page), a token the server issued (for this list or another one), or one
        of them altered: a character changed, cut, extended, re-spelled; or no token at all."""
        tokens, r = self.fx.page_tokens, self.rng.random()
        if not tokens or r < 0.2:
            return self.pick(["", "", "A", "AAAA", "garbage", "x" * 600, "=", "AQ", "AQID" * 40])
        token = self.pick(tokens)
        if r < 0.55:
            return token
        how = self.rng.randrange(6)
        if how == 0:
            k = self.rng.randrange(len(token))
            return token[:k] + self.pick([c for c in "AQgw_-" if c != token[k]]) + token[k + 1:]
        if how == 1:
            return token[:self.rng.randrange(len(token))]
        if how == 2:
            return token + self.pick(["=", "==", "A", "AAAA", "\x00", " "])
        if how == 3:
            return token.replace("-", "+").replace("_", "/")
        if how == 4:
            return token[::-1]
        return self.pick(WEIRD)

    def count(self) -> int:
        r = self.rng.random()
        return 0 if r < 0.2 else 1 if r < 0.5 else self.rng.randrange(2, 6) if r < 0.85 else \
            self.rng.choice([50, 1000, 5000])

    # ------------------------------------------------------------------ tensors
    def tensor(self, shape: Optional[tuple[int, ...]] = None, n: int = 2, labels: Optional[int] = None):
        """A Tensor: valid for `shape` (batch n) or lying in one of many ways."""
        r = self.rng.random()
        if labels is not None and r < 0.5:
            return to_tensor(self.np.integers(0, labels, n).astype(np.int64))
        if shape is not None and r < 0.5:
            return to_tensor(self.np.random((n, *shape), dtype=np.float32))
        t = to_tensor(self.np.random((n, *(shape or (3,))), dtype=np.float32))
        how = self.rng.randrange(12)
        if how == 0:
            t.shape[:] = [2**62, 4]
        elif how == 1:
            t.shape[:] = [2**63 - 1, 2**63 - 1, 2]
        elif how == 2:
            t.shape[:] = [-1] + list(t.shape[1:])
        elif how == 3:
            t.shape[:] = [1] * self.rng.choice([9, 20, 1000])
        elif how == 4:
            t.dtype = self.pick(["float64", "", "complex64", "object", "int8", "\x00", "<f4", "bfloat16", "x" * 500])
        elif how == 5:
            t.data = t.data[: self.rng.randrange(max(1, len(t.data)))]
        elif how == 6:
            t.shape[:] = [2**40, 0]
            t.data = b""
        elif how == 7:
            t.dtype = self.pick(["uint8", "int64", "bool"])  # byte count no longer matches
        elif how == 8:  # NaN / inf / out of the box values
            a = self.np.random((n, *(shape or (3,))), dtype=np.float32)
            a.flat[0] = self.pick([np.nan, np.inf, -np.inf, 2.0, -1.0, 3e38])
            t = to_tensor(a)
        elif how == 9:
            t = to_tensor(np.zeros((0, *(shape or (3,))), np.float32))
        elif how == 10:  # a valid tensor of another shape: [N,D] for an image model, or too many examples
            t = to_tensor(self.np.random((self.rng.choice([1, 9, 64]), 101), dtype=np.float32))
        else:
            t = to_tensor(self.np.integers(-2**62, 2**62, n).astype(np.int64))
        return t

    # ------------------------------------------------------------------ random messages
    def fill(self, msg, depth: int = 0, density: float = 0.5, for_delete: bool = False) -> None:
        for f in msg.DESCRIPTOR.fields:
            if self.rng.random() > density:
                continue
            try:
                self.set_field(msg, f, depth, for_delete)
            except (ValueError, TypeError, OverflowError):
                pass  # a value the Python API refuses (e.g. float out of range): leave it unset

    def set_field(self, msg, f, depth: int, for_delete: bool = False) -> None:
        if f.type == FD.TYPE_MESSAGE and f.message_type.full_name == "advex.v1.Tensor" and not _repeated(f):
            getattr(msg, f.name).CopyFrom(self.tensor())
            return
        if _is_map(f):
            container = getattr(msg, f.name)
            kf, vf = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            for _ in range(self.count()):
                container[self.scalar(kf)] = self.scalar(vf)
            return
        if _repeated(f):
            container = getattr(msg, f.name)
            for _ in range(self.count()):
                if f.type == FD.TYPE_MESSAGE:
                    if depth < 3:
                        self.fill(container.add(), depth + 1, 0.5)
                else:
                    container.append(self.scalar(f, for_delete))
            return
        if f.type == FD.TYPE_MESSAGE:
            if depth < 3:
                self.fill(getattr(msg, f.name), depth + 1, 0.5)
                getattr(msg, f.name).SetInParent()
            return
        setattr(msg, f.name, self.scalar(f, for_delete))

    def mutate(self, msg, times: int = 1) -> None:
        """Set `times` random fields (anywhere in the message tree) to random values."""
        for _ in range(times):
            target = msg
            for _ in range(3):  # maybe step into a set sub-message
                subs = [f for f in target.DESCRIPTOR.fields if f.type == FD.TYPE_MESSAGE and not _repeated(f)
                        and target.HasField(f.name) and f.message_type.full_name != "advex.v1.Tensor"]
                if subs and self.rng.random() < 0.4:
                    target = getattr(target, self.pick(subs).name)
                else:
                    break
            if not target.DESCRIPTOR.fields:
                return
            f = self.pick(target.DESCRIPTOR.fields)
            try:
                target.ClearField(f.name)
                self.set_field(target, f, 1)
            except (ValueError, TypeError, OverflowError):
                pass

    # ------------------------------------------------------------------ bytes
    def raw_bytes(self, valid: bytes) -> bytes:
        how = self.rng.randrange(9)
        if how == 0:
            return self.rng.randbytes(self.rng.choice([1, 2, 7, 64, 512]))
        if how == 1 and valid:  # flip bytes
            b = bytearray(valid)
            for _ in range(self.rng.randrange(1, 6)):
                b[self.rng.randrange(len(b))] = self.rng.randrange(256)
            return bytes(b)
        if how == 2 and len(valid) > 1:  # truncate
            return valid[: self.rng.randrange(1, len(valid))]
        if how == 3:  # invalid UTF-8 in string field 1
            return b"\x0a\x04\xc3\x28\xff\xfe" + valid
        if how == 4:  # a varint that never ends / overlong
            return b"\x08" + b"\xff" * self.rng.choice([10, 11, 40])
        if how == 5:  # a length-delimited field that runs past the end
            return valid + b"\x12\xff\xff\xff\x0f" + b"ab"
        if how == 6:  # deep group nesting (unknown field 15, start group)
            return b"\x7b" * self.rng.choice([50, 150, 5000])
        if how == 7:  # wrong wire type on field 1, field number 0, end group without start
            return self.pick([b"\x0d\x00", b"\x00\x01", b"\x0c", b"\x0f", b"\x0e" + valid, b"\x1b\x1c" * 3])
        return valid + self.rng.randbytes(self.rng.choice([1, 3, 9]))

    # ------------------------------------------------------------------ near-valid requests
    def attack_spec(self, image: bool, targeted: bool = False) -> results.AttackSpec:
        norm = self.pick([results.LINF, results.L2])
        eps = (self.pick([0.03, 0.1, 0.3]) if norm == results.LINF else self.pick([0.5, 1.0])) if image else 0.5
        return results.AttackSpec(method=self.pick(["pgd", "fgsm", "square"]), norm=norm, eps=eps,
                                  steps=self.rng.randrange(0, 4), seed=self.rng.randrange(100), targeted=targeted)

    def near(self, method: str):
        fx, r = self.fx, self.rng
        model, dataset, shape, classes, domain = self.pick(fx.pairs)
        image = domain == "image"
        op_id = self.pick(fx.ops) if fx.ops else "op-none"
        limit = self.pick([0, 2, 4, 8])
        if method == "Attack":
            n = self.rng.randrange(1, 4)
            m = rpc.AttackRequest(model_id=model, x=to_tensor(self.np.random((n, *shape), dtype=np.float32)),
                                  y=to_tensor(self.np.integers(0, classes, n).astype(np.int64)),
                                  attack=self.attack_spec(image, r.random() < 0.2),
                                  domain=res.IMAGE if image else res.REAL)
            m.attack.steps = self.rng.randrange(1, 4)
        elif method == "Evaluate":
            m = rpc.EvaluateRequest(model_id=model, dataset_id=dataset, limit=limit or 4, batch_size=4)
            sweep = m.attacks.add(attack=self.attack_spec(image))
            sweep.eps.extend([sweep.attack.eps] * r.randrange(0, 3))
            if r.random() < 0.2:
                m.surrogate_model_id = fx.models[0]
        elif method == "Train":
            m = rpc.TrainRequest(architecture=self.pick(["linear", "mlp", "small_cnn"]), dataset_id=dataset,
                                 limit=limit or 8, epochs=1, batch_size=4, schedule="constant")
            if r.random() < 0.3:
                m.adversarial.CopyFrom(self.attack_spec(image))
            if r.random() < 0.3:
                m.arch_args[self.pick(["width", "hidden", "activation"])] = self.pick(
                    ["-1", "0", "4", "1e3", "100000", "abc", "", "relu", "gelu", "nope", "9" * 30])
        elif method == "Robustify":
            m = rpc.RobustifyRequest(model_id=fx.feature_models[0], dataset_id=self.pick(fx.datasets),
                                     limit=limit or 2, inversion=rpc.InversionSpec(steps=1), batch_size=2)
        elif method == "BuildNonRobustDataset":
            m = rpc.BuildNonRobustDatasetRequest(mode=r.randrange(0, 4), model_id=model, dataset_id=dataset,
                                                 limit=limit or 2, inversion=rpc.InversionSpec(steps=1),
                                                 attack=results.AttackSpec(steps=1), batch_size=2)
        elif method == "TransferRate":
            m = rpc.TransferRateRequest(source_model_ids=[model], target_model_ids=[model], dataset_id=dataset,
                                        limit=limit or 2, attack=self.attack_spec(image), batch_size=2)
        elif method in ("GetOperation", "CancelOperation", "WatchOperation"):
            m = message_factory.GetMessageClass(SERVICE.methods_by_name[method].input_type)(operation_id=op_id)
        elif method == "WaitOperation":
            m = op_pb.WaitOperationRequest(operation_id=op_id, timeout_seconds=self.pick([0.0, 0.01, 0.2]))
        elif method == "ListOperations":
            m = op_pb.ListOperationsRequest(kind=self.pick(["", "train", "evaluate"]), page_size=self.pick([0, 1, 5, 1000]),
                                            page_token=self.page_token())
        elif method in ("GetModel", "DeleteModel"):
            pool = fx.models if method == "GetModel" else fx.created_models or ["m-none"]
            m = message_factory.GetMessageClass(SERVICE.methods_by_name[method].input_type)(model_id=self.pick(pool))
        elif method in ("GetDataset", "DeleteDataset"):
            pool = fx.datasets if method == "GetDataset" else fx.created_datasets or ["ds-none"]
            m = message_factory.GetMessageClass(SERVICE.methods_by_name[method].input_type)(dataset_id=self.pick(pool))
        elif method == "DownloadDataset":
            m = rpc.DownloadDatasetRequest(dataset_id=self.pick(fx.datasets), limit=self.pick([1, 3, 0]),
                                           lossy_uint8=r.random() < 0.3)
            if m.dataset_id != fx.datasets[0] and m.limit == 0:
                m.limit = 5  # built-ins in full are big: keep the fuzz quick
        elif method == "ExportModel":
            m = res.ExportModelRequest(model_id=model, dataset_id=dataset, limit=limit or 2)
        elif method == "RegisterEndpoint":  # the fuzzed server allows no endpoint host: nothing is contacted
            endpoint = res.EndpointSpec(
                url=self.pick(["http://127.0.0.1:9", "grpc://[::1]:9", "https://10.0.0.1", "ftp://127.0.0.1:9",
                               "http://u:p@127.0.0.1:9", "http://127.0.0.1:9/v2", "grpc://127.0.0.1", ""]),
                model_name=self.pick(["linear", "../x", "", "a" * 200]), max_batch_size=self.pick([0, 1, 10 ** 6]))
            m = res.RegisterEndpointRequest(spec=res.ModelSpec(format=res.ENDPOINT, input_shape=list(shape),
                                                               num_classes=classes, endpoint=endpoint))
        elif method == "Audit":
            m = rpc.AuditRequest(name=self.pick(["nightly", "", "../x", "a" * 80]), dataset_id=dataset,
                                 limit=limit or 2, batch_size=2)
            m.targets.add(model_id=model, name=self.pick(["", "prod"]))
            sweep = m.attacks.add(attack=self.attack_spec(image))
            sweep.attack.steps = 1
            m.thresholds.add(norm=sweep.attack.norm, eps=sweep.attack.eps, min_robust_accuracy=self.pick([0.0, 0.5, 2.0]))
            if r.random() < 0.5:
                m.max_drop = self.pick([0.0, 0.1, -1.0, float("nan")])
        elif method == "ListAudits":
            m = rpc.ListAuditsRequest(target=self.pick([model, "", "prod"]), audit_name=self.pick(["", "nightly"]),
                                      page_size=self.pick([0, 1, 1000]), page_token=self.page_token())
        else:  # ListModels, ListDatasets
            m = message_factory.GetMessageClass(SERVICE.methods_by_name[method].input_type)(
                page_size=self.pick([0, 1, 2, 1000]), page_token=self.page_token())
        if r.random() < 0.85:
            self.mutate(m, self.pick([1, 1, 1, 2, 3]))
        return m

    # ------------------------------------------------------------------ uploads
    def hostile_file(self, fmt: str) -> tuple[str, bytes]:
        fx, r = self.fx, self.rng
        valid = fx.files.get(fmt, fx.files["safetensors"]) if fmt != "npz" else fx.npz
        how = r.randrange(17)
        if how == 0:
            return "valid", valid
        if how == 1:
            cut = r.randrange(1, max(2, len(valid)))
            return f"truncated at {cut}", valid[:cut]
        if how == 2:
            return "random bytes", r.randbytes(r.choice([1, 100, 5000]))
        if how == 3:
            b = bytearray(valid)
            for _ in range(r.randrange(1, 20)):
                b[r.randrange(len(b))] = r.randrange(256)
            return "bytes flipped", bytes(b)
        if how == 4:
            return "zip of garbage", _zip({"x.npy": r.randbytes(64), "y.npy": b"\x93NUMPY garbage",
                                           "archive/data.pkl": r.randbytes(32)})
        if how == 5:
            return "safetensors header claims 2**62 bytes", struct.pack("<Q", 2**62) + b"{}"
        if how == 6:
            header = r.choice([b'{"w": {"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 16]}}',
                               b'{"head.weight": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
                               b'{"__metadata__": 5}', b"not json", b'{"a": {"dtype": "F99"}}'])
            return "safetensors with a lying header", struct.pack("<Q", len(header)) + header + b"\0" * 16
        if how == 7:
            return "zip with a pickle", _zip({"archive/data.pkl": pickle.dumps(_Harmless()),
                                              "archive/version": b"3\n"})
        if how == 8:
            return "npz, x float64", _npz(x=np.zeros((4, 1, 28, 28)), y=np.zeros(4, np.int64))
        if how == 9:
            shape = r.choice([(4, 1, 28), (4, 1, 1, 28, 28), (4,), (0, 1, 28, 28)])
            return f"npz, x shape {shape}", _npz(x=np.zeros(shape, np.uint8), y=np.zeros(shape[0], np.int64))
        if how == 10:
            y = r.choice([np.array([2**62, 0, 1, 2]), np.array([-1, 0, 1, 2]), np.array([0.5] * 4),
                          np.zeros((4, 2), np.int64), np.zeros(3, np.int64), np.array([2**31 - 1] * 4),
                          np.array([10**6, 0, 1, 2])])
            return f"npz, y {y.dtype} {list(y.shape)} max {y.max()}", _npz(x=np.zeros((4, 1, 28, 28), np.uint8), y=y)
        if how == 11:
            x = np.full((4, 101), r.choice([np.nan, np.inf, 1e30]), np.float32)
            return "npz, x non-finite/huge", _npz(x=x, y=np.array([0, 1, 0, 1]))
        if how == 12:
            return "npz with object arrays", _npz(x=np.array([None, 1], dtype=object), y=np.zeros(2))
        if how == 13:
            # an .npy header that promises far more data than is there
            hdr = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 2), }"
            hdr = hdr + b" " * (127 - len(hdr)) + b"\n"
            return "npy header with a huge shape", _zip({"x.npy": hdr, "y.npy": hdr})
        if how == 14:
            return "compressed zeros (small zip bomb)", _zip({"x.npy": _npy_bytes(np.zeros((2000, 1, 28, 28), np.uint8)),
                                                               "y.npy": _npy_bytes(np.zeros(2000, np.int64))}, compress=True)
        if how == 15:
            if r.random() < 0.5:  # an .npy header that ends mid-expression
                hdr = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (3,"
                hdr = hdr + b" " * (127 - len(hdr)) + b"\n"
                return "npy header cut mid-expression", _zip({"x.npy": hdr, "y.npy": hdr})
            name = "archive/data.pkl"  # a stored member whose bytes no longer match its CRC-32
            b = bytearray(_zip({name: pickle.dumps({"a": 1}), "archive/version": b"3\n"}))
            b[30 + len(name) + 3] ^= 0xFF
            return "zip member with a bad CRC-32", bytes(b)
        return "empty", b""

    def upload(self, method: str) -> tuple[list[bytes], str]:
        fx, r = self.fx, self.rng
        if method == "UploadModel":
            fmt = self.pick(["safetensors", "safetensors_linear", "torchscript", "torch_export", "onnx"])
            head = res.ModelSpec()
            head.CopyFrom(fx.file_specs[fmt])
            if r.random() < 0.25:  # leave out what the file records
                head.ClearField("input_shape")
                head.num_classes = 0
            if r.random() < 0.6:
                self.mutate(head, self.pick([1, 1, 2]))
            first = res.UploadModelRequest(spec=head)
            what, data = self.hostile_file(fmt)
            wrap = lambda c: res.UploadModelRequest(chunk=c)  # noqa: E731
        else:
            fmt = "npz"
            head = res.UploadDatasetHeader(name="fuzz", split=self.pick(["train", "test", ""]))
            if r.random() < 0.6:
                self.mutate(head, self.pick([1, 1, 2]))
            first = res.UploadDatasetRequest(header=head)
            what, data = self.hostile_file(fmt)
            wrap = lambda c: res.UploadDatasetRequest(chunk=c)  # noqa: E731
        size = r.choice([1 << 20, 4096, 7 if len(data) < 1000 else 1024])
        chunks = [data[i:i + size] for i in range(0, len(data), size)][:2000]
        parts = [first.SerializeToString()] + [wrap(c).SerializeToString() for c in chunks]
        order = r.randrange(10)
        if order == 0:
            parts = parts[1:] + parts[:1]
            what += ", spec last"
        elif order == 1:
            parts = parts[:1] + parts
            what += ", spec twice"
        elif order == 2:
            parts = parts[:1]
            what += ", no chunks"
        elif order == 3:
            parts = []
            what += ", empty stream"
        elif order == 4 and parts:
            k = r.randrange(len(parts))
            parts[k] = self.raw_bytes(parts[k])
            what += f", message {k} garbled"
        return parts, f"{fmt}: {what}; head {_brief(head)}"

    # ------------------------------------------------------------------ one case
    def case(self, index: int) -> Case:
        r = self.rng
        u = r.random()
        method = self.pick(["UploadModel", "UploadDataset"]) if u < 0.18 else self.pick(METHODS)
        desc = SERVICE.methods_by_name[method]
        cls = message_factory.GetMessageClass(desc.input_type)
        if desc.client_streaming:
            if r.random() < 0.15:  # messages of random bytes
                parts = [self.raw_bytes(b"") for _ in range(r.randrange(0, 4))]
                return Case(index, method, "bytes", parts, f"{len(parts)} random messages {[p[:16] for p in parts]}")
            if r.random() < 0.2:  # random messages
                msgs = []
                for _ in range(r.randrange(1, 4)):
                    m = cls()
                    self.fill(m, 0, 0.7)
                    msgs.append(m)
                return Case(index, method, "random", [m.SerializeToString() for m in msgs],
                            " | ".join(_brief(m) for m in msgs))
            parts, what = self.upload(method)
            return Case(index, method, "upload", parts, what)
        v = r.random()
        if v < 0.2:
            valid = self.near(method).SerializeToString()
            data = self.raw_bytes(valid)
            return Case(index, method, "bytes", data, f"bytes {data[:48]!r} (len {len(data)})")
        if v < 0.5:
            m = cls()
            self.fill(m, 0, 0.6, for_delete=method.startswith("Delete"))
            return Case(index, method, "random", m.SerializeToString(), _brief(m))
        m = self.near(method)
        return Case(index, method, "near", m.SerializeToString(), _brief(m))


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


# ---------------------------------------------------------------------------------- runner

@dataclass
class Outcome:
    case: Case
    code: str
    details: str
    seconds: float


@dataclass
class Report:
    seed: int
    count: int
    outcomes: list[Outcome] = field(default_factory=list)
    alive: bool = False
    alive_detail: str = ""
    seconds: float = 0.0

    def counts(self) -> dict[str, dict[str, int]]:
        table: dict[str, collections.Counter] = {m: collections.Counter() for m in METHODS}
        for o in self.outcomes:
            table[o.case.method][o.code] += 1
        return {m: dict(sorted(c.items())) for m, c in table.items()}

    def bad(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code in BAD_CODES]

    def summary(self, limit: int = 5) -> str:
        bad = self.bad()
        lines = [f"{len(bad)} of {len(self.outcomes)} requests got {'/'.join(BAD_CODES)} (seed {self.seed})"]
        for o in bad[:limit]:
            lines.append(f"  {o.code}: {o.case.short()}\n      -> {o.details[:300]}")
        return "\n".join(lines)


class Runner:
    def __init__(self, target: str, metadata=(), deadline: float = 5.0) -> None:
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                                              ("grpc.max_send_message_length", MAX_MESSAGE)])
        self.metadata = tuple(metadata)
        self.deadline = deadline
        self.calls: dict[str, Callable] = {}
        for m in SERVICE.methods:
            path = f"/{SERVICE.full_name}/{m.name}"
            kind = {(False, False): self.channel.unary_unary, (False, True): self.channel.unary_stream,
                    (True, False): self.channel.stream_unary}[m.client_streaming, m.server_streaming]
            self.calls[m.name] = kind(path, request_serializer=None, response_deserializer=None)

    def close(self) -> None:
        self.channel.close()

    def send(self, case: Case) -> tuple[str, str, list[bytes]]:
        """(status code name, details, response messages as bytes)."""
        desc = SERVICE.methods_by_name[case.method]
        call = self.calls[case.method]
        try:
            if desc.server_streaming:
                stream = call(case.payload, metadata=self.metadata, timeout=self.deadline)
                out = []
                for item in stream:
                    out.append(item)
                    if len(out) >= 4:  # enough: hang up
                        stream.cancel()
                        return "OK", "(read 4 messages, then cancelled)", out
                return "OK", "", out
            if desc.client_streaming:
                return "OK", "", [call(iter(case.payload), metadata=self.metadata, timeout=self.deadline)]
            return "OK", "", [call(case.payload, metadata=self.metadata, timeout=self.deadline)]
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or "", []

    def cancel(self, op_id: str) -> None:
        try:
            self.calls["CancelOperation"](op_pb.CancelOperationRequest(operation_id=op_id).SerializeToString(),
                                          metadata=self.metadata, timeout=self.deadline)
        except grpc.RpcError:
            pass

    def alive(self) -> tuple[bool, str]:
        try:
            health = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=10)
            listed = res.ListDatasetsResponse.FromString(self.calls["ListDatasets"](
                res.ListDatasetsRequest().SerializeToString(), metadata=self.metadata, timeout=10))
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
        serving = health.status == health_pb2.HealthCheckResponse.SERVING
        return serving, f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}, " \
                        f"{len(listed.datasets)} datasets listed"


def fuzz(target: str, count: int, seed: int, fx: Fixtures, *, metadata=(), deadline: float = 5.0,
         progress: Optional[Callable[[int], None]] = None) -> Report:
    runner = Runner(target, metadata, deadline)
    gen = Generator(seed, fx)
    report = Report(seed, count)
    t0 = time.perf_counter()
    try:
        for i in range(count):
            case = gen.case(i)
            t = time.perf_counter()
            code, details, out = runner.send(case)
            report.outcomes.append(Outcome(case, code, details, time.perf_counter() - t))
            if code == "OK" and out:
                output = SERVICE.methods_by_name[case.method].output_type.full_name
                if output == "advex.v1.Operation" and not SERVICE.methods_by_name[case.method].server_streaming:
                    op = op_pb.Operation.FromString(out[0])
                    fx.ops.append(op.id)
                    if not op.done:
                        runner.cancel(op.id)  # long work that happened to be accepted
                elif case.method == "UploadModel":
                    fx.created_models.append(res.Model.FromString(out[0]).id)
                elif case.method == "UploadDataset":
                    fx.created_datasets.append(res.Dataset.FromString(out[0]).id)
                elif case.method.startswith("List") and len(fx.page_tokens) < 64:
                    listed = message_factory.GetMessageClass(SERVICE.methods_by_name[case.method].output_type)
                    token = listed.FromString(out[0]).next_page_token
                    if token and token not in fx.page_tokens:
                        fx.page_tokens.append(token)
            if progress is not None:
                progress(i)
        for op_id in fx.ops:
            runner.cancel(op_id)
        report.alive, report.alive_detail = runner.alive()
    finally:
        runner.close()
    report.seconds = time.perf_counter() - t0
    return report


# ---------------------------------------------------------------------------------- report

def versions() -> dict[str, str]:
    import google.protobuf
    import torch

    out = {"python": platform.python_version(), "grpcio": grpc.__version__,
           "protobuf": google.protobuf.__version__, "numpy": np.__version__, "torch": torch.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} CPU cores available, {platform.system()} {platform.release()}"


def write_report(report: Report, out: Path, command: str) -> None:
    counts = report.counts()
    codes = sorted({c for row in counts.values() for c in row})
    totals = collections.Counter(o.code for o in report.outcomes)
    kinds = collections.Counter(o.case.kind for o in report.outcomes)
    data = {"seed": report.seed, "count": report.count, "command": command, "machine": machine(),
            "versions": versions(), "seconds": round(report.seconds, 1), "server_settings": SERVER_SETTINGS,
            "alive_at_end": report.alive, "alive_detail": report.alive_detail,
            "internal_or_unknown": len(report.bad()), "totals": dict(sorted(totals.items())),
            "request_kinds": dict(sorted(kinds.items())), "by_method": counts,
            "offenders": [{"code": o.code, "case": o.case.short(), "details": o.details[:300]}
                          for o in report.bad()[:50]]}
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"# Fuzz: {report.count} requests over every RPC of advex.v1.Robustness", "",
             f"- command: `{command}`", f"- seed: {report.seed}", f"- machine: {data['machine']}",
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()),
             f"- server settings: " + ", ".join(f"{k}={v}" for k, v in SERVER_SETTINGS.items()),
             f"- wall time: {report.seconds:.1f} s ({report.count / max(report.seconds, 1e-9):.0f} requests/s)",
             f"- request kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
             + " (bytes: random or mangled serialized requests; random: messages with random/extreme fields; "
               "near: valid requests with 1-3 fields mutated; upload: client streams of hostile files)",
             f"- **INTERNAL or UNKNOWN: {len(report.bad())}**",
             f"- server alive at the end: {report.alive} ({report.alive_detail})", "",
             "| method | " + " | ".join(codes) + " | total |",
             "|---|" + "---:|" * (len(codes) + 1)]
    for m in METHODS:
        row = counts[m]
        lines.append(f"| {m} | " + " | ".join(str(row.get(c, "")) for c in codes) + f" | {sum(row.values())} |")
    lines.append("| **all** | " + " | ".join(f"**{totals.get(c, 0)}**" for c in codes) + f" | **{len(report.outcomes)}** |")
    if report.bad():
        lines += ["", "## INTERNAL / UNKNOWN", ""] + [f"- {o.code}: {o.case.short()} -> {o.details[:200]}"
                                                     for o in report.bad()[:50]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--deadline", type=float, default=5.0, help="seconds per request")
    ap.add_argument("--out", default="", help="write <out>.md and <out>.json (e.g. bench/results/fuzz-10000)")
    args = ap.parse_args(argv)

    import logging

    from advex.service.inprocess import InProcessServer

    logging.disable(logging.CRITICAL)  # the server logs every INTERNAL with a traceback; the report lists them
    roots = [r for r in os.environ.get("ADVEX_DATA_ROOT", "").split(os.pathsep) if r] + ["/usr/share/datasets"]
    command = "python bench/fuzz.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp, \
            InProcessServer(data_dir=tmp, data_roots=roots, **SERVER_SETTINGS) as srv:
        channel = grpc.insecure_channel(srv.target)
        fx = prepare(channel)
        channel.close()

        def progress(i: int) -> None:
            if (i + 1) % 1000 == 0:
                print(f"  {i + 1} requests", file=sys.stderr, flush=True)

        report = fuzz(srv.target, args.count, args.seed, fx, deadline=args.deadline, progress=progress)
    print(report.summary(10))
    print(f"alive at the end: {report.alive} ({report.alive_detail}); {report.seconds:.1f} s")
    for m, row in report.counts().items():
        print(f"  {m:24s} {row}")
    if args.out:
        write_report(report, Path(args.out), command)
        print(f"wrote {args.out}.md and .json")
    return 0 if report.alive and not report.bad() else 1


if __name__ == "__main__":
    sys.exit(main())
