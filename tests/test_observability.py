"""What an operator sees: the config file as a third source of settings, the log (one line per RPC
with its request id, one per operation event, other libraries' chatter held back, text or JSON),
the metrics added for dashboards (operation duration, build info, a latency histogram without
long-lived calls) and `advex health`."""
from __future__ import annotations

import io
import json
import logging

import grpc
import pytest
from prometheus_client import generate_latest

from advex.client import Client
from advex.client.cli import main as cli_main
from advex.service import config as config_mod
from advex.service import logs
from advex.service.inprocess import InProcessServer
from advex.service.plugin import serve
from advex.v1 import resources_pb2 as res


def test_config_file_is_the_third_source(tmp_path):
    path = tmp_path / "advex.toml"
    path.write_text('port = 50070\nworkers = 3\nendpoint_hosts = ["a.internal:8081"]\nlog_format = "json"\n'
                    'data_roots = ["/srv/data"]\n')
    cfg = config_mod.load(config_mod.make_parser().parse_args(["--workers", "2"]),
                          env={"ADVEX_CONFIG": str(path), "ADVEX_PORT": "50071"})
    # flag > environment > file > default
    assert (cfg.workers, cfg.port, cfg.endpoint_hosts, cfg.log_format, cfg.max_queue) == (
        2, 50071, ["a.internal:8081"], "json", 16)
    assert cfg.data_roots == ["/srv/data", config_mod.DEFAULT_DATA_ROOT] and cfg.config == str(path)
    flag = config_mod.load(config_mod.make_parser().parse_args(["--config", str(path)]), env={})
    assert flag.port == 50070


@pytest.mark.parametrize("text, message", [
    ("prot = 1\n", "prot: in config file '{path}' is not a setting (expected one of `advex serve --help`'s, "
                   "with underscores; did you mean 'port'?)"),
    ('port = "abc"\n', "port: 'abc' from config file '{path}' is not an integer (expected an integer from 0 to 65535)"),
    ("endpoint_hosts = 5\n", "endpoint_hosts: 5 from config file '{path}' is not a list (expected a list of strings)"),
    ("[server]\nport = 1\n", "server: in config file '{path}' is a table (expected a value: settings are flat, no "
                             "[sections])"),
    ("port = [1\n", "config: config file '{path}' is not valid TOML"),
])
def test_config_file_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / "advex.toml"
    path.write_text(text)
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(env={"ADVEX_CONFIG": str(path)})
    assert str(info.value).startswith(message.format(path=path)) and "\n" not in str(info.value)


def test_serve_stops_on_a_bad_config_file_before_anything_starts(tmp_path, capsys):
    path = tmp_path / "advex.toml"
    path.write_text("log_level = 'loud'\n")
    assert serve(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("advex serve: log_level: 'loud' from config file") and "debug, info, warning, error" in err


@pytest.fixture
def json_log():
    stream = io.StringIO()
    handler = logs.setup("info", "json", stream=stream)
    yield stream
    logging.getLogger().removeHandler(handler)


def _lines(stream) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_line_per_rpc_and_per_operation_event(tmp_path, json_log):
    with InProcessServer(data_dir=str(tmp_path), data_roots=[]) as srv, Client(srv.target) as c:
        with pytest.raises(grpc.RpcError):
            c.stub.GetModel(res.GetModelRequest(model_id="m-none"), metadata=(("x-request-id", "job-42.step-1"),),
                            timeout=10)
        op = c.train("linear", "tsipras", epochs=1, batch_size=200, limit=400)
        op.result(progress=False)
        c.wait_operation(op.id, timeout=1)
        text = generate_latest(srv.running.metrics.registry).decode()
    logging.getLogger("onnxscript").info("chatter")      # another library's INFO: held back
    logging.getLogger("onnxscript").warning("a real problem")  # its WARNING: kept
    lines = _lines(json_log)
    get = next(line for line in lines if line.get("method") == "GetModel")
    assert (get["code"], get["request_id"], get["logger"]) == ("NOT_FOUND", "job-42.step-1", "advex.rpc")
    assert get["duration_ms"] >= 0 and get["level"] == "info" and get["time"].endswith("Z")
    train = next(line for line in lines if line.get("method") == "Train")
    assert train["code"] == "OK" and len(train["request_id"]) == 16  # one made up when none is sent
    events = [(line["state"]) for line in lines if line.get("operation_id") == op.id]
    assert events == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert not any(line["message"] == "chatter" for line in lines)
    assert any(line["message"] == "a real problem" for line in lines)
    # the metrics beside it: durations by kind and state, the build, no latency for the long poll
    assert 'advex_operation_duration_seconds_count{kind="train",state="SUCCEEDED"} 1.0' in text
    assert "advex_build_info{" in text and 'device="cpu"' in text
    assert 'advex_requests_total{code="OK",method="WaitOperation"}' in text
    assert 'advex_request_latency_seconds_count{method="WaitOperation"}' not in text
    assert 'advex_request_latency_seconds_count{method="Train"} 1.0' in text


def test_the_request_id_comes_back_in_the_trailing_metadata(tmp_path):
    with InProcessServer(data_dir=str(tmp_path), data_roots=[]) as srv, Client(srv.target) as c:
        _, call = c.stub.ListModels.with_call(res.ListModelsRequest(), metadata=(("x-request-id", "abc-1"),),
                                              timeout=10)
        assert dict(call.trailing_metadata())["x-request-id"] == "abc-1"
        _, call = c.stub.ListModels.with_call(res.ListModelsRequest(), metadata=(("x-request-id", "bad id!"),),
                                              timeout=10)
        made = dict(call.trailing_metadata())["x-request-id"]
        assert made != "bad id!" and len(made) == 16  # a client's odd id is replaced, never logged


def test_text_lines_carry_the_fields(tmp_path):
    stream = io.StringIO()
    handler = logs.setup("info", "text", stream=stream)
    try:
        logging.getLogger("advex.rpc").info("GetModel NOT_FOUND 1.0 ms",
                                            extra={"request_id": "r1", "method": "GetModel", "code": "NOT_FOUND"})
    finally:
        logging.getLogger().removeHandler(handler)
    assert stream.getvalue().rstrip().endswith("advex.rpc: GetModel NOT_FOUND 1.0 ms request_id=r1 method=GetModel "
                                               "code=NOT_FOUND")


def test_health_command(tmp_path, capsys):
    with InProcessServer(data_dir=str(tmp_path), data_roots=[]) as srv:
        assert cli_main(["--target", srv.target, "health"]) == 0
        assert capsys.readouterr().out.strip() == "SERVING"
        assert cli_main(["--target", srv.target, "health", "--service", "no.such.Service"]) == 2
    assert cli_main(["--target", "127.0.0.1:9", "--connect-timeout", "0.5", "health"]) == 2
    assert "UNREACHABLE" in capsys.readouterr().err
