"""Uploads without --input-shape / --num-classes: the server reads them from the file where the
format records them (ONNX graphs, torch.export programs, zoo weights), requires them by name
where it does not (TorchScript), and says precisely when a given value contradicts the file."""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from advex.client import Client
from advex.engine.loaders import save_safetensors
from advex.engine.zoo import build
from advex.service.inprocess import InProcessServer

from conftest import require_module

CLASSES = 5
SHAPE = [1, 12, 12]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with InProcessServer(data_dir=str(tmp_path_factory.mktemp("upload")), data_roots=[]) as srv, \
            Client(srv.target) as c:
        yield c


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, CLASSES)).eval()


def upload(c: Client, data, fmt: str, **spec):
    """The SDK call the CLI makes when the user leaves the shape and classes out."""
    spec.setdefault("num_classes", 0)
    spec.setdefault("input_shape", [])
    return c.upload_model(data, format=fmt, **spec)


def refused(c: Client, data, fmt: str, **spec) -> str:
    with pytest.raises(grpc.RpcError) as info:
        upload(c, data, fmt, **spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details()


def onnx_linear(example: list[int], classes: int = CLASSES, class_dim=None) -> tuple[bytes, np.ndarray]:
    """A graph y = flatten(x) @ W with input [batch, *example] and output [batch, classes]."""
    onnx = require_module("onnx", "pip install onnx")
    from onnx import TensorProto, helper, numpy_helper

    n = int(np.prod(example))
    w = np.random.default_rng(0).standard_normal((n, classes)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "W"], ["logits"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *example])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", class_dim or classes])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString(), w


def test_onnx_upload_reads_input_shape_and_classes_from_the_graph(client):
    require_module("onnxruntime", "pip install 'advex[server]'")
    graph, w = onnx_linear(SHAPE)
    m = upload(client, graph, "onnx")
    assert list(m.spec.input_shape) == SHAPE and m.spec.num_classes == CLASSES
    assert list(client.get_model(m.id).spec.input_shape) == SHAPE  # recorded, not just answered
    x = np.random.default_rng(1).random((4, *SHAPE), dtype=np.float32)
    out = client.attack(m.id, x, [0] * 4, norm="Linf", eps=0.01, method="square", steps=1)
    assert np.array_equal(out.clean_pred, (x.reshape(4, -1) @ w).argmax(1))
    # a declared NHWC layout: the graph's [batch, H, W, C] is advex's [C, H, W]
    nhwc, _ = onnx_linear([12, 12, 3])
    m = upload(client, nhwc, "onnx", layout="NHWC")
    assert list(m.spec.input_shape) == [3, 12, 12] and m.spec.num_classes == CLASSES
    # undeclared, a channels-last looking input is not silently taken as 12 channels
    details = refused(client, nhwc, "onnx")
    assert details.startswith("spec.layout:") and "NHWC" in details
    # a graph whose class count is symbolic: measured by running it once
    dyn, _ = onnx_linear(SHAPE, class_dim="classes")
    assert upload(client, dyn, "onnx").spec.num_classes == CLASSES


def test_onnx_given_values_that_contradict_the_graph_are_named(client):
    require_module("onnxruntime", "pip install 'advex[server]'")
    graph, _ = onnx_linear(SHAPE)
    details = refused(client, graph, "onnx", input_shape=[3, 32, 32], num_classes=10)
    assert details.startswith("spec.input_shape: [3, 32, 32] given, but the graph's input 'x' is "
                              "[batch, 1, 12, 12]"), details
    assert "--input-shape 1,12,12" in details and "batch dimension" not in details
    details = refused(client, graph, "onnx", num_classes=10)
    assert details.startswith("spec.num_classes: 10 given, but the graph's output 'logits' is [batch, 5]"), details


