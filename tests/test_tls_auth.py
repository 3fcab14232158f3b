"""Safe to expose: TLS and mutual TLS on the gRPC port, the token (file, environment, one
header, constant-time comparison), reflection behind the token, and the metrics endpoint on its
own (loopback) host. Certificates are made with the openssl command into tmp folders."""
from __future__ import annotations

import hmac
import os
import shutil
import socket
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from advex.client import Client
from advex.client import cli
from advex.service import config as config_mod
from advex.service import plugin
from advex.service.inprocess import InProcessServer
from advex.v1 import resources_pb2 as res

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

TOKEN = "s3cret-token"


# ---------------------------------------------------------------------- certificates
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)


def _signed(folder: Path, name: str, ca: str, ext: str) -> None:
    (folder / f"{name}.ext").write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-set_serial",
             str(abs(hash(name)) % 10**9 + 1), "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca (trusted), other-ca (not), server (localhost, 127.0.0.1), client (by ca), stranger (by other-ca)."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _signed(d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                "extendedKeyUsage=serverAuth\n")
    _signed(d, "client", "ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    _signed(d, "stranger", "other-ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    return d


def _server(tmp_path: Path, **settings) -> InProcessServer:
    return InProcessServer(data_dir=str(tmp_path / "data"), data_roots=[], **settings)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# ---------------------------------------------------------------------- 1-2. TLS, mutual TLS, SDK, CLI
def test_tls_server_answers_a_client_that_trusts_its_ca_and_refuses_plaintext(tmp_path, pki):
    with _server(tmp_path, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key")) as srv:
        assert srv.target == f"127.0.0.1:{srv.running.port}"
        with Client(srv.target, tls=(pki / "ca.pem").read_bytes(), timeout=20) as c:  # PEM bytes
            assert isinstance(c.list_datasets(), list)
        with Client(f"localhost:{srv.running.port}", tls=str(pki / "ca.pem"), timeout=20) as c:  # a path
            assert isinstance(c.list_datasets(), list)
        with Client(srv.target, timeout=5) as c:  # plaintext against a TLS port
            assert _code(c.list_datasets) == grpc.StatusCode.UNAVAILABLE
        with Client(srv.target, tls=(pki / "other-ca.pem").read_bytes(), timeout=5) as c:  # does not trust it
            assert _code(c.list_datasets) == grpc.StatusCode.UNAVAILABLE
        # health and reflection are served on the same, secure port
        creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
        with grpc.secure_channel(srv.target, creds) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            replies = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            names = [s.name for s in replies[0].list_services_response.service]
            assert "advex.v1.Robustness" in names


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(tmp_path, pki):
    ca = (pki / "ca.pem").read_bytes()
    with _server(tmp_path, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                 tls_client_ca=str(pki / "ca.pem")) as srv:
        with Client(srv.target, tls=ca, timeout=5) as c:  # no client certificate
            assert _code(c.list_datasets) == grpc.StatusCode.UNAVAILABLE
        with Client(srv.target, tls=ca, timeout=5, client_cert=pki / "stranger.pem",
                    client_key=pki / "stranger.key") as c:  # signed by another CA
            assert _code(c.list_datasets) == grpc.StatusCode.UNAVAILABLE
        with Client(srv.target, tls=ca, timeout=20, client_cert=(pki / "client.pem").read_bytes(),
                    client_key=(pki / "client.key").read_bytes()) as c:
            assert isinstance(c.list_datasets(), list)
        # the CLI: --tls-ca and the client certificate from the environment
        env = {"ADVEX_TLS_CERT": str(pki / "client.pem"), "ADVEX_TLS_KEY": str(pki / "client.key")}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            assert cli.main(["--target", srv.target, "--tls-ca", str(pki / "ca.pem"), "--connect-timeout", "20",
                             "datasets", "list"]) == 0
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert cli.main(["--target", srv.target, "--tls-ca", str(pki / "ca.pem"), "--connect-timeout", "3",
                         "datasets", "list"]) != 0  # no client certificate


def test_client_keeps_its_positional_signature_and_checks_the_pair():
    c = Client("127.0.0.1:1", "tok", False, 5.0)  # target, token, tls, timeout as before
    assert c.timeout == 5.0 and c.metadata == (("authorization", "Bearer tok"),)
    c.close()
    with pytest.raises(ValueError):
        Client("127.0.0.1:1", tls=True, client_cert=b"cert only")


@pytest.mark.parametrize("argv,setting", [
    (["--tls-cert", "CERT"], "tls_cert"),                          # a certificate without its key
    (["--tls-key", "KEY"], "tls_key"),                             # a key without its certificate
    (["--tls-cert", "CERT", "--tls-key", "MISSING"], "tls_key"),   # unreadable key
    (["--tls-cert", "MISSING", "--tls-key", "KEY"], "tls_cert"),   # unreadable certificate
    (["--tls-cert", "KEY", "--tls-key", "KEY"], "tls_cert"),       # not a certificate
    (["--tls-client-ca", "CA"], "tls_client_ca"),                  # client CA without a server certificate
    (["--token-file", "MISSING"], "token_file"),
    (["--token-file", "EMPTY"], "token_file"),
    (["--token-file", "TOKENFILE", "--token", "x"], "token_file"),  # both
    (["--reflection-requires-token", "maybe"], "reflection_requires_token"),
])
def test_bad_tls_or_token_settings_are_one_line_and_exit_2(monkeypatch, capsys, tmp_path, pki, argv, setting):
    for name in [k for k in os.environ if k.startswith("ADVEX_")]:
        monkeypatch.delenv(name)
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "token").write_text(TOKEN + "\n")
    files = {"CERT": pki / "server.pem", "KEY": pki / "server.key", "CA": pki / "ca.pem",
             "MISSING": tmp_path / "missing.pem", "EMPTY": tmp_path / "empty", "TOKENFILE": tmp_path / "token"}
    argv = [str(files.get(a, a)) for a in argv]
    started = []

    async def never_serve(cfg, ready=None):
        started.append(cfg)

    import advex.service.server as server_mod

    monkeypatch.setattr(server_mod, "serve", never_serve)
    code = plugin.serve(argv + ["--data-dir", str(tmp_path / "unused"), "--port", "0", "--metrics-port", "0"])
    err = capsys.readouterr().err.strip()
    assert not started
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"advex serve: {setting}: "), err


