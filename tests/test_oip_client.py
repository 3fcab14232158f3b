"""advex's Open Inference Protocol client (advex.service.oip) against a real MLServer (the
session's `mlserver` fixture, tests/mlserver.py) and against a hostile in-process HTTP server."""
from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from advex.service.oip import (EndpointError, EndpointTarget, OipClient, Pacer, Usage, check_metadata,
                               input_is_flat, parse_url)

ROOT = Path(__file__).resolve().parent.parent
SERVER_SRC = ROOT / "tests" / "oip_server"


def declared_metadata(model: str) -> dict:
    s = json.loads((SERVER_SRC / model / "model-settings.json").read_text())
    return {k: s[k] for k in ("name", "versions", "platform", "inputs", "outputs")}


def reference(mlserver, x: np.ndarray, rows_per_request: int = 256) -> np.ndarray:
    """What the runtime computes, request by request (BLAS may round a 600-row product differently
    from 256-row ones, by a few 1e-6)."""
    return np.concatenate([x[i:i + rows_per_request].reshape(-1, 784).astype(np.float32) @ mlserver.weight.T
                           + mlserver.bias for i in range(0, len(x), rows_per_request)])


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def client(url: str, model: str = "linear", pacer: Pacer | None = None, **kw) -> OipClient:
    kw.setdefault("backoff_s", 0.001)
    return OipClient(EndpointTarget(url=url, model_name=model, **kw), pacer=pacer)


@pytest.fixture(params=["rest", "grpc"])
def url(request, mlserver):
    return mlserver.rest_url if request.param == "rest" else mlserver.grpc_url


# ---------------------------------------------------------------- metadata
@pytest.mark.mlserver
def test_metadata_matches_the_declared_model(url, mlserver):
    with client(url) as c:
        assert c.metadata() == declared_metadata("linear")
        assert c.server_metadata() == {"name": "mlserver", "version": "1.7.1", "extensions": []}
        assert c.usage() == Usage(requests=0, rows=0, retries=0, failures=0, metadata_requests=2)


def test_check_metadata_accepts_and_refuses():
    meta = declared_metadata("linear")
    assert check_metadata(meta, (1, 28, 28), "NCHW", 10, "", "") == ("input", "logits")
    assert check_metadata(meta, (1, 28, 28), "NCHW", 10, "input", "logits") == ("input", "logits")
    nhwc = dict(meta, inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 28, 28, 1]}])
    assert check_metadata(nhwc, (1, 28, 28), "NHWC", 10, "", "") == ("input", "logits")
    flat = dict(meta, inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 784]}])
    assert check_metadata(flat, (1, 28, 28), "NCHW", 10, "", "") == ("input", "logits")
    dyn = dict(meta, inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 1, -1, -1]}],
               outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, -1]}])
    assert check_metadata(dyn, (1, 28, 28), "NCHW", 10, "", "") == ("input", "logits")

    cases = [
        ((meta, (1, 28, 28), "NHWC", 10, "", ""),
         "input 'input' of model 'linear' has shape [-1, 1, 28, 28]; expected [-1, 28, 28, 1] (NHWC) or [-1, 784] "
         "(flattened)"),
        ((meta, (3, 28, 28), "NCHW", 10, "", ""),
         "input 'input' of model 'linear' has shape [-1, 1, 28, 28]; expected [-1, 3, 28, 28] (NCHW) or [-1, 2352] "
         "(flattened)"),
        ((dict(meta, inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, -1]}]), (1, 28, 28), "NCHW", 10,
          "", ""),
         "input 'input' of model 'linear' has shape [-1, -1]; expected [-1, 1, 28, 28] (NCHW) or [-1, 784] "
         "(flattened)"),
        ((meta, (1, 28, 28), "NCHW", 100, "", ""),
         "output 'logits' of model 'linear' has shape [-1, 10]; expected [-1, 100] (100 classes)"),
        ((meta, (1, 28, 28), "NCHW", 10, "pixels", ""),
         "model 'linear' has no input named 'pixels' (its inputs: ['input'])"),
        ((meta, (1, 28, 28), "NCHW", 10, "", "probs"),
         "model 'linear' has no output named 'probs' (its outputs: ['logits'])"),
        ((dict(meta, inputs=meta["inputs"] * 2), (1, 28, 28), "NCHW", 10, "", ""),
         "model 'linear' has 2 inputs ['input', 'input']; name the input to use"),
        ((dict(meta, inputs=[{"name": "input", "datatype": "INT32", "shape": [-1, 1, 28, 28]}]), (1, 28, 28),
          "NCHW", 10, "", ""),
         "input 'input' is INT32; advex sends FP32 (model 'linear')"),
        ((meta, (1, 28, 28), "CHWN", 10, "", ""), "layout must be NCHW or NHWC, got 'CHWN'"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as e:
            check_metadata(*args)
        assert str(e.value) == message


def test_check_metadata_requires_fp32_inputs():
    """The client always sends FP32: an FP16, BF16 or FP64 input would be refused by a strict server."""
    meta = declared_metadata("linear")
    for dt in ("FP16", "BF16", "FP64"):
        other = dict(meta, inputs=[{"name": "x", "datatype": dt, "shape": [-1, 1, 28, 28]}])
        with pytest.raises(ValueError) as e:
            check_metadata(other, (1, 28, 28), "NCHW", 10, "", "")
        assert str(e.value) == f"input 'x' is {dt}; advex sends FP32 (model 'linear')"


def test_input_is_flat():
    meta = declared_metadata("linear")
    flat = dict(meta, inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 784]}])
    assert check_metadata(flat, (1, 28, 28), "NCHW", 10, "", "") == ("input", "logits")   # still accepted
    assert input_is_flat(flat, "input") and input_is_flat(flat, "")
    assert not input_is_flat(meta, "input") and not input_is_flat(meta, "")
    two = dict(meta, inputs=[{"name": "a", "datatype": "FP32", "shape": [-1, 784]},
                             {"name": "b", "datatype": "FP32", "shape": [-1, 28, 28, 1]}])
    assert input_is_flat(two, "a") and not input_is_flat(two, "b")
    with pytest.raises(ValueError, match="has no input named 'c'"):
        input_is_flat(two, "c")
    with pytest.raises(ValueError, match="has 2 inputs; name the input to use"):
        input_is_flat(two, "")


