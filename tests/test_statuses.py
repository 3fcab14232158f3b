"""Every bad input gets its precise status, never INTERNAL or UNKNOWN: one regression test per
cause found by fuzzing (tests/test_fuzz.py, bench/fuzz.py). Requests are sent as raw bytes where
the point is what a well-behaved client could never send."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from advex.service.inprocess import InProcessServer
from advex.v1 import operation_pb2 as op_pb
from advex.v1 import resources_pb2 as res
from advex.v1 import robustness_pb2 as rpc
from advex.v1 import results_pb2, tensor_pb2
from advex.v1.wire import WireError, from_tensor, to_tensor

from conftest import data_roots

SERVICE = rpc.DESCRIPTOR.services_by_name["Robustness"].full_name
# Not a message: field 1 as a varint that never ends.
GARBAGE = b"\x08" + b"\xff" * 11


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with InProcessServer(data_dir=str(tmp_path_factory.mktemp("advex")), data_roots=data_roots(), max_batch=8,
                         max_upload_mb=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def linear_model(channel):
    """A linear model on tsipras' 101 features."""
    import torch

    from advex.engine.loaders import safetensors_bytes
    from advex.engine.zoo import Linear

    torch.manual_seed(0)
    spec = res.ModelSpec(format=res.SAFETENSORS, architecture="linear", num_classes=2, input_shape=[101])
    parts = [res.UploadModelRequest(spec=spec), res.UploadModelRequest(chunk=safetensors_bytes(Linear(101, 2)))]
    return channel.stream_unary(f"/{SERVICE}/UploadModel", request_serializer=res.UploadModelRequest.SerializeToString,
                                response_deserializer=res.Model.FromString)(iter(parts), timeout=60)


def raw(channel, method: str, kind: str = "unary_unary"):
    """A callable for /advex.v1.Robustness/<method> taking and returning bytes."""
    return getattr(channel, kind)(f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None)


