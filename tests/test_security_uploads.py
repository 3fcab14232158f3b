"""Hostile uploads ("Safe to expose: hostile clients"): no upload runs code on the server, a
program is checked under time and memory limits, client strings never become paths, a zip bomb
is refused before it is decompressed, client numbers are bounded, and errors quote client input
cut short. Each test names the hole it closes; each failed on the code before the fix."""
from __future__ import annotations

import io
import json
import pickle
import time
import warnings
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from advex.client import Client
from advex.v1 import resources_pb2 as res

SHAPE = (1, 6, 6)


# `server` and `client`: conftest.py (an in-process server without data roots)


class _Marker:
    """Unpickled, it creates a file: proof that the upload ran the uploader's code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Marker(marker), protocol=2)


def refused(call, code=grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, (info.value.code(), info.value.details()[:500])
    return info.value.details()


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


@pytest.fixture(scope="module")
def pt2() -> bytes:
    torch.manual_seed(0)
    ep = torch.export.export(_Tiny().eval(), (torch.rand(2, *SHAPE),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


def rewrite(archive: bytes, edit=lambda rel, data: data, add: dict | None = None) -> bytes:
    """A copy of a zip archive with members edited (rel: the name under the top folder; None
    drops it) and members added."""
    src = zipfile.ZipFile(io.BytesIO(archive))
    root = src.namelist()[0].split("/", 1)[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            data = edit(name[len(root) + 1:], src.read(name))
            if data is not None:
                dst.writestr(name, data)
        for rel, data in (add or {}).items():
            dst.writestr(f"{root}/{rel}", data)
    return out.getvalue()


def edit_json(rel_wanted: str, change):
    def edit(rel, data):
        if rel != rel_wanted:
            return data
        d = json.loads(data)
        change(d)
        return json.dumps(d).encode()
    return edit


def upload(client: Client, data: bytes, fmt: str, **spec):
    return client.upload_model(data, format=fmt, **spec)


# ------------------------------------------------------------------ 1. no upload executes code

def test_genuine_export_still_uploads(client, pt2):
    m = upload(client, pt2, "torch_export")
    assert list(m.spec.input_shape) == list(SHAPE) and m.spec.num_classes == 3


def test_pt2_with_pickled_weight_is_refused_unloaded(client, pt2, tmp_path):
    marker = tmp_path / "weights-ran"

    def pickled(d):
        d["config"]["conv.weight"]["use_pickle"] = True

    data = rewrite(pt2, lambda rel, b: evil_pickle(marker) if rel == "data/weights/weight_0"
                   else edit_json("data/weights/model_weights_config.json", pickled)(rel, b))
    msg = refused(lambda: upload(client, data, "torch_export"))
    assert "pickle" in msg and "conv.weight" in msg and "export without pickled parts" in msg, msg
    assert not marker.exists(), "the uploader's pickle ran on the server"


def test_pt2_with_opaque_constant_is_refused_unloaded(client, pt2, tmp_path):
    marker = tmp_path / "opaque-ran"

    def add_const(d):
        d["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                               "tensor_meta": None}

    data = rewrite(pt2, edit_json("data/constants/model_constants_config.json", add_const),
                   add={"data/constants/opaque_obj_0": evil_pickle(marker)})
    msg = refused(lambda: upload(client, data, "torch_export"))
    assert "refused" in msg and "pickle" in msg, msg
    assert not marker.exists()


def test_pt2_with_pickled_sample_inputs_is_refused_unloaded(client, pt2, tmp_path):
    """torch loads the sample inputs with weights_only=True and, when that fails, with False."""
    marker = tmp_path / "sample-ran"
    data = rewrite(pt2, lambda rel, b: evil_pickle(marker) if rel == "data/sample_inputs/model.pt" else b)
    msg = refused(lambda: upload(client, data, "torch_export"))
    assert "sample inputs" in msg and "pickle" in msg, msg
    assert not marker.exists()


def test_pt2_with_python_in_a_symbolic_shape_is_refused_unloaded(client, pt2, tmp_path):
    """torch.export.load hands expr_str to sympy.sympify, which evaluates it as Python."""
    marker = tmp_path / "sympify-ran"

    def inject(rel, b):
        if rel != "models/model.json":
            return b
        text = b.decode()
        assert '"expr_str": "Symbol' in text
        return text.replace('"expr_str": "Symbol', f'"expr_str": "open(\'{marker}\', \'w\') and Symbol', 1).encode()

    msg = refused(lambda: upload(client, rewrite(pt2, inject), "torch_export"))
    assert "symbolic shape" in msg and "not a plain shape expression" in msg, msg
    assert not marker.exists()


def test_pt2_with_python_in_a_guard_is_refused_unloaded(client, pt2, tmp_path):
    """ExportedProgram.module() exec's guards_code."""
    marker = tmp_path / "guard-ran"
    data = rewrite(pt2, edit_json("models/model.json", lambda d: d.__setitem__(
        "guards_code", [f"open('{marker}', 'w') is not None"])))
    msg = refused(lambda: upload(client, data, "torch_export"))
    assert "guard" in msg and "not a plain shape expression" in msg, msg
    assert not marker.exists()


