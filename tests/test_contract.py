"""Contract tests: the service over a real gRPC channel to an in-process server.
Every RPC, every error status, byte-exact tensors, cancel, watch, restart with the store intact."""
from __future__ import annotations

import io
import time

import grpc
import numpy as np
import pytest
import torch

from advex.client import Client, OperationError
from advex.engine.loaders import save_safetensors
from advex.engine.zoo import Linear, SmallCNN
from advex.service.inprocess import InProcessServer
from advex.v1 import resources_pb2 as res
from advex.v1 import robustness_pb2 as rpc
from advex.v1.wire import from_tensor, to_tensor

from conftest import data_roots

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("advex")
    with InProcessServer(data_dir=str(data_dir), data_roots=data_roots(), token=TOKEN, max_batch=64,
                         max_queue=2, max_upload_mb=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, token=TOKEN) as c:
        yield c


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def linear_weights(tmp_path, d=16) -> bytes:
    torch.manual_seed(0)
    net = Linear(d, 2)
    save_safetensors(net, tmp_path / "w.safetensors")
    return (tmp_path / "w.safetensors").read_bytes()


@pytest.fixture(scope="module")
def cnn_model(client, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "cnn.safetensors"
    save_safetensors(SmallCNN(1, 10, width=8), path)
    return client.upload_model(path, format="safetensors", architecture="small_cnn", num_classes=10,
                               input_shape=[1, 28, 28], name="tiny-cnn", arch_args={"width": 8})


# ---------------------------------------------------------------- wire format

@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5),
    np.random.default_rng(0).random((3, 1, 7, 7), dtype=np.float32),
    np.array([0, -5, 2**40], dtype=np.int64),
    np.array([True, False, True]),
])
def test_tensor_round_trip_is_byte_exact(array):
    t = to_tensor(array)
    back = from_tensor(rpc.AttackRequest.FromString(rpc.AttackRequest(x=t).SerializeToString()).x)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()


def test_attack_round_trips_inputs_byte_exact_when_eps_is_zero_like(client, cnn_model):
    # FGSM with a step of 0 leaves x untouched: x_adv must come back bit for bit.
    x = np.random.default_rng(1).random((4, 1, 28, 28), dtype=np.float32)
    out = client.attack(cnn_model.id, x, [0, 1, 2, 3], norm="Linf", eps=0.1, method="fgsm", step_size=1e-30)
    assert out.x_adv.dtype == np.float32 and out.x_adv.tobytes() == x.tobytes()
    u8 = (x * 255).astype(np.uint8)
    out = client.attack(cnn_model.id, u8, [0, 1, 2, 3], norm="Linf", eps=0.1, method="fgsm", step_size=1e-30)
    assert np.array_equal(out.x_adv, u8.astype(np.float32) / 255)


# ---------------------------------------------------------------- auth, health, reflection

def test_missing_token_is_unauthenticated(server):
    with Client(server.target) as anon:
        assert code_of(anon.list_models) == grpc.StatusCode.UNAUTHENTICATED
    with Client(server.target, token="wrong") as bad:
        assert code_of(bad.list_models) == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_are_served(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="advex.v1.Robustness"))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               metadata=(("authorization", f"Bearer {TOKEN}"),)))  # behind the token
        names = {s.name for s in reply.list_services_response.service}
        assert "advex.v1.Robustness" in names and "grpc.health.v1.Health" in names


# ---------------------------------------------------------------- models