# ---------------------------------------------------------------------- 3. the token
@pytest.fixture
def token_server(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")  # for the clients (a trailing newline, as echo writes it)
    with _server(tmp_path, token=TOKEN) as srv:
        yield srv


def _list(srv, metadata=()):
    with grpc.insecure_channel(srv.target) as ch:
        from advex.v1 import robustness_pb2_grpc as rpc_grpc

        return rpc_grpc.RobustnessStub(ch).ListDatasets(res.ListDatasetsRequest(), metadata=metadata, timeout=20)


def test_token_right_wrong_missing_and_duplicate_headers(token_server):
    right, wrong = ("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer nope")
    assert _list(token_server, (right,)) is not None
    for metadata in [(), (wrong,), (("authorization", TOKEN),), (right, wrong), (wrong, right), (right, right)]:
        with pytest.raises(grpc.RpcError) as info:
            _list(token_server, metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        if len(metadata) == 2:
            assert "send one authorization header" in info.value.details()


def test_token_comparison_is_constant_time(token_server, monkeypatch):
    calls = []
    original = hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    _list(token_server, (("authorization", f"Bearer {TOKEN}"),))
    with pytest.raises(grpc.RpcError):
        _list(token_server, (("authorization", "Bearer nope"),))
    assert len(calls) == 2
    assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
    assert calls[1][0] == b"Bearer nope"


def test_cli_token_from_file_and_environment(token_server, tmp_path, monkeypatch, capsys):
    for name in [k for k in os.environ if k.startswith("ADVEX_")]:
        monkeypatch.delenv(name)
    base = ["--target", token_server.target, "--connect-timeout", "20"]
    assert cli.main(base + ["datasets", "list"]) == 1  # no token: UNAUTHENTICATED
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert cli.main(base + ["--token-file", str(tmp_path / "token"), "datasets", "list"]) == 0
    monkeypatch.setenv("ADVEX_TOKEN_FILE", str(tmp_path / "token"))
    assert cli.main(base + ["datasets", "list"]) == 0
    monkeypatch.delenv("ADVEX_TOKEN_FILE")
    monkeypatch.setenv("ADVEX_TOKEN", TOKEN)
    assert cli.main(base + ["datasets", "list"]) == 0
    help_text = cli.build_parser().format_help()
    assert "process list" in " ".join(help_text.split())


def test_server_reads_the_token_from_a_file(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")  # a trailing newline, as editors and echo write it
    with _server(tmp_path, token_file=str(tmp_path / "token")) as srv:
        assert srv.cfg.token == TOKEN
        assert _list(srv, (("authorization", f"Bearer {TOKEN}"),)) is not None
        assert _code(lambda: _list(srv, (("authorization", "Bearer nope"),))) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda: _list(srv)) == grpc.StatusCode.UNAUTHENTICATED


def test_server_token_from_the_environment(tmp_path):
    cfg = config_mod.load(None, env={"ADVEX_TOKEN_FILE": str(_write(tmp_path / "t", TOKEN + "\r\n"))})
    assert cfg.token == TOKEN
    assert config_mod.load(None, env={"ADVEX_TOKEN": TOKEN}).token == TOKEN


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------- 5. reflection behind the token
def test_reflection_needs_the_token_and_health_does_not(token_server):
    request = [reflection_pb2.ServerReflectionRequest(list_services="")]
    with grpc.insecure_channel(token_server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter(request), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter(request), timeout=10,
                                           metadata=(("authorization", "Bearer nope"),)))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = list(stub.ServerReflectionInfo(iter(request), timeout=10,
                                                 metadata=(("authorization", f"Bearer {TOKEN}"),)))
        assert "advex.v1.Robustness" in [s.name for s in replies[0].list_services_response.service]
        for service in ("", "advex.v1.Robustness"):
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_can_stay_open_when_asked(tmp_path):
    with _server(tmp_path, token=TOKEN, reflection_requires_token=False) as srv, \
            grpc.insecure_channel(srv.target) as ch:
        replies = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert replies[0].list_services_response.service
        assert _code(lambda: _list(srv)) == grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------------- 4. metrics on their own host
def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_metrics_stay_on_loopback_when_grpc_listens_on_all_interfaces(tmp_path):
    mport = _free_port()
    with _server(tmp_path, host="0.0.0.0", metrics_port=mport) as srv:
        assert srv.running.metrics_http[0].server_address[:2] == ("127.0.0.1", mport)
    assert config_mod.from_kwargs(host="0.0.0.0").metrics_bind_host == "127.0.0.1"
    assert config_mod.from_kwargs(host="::").metrics_bind_host == "::1"
    assert config_mod.from_kwargs(host="0.0.0.0", metrics_host="0.0.0.0").metrics_bind_host == "0.0.0.0"
    assert config_mod.from_kwargs(metrics_host="[::1]").metrics_bind_host == "::1"
