"""Models served by a real inference server (MLServer, Open Inference Protocol, REST and gRPC) as
black boxes: registration checked against the endpoint's metadata and the server's allow-list,
black-box results equal to those of the same weights uploaded directly (same seeds), exact query
counts (what advex says it sent = what the endpoint saw), transfer attacks and TransferRate
targets, and a failing or slow endpoint ending the operation with a precise status, never a hang."""
from __future__ import annotations

import http.server
import json
import os
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from advex.client import Client
from advex.client.sdk import OperationError, attack_spec
from advex.engine import zoo
from advex.engine.loaders import save_safetensors
from advex.service.inprocess import InProcessServer
from advex.v1 import resources_pb2 as res
from advex.v1 import robustness_pb2 as rpc
from advex.v1.wire import to_tensor

pytestmark = pytest.mark.mlserver

TOKEN_ENV = "ADVEX_TEST_ENDPOINT_SECRET"
SECRET = "s3cret-token-that-must-never-be-stored"
N = 40
SQUARE = {"norm": "Linf", "eps": [0.05], "method": "square", "steps": 40, "seed": 3}


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlserver):
    os.environ[TOKEN_ENV] = SECRET
    data_dir = tmp_path_factory.mktemp("advex-endpoints")
    with InProcessServer(data_dir=str(data_dir), data_roots=[], endpoint_hosts=[mlserver.host],
                         endpoint_credentials=[f"ci=env:{TOKEN_ENV}", "gone=env:ADVEX_TEST_UNSET_VARIABLE",
                                               f"bound@127.0.0.1:1=env:{TOKEN_ENV}"]) as srv:
        srv.data_dir = data_dir
        yield srv
    os.environ.pop(TOKEN_ENV, None)


@pytest.fixture(scope="module")
def twin(client, mlserver, tmp_path_factory):
    """The endpoint's weights uploaded as a torch model, and a dataset the endpoint classifies
    correctly (labels = its predictions)."""
    net = zoo.Linear(784, 10)
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(mlserver.weight))
        net.head.bias.copy_(torch.from_numpy(mlserver.bias))
    path = tmp_path_factory.mktemp("twin") / "linear.safetensors"
    save_safetensors(net, path)
    model = client.upload_model(path, format="safetensors", architecture="linear", input_shape=[1, 28, 28],
                                num_classes=10, name="twin")
    x = np.random.default_rng(7).random((N, 1, 28, 28), dtype=np.float32)
    y = (x.reshape(N, -1) @ mlserver.weight.T + mlserver.bias).argmax(1)
    dataset = client.upload_dataset((x, y), name="endpoint-data", split="test", num_classes=10)
    return model, dataset


