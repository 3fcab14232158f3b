"""`advex serve` settings and addresses as users meet them: a port already in use is refused
(exit 2, one line) instead of quietly sharing connections; IPv6 hosts in both spellings; every
bad setting is one line naming the setting, its source and value (exit 2); --help shows every
setting's default, environment variable and meaning; data roots follow one rule."""
from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import fields
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from advex.client import Client
from advex.service import config as config_mod
from advex.service import plugin
from advex.service.inprocess import InProcessServer

from conftest import require_builtin

DEFAULT_ROOT = "/usr/share/datasets"


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def advex_command() -> list[str]:
    """The installed `advex` script next to this interpreter (what users run), else the module."""
    script = Path(sys.executable).parent / "advex"
    return [str(script)] if script.exists() else [sys.executable, "-m", "advex.client.cli"]


class ServerProcess:
    """`advex serve ...` in its own process; .wait_for(text) reads its output until text shows."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(advex_command() + ["serve", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def wait_for(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line == "":
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} from `advex serve`; it wrote: {''.join(self.seen)!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def health_status(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {stderr!r}"
    return lines[0]


# ---------------------------------------------------------------------- 1. a port already in use
def test_second_server_on_a_port_in_use_exits_2_and_the_first_keeps_serving(tmp_path):
    port, mport = free_port(), free_port()
    first = ServerProcess("--port", str(port), "--metrics-port", str(mport), "--data-dir", str(tmp_path / "a"),
                          "--data-roots", str(tmp_path))
    try:
        first.wait_for(f"serving on 127.0.0.1:{port}")
        # same gRPC port (and the same data dir, as a user typing the command twice would);
        # another gRPC port but the first one's metrics port
        second = subprocess.Popen(advex_command() + ["serve", "--port", str(port), "--metrics-port", "0",
                                                     "--data-dir", str(tmp_path / "a")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        third = subprocess.Popen(advex_command() + ["serve", "--port", str(free_port()), "--metrics-port", str(mport),
                                                    "--data-dir", str(tmp_path / "c")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _, err2 = second.communicate(timeout=30)
            _, err3 = third.communicate(timeout=30)
        finally:
            for p in (second, third):
                if p.poll() is None:  # today: it starts and shares the port
                    p.kill()
                    p.wait()
        assert second.returncode == 2, err2
        assert one_line(err2) == (f"advex serve: cannot listen on 127.0.0.1:{port}: the address is in use "
                                  "(is another advex serve running? choose another --port)")
        assert third.returncode == 2, err3
        assert one_line(err3).startswith(f"advex serve: cannot serve metrics on 127.0.0.1:{mport}: the address "
                                         "is in use (is another advex serve running? choose another --metrics-port")
        assert not (tmp_path / "c").exists()  # refused before touching its data dir
        assert health_status(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.SERVING
        with Client(f"127.0.0.1:{port}") as c:
            assert "tsipras" in [d.id for d in c.list_datasets()]
        assert "advex_requests_total" in urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics",
                                                                timeout=10).read().decode()
    finally:
        first.stop()
    assert first.proc.returncode == 0, "".join(first.seen)


def test_start_raises_listen_error_for_addresses_in_use(tmp_path):
    from advex.service.server import ListenError

    mport = free_port()
    with InProcessServer(data_dir=str(tmp_path / "a"), data_roots=[], metrics_port=mport) as first:
        port = first.running.port
        with pytest.raises(ListenError, match=re.escape(f"cannot listen on 127.0.0.1:{port}: the address is in use")):
            InProcessServer(data_dir=str(tmp_path / "b"), data_roots=[], port=port).start()
        with pytest.raises(ListenError, match=re.escape(f"cannot serve metrics on 127.0.0.1:{mport}: the address "
                                                        "is in use")):
            InProcessServer(data_dir=str(tmp_path / "c"), data_roots=[], metrics_port=mport).start()
        assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
        with Client(first.target) as c:
            assert "tsipras" in [d.id for d in c.list_datasets()]


# ---------------------------------------------------------------------- 2. IPv6
def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_host_in_both_spellings_serves_grpc_and_metrics(tmp_path):
    mport = free_port("::1")
    with InProcessServer(host="::1", data_dir=str(tmp_path / "a"), data_roots=[], metrics_port=mport) as srv:
        assert srv.target == f"[::1]:{srv.running.port}"
        assert health_status(srv.target) == health_pb2.HealthCheckResponse.SERVING
        assert "advex_requests_total" in urllib.request.urlopen(f"http://[::1]:{mport}/metrics", timeout=10).read().decode()
    port, mport = free_port("::1"), free_port("::1")
    server = ServerProcess("--host", "[::1]", "--port", str(port), "--metrics-port", str(mport),
                           "--data-dir", str(tmp_path / "b"), "--data-roots", str(tmp_path))
    try:
        server.wait_for(f"advex: serving on [::1]:{port}, metrics on http://[::1]:{mport}/metrics")
        assert health_status(f"[::1]:{port}") == health_pb2.HealthCheckResponse.SERVING
        with Client(f"[::1]:{port}") as c:
            assert "tsipras" in [d.id for d in c.list_datasets()]
        text = urllib.request.urlopen(f"http://[::1]:{mport}/metrics", timeout=10).read().decode()
        assert 'advex_requests_total{code="OK",method="ListDatasets"} 1.0' in text
    finally:
        server.stop()
    assert server.proc.returncode == 0, "".join(server.seen)


def test_host_spellings_normalise_once():
    for spelling in ("::1", "[::1]", " [::1] "):
        cfg = config_mod.load(argparse.Namespace(host=spelling), env={})
        assert cfg.host == "::1"
        assert config_mod.address(cfg.host, 50051) == "[::1]:50051"
    assert config_mod.load(None, env={"ADVEX_HOST": "[::]"}).host == "::"
    assert config_mod.address("127.0.0.1", 1) == "127.0.0.1:1"


# ---------------------------------------------------------------------- 3. configuration errors
@pytest.mark.parametrize("env,argv,setting,source,value", [
    ({"ADVEX_WORKERS": "abc"}, [], "workers", "environment ADVEX_WORKERS", "abc"),
    ({}, ["--workers", "0"], "workers", "flag --workers", "0"),
    ({"ADVEX_MAX_QUEUE": "0"}, [], "max_queue", "environment ADVEX_MAX_QUEUE", "0"),
    ({}, ["--port", "70000"], "port", "flag --port", "70000"),
    ({"ADVEX_PORT": "-1"}, [], "port", "environment ADVEX_PORT", "-1"),
    ({}, ["--metrics-port", "nine"], "metrics_port", "flag --metrics-port", "nine"),
    ({"ADVEX_SHUTDOWN_GRACE_S": "soon"}, [], "shutdown_grace_s", "environment ADVEX_SHUTDOWN_GRACE_S", "soon"),
    ({}, ["--shutdown-grace-s", "-1"], "shutdown_grace_s", "flag --shutdown-grace-s", "-1"),
    ({}, ["--max-batch", "1.5"], "max_batch", "flag --max-batch", "1.5"),
    ({"ADVEX_DEVICE": "gpu"}, [], "device", "environment ADVEX_DEVICE", "gpu"),
    ({}, ["--host", "[::1"], "host", "flag --host", "[::1"),
    ({}, ["--torch-threads", "-2"], "torch_threads", "flag --torch-threads", "-2"),
    ({"ADVEX_WORKERS": "4"}, ["--workers", "x"], "workers", "flag --workers", "x"),  # the flag is what counts
    ({}, ["--port", "9108"], "port", "flag --port", "9108"),  # the default metrics port: not both
])
def test_bad_setting_is_one_line_naming_it_and_exit_code_2(monkeypatch, capsys, env, argv, setting, source, value):
    for name in [k for k in os.environ if k.startswith("ADVEX_")]:
        monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    started = []

    async def never_serve(cfg, ready=None):  # were the settings accepted, the server must not run here
        started.append(cfg)

    import advex.service.server as server_mod

    monkeypatch.setattr(server_mod, "serve", never_serve)
    code = plugin.serve(argv + ["--data-dir", "unused"])
    out = capsys.readouterr()
    assert not started
    assert code == 2
    line = one_line(out.err)
    assert line.startswith(f"advex serve: {setting}: ") and source in line and value in line, line


def test_unknown_flag_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as info:
        plugin.serve(["--wokers", "2"])
    assert info.value.code == 2
    assert "--wokers" in one_line(capsys.readouterr().err)


def test_bad_environment_through_the_real_command_is_one_line_without_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADVEX_")}
    env["ADVEX_WORKERS"] = "abc"
    done = subprocess.run(advex_command() + ["serve", "--data-dir", str(tmp_path), "--port", "0",
                                             "--metrics-port", "0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert one_line(done.stderr) == ("advex serve: workers: 'abc' from environment ADVEX_WORKERS is not an integer "
                                     "(expected an integer >= 1)")
    assert not (tmp_path / "advex.sqlite3").exists()


# ---------------------------------------------------------------------- 4. --help
def help_entries(text: str) -> dict[str, str]:
    """--flag -> its whole help (metavar and wrapped lines joined by single spaces)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^ {2}(--[a-z0-9-]+)(.*)$", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2)
        elif current and line.startswith("   "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_shows_every_setting_with_default_env_and_meaning(capsys):
    with pytest.raises(SystemExit) as info:
        plugin.serve(["--help"])
    assert info.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    defaults = config_mod.ServerConfig()
    for f in fields(config_mod.ServerConfig):
        flag, env = "--" + f.name.replace("_", "-"), "ADVEX_" + f.name.upper()
        assert flag in entries, f"{flag} missing from --help"
        text = entries[flag]
        default = getattr(defaults, f.name)
        shown = "none" if default is None else ":".join(default) if isinstance(default, list) else str(default)
        assert f"default: {shown}" in text, f"{flag}: no 'default: {shown}' in {text!r}"
        assert env in text, f"{flag}: no {env} in {text!r}"
        meaning = re.sub(r"\[default:.*?\]", "", text).strip()
        assert len(meaning.split()) >= 4, f"{flag}: no meaning in {text!r}"
    assert "always searched last" in entries["--data-roots"]


# ---------------------------------------------------------------------- 5. data roots: one rule
def roots_from(argv: list[str], env: dict) -> list[str]:
    parser = argparse.ArgumentParser()
    config_mod.add_arguments(parser)
    return list(config_mod.load(parser.parse_args(argv), env=env).data_roots)


def test_given_data_roots_come_first_and_the_default_root_always_last(tmp_path):
    require_builtin("fashion-mnist")
    from advex.engine.data import find_builtin

    assert roots_from([], {}) == [DEFAULT_ROOT]
    assert roots_from(["--data-roots", "/some/dir"], {}) == ["/some/dir", DEFAULT_ROOT]
    assert roots_from([], {"ADVEX_DATA_ROOTS": "/x:/y"}) == ["/x", "/y", DEFAULT_ROOT]
    assert roots_from([], {"ADVEX_DATA_ROOT": "/t"}) == ["/t", DEFAULT_ROOT]
    # every source counts, in the documented order: flags, ADVEX_DATA_ROOTS, ADVEX_DATA_ROOT, default
    assert roots_from(["--data-roots", "/a", "--data-roots", "/b"],
                      {"ADVEX_DATA_ROOTS": "/c:/d", "ADVEX_DATA_ROOT": "/e"}) \
        == ["/a", "/b", "/c", "/d", "/e", DEFAULT_ROOT]
    assert find_builtin("fashion-mnist", roots_from(["--data-roots", "/some/dir"], {})) is not None

    parser = argparse.ArgumentParser()
    config_mod.add_arguments(parser)
    cfg = config_mod.load(parser.parse_args(["--data-roots", str(tmp_path / "mine"), "--port", "0",
                                             "--metrics-port", "0", "--data-dir", str(tmp_path / "d")]), env={})
    with InProcessServer(cfg) as srv, Client(srv.target) as c:
        assert {"fashion-mnist", "tsipras"} <= {d.id for d in c.list_datasets()}


def test_the_precision_setting_reaches_every_loaded_model_and_bf16_results_stay_in_fp32s_interval(tmp_path):
    """--precision: models loaded for attacks run as asked (auto is fp32 on the CPU), frozen; an
    evaluation in bf16 (CPU autocast here) lands inside the fp32 evaluation's 95% interval."""
    from advex.engine.models import PRECISIONS
    from advex.service.inprocess import InProcessServer

    assert config_mod.PRECISIONS == PRECISIONS
    found = {}
    for precision in ("auto", "bf16"):
        with InProcessServer(data_dir=str(tmp_path / precision), data_roots=[], precision=precision) as srv, \
                Client(srv.target) as c:
            model_id = c.train("mlp", "tsipras", epochs=1, limit=2000, seed=1).result(progress=False).model_id
            wrapper = srv.running.registry.load_model(model_id)[1]
            assert wrapper.precision == ("fp32" if precision == "auto" else "bf16")
            assert not any(p.requires_grad for p in wrapper.parameters())
            found[precision] = c.evaluate(model_id, "tsipras", limit=1000,
                                          attacks=[{"norm": "Linf", "eps": [0.3], "steps": 10}]).result(progress=False)
    fp32, bf16 = found["auto"].robust[0], found["bf16"].robust[0]
    assert fp32.robust_accuracy_ci.lower <= bf16.robust_accuracy <= fp32.robust_accuracy_ci.upper
    assert 0.05 < fp32.robust_accuracy < 0.95
