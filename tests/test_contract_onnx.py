"""ONNX models through the service: a torch model and its ONNX export agree on every prediction
and get the same clean accuracy; a black box gets black-box attacks only, and says why; declared
layout and value range are honoured and checked against the graph."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from advex.client import Client
from advex.engine.loaders import save_safetensors
from advex.engine.zoo import build
from advex.service.inprocess import InProcessServer

from conftest import require_module

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_module("onnxruntime", "pip install 'advex[server]' (onnxruntime-gpu)")
    tmp = tmp_path_factory.mktemp("onnx")
    with InProcessServer(data_dir=str(tmp / "d"), data_roots=[]) as srv, Client(srv.target) as c:
        torch.manual_seed(0)
        net = build("small_cnn", (1, 12, 12), 10, {"width": 4}).eval()
        save_safetensors(net, tmp / "m.safetensors")
        torch_model = c.upload_model(tmp / "m.safetensors", format="safetensors", architecture="small_cnn",
                                     num_classes=10, input_shape=[1, 12, 12], arch_args={"width": 4},
                                     mean=[0.5], std=[0.25])
        x = (np.random.default_rng(0).random((80, 1, 12, 12)) * 255).astype(np.uint8)
        with torch.no_grad():
            y = net((torch.from_numpy(x).float() / 255 - 0.5) / 0.25).argmax(1).numpy()
        y[::3] = (y[::3] + 1) % 10  # some wrong labels, so accuracy is not trivially 1
        ds = c.upload_dataset((x, y), num_classes=10, split="test")
        yield c, net, torch_model, ds, x


@pytest.fixture(scope="module")
def exported(env):
    c, _, torch_model, ds, _ = env
    return c.export_model(torch_model.id, ds.id, name="deployed").result(timeout=300, progress=False)


def test_export_agrees_on_every_prediction_and_on_clean_accuracy(env, exported):
    c, _, torch_model, ds, _ = env
    assert exported.examples == 80 and exported.agreement_rate == 1.0 and exported.disagreements == 0
    assert exported.max_abs_logit_difference < 1e-4
    onnx_model = c.get_model(exported.model_id)
    assert onnx_model.spec.format == 4 and not onnx_model.has_gradients and not onnx_model.has_features
    assert onnx_model.execution_provider == "CPUExecutionProvider" == exported.execution_provider
    assert onnx_model.source.startswith("export:")
    acc = [c.evaluate(m, ds.id).result(timeout=120, progress=False).clean_accuracy
           for m in (torch_model.id, onnx_model.id)]
    assert acc[0] == acc[1] and 0.5 < acc[0] < 1.0


def test_black_box_gets_black_box_attacks_and_says_why(env, exported):
    c, _, torch_model, ds, x = env
    onnx_id = exported.model_id
    with pytest.raises(grpc.RpcError) as info:
        c.attack(onnx_id, x[:4], [0, 1, 2, 3], norm="L2", eps=1.0)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "square" in info.value.details()
    out = c.attack(onnx_id, x[:4], [0, 1, 2, 3], norm="L2", eps=1.0, method="square", steps=30)
    assert (out.queries <= 30).all()
    ev = c.evaluate(onnx_id, ds.id, attacks=[{"norm": "L2", "eps": [1.0], "steps": 5},
                                             {"norm": "L2", "eps": [1.0], "method": "square", "steps": 50}]) \
        .result(timeout=120, progress=False)
    assert [r.attack.method for r in ev.robust] == ["square"] and ev.robust[0].mean_queries > 0
    assert len(ev.skipped) == 1 and ev.skipped[0].attack.method == "pgd" and "gradients" in ev.skipped[0].reason
    # transfer from the torch model to its deployed copy: a black box is a fine target
    tr = c.transfer_rate([torch_model.id], [onnx_id], ds.id, eps=4.0, steps=20).result(timeout=120, progress=False)
    pair = tr.pairs[0]
    assert pair.successful_on_source > 0 and pair.transfer_rate == 1.0
    with pytest.raises(grpc.RpcError) as info:  # but not a white-box source
        c.transfer_rate([onnx_id], [torch_model.id], ds.id, eps=1.0)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith("source_model_ids[0]:")
    with pytest.raises(grpc.RpcError) as info:
        c.build_nonrobust_dataset("d_det", onnx_id, ds.id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_declared_layout_and_range_are_honoured_and_checked(env, tmp_path):
    c, net, _, ds, x = env

    class Deployed(torch.nn.Module):  # what a team might ship: NHWC input in 0..255
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, v):
            return self.net((v.permute(0, 3, 1, 2) / 255 - 0.5) / 0.25)

    def export(path, external_data):
        torch.onnx.export(Deployed().eval(), (torch.rand(2, 12, 12, 1) * 255,), str(path), input_names=["img"],
                          dynamic_shapes={"v": {0: torch.export.Dim("batch")}}, dynamo=True,
                          external_data=external_data)
        return path.read_bytes()

    graph = export(tmp_path / "d.onnx", external_data=False)
    m = c.upload_model(graph, format="onnx", num_classes=10, input_shape=[1, 12, 12], layout="NHWC",
                       value_range="0-255")
    out = c.attack(m.id, x[:8], [0] * 8, norm="Linf", eps=0.01, method="square", steps=1)
    with torch.no_grad():
        expected = net((torch.from_numpy(x[:8]).float() / 255 - 0.5) / 0.25).argmax(1).numpy()
    assert np.array_equal(out.clean_pred, expected)
    for bad in (dict(input_shape=[3, 12, 12], layout="NHWC", value_range="0-255"),  # contradicts the graph
                dict(input_shape=[1, 12, 12], layout="NCWH")):
        with pytest.raises(grpc.RpcError) as info:
            c.upload_model(graph, format="onnx", num_classes=10, **bad)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # weights in a side file cannot travel in one upload: refused, with the fix in the message
    split = export(tmp_path / "split.onnx", external_data=True)
    with pytest.raises(grpc.RpcError) as info:
        c.upload_model(split, format="onnx", num_classes=10, input_shape=[1, 12, 12], layout="NHWC",
                       value_range="0-255")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "external_data=False" in info.value.details()


def test_transfer_attacks_through_a_surrogate_match_the_source_exactly(env, exported):
    """The export computes what its source computes: PGD crafted on the source and judged on the
    export must give exactly the source's own white-box robust accuracy."""
    c, _, torch_model, ds, _ = env
    sweep = [{"norm": "L2", "eps": [2.0, 4.0], "steps": 10}]
    white = c.evaluate(torch_model.id, ds.id, attacks=sweep).result(timeout=120, progress=False)
    transfer = c.evaluate(exported.model_id, ds.id, attacks=sweep, surrogate_model_id=torch_model.id) \
        .result(timeout=120, progress=False)
    assert not transfer.skipped and [r.crafted_on_model_id for r in transfer.robust] == [torch_model.id] * 2
    assert [r.robust_correct for r in transfer.robust] == [r.robust_correct for r in white.robust]
    assert white.robust[1].robust_correct < white.robust[1].total * white.clean_accuracy  # the attack does bite
    with pytest.raises(grpc.RpcError) as info:  # a black box cannot be a surrogate
        c.evaluate(exported.model_id, ds.id, attacks=sweep, surrogate_model_id=exported.model_id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith("surrogate_model_id:")
