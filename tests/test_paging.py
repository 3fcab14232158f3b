"""The list RPCs page: ListModels, ListDatasets and ListOperations return at most page_size items
and a next_page_token; paging through neither repeats nor skips an item while others are added
or deleted; a page stays under paging.PAGE_BYTES; a token this server did not issue, or issued
for another list, is INVALID_ARGUMENT; the SDK still returns whole lists."""
from __future__ import annotations

import base64
import struct
import time

import grpc
import numpy as np
import pytest
import torch

from advex.client import Client
from advex.engine.loaders import safetensors_bytes
from advex.engine.zoo import Linear
from advex.service import paging
from advex.service.inprocess import InProcessServer
from advex.v1 import operation_pb2 as op_pb
from advex.v1 import resources_pb2 as res
from advex.v1 import robustness_pb2_grpc as rpc_grpc

LISTS = {"ListModels": (res.ListModelsRequest, "models"), "ListDatasets": (res.ListDatasetsRequest, "datasets"),
         "ListOperations": (op_pb.ListOperationsRequest, "operations")}


@pytest.fixture
def server(tmp_path):
    with InProcessServer(data_dir=str(tmp_path / "data"), data_roots=[]) as srv:
        yield srv


@pytest.fixture
def client(server):
    with Client(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def weights() -> bytes:
    torch.manual_seed(0)
    return safetensors_bytes(Linear(4, 2))


def upload_models(client, weights, n: int, prefix: str = "m") -> list[str]:
    return [client.upload_model(weights, format="safetensors", architecture="linear", num_classes=2,
                                input_shape=[4], name=f"{prefix}{i}").id for i in range(n)]


def upload_datasets(client, n: int, prefix: str = "d") -> list[str]:
    x, y = np.zeros((3, 4), np.float32), np.array([0, 1, 0])
    return [client.upload_dataset((x, y), name=f"{prefix}{i}").id for i in range(n)]


def status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def pages(call, page_size: int, between=None) -> list[list[str]]:
    """The ids of every page; between(k) runs after page k is read."""
    out, token = [], ""
    while True:
        items, token = call(page_size=page_size, page_token=token)
        out.append([item.id for item in items])
        if between is not None:
            between(len(out))
        if not token:
            return out


def test_25_models_in_pages_of_10(client, weights):
    made = upload_models(client, weights, 25)
    got = pages(client.list_models_page, 10)
    assert [len(p) for p in got] == [10, 10, 5]
    assert sum(got, []) == made  # oldest first, each once
    assert [m.id for m in client.list_models()] == made  # the SDK follows the tokens
    assert [m.id for m in client.list_models(page_size=7)] == made


def test_datasets_list_the_builtins_first_then_the_uploads(client):
    made = upload_datasets(client, 24)
    got = pages(client.list_datasets_page, 10)
    assert [len(p) for p in got] == [10, 10, 5]
    assert sum(got, []) == ["tsipras"] + made
    assert [d.id for d in client.list_datasets(page_size=1)] == ["tsipras"] + made
    only, token = client.list_datasets_page(page_size=1)
    assert [d.id for d in only] == ["tsipras"] and token  # a token after a built-in continues into the store
    assert [d.id for d in client.list_datasets_page(page_size=3, page_token=token)[0]] == made[:3]


def test_no_repeats_and_no_skips_while_items_come_and_go(client):
    made = upload_datasets(client, 20)
    added, deleted = [], []

    def between(k: int) -> None:
        if k == 1:  # after the first page: one new dataset, and one deleted from a page already read
            added.extend(upload_datasets(client, 1, "late"))
            client.delete_dataset(made[3])
            deleted.append(made[3])
        if k == 2:  # one deleted from the page still to come
            client.delete_dataset(made[15])
            deleted.append(made[15])

    got = sum(pages(client.list_datasets_page, 7, between), [])
    expected = [d for d in ["tsipras"] + made + added if d not in deleted[1:]]
    assert got == expected  # made[3] was listed before it went; the late one comes at the end
    assert len(set(got)) == len(got)


def test_operations_newest_first_with_ties_and_new_ones_between_pages(server, client):
    store = server.running.store
    when = time.time() - 1000  # older than anything the server makes now
    ids = [f"op-{i:012x}" for i in range(23)]
    for k, op_id in enumerate(ids):  # three operations per created time: the id breaks the tie
        op = op_pb.Operation(id=op_id, kind="train" if k % 2 else "evaluate", state=op_pb.Operation.SUCCEEDED,
                             done=True)
        store.put_operation(op_id, op.kind, op.state, when + k // 3, op.SerializeToString())
    newest_first = sorted(ids, key=lambda i: (when + ids.index(i) // 3, i), reverse=True)
    late: list[str] = []

    def between(k: int) -> None:
        if k == 1:  # a new operation between the pages: newer than the first page, so not listed
            late.append(client.train("linear", "tsipras", epochs=1, limit=10, batch_size=10).id)

    got = pages(client.list_operations_page, 5, between)
    assert [len(p) for p in got] == [5, 5, 5, 5, 3]
    assert sum(got, []) == newest_first
    assert [len(p) for p in pages(client.list_operations_page, 5)] == [5, 5, 5, 5, 4]  # and the late one
    assert [o.id for o in client.list_operations()] == late + newest_first
    assert [o.id for o in client.list_operations(limit=4)] == late + newest_first[:3]
    trains = [o.id for o in client.list_operations(kind="train", page_size=2)]
    assert trains == late + [i for i in newest_first if int(i[3:], 16) % 2]
    client.get_operation(late[0]).result(timeout=60, progress=False)


def test_page_size_out_of_range_is_invalid_argument(client):
    stub = client.stub
    for method, (request_type, _) in LISTS.items():
        for bad in (-1, 1001, -2**31, 2**31 - 1):
            code, details = status(lambda: getattr(stub, method)(request_type(page_size=bad), timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("page_size:"), (method, details)
        for fine in (0, 1, 1000):
            getattr(stub, method)(request_type(page_size=fine), timeout=10)


def test_forged_and_foreign_tokens_are_invalid_argument(tmp_path, server, client, weights):
    upload_models(client, weights, 3)
    upload_datasets(client, 3)
    client.train("linear", "tsipras", epochs=1, limit=10, batch_size=10).result(timeout=60, progress=False)
    client.train("linear", "tsipras", epochs=1, limit=10, batch_size=10).result(timeout=60, progress=False)
    tokens = {"ListModels": client.list_models_page(page_size=1)[1],
              "ListDatasets": client.list_datasets_page(page_size=1)[1],
              "ListOperations": client.list_operations_page(page_size=1)[1]}
    assert all(tokens.values())
    token = tokens["ListModels"]
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    flipped = raw[:-20] + bytes([raw[-20] ^ 1]) + raw[-19:]  # the position changed, the tag kept
    payload = struct.pack(">BB8sd", 1, 1, b"\0" * 8, 0.0) + b"m-000000000000"
    made_up = payload + b"\0" * 16  # the layout right, the tag made up

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    forged = [b64(flipped), b64(made_up), b64(raw[:-1]), b64(raw + b"\0"), token + "=", token[:-1], token + "A",
              "garbage", "x" * 10_000, "ünïcödé", "\x00", " " + token, token.replace("-", "+").replace("_", "/"),
              b64(b"{\"created\": 0, \"id\": \"m-1\"}"), "A", "AA"]
    stub = client.stub
    for bad in forged:
        if bad == token:
            continue
        code, details = status(lambda: stub.ListModels(res.ListModelsRequest(page_token=bad), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (bad[:40], code, details)
        assert details.startswith("page_token: not a token this server issued"), details
    for method, (request_type, _) in LISTS.items():  # each list refuses the others' tokens
        for other, foreign in tokens.items():
            if other == method:
                continue
            code, details = status(lambda: getattr(stub, method)(request_type(page_token=foreign), timeout=10))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert details.startswith(f"page_token: a token of {other}, not of {method}"), details
    code, details = status(lambda: stub.ListOperations(op_pb.ListOperationsRequest(
        kind="train", page_token=tokens["ListOperations"]), timeout=10))  # issued for kind "" (all)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "another filter" in details
    with InProcessServer(data_dir=str(tmp_path / "other"), data_roots=[]) as other, Client(other.target) as c:
        upload_datasets(c, 2)
        code, details = status(lambda: c.list_models_page(page_token=token))  # another server's key
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a token this server issued" in details
        foreign = c.list_datasets_page(page_size=1)[1]
    code, _ = status(lambda: client.list_datasets_page(page_token=foreign))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_tokens_survive_a_restart(tmp_path, weights):
    with InProcessServer(data_dir=str(tmp_path), data_roots=[]) as srv, Client(srv.target) as c:
        made = upload_models(c, weights, 3)
        first, token = c.list_models_page(page_size=1)
    with InProcessServer(data_dir=str(tmp_path), data_roots=[]) as srv, Client(srv.target) as c:
        rest, end = c.list_models_page(page_size=5, page_token=token)
    assert [m.id for m in first + rest] == made and end == ""


def test_a_page_is_cut_by_bytes_and_a_big_item_comes_alone(server):
    """Records near the limits: a page holds at most paging.PAGE_BYTES of items, whatever its
    page_size, and an item larger than that comes alone."""
    registry = server.running.registry
    sizes = [1_500_000] * 5 + [5_000_000] + [1_000] * 3  # bytes of class names per dataset
    made = []
    for k, size in enumerate(sizes):
        names = [f"{k:02d}" + "é" * 62] * (size // 128)  # 128 bytes each (é is 2 bytes in UTF-8)
        dataset_id, folder = registry.new_dataset_folder()
        record = res.Dataset(id=dataset_id, name=f"big{k}", kind="upload", splits={"train": 1}, example_shape=[4],
                             num_classes=len(names), class_names=names)
        registry.record_dataset(record, folder / "data.npz")
        made.append(dataset_id)
    channel = grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = rpc_grpc.RobustnessStub(channel)
    listed, token, shapes = [], "", []
    while True:
        resp = stub.ListDatasets(res.ListDatasetsRequest(page_size=1000, page_token=token), timeout=30)
        ids = [d.id for d in resp.datasets]
        listed += ids
        shapes.append(len(ids))
        if len(ids) > 1:
            assert resp.ByteSize() <= paging.PAGE_BYTES, resp.ByteSize()
        token = resp.next_page_token
        if not token:
            break
    channel.close()
    assert listed == ["tsipras"] + made
    # tsipras + 2 x 1.5 MB | 2 x 1.5 MB | the fifth 1.5 MB (the 5 MB one does not fit) | the 5 MB one alone | 3 small
    assert shapes == [3, 2, 1, 1, 3]
