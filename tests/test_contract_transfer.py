"""TransferRate over a real gRPC channel: a model and its exact copy, denominators that add up,
and targets that cannot take the batch refused with the model named."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from advex.client import Client
from advex.engine.loaders import save_safetensors
from advex.engine.zoo import build
from advex.service.inprocess import InProcessServer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t")
    with InProcessServer(data_dir=str(tmp / "d"), data_roots=[]) as srv, Client(srv.target) as c:
        torch.manual_seed(0)
        net = build("linear", (1, 8, 8), 10).eval()
        save_safetensors(net, tmp / "a.safetensors")
        spec = dict(format="safetensors", architecture="linear", num_classes=10, input_shape=[1, 8, 8])
        source = c.upload_model(tmp / "a.safetensors", name="source", **spec)
        copy = c.upload_model(tmp / "a.safetensors", name="copy", **spec)
        torch.manual_seed(1)
        save_safetensors(build("linear", (1, 8, 8), 10), tmp / "b.safetensors")
        other = c.upload_model(tmp / "b.safetensors", name="other", **spec)
        save_safetensors(build("linear", (16,), 10), tmp / "wrong.safetensors")
        wrong = c.upload_model(tmp / "wrong.safetensors", format="safetensors", architecture="linear",
                               num_classes=10, input_shape=[16])
        x = (np.random.default_rng(0).random((60, 1, 8, 8)) * 255).astype(np.uint8)
        with torch.no_grad():  # labelled by the source itself, so it is right on every clean example
            y = net(torch.from_numpy(x).float() / 255).argmax(1).numpy()
        ds = c.upload_dataset((x, y), num_classes=10, split="test")
        yield c, source, copy, other, wrong, ds


def test_copy_transfers_like_white_box_and_denominators_add_up(setup):
    c, source, copy, other, _, ds = setup
    result = c.transfer_rate([source.id], [copy.id, other.id], ds.id, norm="L2", eps=1.0, steps=10).result(
        timeout=120, progress=False)
    assert "transfer rate" in result.definition and result.attack.steps == 10 and result.split == "test"
    to_copy, to_other = result.pairs
    assert (to_copy.source_model_id, to_copy.target_model_id) == (source.id, copy.id)
    assert to_copy.successful_on_source > 0 and to_copy.transfer_rate == 1.0
    assert to_copy.unconditional_rate == pytest.approx(to_copy.white_box_success_rate)
    for p in result.pairs:
        assert p.examples == 60
        assert p.transferred <= p.successful_on_source <= p.correct_on_source <= p.examples
        assert p.fooled_target <= p.correct_on_target <= p.examples
        assert p.transfer_rate == pytest.approx(p.transferred / p.successful_on_source)
        assert p.white_box_success_rate == pytest.approx(p.successful_on_source / p.correct_on_source)
        # an empty denominator (a target never right on clean data) reports 0, not an error
        expected = p.fooled_target / p.correct_on_target if p.correct_on_target else 0.0
        assert p.unconditional_rate == pytest.approx(expected)


def test_bad_targets_are_named(setup):
    c, source, _, _, wrong, ds = setup
    with pytest.raises(grpc.RpcError) as info:
        c.transfer_rate([source.id], [wrong.id], ds.id)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("target_model_ids[0]:") and wrong.id in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        c.transfer_rate([source.id], [source.id, "m-missing"], ds.id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and info.value.details().startswith("target_model_ids[1]:")
    with pytest.raises(grpc.RpcError) as info:
        c.transfer_rate([], [source.id], ds.id)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("source_model_ids")
