"""ONNX graphs run through onnxruntime's IO binding: the logits are bit for bit what session.run
gave, nothing goes through numpy, a wrong output shape fails as before, and the onnx_provider
setting is checked when the configuration is read, falls back with a warning naming the
provider asked for and the one used, and reaches the models the server loads."""
from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest
import torch

from advex.client import Client
from advex.engine.blackbox import BlackBoxNet
from advex.engine.loaders import ModelLoadError, ShapeMismatch, check_model
from advex.engine.models import ModelInfo, ModelWrapper
from advex.service import config as config_mod
from advex.service.inprocess import InProcessServer

from conftest import require_module

SHAPE = (1, 4, 4)
CLASSES = 5


def graph(classes: int = CLASSES, *, class_dim=None, out_type: str = "FLOAT", nhwc: bool = False,
          extra_dim: bool = False) -> bytes:
    """logits = relu(flatten(x) @ W1) @ W2, input [batch, 1, 4, 4] (NHWC: [batch, 4, 4, 1]), output
    [batch, classes] declared with `class_dim` (a name: symbolic) and cast to `out_type`;
    extra_dim: the output is [batch, 1, classes] (not logits)."""
    require_module("onnxruntime", "pip install 'advex[server]'")
    onnx = require_module("onnx", "pip install onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, classes)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["z"])]
    out_dims = ["batch", class_dim or classes]
    if extra_dim:
        nodes.append(helper.make_node("Unsqueeze", ["z", "axes"], ["z3"]))
        out_dims = ["batch", 1, classes]
    nodes.append(helper.make_node("Cast", [nodes[-1].output[0]], ["logits"], to=getattr(TensorProto, out_type)))
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    if extra_dim:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    g = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *((4, 4, 1) if nhwc else SHAPE)])],
        [helper.make_tensor_value_info("logits", getattr(TensorProto, out_type), out_dims)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def old_path(data: bytes, layout: str = "NCHW", value_range: str = "0-1") -> BlackBoxNet:
    """What OnnxNet.forward did before: to_layout (numpy), session.run, torch.from_numpy."""
    from advex.engine.onnx_model import onnxruntime

    session = onnxruntime().InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return BlackBoxNet(lambda a: session.run(None, {name: a})[0], layout, value_range)


def bound(data: bytes, layout: str = "NCHW", value_range: str = "0-1", **kw):
    """An OnnxNet whose session.run fails: only the bound path may run it."""
    from advex.engine.onnx_model import OnnxNet

    net = OnnxNet(data, SHAPE, layout, value_range, "cpu", **kw)

    def no_run(*args, **kwargs):
        raise AssertionError("session.run was called: the batch went through numpy")

    net.session.run = no_run
    return net


@pytest.mark.parametrize("case", [
    dict(), dict(class_dim="classes"), dict(out_type="DOUBLE"), dict(out_type="FLOAT16"),
    dict(nhwc=True, layout="NHWC", value_range="0-255"),
])
def test_bound_logits_are_bit_identical_to_session_run(case):
    layout, value_range = case.pop("layout", "NCHW"), case.pop("value_range", "0-1")
    data = graph(**case)
    net, ref = bound(data, layout, value_range), old_path(data, layout, value_range)
    assert net.provider == "CPUExecutionProvider"
    for n in (3, 8, 1, 0):  # a symbolic class count is learned at the first batch, then preallocated
        x = torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(n))
        got, want = net(x), ref(x)
        assert got.dtype == torch.float32 and got.shape == want.shape == (n, CLASSES)
        assert torch.equal(got, want), (case, n)
    x64 = torch.rand((4, *SHAPE), dtype=torch.float64)  # a float64 batch is cast as to_layout did
    assert torch.equal(net(x64), ref(x64))
    assert torch.equal(net(x.permute(0, 1, 3, 2)), ref(x.permute(0, 1, 3, 2)))  # not contiguous


def test_the_binding_path_never_touches_numpy(monkeypatch):
    data = graph(class_dim="classes")  # the first batch also measures the class count
    net, ref = bound(data), old_path(data)
    x = torch.rand((6, *SHAPE))
    want = ref(x)
    runs = []
    real_run = net.session.run_with_iobinding
    monkeypatch.setattr(net.session, "run_with_iobinding", lambda b, *a: runs.append(1) or real_run(b, *a))

    def forbidden(*args, **kwargs):
        raise AssertionError("numpy was used on the ONNX path")

    for target, name in ((torch.Tensor, "numpy"), (torch, "from_numpy"), (np, "asarray"), (np, "ascontiguousarray"),
                         (np, "array")):
        monkeypatch.setattr(target, name, forbidden)
    got = net(x)
    assert net(x[:0]).shape == (0, CLASSES)
    monkeypatch.undo()
    assert torch.equal(got, want) and runs


def test_a_wrong_output_shape_fails_as_before():
    """check_model names the declared and the real class count, or the output that is not logits,
    in the same words as with session.run; a preallocated buffer of a wrong shape is recovered from."""
    info = ModelInfo("onnx", SHAPE, 7)
    for data, error, words in ((graph(), ShapeMismatch, "7 given, but the model returns 5 logits per example"),
                               (graph(class_dim="classes"), ShapeMismatch, "7 given, but the model returns 5"),
                               (graph(extra_dim=True), ModelLoadError, "model returns shape [2, 1, 5] for a batch")):
        with pytest.raises(error) as old:
            check_model(ModelWrapper(old_path(data), info))
        with pytest.raises(error) as new:
            check_model(ModelWrapper(bound(data), info))
        assert str(new.value) == str(old.value) and type(new.value) is type(old.value)
        assert str(new.value).startswith(words), str(new.value)
    net = bound(graph())
    net._out_tail = (7,)  # what the graph said is not what it gives: measured, then bound right
    x = torch.rand((3, *SHAPE))
    assert torch.equal(net(x), old_path(graph())(x)) and net._out_tail == (CLASSES,)