# ---------------------------------------------------------------- inference
@pytest.mark.mlserver
def test_infer_equals_the_linear_model(url, mlserver):
    with client(url, max_batch_size=256) as c:
        for n in (1, 7):
            x = images(n, seed=n)
            got = c.infer(x)
            assert got.dtype == np.float32 and got.shape == (n, 10)
            assert np.abs(got - reference(mlserver, x)).max() <= 1e-6
        assert c.infer(np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 10)
        calls0, rows0 = mlserver.served("linear")
        before = c.usage()
        x = images(600, seed=600)
        got = c.infer(x)
        assert np.abs(got - reference(mlserver, x)).max() <= 1e-6
        after = c.usage()
        assert (after.requests - before.requests, after.rows - before.rows, after.retries, after.failures) == \
            (3, 600, 0, 0)
        assert c.usage() == Usage(requests=5, rows=608, retries=0, failures=0, metadata_requests=1)
    assert mlserver.served("linear") == (calls0 + 3, rows0 + 600)


@pytest.mark.mlserver
def test_flaky_model_is_retried(url, mlserver):
    before = mlserver.counts("linear-flaky")
    x = images(50, seed=3)
    with client(url, "linear-flaky", max_batch_size=10, retries=3, input_name="input") as c:
        got = c.infer(x)
        usage = c.usage()
    assert np.abs(got - reference(mlserver, x, 10)).max() <= 1e-6
    after = mlserver.counts("linear-flaky")
    failures = after["failures"] - before["failures"]
    # calls 0, 2, 4, ... fail: each of the 5 requests fails once, except the first one when it
    # starts on an odd call
    assert failures == (5 if before["calls"] % 2 == 0 else 4)
    assert usage.retries == usage.failures == failures
    assert usage.requests == after["calls"] - before["calls"] == 5 + failures
    assert usage.rows == after["rows"] - before["rows"] == 10 * usage.requests


@pytest.mark.mlserver
def test_broken_model_is_not_retried(url, mlserver):
    calls0, _ = mlserver.served("linear-broken")
    with client(url, "linear-broken", retries=3, input_name="input") as c, pytest.raises(EndpointError) as e:
        c.infer(images(2))
    assert (e.value.kind, e.value.attempts) == ("internal", 1)
    assert str(e.value).startswith(f"{url} model 'linear-broken': inference failed: endpoint internal error after "
                                   "1 attempt: ")
    assert "simulated failure on call" in str(e.value) and "\n" not in str(e.value)
    assert mlserver.served("linear-broken")[0] == calls0 + 1