def test_pt2_calling_python_through_torch_is_refused():
    """A node target 'torch.<anything>' is resolved by getattr on the torch module (torch.os.system)."""
    from advex.engine.loaders import UnsafeModel, _check_program_json

    with pytest.raises(UnsafeModel, match="torch.os.system"):
        _check_program_json({"graph_module": {"graph": {"nodes": [
            {"target": "torch.os.system", "inputs": [], "outputs": []}]}}})
    with pytest.raises(UnsafeModel, match="file access"):
        _check_program_json({"graph_module": {"graph": {"nodes": [
            {"target": "torch.ops.aten.save.default", "inputs": [], "outputs": []}]}}})
    _check_program_json({"graph_module": {"graph": {"nodes": [
        {"target": "torch.ops.aten.conv2d.default", "inputs": [], "outputs": []},
        {"target": "_operator.getitem", "inputs": [], "outputs": []}]}},
        "guards_code": ["L['x'].size()[0] <= 1024"]})


def test_pt2_with_compiled_code_is_refused(client, pt2):
    data = rewrite(pt2, add={"data/aotinductor/model/model.so": b"\x7fELF"})
    msg = refused(lambda: upload(client, data, "torch_export"))
    assert "AOTInductor" in msg, msg


def _script(module: nn.Module) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = io.BytesIO()
        torch.jit.save(torch.jit.script(module), buf)
        return buf.getvalue()


def test_torchscript_naming_a_python_global_is_refused(client, tmp_path):
    marker = tmp_path / "ts-ran"
    good = _script(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)))
    data = rewrite(good, lambda rel, b: evil_pickle(marker) if rel == "data.pkl" else b)
    msg = refused(lambda: upload(client, data, "torchscript", input_shape=list(SHAPE)))
    assert "Python global" in msg and "io.open" in msg, msg
    assert not marker.exists()
    m = upload(client, good, "torchscript", input_shape=list(SHAPE))
    assert m.spec.num_classes == 3


class _Writes(nn.Module):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x):
        torch.save(x, self.path)
        return x.flatten(1)[:, :3]


def test_torchscript_writing_files_is_refused_unrun(client, tmp_path):
    marker = tmp_path / "ts-wrote"
    msg = refused(lambda: upload(client, _script(_Writes(str(marker))), "torchscript", input_shape=list(SHAPE)))
    assert "torch.save" in msg and "files" in msg, msg
    assert not marker.exists()


def test_plain_checkpoints_load_weights_only():
    """The only torch.load of the engine / service is weights_only=True."""
    root = Path(__file__).resolve().parents[1]
    for folder in ("engine/advex", "service/advex"):
        for path in (root / folder).rglob("*.py"):
            code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
            for at in [i for i in range(len(code)) if code.startswith("torch.load(", i)]:
                call = code[at:code.find(")\n", at) + 1]
                assert "weights_only=True" in call, f"{path}: {call}"