def test_a_provider_onnxruntime_lacks_or_cannot_start_falls_back_with_a_warning(monkeypatch, caplog):
    from advex.engine import onnx_model

    ort = onnx_model.onnxruntime()
    data = graph()
    caplog.set_level(logging.WARNING, logger="advex.onnx")
    # a CPU server: the GPU providers are not tried
    net = bound(data, provider="tensorrt")
    assert net.provider == "CPUExecutionProvider"
    # a GPU server whose onnxruntime has no TensorRT (nor CUDA) provider
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_model.OnnxNet(data, SHAPE, device="cuda:0", provider="tensorrt").provider == "CPUExecutionProvider"
    # one that has it, but whose session cannot be created with it (no TensorRT libraries)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    real, asked = ort.InferenceSession, []

    def session(model, sess_options=None, providers=None, **kw):
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        asked.append(names)
        if "TensorrtExecutionProvider" in names:
            raise RuntimeError("libnvinfer.so.10: cannot open shared object file")
        return real(model, sess_options=sess_options, providers=providers, **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)
    net = onnx_model.OnnxNet(data, SHAPE, device="cuda:0", provider="tensorrt")
    assert net.provider == "CPUExecutionProvider"
    assert asked == [["TensorrtExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]
    x = torch.rand((2, *SHAPE))
    assert torch.equal(net(x), old_path(data)(x))  # a CPU batch runs on the CPU session
    warnings = [r for r in caplog.records if r.name == "advex.onnx" and r.levelno == logging.WARNING]
    assert len(warnings) == 3, [r.getMessage() for r in warnings]
    for record in warnings:
        text = record.getMessage()
        assert "TensorrtExecutionProvider" in text and "CPUExecutionProvider" in text and "tensorrt" in text, text
    assert "device to be a CUDA GPU (it is cpu)" in warnings[0].getMessage()
    assert "no TensorrtExecutionProvider" in warnings[1].getMessage()
    assert "libnvinfer" in warnings[2].getMessage()
    caplog.clear()
    assert bound(data, provider="cpu").provider == "CPUExecutionProvider" and not caplog.records  # asked, got
    with pytest.raises(ValueError, match="onnx_provider must be one of auto, cpu, cuda, tensorrt"):
        onnx_model.OnnxNet(data, SHAPE, provider="gpu")


@pytest.mark.parametrize("argv,env,source", [
    (["--onnx-provider", "tpu"], {}, "flag --onnx-provider"),
    ([], {"ADVEX_ONNX_PROVIDER": "TensorRT"}, "environment ADVEX_ONNX_PROVIDER"),
])
def test_onnx_provider_is_checked_when_the_configuration_is_read(argv, env, source):
    parser = argparse.ArgumentParser()
    config_mod.add_arguments(parser)
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(parser.parse_args(argv), env=env)
    value = (argv or list(env.values()))[-1]
    assert str(info.value) == (f"onnx_provider: {value!r} from {source} is not valid "
                               "(expected one of auto, cpu, cuda, tensorrt)")
    assert config_mod.load(parser.parse_args([]), env={}).onnx_provider == "auto"
    assert config_mod.load(parser.parse_args(["--onnx-provider", "tensorrt"]), env={}).onnx_provider == "tensorrt"
    with pytest.raises(config_mod.ConfigError, match="^onnx_provider: 'gpu' from keyword argument onnx_provider"):
        config_mod.from_kwargs(onnx_provider="gpu")
    from advex.engine.onnx_model import ONNX_PROVIDERS

    assert config_mod.ONNX_PROVIDERS == ONNX_PROVIDERS


def test_the_server_setting_reaches_the_onnx_models_it_loads(tmp_path, caplog):
    data = graph()
    x = np.random.default_rng(1).random((4, *SHAPE), dtype=np.float32)
    with torch.no_grad():
        expected = old_path(data)(torch.from_numpy(x)).argmax(1).numpy()
    caplog.set_level(logging.WARNING, logger="advex.onnx")
    with InProcessServer(data_dir=str(tmp_path / "d"), data_roots=[], device="cpu", onnx_provider="tensorrt") as srv, \
            Client(srv.target) as c:
        m = c.upload_model(data, format="onnx", num_classes=CLASSES, input_shape=list(SHAPE))
        assert m.execution_provider == "CPUExecutionProvider"  # the GPU providers need a CUDA device
        out = c.attack(m.id, x, [0] * 4, norm="Linf", eps=0.01, method="square", steps=1)
        assert np.array_equal(out.clean_pred, expected)
        assert srv.running.registry.load_model(m.id)[1].net.provider == "CPUExecutionProvider"
    assert any("onnx_provider tensorrt asked for TensorrtExecutionProvider, but CPUExecutionProvider runs it"
               in r.getMessage() for r in caplog.records if r.name == "advex.onnx")