def test_model_upload_get_list_delete(client, tmp_path):
    data = linear_weights(tmp_path)
    m = client.upload_model(data, format="safetensors", architecture="linear", num_classes=2, input_shape=[16],
                            name="lin")
    import hashlib
    assert m.sha256 == hashlib.sha256(data).hexdigest() and m.size_bytes == len(data)
    assert client.get_model(m.id) == m
    assert m.id in {x.id for x in client.list_models()}
    client.delete_model(m.id)
    assert code_of(lambda: client.get_model(m.id)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.delete_model(m.id)) == grpc.StatusCode.NOT_FOUND


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch 2.14 deprecates TorchScript; teams still deploy it
def test_torchscript_and_torch_export_models_load(client, tmp_path):
    net = Linear(16, 2).eval()
    scripted = torch.jit.script(net)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    ts = client.upload_model(buf.getvalue(), format="torchscript", num_classes=2, input_shape=[16])
    static = torch.export.export(net, (torch.rand(1, 16),))
    torch.export.save(static, tmp_path / "static.pt2")
    with pytest.raises(grpc.RpcError) as info:  # a static batch of 1 is refused at upload, with the fix
        client.upload_model(tmp_path / "static.pt2", format="torch_export", num_classes=2, input_shape=[16])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dynamic" in info.value.details()
    exported = torch.export.export(net, (torch.rand(4, 16),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(exported, tmp_path / "m.pt2")
    ex = client.upload_model(tmp_path / "m.pt2", format="torch_export", num_classes=2, input_shape=[16])
    x = np.random.default_rng(0).random((5, 16), dtype=np.float32)
    expected = net(torch.from_numpy(x)).argmax(1).numpy()
    for m in (ts, ex):
        out = client.attack(m.id, x, [0] * 5, norm="L2", eps=0.01, steps=1)
        assert np.array_equal(out.clean_pred, expected)


@pytest.mark.parametrize("mutate,field", [
    (lambda s: s.ClearField("format"), "spec.format"),
    (lambda s: setattr(s, "architecture", "vgg99"), "spec.architecture"),
    (lambda s: setattr(s, "num_classes", 1), "spec.num_classes"),
    (lambda s: s.ClearField("input_shape"), "spec.input_shape"),
])
def test_bad_model_spec_is_invalid_argument_naming_the_field(client, tmp_path, mutate, field):
    spec = res.ModelSpec(format=res.SAFETENSORS, architecture="linear", num_classes=2, input_shape=[16])
    mutate(spec)
    parts = [res.UploadModelRequest(spec=spec), res.UploadModelRequest(chunk=linear_weights(tmp_path))]
    with pytest.raises(grpc.RpcError) as info:
        client.stub.UploadModel(iter(parts), metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field)


def test_upload_errors_store_nothing(client, server, tmp_path):
    before = len(client.list_models())
    # weights for another architecture
    with pytest.raises(grpc.RpcError) as info:
        client.upload_model(linear_weights(tmp_path, d=9), format="safetensors", architecture="linear",
                            num_classes=2, input_shape=[16])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # a pickle is not a model (and is never executed)
    import pickle
    with pytest.raises(grpc.RpcError) as info:
        client.upload_model(pickle.dumps({"a": 1}), format="torchscript", num_classes=2, input_shape=[16])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # over the 1 MiB upload limit of this server
    with pytest.raises(grpc.RpcError) as info:
        client.upload_model(b"\0" * (2 << 20), format="torchscript", num_classes=2, input_shape=[16])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in info.value.details()
    # chunks without a spec first
    with pytest.raises(grpc.RpcError) as info:
        client.stub.UploadModel(iter([res.UploadModelRequest(chunk=b"x")]), metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(client.list_models()) == before
    assert list((server.running.registry.tmp_dir).iterdir()) == []


# ---------------------------------------------------------------- datasets

def test_dataset_upload_get_list_delete(client):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 1, 28, 28), dtype=np.uint8)
    y = np.arange(30) % 10
    ds = client.upload_dataset((x, y), name="tiny", split="test")
    assert ds.splits["test"] == 30 and list(ds.example_shape) == [1, 28, 28] and ds.num_classes == 10
    assert ds.dtype == "uint8"
    assert client.get_dataset(ds.id) == ds
    ids = {d.id for d in client.list_datasets()}
    assert ds.id in ids and "tsipras" in ids
    client.delete_dataset(ds.id)
    assert code_of(lambda: client.get_dataset(ds.id)) == grpc.StatusCode.NOT_FOUND


def test_bad_datasets_are_refused(client):
    import pickle
    bad_npz = io.BytesIO()
    np.savez(bad_npz, x=np.zeros((2, 1, 4, 4), np.float64), y=np.zeros(2, np.int64))
    for payload in (pickle.dumps([1, 2]), bad_npz.getvalue()):
        with pytest.raises(grpc.RpcError) as info:
            client.upload_dataset(payload)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    obj = io.BytesIO()
    np.savez(obj, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
    with pytest.raises(grpc.RpcError) as info:
        client.upload_dataset(obj.getvalue())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: client.delete_dataset("tsipras")) == grpc.StatusCode.FAILED_PRECONDITION


# ---------------------------------------------------------------- Attack validation

@pytest.mark.parametrize("change,field", [
    (dict(x=np.zeros((2, 1, 27, 28), np.float32)), "x"),
    (dict(x=np.full((2, 1, 28, 28), np.nan, np.float32)), "x"),
    (dict(x=np.full((2, 1, 28, 28), 1.5, np.float32)), "x"),
    (dict(x=np.zeros((65, 1, 28, 28), np.float32), y=[0] * 65), "x"),
    (dict(y=[0, 10]), "y"),
    (dict(y=[0]), "y"),
    (dict(eps=-1.0), "attack.eps"),
    (dict(eps=2.0), "attack.eps"),
    (dict(steps=10**6), "attack.steps"),
    (dict(method="cw"), "attack.method"),
])
def test_attack_bad_input_is_invalid_argument_naming_the_field(client, cnn_model, change, field):
    args = dict(x=np.zeros((2, 1, 28, 28), np.float32), y=[0, 1], norm="Linf", eps=0.1, steps=1)
    args.update(change)
    with pytest.raises(grpc.RpcError) as info:
        client.attack(cnn_model.id, args.pop("x"), args.pop("y"), **args)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field + ":"), info.value.details()


