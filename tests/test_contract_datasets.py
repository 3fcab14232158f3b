"""Robustify, BuildNonRobustDataset and DownloadDataset over a real gRPC channel: stored
artifacts with lineage, byte-exact downloads, use by Train / Evaluate, precise errors, and
cancellation that leaves nothing behind."""
from __future__ import annotations

import hashlib
import json

import grpc
import numpy as np
import pytest
import torch

from advex.client import OperationError
from advex.engine.loaders import save_safetensors
from advex.engine.zoo import Linear, build
from advex.v1 import robustness_pb2 as rpc


# `server` and `client`: conftest.py (an in-process server without data roots)


@pytest.fixture(scope="module")
def source(client, tmp_path_factory):
    """A 10-class 8x8 image dataset and a small CNN to build from."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "cnn.safetensors"
    save_safetensors(build("small_cnn", (1, 8, 8), 10, {"width": 4}), path)
    model = client.upload_model(path, format="safetensors", architecture="small_cnn", num_classes=10,
                                input_shape=[1, 8, 8], arch_args={"width": 4})
    x = (np.random.default_rng(0).random((40, 1, 8, 8)) * 255).astype(np.uint8)
    y = np.arange(40) % 10
    ds = client.upload_dataset((x, y), name="tiny", num_classes=10)
    return model, ds, x, y


def test_d_det_is_stored_with_lineage_and_downloads_byte_exact(client, server, source, tmp_path):
    model, ds, x, y = source
    op = client.build_nonrobust_dataset("d_det", model.id, ds.id, seed=5, attack={"eps": 1.0, "steps": 10},
                                        batch_size=16, shard_size=16)
    result = op.result(timeout=120, progress=False)
    assert result.mode == "D_det" and result.num_examples == 40
    assert 0 < result.mean_l2 <= result.max_l2 <= 1.0 + 1e-5
    record = client.get_dataset(result.dataset_id)
    assert record.kind == "generated" and record.dtype == "float32" and record.splits["train"] == 40
    lineage = json.loads(record.lineage_json)
    assert lineage["source_dataset_id"] == ds.id and lineage["model_id"] == model.id
    assert lineage["model_sha256"] == model.sha256 and lineage["mode"] == "d_det" and lineage["seed"] == 5
    assert lineage["operation_id"] == op.id and lineage["params"]["attack"]["eps"] == 1.0
    assert lineage["params"]["attack"]["targeted"] is True and lineage["params"]["attack"]["steps"] == 10
    stored = server.running.registry.dataset_file(record.id, "train").read_bytes()
    xd, yd = client.download_dataset(record.id, path=None)
    assert np.array_equal(yd, (y + 1) % 10)
    assert xd.dtype == np.float32 and xd.min() >= 0 and xd.max() <= 1
    assert np.sqrt(((xd - x / 255.0) ** 2).reshape(40, -1).sum(1)).max() <= 1.0 + 1e-5
    # byte-exact: what came over the wire is what is stored, and its digest is the record's
    client.download_dataset(record.id, path=tmp_path / "d.npz")
    got = (tmp_path / "d.npz").read_bytes()
    assert got == stored and hashlib.sha256(got).hexdigest() == record.sha256
    # the lossy option is explicit and rounds to the nearest level
    xu, _ = client.download_dataset(record.id, lossy_uint8=True)
    assert xu.dtype == np.uint8 and np.abs(xu / 255.0 - xd).max() <= 0.5 / 255 + 1e-7
    # the first examples only; and built-in datasets are served too
    xl, yl = client.download_dataset(record.id, limit=3)
    assert np.array_equal(xl, xd[:3]) and np.array_equal(yl, yd[:3])
    xt, yt = client.download_dataset("tsipras", split="test", limit=5)
    assert xt.shape == (5, 101) and xt.dtype == np.float32 and set(yt) <= {0, 1}


def test_generated_sets_train_and_evaluate_like_any_dataset(client, source):
    model, ds, _, y = source
    built = client.build_nonrobust_dataset("d_rand", model.id, ds.id, attack={"eps": 1.0, "steps": 5}).result(
        timeout=120, progress=False)
    _, yr = client.download_dataset(built.dataset_id)
    assert (yr != y).all()
    trained = client.train("small_cnn", built.dataset_id, epochs=1, batch_size=20, arch_args={"width": 4}).result(
        timeout=120, progress=False)
    ev = client.evaluate(trained.model_id, built.dataset_id, attacks=[{"norm": "L2", "eps": [0.5], "steps": 2}]) \
        .result(timeout=120, progress=False)
    assert ev.num_examples == 40 and ev.split == "train"
    client.delete_dataset(built.dataset_id)
    with pytest.raises(grpc.RpcError) as info:
        client.get_dataset(built.dataset_id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_robustify_reports_feature_diagnostics(client, source):
    model, ds, _, _ = source
    result = client.robustify(model.id, ds.id, steps=30, limit=20, seed=1).result(timeout=120, progress=False)
    assert result.mode == "D_R" and result.num_examples == 20
    assert result.feature_distance_mean < result.feature_distance_start_mean
    assert 0 <= result.feature_distance_mean <= result.feature_distance_p95
    assert result.mean_l2_from_start > 0
    lineage = json.loads(client.get_dataset(result.dataset_id).lineage_json)
    assert lineage["mode"] == "d_r" and lineage["params"]["inversion"]["steps"] == 30
    assert lineage["params"]["inversion"]["step_size"] == 0.1 and lineage["params"]["inversion"]["start"] == "image"


def test_build_errors(client, source, tmp_path):
    model, ds, _, _ = source
    # a torch.export program exposes no penultimate layer
    net = Linear(64, 10).eval()
    exported = torch.export.export(net, (torch.rand(2, 1, 8, 8),), dynamic_shapes={"x": {0: torch.export.Dim("b")}})
    torch.export.save(exported, tmp_path / "m.pt2")
    blind = client.upload_model(tmp_path / "m.pt2", format="torch_export", num_classes=10, input_shape=[1, 8, 8])
    assert not blind.has_features
    cases = [
        (lambda: client.robustify(blind.id, ds.id), grpc.StatusCode.FAILED_PRECONDITION, "model"),
        (lambda: client.build_nonrobust_dataset("d_nr", blind.id, ds.id), grpc.StatusCode.FAILED_PRECONDITION, "model"),
        (lambda: client.robustify(model.id, ds.id, start="zeros"), grpc.StatusCode.INVALID_ARGUMENT, "inversion.start"),
        (lambda: client.robustify(model.id, ds.id, steps=10**6), grpc.StatusCode.INVALID_ARGUMENT, "inversion.steps"),
        (lambda: client.robustify(model.id, ds.id, limit=1), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        (lambda: client.robustify(model.id, "tsipras"), grpc.StatusCode.INVALID_ARGUMENT, "dataset_id"),
        (lambda: client.robustify("m-none", ds.id), grpc.StatusCode.NOT_FOUND, "model"),
        (lambda: client.build_nonrobust_dataset("d_det", model.id, ds.id, attack={"eps": -1}),
         grpc.StatusCode.INVALID_ARGUMENT, "attack.eps"),
        (lambda: client.download_dataset(ds.id, limit=-1), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
        (lambda: client.download_dataset("ds-none"), grpc.StatusCode.NOT_FOUND, "dataset"),
    ]
    for call, code, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code and info.value.details().startswith(field), info.value.details()
    req = rpc.BuildNonRobustDatasetRequest(model_id=model.id, dataset_id=ds.id)  # no mode
    with pytest.raises(grpc.RpcError) as info:
        client.stub.BuildNonRobustDataset(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("mode")


def test_cancelled_build_leaves_nothing_and_source_in_use_cannot_be_deleted(client, server, source):
    model, _, _, _ = source
    x = (np.random.default_rng(1).random((400, 1, 8, 8)) * 255).astype(np.uint8)
    src = client.upload_dataset((x, np.arange(400) % 10), num_classes=10)
    before = {d.id for d in client.list_datasets()}
    folders_before = set(p.name for p in server.running.registry.datasets_dir.iterdir())
    op = client.robustify(model.id, src.id, steps=5000, batch_size=8)
    for snap in op.watch():
        if snap.state == snap.RUNNING:
            break
    with pytest.raises(grpc.RpcError) as info:
        client.delete_dataset(src.id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    op.cancel()
    with pytest.raises(OperationError) as err:
        client.wait_operation(op.id, timeout=60).result(progress=False)
    assert err.value.code == "CANCELLED"
    assert {d.id for d in client.list_datasets()} == before
    assert set(p.name for p in server.running.registry.datasets_dir.iterdir()) == folders_before
    client.delete_dataset(src.id)