@pytest.mark.mlserver
def test_unavailable_model_exhausts_retries(url, mlserver):
    calls0, rows0 = mlserver.served("linear-unavailable")
    with client(url, "linear-unavailable", retries=2, input_name="input") as c:
        with pytest.raises(EndpointError) as e:
            c.infer(images(4))
        assert c.usage() == Usage(requests=3, rows=12, retries=2, failures=3, metadata_requests=0)
    assert (e.value.kind, e.value.attempts) == ("unavailable", 3)
    assert "endpoint unavailable after 3 attempts" in str(e.value)
    assert mlserver.served("linear-unavailable") == (calls0 + 3, rows0 + 12)


@pytest.mark.mlserver
def test_slow_model_times_out(url):
    t0 = time.monotonic()
    with client(url, "linear-slow", timeout_s=0.5, retries=1, input_name="input") as c:
        with pytest.raises(EndpointError) as e:
            c.infer(images(1))
    took = time.monotonic() - t0
    assert (e.value.kind, e.value.attempts) == ("deadline", 2)
    assert "timed out (0.5 s) after 2 attempts" in str(e.value)
    assert took < 2.0, took


@pytest.mark.mlserver
def test_declared_num_classes_is_checked(url):
    """A model registered with num_classes answering another class count is refused (REST and gRPC)."""
    with client(url, input_name="input", num_classes=10) as c:
        assert c.infer(images(2)).shape == (2, 10)
        assert c.infer(np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 10)
    with client(url, input_name="input", num_classes=3, retries=2) as c:
        assert c.infer(np.zeros((0, 1, 28, 28), np.float32)).shape == (0, 3)   # nothing sent
        with pytest.raises(EndpointError) as e:
            c.infer(images(2))
    assert (e.value.kind, e.value.attempts) == ("protocol", 1)
    assert "output 'logits' answered 10 classes, the model was registered with 3" in str(e.value)


@pytest.mark.mlserver
def test_unknown_model_is_not_found(url):
    with client(url, "nope", input_name="input") as c:
        with pytest.raises(EndpointError) as e:
            c.infer(images(1))
        assert (e.value.kind, e.value.attempts) == ("not_found", 1)
        with pytest.raises(EndpointError) as e:
            c.metadata()
        assert e.value.kind == "not_found"
        assert c.usage() == Usage(requests=1, rows=1, retries=0, failures=1, metadata_requests=1)


@pytest.mark.mlserver
def test_too_many_rows_is_invalid(url):
    with client(url, max_batch_size=300, input_name="input") as c, pytest.raises(EndpointError) as e:
        c.infer(images(257))
    assert (e.value.kind, e.value.attempts) == ("invalid", 1)
    assert "batch of 257 rows exceeds max_rows=256" in str(e.value)


@pytest.mark.mlserver
def test_refused_connection_is_unavailable():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for url in (f"http://127.0.0.1:{port}", f"grpc://127.0.0.1:{port}"):
        with client(url, retries=1, input_name="input") as c, pytest.raises(EndpointError) as e:
            c.infer(images(1))
        assert (e.value.kind, e.value.attempts) == ("unavailable", 2), str(e.value)


# ---------------------------------------------------------------- pacing
class FakeTime:
    def __init__(self):
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


@pytest.mark.mlserver
def test_qps_limit_spaces_requests(mlserver):
    fake = FakeTime()
    c = OipClient(EndpointTarget(url=mlserver.grpc_url, model_name="linear", input_name="input", max_qps=10,
                                 max_batch_size=1), sleep=fake.sleep, clock=fake.clock)
    with c:
        c.infer(images(5))
    assert c.usage().requests == 5
    assert sum(fake.sleeps) == pytest.approx(0.4, abs=1e-9)
    assert len(fake.sleeps) == 4


def test_clients_sharing_a_pacer_keep_to_its_rate(hostile):
    """The service makes one client per operation: clients of one endpoint share one Pacer, so
    that two operations together still start at most max_qps requests per second."""
    hostile.mode = "ok"
    fake = FakeTime()
    pacer = Pacer(10, clock=fake.clock, sleep=fake.sleep)
    url = f"http://127.0.0.1:{hostile.server_address[1]}"
    with client(url, "m", input_name="input", max_qps=10, pacer=pacer) as a, \
            client(url, "m", input_name="input", max_qps=10, pacer=pacer) as b:
        for _ in range(3):
            a.infer(images(1))
            b.infer(images(1))
        assert a.usage().requests == b.usage().requests == 3
    assert sum(fake.sleeps) == pytest.approx(0.5, abs=1e-9)   # 6 request starts, 0.1 s apart
    assert fake.sleeps == pytest.approx([0.1] * 5, abs=1e-9)