# ------------------------------------------------------------------ 2. checks under limits

def _limits(server, **kw):
    try:
        from advex.service.sandbox import Limits
    except ImportError:  # the code before the fix: no limits to set
        return None
    old = getattr(server.running.registry, "check_limits", None)
    server.running.registry.check_limits = Limits(**kw)
    return old


class _Slow(nn.Module):
    def forward(self, x):
        a = torch.ones(64, 64)
        for _ in range(1_000_000_000):
            a = torch.tanh(a @ a)
        return x.flatten(1)[:, :3] + a[0, :3]


class _Huge(nn.Module):
    def forward(self, x):
        big = torch.empty([1 << 30])  # 4 GiB of address space, never touched
        return x.flatten(1)[:, :3] + big[:1] * 0


def test_a_program_that_never_ends_is_refused_within_the_time_limit(server, client):
    old = _limits(server, timeout_s=4.0, memory_mb=2048)
    try:
        spec = res.ModelSpec(format=res.TORCHSCRIPT, input_shape=list(SHAPE))
        parts = [res.UploadModelRequest(spec=spec), res.UploadModelRequest(chunk=_script(_Slow()))]
        t0 = time.monotonic()
        msg = refused(lambda: client.stub.UploadModel(iter(parts), timeout=40))
        took = time.monotonic() - t0
        assert "longer than the limit of 4 s" in msg and "upload_check_timeout_s" in msg, msg
        assert took < 30, took
    finally:
        if old is not None:
            server.running.registry.check_limits = old
    assert client.list_models() is not None  # the server is healthy: it answers and still takes uploads
    assert upload(client, _script(nn.Sequential(nn.Flatten(), nn.Linear(36, 4))), "torchscript",
                  input_shape=list(SHAPE)).spec.num_classes == 4


def test_a_program_that_allocates_too_much_is_refused_by_the_memory_limit(server, client):
    old = _limits(server, timeout_s=60.0, memory_mb=1024)
    try:
        msg = refused(lambda: upload(client, _script(_Huge()), "torchscript", input_shape=list(SHAPE)))
        assert "memory" in msg and "1024 MiB" in msg and "upload_check_memory_mb" in msg, msg
    finally:
        if old is not None:
            server.running.registry.check_limits = old


# ------------------------------------------------------------------ 3. paths come from the server