def test_square_attack_through_the_service_reports_queries(client, cnn_model):
    x = np.random.default_rng(2).random((6, 1, 28, 28), dtype=np.float32)
    out = client.attack(cnn_model.id, x, [0] * 6, norm="Linf", eps=0.05, method="square", steps=40)
    assert out.queries.dtype == np.int64 and out.queries.shape == (6,)
    assert (out.queries >= 1).all() and (out.queries <= 40).all() and out.attack.steps == 40
    assert (out.perturbation_norm <= 0.05 + 1e-6).all()
    assert client.attack(cnn_model.id, x, [0] * 6, eps=0.05, steps=2).queries is None  # white-box: no count


def test_attack_unknown_model_is_not_found(client):
    assert code_of(lambda: client.attack("m-nope", np.zeros((1, 1, 28, 28), np.float32), [0], eps=0.1)) \
        == grpc.StatusCode.NOT_FOUND


def test_wrong_tensor_byte_count_is_invalid(client, cnn_model):
    req = rpc.AttackRequest(model_id=cnn_model.id, y=to_tensor(np.array([0])))
    req.x.dtype, req.x.data = "float32", b"\0" * 10
    req.x.shape.extend([1, 1, 28, 28])
    req.attack.norm, req.attack.eps = 1, 0.1
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Attack(req, metadata=client.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("x:")


# ---------------------------------------------------------------- operations

def test_train_then_evaluate_on_tsipras_through_the_service(client):
    op = client.train("linear", "tsipras", epochs=2, batch_size=100, lr=0.1, schedule="constant",
                      weight_decay=0.0, limit=2000, seed=3)
    assert op.state in ("QUEUED", "RUNNING", "SUCCEEDED")
    trained = op.result(timeout=120, progress=False)
    model = client.get_model(trained.model_id)
    assert model.source == f"train:{op.id}" and model.sha256 == trained.model_sha256
    assert len(trained.history) == 2
    ev = client.evaluate(model.id, "tsipras", limit=500,
                         attacks=[{"norm": "Linf", "eps": [0.6], "steps": 10}]).result(timeout=120, progress=False)
    assert ev.clean_accuracy > 0.95 and ev.robust[0].robust_accuracy < 0.1
    assert ev.model_sha256 == model.sha256 and ev.num_examples == 500
    mask = from_tensor(ev.worst_case[0].per_example)
    assert mask.shape == (500,) and int(mask.sum()) == ev.worst_case[0].robust_correct


def test_evaluate_and_train_bad_requests(client, cnn_model):
    cases = [
        (lambda: client.evaluate(cnn_model.id, "tsipras"), grpc.StatusCode.INVALID_ARGUMENT),  # shape mismatch
        (lambda: client.evaluate("m-nope", "tsipras"), grpc.StatusCode.NOT_FOUND),
        (lambda: client.evaluate(cnn_model.id, "no-such-set"), grpc.StatusCode.NOT_FOUND),
        (lambda: client.evaluate(cnn_model.id, "tsipras", split="val"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.train("vgg99", "tsipras"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.train("small_cnn", "tsipras"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.train("linear", "tsipras", lr=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.train("linear", "tsipras", preset="nope"), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.get_operation("op-nope"), grpc.StatusCode.NOT_FOUND),
    ]
    for call, code in cases:
        assert code_of(call) == code


def test_cancel_stops_the_work_and_full_queue_is_resource_exhausted(client):
    long_train = dict(epochs=500, batch_size=10, schedule="constant", limit=10000)
    first = client.train("mlp", "tsipras", **long_train)
    second = client.train("mlp", "tsipras", **long_train)  # queued behind the first (one worker)
    assert code_of(lambda: client.train("mlp", "tsipras", **long_train)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # progress is real: wait until the first has done some batches
    for op in first.watch():
        if op.progress.done >= 3:
            assert op.state == op.RUNNING and 0 < op.progress.eta_seconds
            break
    assert first.proto.progress.total == 500 * 1000 and first.proto.progress.unit == "batches"
    second.cancel()
    assert second.state == "CANCELLED"
    first.cancel()
    final = client.wait_operation(first.id, timeout=30)
    assert final.state == "CANCELLED" and final.proto.progress.done < 500 * 1000
    with pytest.raises(OperationError) as info:
        final.result(progress=False)
    assert info.value.code == "CANCELLED"
    listed = {o.id: o.state for o in client.list_operations(kind="train")}
    assert listed[first.id] == "CANCELLED" and listed[second.id] == "CANCELLED"


def test_deleting_a_dataset_in_use_is_refused(client):
    ds = client.upload_dataset((np.random.default_rng(0).normal(size=(3000, 4)).astype(np.float32),
                                np.arange(3000) % 2), domain="real")
    op = client.train("mlp", ds.id, epochs=200, batch_size=10, schedule="constant")
    assert code_of(lambda: client.delete_dataset(ds.id)) == grpc.StatusCode.FAILED_PRECONDITION
    op.cancel()
    client.wait_operation(op.id, timeout=30)
    client.delete_dataset(ds.id)


def test_wait_operation_times_out_with_current_state(client):
    op = client.train("mlp", "tsipras", epochs=200, batch_size=10, schedule="constant")
    t0 = time.monotonic()
    now = client.wait_operation(op.id, timeout=0.5)
    assert not now.done and time.monotonic() - t0 < 10
    op.cancel()
    client.wait_operation(op.id, timeout=30)


def test_restart_keeps_the_store_intact(tmp_path):
    settings = dict(data_dir=str(tmp_path / "d"), data_roots=[])
    with InProcessServer(**settings) as srv, Client(srv.target) as c:
        op = c.train("linear", "tsipras", epochs=1, batch_size=200, limit=1000, seed=1)
        model_id = op.result(timeout=60, progress=False).model_id
        long = c.train("mlp", "tsipras", epochs=500, batch_size=10, schedule="constant")
        ds = c.upload_dataset((np.zeros((4, 3), np.float32), np.array([0, 1, 0, 1])), domain="real")
        before = c.get_model(model_id)
    # the server stopped with `long` running: training checkpoints and resumes under its id
    with InProcessServer(**settings) as srv, Client(srv.target) as c:
        assert c.get_model(model_id) == before
        assert c.get_operation(op.id).state == "SUCCEEDED"
        resumed = c.get_operation(long.id)
        # resumed once, under its id (its stage says so until the first batch reports progress)
        assert not resumed.done and (tmp_path / "d" / "artifacts" / "jobs" / long.id / "resumes").read_text() == "1"
        c.cancel_operation(long.id)
        assert c.wait_operation(long.id, timeout=30).state == "CANCELLED"
        assert c.get_dataset(ds.id).splits["train"] == 4
        x = np.random.default_rng(0).normal(size=(4, 101)).astype(np.float32)
        assert c.attack(model_id, x, [0, 1, 0, 1], norm="Linf", eps=0.1, domain="real").x_adv.shape == (4, 101)


def test_interrupted_operations_are_marked_failed_after_a_crash(tmp_path):
    from advex.service.store import Store
    from advex.v1 import operation_pb2 as op_pb

    store = Store(tmp_path / "advex.sqlite3")
    for op_id, kind, request in [("op-crashed", "evaluate", '{"model_id": "m-1"}'),
                                 ("op-gone", "train", '{"architecture": "mlp", "dataset_id": "ds-deleted"}'),
                                 ("op-garbled", "robustify", '{"no_such_field": 1}'),
                                 ("op-crashy", "train", '{"architecture": "mlp", "dataset_id": "tsipras"}')]:
        op = op_pb.Operation(id=op_id, kind=kind, state=op_pb.Operation.RUNNING, request_json=request)
        op.create_time.GetCurrentTime()
        store.put_operation(op.id, op.kind, op.state, 0.0, op.SerializeToString())
    store.close()
    (tmp_path / "artifacts" / "jobs" / "op-crashy").mkdir(parents=True)
    (tmp_path / "artifacts" / "jobs" / "op-crashy" / "resumes").write_text("5")  # 5 crashes in a row so far
    with InProcessServer(data_dir=str(tmp_path), data_roots=[]) as srv, Client(srv.target) as c:
        got = c.get_operation("op-crashed")  # not a resumable kind: it says so
        assert got.state == "FAILED" and got.proto.error.code == grpc.StatusCode.ABORTED.value[0]
        assert "evaluate operations do not resume" in got.proto.error.message
        gone = c.get_operation("op-gone")  # resumable, but what it needs is gone: the planner's own status
        assert gone.state == "FAILED" and gone.proto.error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert gone.proto.error.message.startswith("could not resume after a restart: ")
        garbled = c.get_operation("op-garbled")
        assert garbled.state == "FAILED" and garbled.proto.error.code == grpc.StatusCode.ABORTED.value[0]
        crashy = c.get_operation("op-crashy")  # a sixth crash in a row: it may be what kills the server
        assert crashy.state == "FAILED" and "6 crashes in a row" in crashy.proto.error.message
        assert not (tmp_path / "artifacts" / "jobs" / "op-crashy").exists()