def test_backoff_doubles_and_is_capped():
    fake = FakeTime()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = OipClient(EndpointTarget(url=f"http://127.0.0.1:{port}", model_name="m", input_name="input", retries=6,
                                 backoff_s=1.0), sleep=fake.sleep, clock=fake.clock)
    with pytest.raises(EndpointError) as e:
        c.infer(images(1))
    assert e.value.attempts == 7
    assert fake.sleeps == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


# ---------------------------------------------------------------- a hostile endpoint
class Hostile(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    mode = "ok"

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None):
        self.send_response(status)
        for k, v in (headers or {"Content-Type": "application/json"}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = int(self.headers["Content-Length"])
        req = json.loads(self.rfile.read(n))
        rows = req["inputs"][0]["shape"][0]
        self.server.seen_headers.append(dict(self.headers))
        mode = self.server.mode
        out = {"name": "logits", "datatype": "FP32", "shape": [rows, 2], "data": [0.5] * (2 * rows)}
        if mode == "ok":
            self._send(200, json.dumps({"outputs": [out]}).encode())
        elif mode == "nested":
            self._send(200, json.dumps({"outputs": [dict(out, data=[[1.0, 2.0]] * rows)]}).encode())
        elif mode == "oversized":
            self._send(200, b"[" + b"0," * (3 * 1024 * 1024) + b"0]")
        elif mode == "oversized-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"10000\r\n" + b" " * 0x10000 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif mode == "redirect":
            self._send(307, b"", {"Location": "http://evil.example/v2/models/m/infer"})
        elif mode == "nan":
            self._send(200, json.dumps({"outputs": [dict(out, data=[float("nan")] * (2 * rows))]}).encode())
        elif mode == "wrong-shape":
            self._send(200, json.dumps({"outputs": [dict(out, shape=[rows, 1, 2])]}).encode())
        elif mode == "wrong-rows":
            self._send(200, json.dumps({"outputs": [dict(out, shape=[rows + 1, 2], data=[0.5] * (2 * rows + 2))]})
                       .encode())
        elif mode == "strings":
            self._send(200, json.dumps({"outputs": [dict(out, data=["1"] * (2 * rows))]}).encode())
        elif mode == "not-json":
            self._send(200, b"<html>hello</html>", {"Content-Type": "text/html"})
        elif mode == "deep":  # nesting that would exhaust a recursive JSON parser
            self._send(200, b"[" * 100_000 + b"]" * 100_000)
        elif mode == "teapot":
            self._send(418, json.dumps({"error": "x" * 2000}).encode())
        elif mode == "hang":
            time.sleep(1.5)
            self._send(200, json.dumps({"outputs": [out]}).encode())
        elif mode == "echo":     # an error quoting the credential received
            auth = self.headers["Authorization"]
            self._send(400, json.dumps({"error": f"bad auth: {auth}; token {auth.split()[-1]} unknown"}).encode())
        elif mode == "echo-datatype":   # the credential in a field the client quotes clipped to 40 characters
            dt = "y" * 20 + " " + self.headers["Authorization"]
            self._send(200, json.dumps({"outputs": [dict(out, datatype=dt)]}).encode())
        elif mode == "trickle":  # a header line every 0.2 s for 10 s: each read is quick, the answer never ends
            self.close_connection = True
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for i in range(50):
                time.sleep(0.2)
                self.wfile.write(f"X-Slow-{i}: {i}\r\n".encode())
        elif mode == "three-classes":
            self._send(200, json.dumps({"outputs": [dict(out, shape=[rows, 3], data=[0.5] * (3 * rows))]}).encode())
        elif mode == "padded":   # a good 2-class answer, padded with 100 KB of JSON white space
            self._send(200, json.dumps({"outputs": [out]}).encode()[:-1] + b" " * 100_000 + b"}")


class QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass   # the client hanging up on an oversized answer is expected


@pytest.fixture(scope="module")
def hostile():
    srv = QuietServer(("127.0.0.1", 0), Hostile)
    srv.mode = "ok"
    srv.seen_headers = []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("mode, kind, words", [
    ("oversized", "protocol", "exceeds the limit of"),
    ("oversized-chunked", "protocol", "exceeds the limit of"),
    ("redirect", "protocol",
     "HTTP 307 Temporary Redirect: redirect to http://evil.example/v2/models/m/infer not followed"),
    ("nan", "protocol", "holds non-finite values"),
    ("wrong-shape", "protocol", "has shape [3, 1, 2]; expected [3, k] logits"),
    ("wrong-rows", "protocol", "has shape [4, 2]; expected [3, k] logits"),
    ("strings", "protocol", "data holds a non-number: '1'"),
    ("not-json", "protocol", "response is not JSON (Content-Type 'text/html'): <html>hello</html>"),
    ("deep", "protocol", "response is not JSON"),
    ("teapot", "invalid", "HTTP 418 I'm a Teapot: xxx"),
    ("hang", "deadline", "timed out (0.3 s) after 2 attempts"),
])
def test_hostile_endpoint(hostile, mode, kind, words):
    hostile.mode = mode
    url = f"http://127.0.0.1:{hostile.server_address[1]}"
    with client(url, "m", input_name="input", timeout_s=0.3, retries=1) as c, pytest.raises(EndpointError) as e:
        c.infer(images(3))
    assert e.value.kind == kind, str(e.value)
    assert words in str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 600


@pytest.mark.parametrize("mode, kind", [("echo", "invalid"), ("echo-datatype", "protocol")])
def test_error_messages_redact_header_values(hostile, mode, kind):
    """An endpoint quoting the credential it received (whole, bare, or cut short by a clip) does
    not put it into the error message, which the service stores."""
    hostile.mode = mode
    url = f"http://127.0.0.1:{hostile.server_address[1]}"
    with client(url, "m", input_name="input", headers=(("Authorization", "Bearer TOPSECRET-0123456789"),)) as c, \
            pytest.raises(EndpointError) as e:
        c.infer(images(3))
    assert e.value.kind == kind, str(e.value)
    assert "TOPSEC" not in str(e.value) and "[redacted]" in str(e.value), str(e.value)
    if mode == "echo":
        assert "HTTP 400 Bad Request: bad auth: Bearer [redacted]; token [redacted] unknown" in str(e.value)


def test_grpc_error_details_redact_header_values():
    import grpc
    from concurrent import futures

    from advex.oip import open_inference_pb2_grpc as pbg

    class Echo(pbg.GRPCInferenceServiceServicer):
        def ModelInfer(self, request, context):
            auth = dict(context.invocation_metadata())["authorization"]
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad auth: {auth}; token {auth.split()[-1]} unknown")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pbg.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with client(f"grpc://127.0.0.1:{port}", "m", input_name="input",
                    headers=(("Authorization", "Bearer TOPSECRET-0123456789"),)) as c, \
                pytest.raises(EndpointError) as e:
            c.infer(images(1))
    finally:
        server.stop(None)
    assert (e.value.kind, e.value.attempts) == ("invalid", 1)
    assert "gRPC INVALID_ARGUMENT: bad auth: Bearer [redacted]; token [redacted] unknown" in str(e.value), \
        str(e.value)
    assert "TOPSEC" not in str(e.value)