def _npz(n: int = 4, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(buf, x=rng.random((n, 4), dtype=np.float32), y=np.arange(n) % 2)
    return buf.getvalue()


def test_a_split_never_becomes_a_path(server, client, tmp_path):
    reg = server.running.registry
    other = client.upload_dataset(_npz(seed=1), split="train")
    stored = reg.dataset_file(other.id, "train")
    before = stored.read_bytes()
    data_dir = Path(server.cfg.data_dir)
    outside = tmp_path / "outside"
    for split in (str(outside), "../escape", "../../escape", "a\x00b", "a/b", f"../{other.id}/train", "x" * 40,
                  "Train\n"):
        msg = refused(lambda: client.upload_dataset(_npz(seed=2), split=split))
        assert msg.startswith("header.split:"), msg
    assert stored.read_bytes() == before, "another dataset's stored file was overwritten"
    assert not (tmp_path / "outside.npz").exists()
    assert not list(data_dir.parent.glob("*.npz"))
    registered = {reg.dataset_file(d.id, next(iter(d.splits))) for d in client.list_datasets() if d.kind != "builtin"}
    assert set(data_dir.rglob("*.npz")) == registered, "a refused upload left a file behind"
    ok = client.upload_dataset(_npz(), split="val-1_b")
    assert dict(ok.splits) == {"val-1_b": 4}
    assert reg.dataset_file(ok.id, "val-1_b").parent == reg.datasets_dir / ok.id


def test_names_are_bounded_printable_text(client):
    msg = refused(lambda: client.upload_dataset(_npz(), name="evil\x1b[2J"))
    assert msg.startswith("header.name:") and "printable" in msg, msg
    msg = refused(lambda: client.upload_dataset(_npz(), name="n" * 10_000))
    assert msg.startswith("header.name:") and "128" in msg and len(msg) < 400, msg[:500]
    msg = refused(lambda: client.upload_dataset(_npz(), class_names=["a", "b" * 1000]))
    assert msg.startswith("header.class_names[1]:"), msg[:500]
    # each name within its limit, but together over 1 MiB: every Get and List of the record would carry them
    many = [f"{k:06d}" + "n" * 120 for k in range(9000)]
    msg = refused(lambda: client.upload_dataset(_npz(), class_names=many))
    assert msg.startswith("header.class_names:") and "at most 1048576" in msg, msg[:500]
    msg = refused(lambda: client.upload_model(b"x", format="onnx", name="m\x00"))
    assert msg.startswith("spec.name:"), msg


# ------------------------------------------------------------------ 4. zip bombs

def _npy_header(shape, dtype) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                              "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _bomb_zeros(mib: int) -> bytes:
    """A deflated .npz whose x holds `mib` MiB of float32 zeros (a few hundred KiB on the wire)."""
    n = (mib << 20) // 4 // 16
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            f.write(_npy_header((n, 16), np.float32))
            block = bytes(16 << 20)
            left = n * 16 * 4
            while left:
                f.write(block[:min(left, len(block))])
                left -= min(left, len(block))
        zf.writestr("y.npy", _npy_header((n,), np.int8) + bytes(n))
    return out.getvalue()


def _bomb_lying_header() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", _npy_header((1 << 31, 4), np.float32) + bytes(64))
        zf.writestr("y.npy", _npy_header((1 << 31,), np.int64) + bytes(64))
    return out.getvalue()


def _bomb_many_members() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((2, 4), np.float32), y=np.array([0, 1]))
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in src.namelist():
            zf.writestr(name, src.read(name))
        for k in range(3000):
            zf.writestr(f"pad{k}.npy", bytes(1 << 14))
    return out.getvalue()


def _object_dtype() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr("x.npy", _npy_header((2, 4), object) + pickle.dumps(np.zeros((2, 4), object)))
        zf.writestr("y.npy", _npy_header((2,), np.int64) + bytes(16))
    return out.getvalue()


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_zip_bombs_are_refused_before_they_cost_memory(client):
    bombs = {"deflated zeros": _bomb_zeros(512), "lying header": _bomb_lying_header(),
             "many members": _bomb_many_members(), "object dtype": _object_dtype()}
    assert len(bombs["deflated zeros"]) < (2 << 20)
    _peak_rss_reset()
    before = _peak_rss()
    for what, data in bombs.items():
        msg = refused(lambda: client.upload_dataset(data))
        assert msg.startswith("chunk:"), (what, msg)
    grew = _peak_rss() - before
    assert grew < 200 << 20, f"peak RSS grew by {grew >> 20} MiB for the bombs"


def test_npz_directory_checks():
    from advex.service.errors import ServiceError
    from advex.service.registry import check_npz

    def refuses(data: bytes, max_bytes: int = 1 << 30) -> str:
        path = Path(__import__("tempfile").mkstemp(suffix=".npz")[1])
        path.write_bytes(data)
        try:
            with pytest.raises(ServiceError) as info:
                check_npz(path, max_bytes)
            return info.value.message
        finally:
            path.unlink()

    assert "exactly the arrays" in refuses(_bomb_many_members())
    assert "header says" in refuses(_bomb_lying_header())
    assert "not accepted" in refuses(_object_dtype())
    small = io.BytesIO()
    np.savez(small, x=np.zeros((300, 1000), np.float32), y=np.zeros(300, np.int64))
    assert "at most 1048576 (1 MiB)" in refuses(small.getvalue(), max_bytes=1 << 20)


# ------------------------------------------------------------------ 5. client numbers in ModelSpec

@pytest.fixture(scope="module")
def cnn_bytes() -> bytes:
    from advex.engine.loaders import safetensors_bytes
    from advex.engine.zoo import build

    return safetensors_bytes(build("small_cnn", (1, 8, 8), 3, {"width": 4}))