def status(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# ---------------------------------------------------------------- undecodable requests

def test_undecodable_unary_request_is_invalid_argument(channel):
    # was UNKNOWN: the generated deserializer raised before any handler ran
    code, details = status(lambda: raw(channel, "GetModel")(GARBAGE, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "request: not a valid advex.v1.GetModelRequest message"


def test_invalid_utf8_in_a_string_field_is_invalid_argument(channel):
    # well-formed wire format, but proto3 strings must be UTF-8
    code, details = status(lambda: raw(channel, "GetDataset")(b"\x0a\x02\xc3\x28", timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request:")


def test_undecodable_request_of_a_server_streaming_rpc_is_invalid_argument(channel):
    for method in ("WatchOperation", "DownloadDataset"):
        code, details = status(lambda: list(raw(channel, method, "unary_stream")(GARBAGE, timeout=10)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, method
        assert details == f"request: not a valid advex.v1.{method}Request message"


def test_undecodable_first_message_of_an_upload_is_invalid_argument(channel):
    # was INTERNAL "DecodeError"
    for method in ("UploadModel", "UploadDataset"):
        code, details = status(lambda: raw(channel, method, "stream_unary")(iter([GARBAGE]), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, method
        assert details == f"request: message 0 of the stream is not a valid advex.v1.{method}Request message"


def test_undecodable_message_later_in_an_upload_is_invalid_argument(channel):
    head = res.UploadDatasetRequest(header=res.UploadDatasetHeader(name="x")).SerializeToString()
    chunk = res.UploadDatasetRequest(chunk=b"PK\x03\x04").SerializeToString()
    code, details = status(lambda: raw(channel, "UploadDataset", "stream_unary")(iter([head, chunk, GARBAGE]),
                                                                                 timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("request: message 2 of the stream is not a valid advex.v1.UploadDatasetRequest")


def test_undecodable_requests_are_counted_in_the_metrics(server, channel):
    status(lambda: raw(channel, "ListModels")(GARBAGE, timeout=10))
    counter = server.running.metrics.requests.labels("ListModels", "INVALID_ARGUMENT")
    assert counter._value.get() >= 1


def test_every_rpc_of_the_service_is_served(channel):
    # the handlers are registered from the service descriptor: none may be missing
    for m in rpc.DESCRIPTOR.services_by_name["Robustness"].methods:
        kind = {(False, False): "unary_unary", (False, True): "unary_stream",
                (True, False): "stream_unary"}[m.client_streaming, m.server_streaming]
        call = raw(channel, m.name, kind)
        try:
            if m.client_streaming:
                call(iter([]), timeout=10)
            elif m.server_streaming:
                list(call(b"", timeout=10))
            else:
                call(b"", timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() not in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                                      grpc.StatusCode.UNKNOWN), (m.name, exc.code(), exc.details())


# ---------------------------------------------------------------- tensors on the wire

def _attack(model_id: str, x: tensor_pb2.Tensor) -> bytes:
    return rpc.AttackRequest(model_id=model_id, x=x, y=to_tensor(np.array([0], np.int64)),
                             attack={"norm": 1, "eps": 0.1}).SerializeToString()


def test_int64_overflowing_tensor_shape_is_invalid_argument(channel, linear_model):
    # 2**62 * 4 wraps to 0 in int64, which matched 0 bytes of data: was INTERNAL (reshape ValueError)
    x = tensor_pb2.Tensor(dtype="float32", shape=[2**62, 4], data=b"")
    code, details = status(lambda: raw(channel, "Attack")(_attack(linear_model.id, x), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("x:"), details


def test_tensor_shape_too_large_for_any_array_is_invalid_argument(channel, linear_model):
    # a zero dim makes 0 bytes right, but numpy refuses the shape: was INTERNAL
    x = tensor_pb2.Tensor(dtype="float32", shape=[2**40, 2**40, 0], data=b"")
    code, details = status(lambda: raw(channel, "Attack")(_attack(linear_model.id, x), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("x:"), details


@pytest.mark.parametrize("tensor, words", [
    (tensor_pb2.Tensor(dtype="float32", shape=[2**62, 4]), "too large"),
    (tensor_pb2.Tensor(dtype="float32", shape=[2**63 - 1, 2**63 - 1, 2]), "too large"),
    (tensor_pb2.Tensor(dtype="float32", shape=[2**61, 0]), "too large"),  # numpy: "array is too big"
    (tensor_pb2.Tensor(dtype="float32", shape=[1] * 9, data=b"\0" * 4), "at most 8"),
    (tensor_pb2.Tensor(dtype="float32", shape=[-1, 4]), "negative"),
    (tensor_pb2.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 20), "needs 24 bytes, got 20"),
    (tensor_pb2.Tensor(dtype="float64", shape=[1], data=b"\0" * 8), "unsupported dtype"),
])
def test_from_tensor_refuses_what_describes_no_array(tensor, words):
    with pytest.raises(WireError) as info:
        from_tensor(tensor, "x")
    assert info.value.field == "x" and str(info.value).startswith("x: ") and words in str(info.value)


def test_from_tensor_still_takes_empty_and_scalar_tensors():
    assert from_tensor(tensor_pb2.Tensor(dtype="float32", shape=[0, 3])).shape == (0, 3)
    assert from_tensor(tensor_pb2.Tensor(dtype="int64", shape=[], data=b"\1" + b"\0" * 7)) == 1


# ---------------------------------------------------------------- handlers

def test_negative_architecture_size_in_train_is_invalid_argument(channel):
    # torch raised RuntimeError ("negative dimension") out of zoo.build: was INTERNAL
    req = rpc.TrainRequest(architecture="mlp", dataset_id="tsipras", arch_args={"hidden": "-1"}).SerializeToString()
    code, details = status(lambda: raw(channel, "Train")(req, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("TrainRequest.arch_args[hidden]:"), details


def test_huge_architecture_size_in_train_is_invalid_argument(channel):
    # was accepted: a 400 MB network built just to check the request, then queued for training
    req = rpc.TrainRequest(architecture="mlp", dataset_id="tsipras", arch_args={"hidden": "1000000"})
    code, details = status(lambda: raw(channel, "Train")(req.SerializeToString(), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("TrainRequest.arch_args[hidden]:"), details


def test_status_message_echoing_a_long_value_is_clipped(channel):
    # a 3,000-character non-ASCII id echoed in the message (18 KB percent-encoded) overflowed the
    # client's 8 KiB metadata limit: the caller saw RESOURCE_EXHAUSTED instead of NOT_FOUND
    model_id = "é" * 3000
    req = res.GetModelRequest(model_id=model_id).SerializeToString()
    code, details = status(lambda: raw(channel, "GetModel")(req, timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    assert details.startswith("model_id: model 'ééé") and len(details.encode()) <= 1024


def test_wait_operation_with_an_undecodable_request_is_invalid_argument(channel):
    # a double field sent as a varint of the wrong wire type that runs off the end
    code, _ = status(lambda: raw(channel, "WaitOperation")(b"\x11\x00\x00", timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    ok = op_pb.WaitOperationRequest(operation_id="op-nope").SerializeToString()
    assert status(lambda: raw(channel, "WaitOperation")(ok, timeout=10))[0] == grpc.StatusCode.NOT_FOUND


def unary(channel, method: str, request):
    return lambda: raw(channel, method)(request.SerializeToString(), timeout=30)


@pytest.mark.parametrize("method, request_, field", [
    ("Robustify", rpc.RobustifyRequest(model_id="m-x", dataset_id="tsipras", name="n" * 129), "name"),
    ("BuildNonRobustDataset", rpc.BuildNonRobustDatasetRequest(mode=1, model_id="m-x", dataset_id="tsipras",
                                                               name="bad\x00name"), "name"),
    ("ExportModel", res.ExportModelRequest(model_id="m-x", dataset_id="tsipras", name="\n" * 3), "name"),
    ("TransferRate", rpc.TransferRateRequest(source_model_ids=[f"m-{i}" for i in range(17)], target_model_ids=["m-1"],
                                             dataset_id="tsipras"), "source_model_ids"),
    ("TransferRate", rpc.TransferRateRequest(source_model_ids=["m-1"], target_model_ids=["m-1"] * 10_000,
                                             dataset_id="tsipras"), "target_model_ids"),
])
def test_free_text_and_id_lists_are_bounded_before_anything_is_looked_up(channel, method, request_, field):
    """The names of generated datasets and exported models are bounded like upload names (and
    checked before the model id, which here is unknown); id lists have a length limit."""
    code, details = status(unary(channel, method, request_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details


@pytest.mark.parametrize("attacks, field", [
    ([rpc.AttackSweep(attack=results_pb2.AttackSpec(norm=results_pb2.LINF), eps=[0.01])] * 33, "attacks"),
    ([rpc.AttackSweep(attack=results_pb2.AttackSpec(norm=results_pb2.LINF), eps=[0.001 * k for k in range(1, 66)])], "attacks[0].eps"),
])
def test_evaluate_sweeps_and_radii_are_bounded(channel, linear_model, attacks, field):
    request = rpc.EvaluateRequest(model_id=linear_model.id, dataset_id="tsipras", limit=10, attacks=attacks)
    code, details = status(unary(channel, "Evaluate", request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field + ": at most"), details