def test_rest_deadline_bounds_a_trickled_answer(hostile):
    """timeout_s bounds the whole attempt (status line and headers included), not each read."""
    hostile.mode = "trickle"
    url = f"http://127.0.0.1:{hostile.server_address[1]}"
    t0 = time.monotonic()
    with client(url, "m", input_name="input", timeout_s=0.5, retries=1) as c, pytest.raises(EndpointError) as e:
        c.infer(images(3))
    took = time.monotonic() - t0
    assert (e.value.kind, e.value.attempts) == ("deadline", 2), str(e.value)
    assert "timed out (0.5 s) after 2 attempts" in str(e.value)
    assert took < 5.0, took   # about 1 s; without an overall deadline, 20 s


def test_declared_num_classes_refuses_other_class_counts(hostile):
    hostile.mode = "three-classes"
    url = f"http://127.0.0.1:{hostile.server_address[1]}"
    with client(url, "m", input_name="input") as c:
        assert c.infer(images(3)).shape == (3, 3)          # no class count declared: accepted
    with client(url, "m", input_name="input", num_classes=2, retries=1) as c, pytest.raises(EndpointError) as e:
        c.infer(images(3))
    assert (e.value.kind, e.value.attempts) == ("protocol", 1)
    assert "output 'logits' answered 3 classes, the model was registered with 2" in str(e.value)