def test_torch_export_upload_reads_input_shape_and_classes_from_the_program(client, net, tmp_path):
    program = torch.export.export(net, (torch.rand(4, *SHAPE),), dynamic_shapes={"input": {0: torch.export.Dim("batch")}})
    torch.export.save(program, tmp_path / "m.pt2")
    m = upload(client, tmp_path / "m.pt2", "torch_export")
    assert list(m.spec.input_shape) == SHAPE and m.spec.num_classes == CLASSES
    x = np.random.default_rng(2).random((3, *SHAPE), dtype=np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).argmax(1).numpy()
    assert np.array_equal(client.attack(m.id, x, [0] * 3, norm="L2", eps=0.01, steps=1).clean_pred, expected)
    # a wrong shape is named as such (it used to be reported as a batch-dimension problem)
    details = refused(client, tmp_path / "m.pt2", "torch_export", input_shape=[3, 32, 32], num_classes=CLASSES)
    assert details.startswith("spec.input_shape: [3, 32, 32] given, but the program's input 'input' is "
                              "[batch, 1, 12, 12]"), details
    assert "batch dimension" not in details and "--input-shape 1,12,12" in details
    details = refused(client, tmp_path / "m.pt2", "torch_export", num_classes=10)
    assert details.startswith("spec.num_classes: 10 given, but the program's output"), details


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.14 deprecates TorchScript
def test_torchscript_needs_the_input_shape_and_measures_the_classes(client, net):
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(net), buf)
    details = refused(client, buf.getvalue(), "torchscript")
    assert details == ("spec.input_shape: required for torchscript models (the file does not record it): "
                       "pass --input-shape C,H,W")
    m = upload(client, buf.getvalue(), "torchscript", input_shape=SHAPE)  # classes: read by running it
    assert list(m.spec.input_shape) == SHAPE and m.spec.num_classes == CLASSES
    details = refused(client, buf.getvalue(), "torchscript", input_shape=[3, 12, 12])
    assert details.startswith("spec.input_shape: the model fails on a batch of two examples of the declared "
                              "input_shape [3, 12, 12]"), details
    assert "batch dimension" not in details and "expected input[2, 3, 12, 12] to have 1 channels" in details
    assert "\n" not in details  # TorchScript's interpreter traceback is left out
    details = refused(client, buf.getvalue(), "torchscript", input_shape=SHAPE, num_classes=10)
    assert details.startswith("spec.num_classes: 10 given, but the model returns 5 logits per example"), details


def test_zoo_weights_give_the_classes_and_what_they_know_of_the_input(client, tmp_path):
    torch.manual_seed(0)
    save_safetensors(build("small_cnn", (1, 12, 12), 7, {"width": 4}), tmp_path / "cnn.safetensors")
    cnn = dict(architecture="small_cnn", arch_args={"width": 4})
    m = upload(client, tmp_path / "cnn.safetensors", "safetensors", input_shape=SHAPE, **cnn)
    assert m.spec.num_classes == 7 and list(m.spec.input_shape) == SHAPE
    details = refused(client, tmp_path / "cnn.safetensors", "safetensors", **cnn)
    assert details == ("spec.input_shape: required for safetensors weights of small_cnn (they record the "
                       "channels, 1, but not the height and width): pass --input-shape 1,H,W"), details
    details = refused(client, tmp_path / "cnn.safetensors", "safetensors", input_shape=[3, 12, 12], **cnn)
    assert details.startswith("spec.input_shape: [3, 12, 12] given, but the file's first layer 'body.0.weight' "
                              "is [4, 1, 3, 3]: it takes images of 1 channel, input_shape [1, H, W]"), details
    details = refused(client, tmp_path / "cnn.safetensors", "safetensors", input_shape=SHAPE, num_classes=10, **cnn)
    assert details.startswith("spec.num_classes: 10 given, but the file's final layer 'head.weight' is [7, 16]")
    save_safetensors(build("linear", (16,), 3), tmp_path / "lin.safetensors")
    details = refused(client, tmp_path / "lin.safetensors", "safetensors", architecture="linear")
    assert details.startswith("spec.input_shape: required for safetensors weights of linear") and "16" in details
    m = upload(client, tmp_path / "lin.safetensors", "safetensors", architecture="linear", input_shape=[16])
    assert m.spec.num_classes == 3
    details = refused(client, tmp_path / "lin.safetensors", "safetensors", architecture="linear",
                      input_shape=[1, 4, 5])
    assert details.startswith("spec.input_shape: [1, 4, 5] given (20 values), but the file's first layer "
                              "'head.weight' is [3, 16]: it takes 16 values per example"), details