@pytest.mark.parametrize("spec, field", [
    (dict(input_shape=[2 ** 62, 2 ** 62, 1]), "spec.input_shape: need 1 to 3 dims without the batch dim, each in [1, 4096]"),
    (dict(input_shape=[3, 5000, 5000]), "spec.input_shape: need 1 to 3 dims without the batch dim, each in [1, 4096]"),
    (dict(input_shape=[3, 2048, 2048]), "spec.input_shape: [3, 2048, 2048] is 12582912 values per example"),
    (dict(num_classes=2 ** 31 - 1), "spec.num_classes: at most 100000"),
    (dict(arch_args={"width": "-5"}), "spec.arch_args[width]"),
    (dict(arch_args={"width": "100000"}), "spec.arch_args[width]"),
    (dict(arch_args={"depth": "3"}), "spec.arch_args"),
    (dict(architecture="mlp", input_shape=[64], arch_args={"hidden": str(10 ** 9)}), "spec.arch_args[hidden]"),
    (dict(architecture="mlp", input_shape=[64], arch_args={"activation": "os.system"}), "spec.arch_args[activation]"),
    (dict(architecture="linear", input_shape=[3, 1024, 1024], num_classes=100_000), "spec.arch_args"),
    (dict(mean=[float("nan")]), "spec.mean"),
    (dict(std=[float("inf")]), "spec.std"),
    (dict(std=[0.0]), "spec.std"),
    (dict(labels={"team": "x" * 200_000}), "spec.labels[team]"),
    (dict(labels={f"k{i}": "v" for i in range(1000)}), "spec.labels"),
    (dict(labels={"../x": "v"}), "spec.labels"),
])
def test_model_spec_numbers_are_bounded(client, cnn_bytes, spec, field):
    args = dict(architecture="small_cnn", num_classes=3, input_shape=[1, 8, 8], **{"arch_args": {"width": "4"}})
    args.update(spec)
    msg = refused(lambda: client.upload_model(cnn_bytes, format="safetensors", **args))
    assert msg.startswith(field if ":" in field else field + ":"), msg[:500]
    assert len(msg) < 600, len(msg)


def test_list_models_stays_small_after_refused_label_floods(client, cnn_bytes):
    for _ in range(4):
        refused(lambda: client.upload_model(cnn_bytes, format="safetensors", architecture="small_cnn",
                                            num_classes=3, input_shape=[1, 8, 8], arch_args={"width": "4"},
                                            labels={"big": "x" * (1 << 20)}))
    assert sum(m.ByteSize() for m in client.list_models()) < 1 << 20


def test_dataset_label_indices_are_bounded(client):
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((2, 4), np.float32), y=np.array([0, 2 ** 62]))
    msg = refused(lambda: client.upload_dataset(buf.getvalue()))
    assert msg.startswith("chunk:") and "100000" in msg, msg
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((2, 4), np.float32), y=np.array([0, 2 ** 63 + 5], dtype=np.uint64))
    msg = refused(lambda: client.upload_dataset(buf.getvalue()))
    assert msg.startswith("chunk:"), msg
    msg = refused(lambda: client.upload_dataset(_npz(), num_classes=2 ** 31 - 1))
    assert msg.startswith("header.num_classes:"), msg


# ------------------------------------------------------------------ 6. errors quote client input cut short

@pytest.mark.parametrize("call", ["get_model", "get_dataset", "delete_dataset", "delete_model"])
def test_a_huge_id_is_not_found_with_a_short_message(client, call):
    huge = "m-" + "A" * 100_000
    msg = refused(lambda: getattr(client, call)(huge), grpc.StatusCode.NOT_FOUND)
    assert len(msg) < 300 and "not found" in msg, msg[:500]


def test_quote_cuts_long_values():
    from advex.service.text import quote

    assert quote("abc") == "'abc'"
    cut = quote("x" * 100_000)
    assert len(cut) < 150 and cut.startswith("'xxx") and "more characters" in cut