def _register(client, mlserver, protocol: str = "rest", model: str = "linear", **kw) -> res.Model:
    url = mlserver.rest_url if protocol == "rest" else mlserver.grpc_url
    return client.register_endpoint(url, model, input_shape=[1, 28, 28], num_classes=10, name=f"{model}-{protocol}",
                                    **kw)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_registration_reads_and_checks_the_endpoint(client, mlserver):
    import hashlib
    import json

    rest = _register(client, mlserver, "rest")
    assert rest.spec.format == res.ENDPOINT and not rest.has_gradients and not rest.has_features
    assert (rest.spec.endpoint.input_name, rest.spec.endpoint.output_name) == ("input", "logits")
    identity = json.loads(rest.endpoint_metadata_json)
    assert identity["model"]["platform"] == "advex-test-linear"
    assert identity["model"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert identity["server"]["name"] == "mlserver"
    assert rest.sha256 == hashlib.sha256(rest.endpoint_metadata_json.encode()).hexdigest()
    again = _register(client, mlserver, "rest", timeout_seconds=12)
    assert again.id == rest.id and again.create_time == rest.create_time and again.sha256 == rest.sha256
    assert again.spec.endpoint.timeout_seconds == 12
    grpc_model = _register(client, mlserver, "grpc")
    assert grpc_model.id != rest.id and grpc_model.spec.endpoint.url == mlserver.grpc_url


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_black_box_results_equal_the_uploaded_model_and_queries_are_exact(client, mlserver, twin, protocol):
    model, dataset = twin
    endpoint = _register(client, mlserver, protocol, max_batch_size=16)
    direct = client.evaluate(model.id, dataset.id, attacks=[SQUARE]).result(progress=False)
    calls0, rows0 = mlserver.served("linear")
    served = client.evaluate(endpoint.id, dataset.id, attacks=[SQUARE]).result(progress=False)
    calls1, rows1 = mlserver.served("linear")
    assert served.clean_correct == direct.clean_correct == N
    assert [r.robust_correct for r in served.robust] == [r.robust_correct for r in direct.robust]
    assert 0 < served.robust[0].robust_correct < N  # the attack did something, and not everything
    assert served.worst_case[0].per_example.data == direct.worst_case[0].per_example.data
    assert served.robust[0].mean_queries == direct.robust[0].mean_queries
    usage = served.endpoint_usage
    assert usage.model_id == endpoint.id
    assert (usage.requests, usage.rows) == (calls1 - calls0, rows1 - rows0)
    assert usage.retries == 0 and usage.failures == 0
    # max_batch_size 16: the clean pass alone is ceil(40 / 16) = 3 requests of 16, 16 and 8 rows
    assert usage.requests >= 3 and usage.rows >= N
    assert not direct.HasField("endpoint_usage")


def test_transfer_attacks_and_transfer_rate_targets(client, mlserver, twin):
    model, dataset = twin
    endpoint = _register(client, mlserver, "grpc")
    pgd = {"norm": "Linf", "eps": [0.03], "method": "pgd", "steps": 10, "seed": 1}
    white = client.evaluate(model.id, dataset.id, attacks=[pgd]).result(progress=False)
    crafted = client.evaluate(endpoint.id, dataset.id, attacks=[pgd], surrogate_model_id=model.id).result(progress=False)
    # crafted on the twin, judged on the endpoint: the same function, so the same survivors
    assert crafted.robust[0].crafted_on_model_id == model.id
    assert crafted.worst_case[0].per_example.data == white.worst_case[0].per_example.data
    rates = client.transfer_rate([model.id], [endpoint.id, model.id], dataset.id, norm="Linf", eps=0.03,
                                 method="pgd", steps=10).result(progress=False)
    to_endpoint, to_twin = rates.pairs
    assert to_endpoint.target_model_id == endpoint.id
    assert (to_endpoint.transferred, to_endpoint.fooled_target, to_endpoint.correct_on_target) == (
        to_twin.transferred, to_twin.fooled_target, to_twin.correct_on_target)
    assert to_endpoint.transfer_rate == 1.0  # the same function: every success transfers
    assert [u.model_id for u in rates.endpoint_usage] == [endpoint.id] and rates.endpoint_usage[0].rows == 2 * N


def test_white_box_attacks_are_refused_on_an_endpoint(client, mlserver):
    endpoint = _register(client, mlserver, "rest")
    x = np.zeros((2, 1, 28, 28), np.float32)
    code, details = _code(lambda: client.attack(endpoint.id, x, [0, 1], method="pgd", eps=0.1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "inference endpoint" in details
    out = client.attack(endpoint.id, x, [0, 1], method="square", eps=0.1, steps=5)
    assert out.queries is not None and len(out.x_adv) == 2
    calls0, rows0 = mlserver.served("linear")
    reply = client.stub.Attack(rpc.AttackRequest(model_id=endpoint.id, x=to_tensor(x), y=to_tensor(np.array([0, 1])),
                                                 attack=attack_spec("Linf", 0.1, "square", 5)), timeout=30)
    calls1, rows1 = mlserver.served("linear")
    usage = reply.endpoint_usage
    assert usage.model_id == endpoint.id and (usage.requests, usage.rows) == (calls1 - calls0, rows1 - rows0) > (0, 0)


def test_a_failing_endpoint_is_retried_then_fails_the_operation_precisely(client, mlserver, twin):
    _, dataset = twin
    endpoint = _register(client, mlserver, "rest", model="linear-fails-batches", retries=2, backoff_seconds=0.01)
    before = mlserver.counts("linear-fails-batches")
    t0 = time.monotonic()
    with pytest.raises(OperationError) as info:
        client.evaluate(endpoint.id, dataset.id, attacks=[SQUARE]).result(progress=False)
    after = mlserver.counts("linear-fails-batches")
    assert time.monotonic() - t0 < 60
    error = info.value.operation.error
    assert error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert endpoint.id in error.message and "linear-fails-batches" in error.message
    assert "after 3 attempts" in error.message and "HTTP 503" in error.message
    # the first batch: one request and two retries, all refused; then nothing more was sent
    assert after["failures"] - before["failures"] == 3 and after["calls"] - before["calls"] == 3


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_slow_endpoint_times_out_instead_of_hanging(client, mlserver, twin, protocol):
    _, dataset = twin
    endpoint = _register(client, mlserver, protocol, model="linear-slow-batches", timeout_seconds=0.5, retries=1,
                         backoff_seconds=0.01)
    t0 = time.monotonic()
    with pytest.raises(OperationError) as info:
        client.evaluate(endpoint.id, dataset.id, attacks=[SQUARE]).result(progress=False)
    assert time.monotonic() - t0 < 30  # two attempts of 0.5 s, not the endpoint's 3 s each
    error = info.value.operation.error
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and "after 2 attempts" in error.message


def test_registration_refusals(client, mlserver):
    port = int(mlserver.rest_url.rsplit(":", 1)[1])
    cases = [
        (dict(url="http://10.0.0.1:8080"), grpc.StatusCode.PERMISSION_DENIED, "allow-list"),
        (dict(url="http://localhost:%d" % port), grpc.StatusCode.PERMISSION_DENIED, "allow-list"),  # a name, not the address
        (dict(url=mlserver.rest_url + "/v2/models"), grpc.StatusCode.INVALID_ARGUMENT, "url"),
        (dict(url="ftp://127.0.0.1:21"), grpc.StatusCode.INVALID_ARGUMENT, "url"),
        (dict(url=f"http://user:pw@127.0.0.1:{port}"), grpc.StatusCode.INVALID_ARGUMENT, "url"),
        (dict(num_classes=9), grpc.StatusCode.INVALID_ARGUMENT, "10"),
        (dict(input_shape=[3, 28, 28]), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (dict(model_name="no-such-model"), grpc.StatusCode.FAILED_PRECONDITION, "no-such-model"),
        (dict(model_name="../etc"), grpc.StatusCode.INVALID_ARGUMENT, "model_name"),
        (dict(credential="nope"), grpc.StatusCode.INVALID_ARGUMENT, "credential"),
        (dict(credential="gone"), grpc.StatusCode.FAILED_PRECONDITION, "ADVEX_TEST_UNSET_VARIABLE"),
        (dict(retries=11), grpc.StatusCode.INVALID_ARGUMENT, "retries"),
        (dict(timeout_seconds=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds"),
        (dict(max_qps=1e-300), grpc.StatusCode.INVALID_ARGUMENT, "max_qps"),
        (dict(credential="bound"), grpc.StatusCode.PERMISSION_DENIED, "bound to 127.0.0.1:1"),
        (dict(model_name="linear-unavailable", retries=0), grpc.StatusCode.UNAVAILABLE, "503"),
    ]
    for change, want, text in cases:
        args = dict(url=mlserver.rest_url, model_name="linear", input_shape=[1, 28, 28], num_classes=10)
        args.update(change)
        url, name = args.pop("url"), args.pop("model_name")
        code, details = _code(lambda: client.register_endpoint(url, name, **args))
        assert (code, text in details) == (want, True), (change, code, details)
    # UploadModel cannot make an ENDPOINT model
    spec = res.ModelSpec(name="x", format=res.ENDPOINT, num_classes=10, input_shape=[1, 28, 28])
    code, details = _code(lambda: client.stub.UploadModel(iter([res.UploadModelRequest(spec=spec),
                                                                      res.UploadModelRequest(chunk=b"x" * 64)]), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "RegisterEndpoint" in details


def test_credentials_are_read_by_the_server_and_never_stored(client, mlserver, server):
    model = _register(client, mlserver, "rest", credential="ci")
    assert model.spec.endpoint.credential == "ci"
    assert SECRET not in str(client.get_model(model.id))
    stored = b"".join(p.read_bytes() for p in server.data_dir.rglob("advex.sqlite3*"))
    assert b"ci=env" not in stored and SECRET.encode() not in stored and TOKEN_ENV.encode() not in stored


def test_a_server_without_an_allow_list_contacts_no_endpoint(tmp_path, mlserver):
    with InProcessServer(data_dir=str(tmp_path), data_roots=[]) as srv, Client(srv.target) as c:
        before = mlserver.counts("linear")
        code, details = _code(lambda: c.register_endpoint(mlserver.rest_url, "linear", input_shape=[1, 28, 28],
                                                          num_classes=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "endpoint_hosts: none" in details
        assert mlserver.counts("linear") == before


def test_retries_are_counted_in_the_result(client, mlserver, twin):
    _, dataset = twin
    endpoint = _register(client, mlserver, "grpc", model="linear-flaky", retries=3, backoff_seconds=0.01)
    before = mlserver.counts("linear-flaky")
    result = client.evaluate(endpoint.id, dataset.id, attacks=[SQUARE]).result(progress=False)
    after = mlserver.counts("linear-flaky")
    usage = result.endpoint_usage
    # every other call fails (503, which MLServer's gRPC reports as UNKNOWN): each is retried once
    assert usage.failures == after["failures"] - before["failures"] > 0
    assert usage.retries == usage.failures and usage.requests == after["calls"] - before["calls"]
    assert result.clean_correct == N


def test_max_qps_spaces_the_requests(client, mlserver, twin):
    _, dataset = twin
    endpoint = _register(client, mlserver, "grpc", max_qps=25)
    t0 = time.monotonic()
    result = client.evaluate(endpoint.id, dataset.id, limit=8,
                             attacks=[{**SQUARE, "steps": 10}]).result(progress=False)
    wall = time.monotonic() - t0
    requests = result.endpoint_usage.requests
    assert requests >= 5 and wall >= (requests - 1) / 25  # a lower bound the limit guarantees, not a timing


# ---------------------------------------------------------------- a scripted OIP endpoint

class _Scripted(http.server.BaseHTTPRequestHandler):
    """A REST OIP endpoint of the MLServer fixture's linear model with scripted misbehaviour,
    by model name: `echo` refuses batches with a 400 that quotes the authorization header it got,
    `narrow` answers batches with 3 classes, `flat` takes its input flattened ([-1, 784])."""
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        if self.path == "/v2":
            return self._send(200, {"name": "scripted", "version": "1", "extensions": []})
        name = self.path.rsplit("/", 1)[-1]
        shape = [-1, 784] if name == "flat" else [-1, 1, 28, 28]
        self._send(200, {"name": name, "versions": ["1"], "platform": "scripted",
                         "inputs": [{"name": "input", "datatype": "FP32", "shape": shape}],
                         "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]})

    def do_POST(self):  # noqa: N802
        name = self.path.split("/")[3]
        self.server.headers_seen.append(self.headers.get("Authorization"))
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        inp = request["inputs"][0]
        n = inp["shape"][0]
        if name == "flat" and len(inp["shape"]) != 2:
            return self._send(400, {"error": f"expected [n, 784], got {inp['shape']}"})
        if name == "echo" and n > 1:
            return self._send(400, {"error": f"bad auth: {self.headers.get('Authorization')}"})
        x = np.asarray(inp["data"], dtype=np.float32).reshape(n, -1)
        logits = x @ self.server.weight.T + self.server.bias
        if name == "narrow" and n > 1:
            logits = logits[:, :3]
        self._send(200, {"model_name": name, "outputs": [{"name": "logits", "datatype": "FP32",
                                                          "shape": list(logits.shape),
                                                          "data": logits.ravel().tolist()}]})

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def scripted(mlserver):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    srv.daemon_threads = True
    srv.weight, srv.bias, srv.headers_seen = mlserver.weight, mlserver.bias, []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _scripted(client, scripted, name: str, **kw) -> res.Model:
    url = f"http://127.0.0.1:{scripted.server_address[1]}"
    return client.register_endpoint(url, name, input_shape=[1, 28, 28], num_classes=10, retries=0, **kw)


def test_the_credential_reaches_the_endpoint_and_an_echo_of_it_is_redacted(client, scripted, twin, server):
    _, dataset = twin
    scripted.headers_seen.clear()
    endpoint = _scripted(client, scripted, "echo", credential="ci")
    assert scripted.headers_seen == [f"Bearer {SECRET}"]  # the registration's one-example check
    with pytest.raises(OperationError) as info:
        client.evaluate(endpoint.id, dataset.id, attacks=[SQUARE]).result(progress=False)
    error = info.value.operation.error
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "bad auth: Bearer [redacted]" in error.message and SECRET not in error.message
    stored = b"".join(p.read_bytes() for p in server.data_dir.rglob("advex.sqlite3*"))
    assert SECRET.encode() not in stored


def test_an_endpoint_changing_its_class_count_fails_precisely(client, scripted, twin):
    _, dataset = twin
    endpoint = _scripted(client, scripted, "narrow")
    with pytest.raises(OperationError) as info:
        client.evaluate(endpoint.id, dataset.id, attacks=[SQUARE]).result(progress=False)
    error = info.value.operation.error
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "10" in error.message
    assert "3 classes" in error.message


def test_a_flattened_input_is_sent_flattened(client, scripted, twin):
    model, dataset = twin
    endpoint = _scripted(client, scripted, "flat")
    served = client.evaluate(endpoint.id, dataset.id, attacks=[SQUARE]).result(progress=False)
    direct = client.evaluate(model.id, dataset.id, attacks=[SQUARE]).result(progress=False)
    assert served.clean_correct == N
    assert served.worst_case[0].per_example.data == direct.worst_case[0].per_example.data


def test_the_suites_black_box_part_runs_on_an_endpoint(client, mlserver, twin):
    _, dataset = twin
    endpoint = _register(client, mlserver, "grpc")
    result = client.evaluate(endpoint.id, dataset.id, limit=8, suite="autoattack",
                             attacks=[{"norm": "Linf", "eps": [0.3]}]).result(progress=False)
    assert [(r.attack.method, r.suite) for r in result.robust] == [("square", "autoattack")]
    assert sorted(s.attack.method for s in result.skipped) == ["apgd-ce", "apgd-t", "fab-t"]
    assert all("inference endpoint" in s.reason for s in result.skipped)
    assert result.worst_case[0].robust_correct == result.robust[0].robust_correct
    assert result.endpoint_usage.requests > 0