def test_declared_num_classes_bounds_the_response(hostile):
    """With num_classes declared, an answer may take rows * num_classes * 48 bytes + 64 KiB."""
    hostile.mode = "padded"
    url = f"http://127.0.0.1:{hostile.server_address[1]}"
    with client(url, "m", input_name="input") as c:
        assert c.infer(images(3)).tolist() == [[0.5, 0.5]] * 3   # under the 10,000-class bound
    with client(url, "m", input_name="input", num_classes=2) as c, pytest.raises(EndpointError) as e:
        c.infer(images(3))
    assert e.value.kind == "protocol"
    assert f"exceeds the limit of {3 * 2 * 48 + 64 * 1024} bytes" in str(e.value)


def test_hostile_endpoint_good_answers_and_headers(hostile):
    url = f"http://127.0.0.1:{hostile.server_address[1]}"
    hostile.seen_headers.clear()
    for mode, value in (("ok", [0.5, 0.5]), ("nested", [1.0, 2.0])):
        hostile.mode = mode
        with client(url, "m", input_name="input", headers=(("Authorization", "Bearer s3cret"),)) as c:
            got = c.infer(images(3))
        assert got.dtype == np.float32 and got.tolist() == [value] * 3
    assert [h["Authorization"] for h in hostile.seen_headers] == ["Bearer s3cret"] * 2


def test_keep_alive_connection_is_reused_and_reconnected(hostile):
    """Three requests on one client, the server closing the idle connection in between:
    no error, and each request counted once."""
    hostile.mode = "ok"
    url = f"http://127.0.0.1:{hostile.server_address[1]}"
    with client(url, "m", input_name="input", max_batch_size=1) as c:
        c.infer(images(2))
        for conn in c._pool:        # the server side goes away while the connection idles
            conn.sock.shutdown(1)
        c.infer(images(1))
        assert c.usage() == Usage(requests=3, rows=3, retries=0, failures=0, metadata_requests=0)


# ---------------------------------------------------------------- URLs
def test_parse_url():
    ok = {
        "http://localhost": ("http", "localhost", 80),
        "https://models.example.com/": ("https", "models.example.com", 443),
        "http://127.0.0.1:8080": ("http", "127.0.0.1", 8080),
        "grpc://host:8001": ("grpc", "host", 8001),
        "GRPCS://Host:443": ("grpcs", "host", 443),
        "http://[::1]:8080": ("http", "::1", 8080),
        "grpc://[fe80::1]:9000": ("grpc", "fe80::1", 9000),
    }
    for url, parsed in ok.items():
        assert parse_url(url) == parsed
    bad = {
        "http://user:pw@host:80": "must not contain user info",
        "http://host:80/v2/models": "must not have a path (got '/v2/models')",
        "http://host:80?x=1": "must not have a query",
        "http://host:80/#frag": "must not have a fragment",
        "ftp://host:21": "has scheme 'ftp'; expected one of http, https, grpc, grpcs",
        "host:8001": "needs a scheme",
        "grpc://host": "needs a port: grpc://host:port",
        "grpcs://[::1]": "needs a port",
        "http://::1:8080": "put an IPv6 address in brackets",
        "http://[::1:8080": "unclosed IPv6 bracket",
        "http://host:0": "invalid port '0'",
        "http://host:99999": "invalid port '99999'",
        "http://host:abc": "invalid port 'abc'",
        "http://h:\u0660\u0668\u0660": "invalid port '\u0660\u0668\u0660'",   # Arabic-Indic digits "080"
        "http://h:\uff18\uff10": "invalid port '\uff18\uff10'",               # full-width digits "80"
        "http://h:\u00b2": "invalid port '\u00b2'",                          # superscript two
        "http://h:123456": "invalid port '123456'",
        "http://:8080": "has no host",
        "http://ho st:80": "whitespace or control characters",
        "": "endpoint URL is empty",
    }
    for url, words in bad.items():
        with pytest.raises(ValueError) as e:
            parse_url(url)
        assert words in str(e.value), (url, str(e.value))


# ---------------------------------------------------------------- the generated code
def test_generated_oip_code_is_current():
    from advex.oip import open_inference_pb2 as pb

    assert pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == "inference.GRPCInferenceService"
    assert pb.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    assert pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number == 7
    assert pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number == 6
    assert [m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods] == [
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
