"""The `advex` command as a new user meets it: option names that do not collide, numbers that
print as numbers, one clear line when no server answers, `python -m advex`, and a demo that
needs no local data files and keeps its results when a figure fails."""
from __future__ import annotations

import builtins
import gzip
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from advex.client import Client, demo
from advex.client.cli import build_parser, main as cli_main
from advex.service.inprocess import InProcessServer

from conftest import require_builtin


def unused_target() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed again: nothing listens there


def test_transfer_target_models_do_not_overwrite_the_server_address():
    args = build_parser().parse_args(["--target", "srv:1", "transfer", "--source", "m-a", "--target", "m-b",
                                      "--target", "m-c", "--dataset", "d"])
    assert args.server == "srv:1" and args.targets == ["m-b", "m-c"] and args.source == ["m-a"]


@pytest.fixture(scope="module")
def tsipras_server(tmp_path_factory):
    """An in-process server with two tiny linear models on the synthetic Tsipras data."""
    with InProcessServer(data_dir=str(tmp_path_factory.mktemp("cli")), data_roots=[]) as srv, \
            Client(srv.target) as c:
        ids = [c.train("linear", "tsipras", limit=300, epochs=1, seed=s).result(progress=False).model_id
               for s in (0, 1)]
        yield srv, ids


def test_transfer_runs_end_to_end_from_the_cli(tsipras_server, capsys):
    srv, (a, b) = tsipras_server
    code = cli_main(["--target", srv.target, "transfer", "--source", a, "--target", b, "--target", a,
                     "--dataset", "tsipras", "--limit", "100", "--eps", "0.5", "--steps", "5"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count(a) >= 3 and b in out  # both pairs printed, with the source named in each
    assert "transfer rate" in out


def test_json_output_prints_int64_fields_as_numbers(tsipras_server, capsys):
    srv, (a, _) = tsipras_server
    assert cli_main(["--target", srv.target, "datasets", "get", "tsipras"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["splits"] == {"train": 10000, "test": 2000}       # map<string, int64>
    assert record["example_shape"] == [101]                          # repeated int64
    assert cli_main(["--target", srv.target, "models", "get", a]) == 0
    model = json.loads(capsys.readouterr().out)
    assert model["spec"]["input_shape"] == [101] and isinstance(model["size_bytes"], int)
    ops = [o.id for o in Client(srv.target).list_operations(kind="train")]
    assert cli_main(["--target", srv.target, "ops", "get", ops[0]]) == 0
    progress = json.loads(capsys.readouterr().out)["progress"]
    assert isinstance(progress["done"], int) and progress["done"] == progress["total"] > 0


CLIENT_COMMANDS = [
    ["models", "list"], ["models", "get", "m-x"], ["datasets", "list"], ["ops", "list"],
    ["ops", "watch", "op-x"], ["evaluate", "--model", "m-x", "--dataset", "d"],
    ["train", "--arch", "linear", "--dataset", "d"], ["robustify", "--model", "m-x", "--dataset", "d"],
    ["build-nonrobust", "--mode", "d_det", "--model", "m-x", "--dataset", "d"],
    ["transfer", "--source", "m-x", "--target", "m-y", "--dataset", "d"], ["reproduce", "--preset", "tiny"],
    ["demo"],
]


@pytest.mark.parametrize("command", CLIENT_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_every_client_command_says_when_no_server_answers(command, capsys):
    target = unused_target()
    code = cli_main(["--target", target, "--connect-timeout", "0.2"] + command)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"error: no advex server at {target} (start one with `advex serve`)"


def test_attack_without_a_server_says_so_too(tmp_path, capsys):
    np.savez(tmp_path / "b.npz", x=np.zeros((1, 1, 4, 4), np.float32), y=np.array([0]))
    target = unused_target()
    code = cli_main(["--target", target, "--connect-timeout", "0.2", "attack", "--model", "m", "--input",
                     str(tmp_path / "b.npz"), "--eps", "0.1"])
    assert code == 2 and "no advex server at" in capsys.readouterr().err


def test_python_dash_m_advex_is_the_advex_command():
    out = subprocess.run([sys.executable, "-m", "advex", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: advex" in out.stdout and "reproduce" in out.stdout


def test_figures_need_the_plot_extra_and_the_cli_says_so_before_any_work(monkeypatch, capsys):
    from advex.client import plots

    monkeypatch.setattr(plots, "missing_plot_extra", lambda: "install it with: pip install 'advex[plot]'")
    target = unused_target()
    for command in (["demo"], ["reproduce", "--preset", "tiny"]):
        assert cli_main(["--target", target, "--connect-timeout", "0.2"] + command) == 2
        err = capsys.readouterr().err
        assert "pip install 'advex[plot]'" in err and "no advex server" not in err  # nothing attempted


# ------------------------------------------------------------------ the demo

def _server_process(tmp_path: Path, roots: list[str]) -> tuple[subprocess.Popen, str]:
    from test_server_process import free_port

    port = free_port()
    args = [sys.executable, "-m", "advex", "serve", "--port", str(port), "--metrics-port", "0",
            "--data-dir", str(tmp_path / "server")]
    for r in roots:
        args += ["--data-roots", r]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()  # the server prints its address once it listens
    assert f"serving on 127.0.0.1:{port}" in line, line
    return proc, f"127.0.0.1:{port}"


def test_demo_reads_no_local_data_and_writes_results_before_the_figure(tmp_path, monkeypatch):
    """The server (its own process) reads the data; the demo's client gets test images through
    DownloadDataset. Any attempt of the client to open the dataset's files fails here, and the
    figure fails too: summary.json must be written all the same."""
    roots = require_builtin("fashion-mnist")
    proc, target = _server_process(tmp_path, roots)
    try:
        real_open, real_gzip_open = builtins.open, gzip.open

        def guarded(opener):
            def open_(file, *a, **k):
                if "datasets" in str(file) or "fashion" in str(file):
                    raise PermissionError(f"the client touched a data file: {file}")
                return opener(file, *a, **k)
            return open_

        monkeypatch.setattr(builtins, "open", guarded(real_open))
        monkeypatch.setattr(gzip, "open", guarded(real_gzip_open))

        def broken_figure(*a, **k):
            raise RuntimeError("figure failed")

        monkeypatch.setattr(demo, "image_grid", broken_figure)
        settings = demo.DemoSettings(train_limit=300, epochs=1, eval_limit=50, steps=2, show=4,
                                     l2_eps=(0.5, 1.0), linf_eps=(0.03,), out=str(tmp_path / "out"))
        with Client(target) as c, pytest.raises(RuntimeError, match="figure failed"):
            demo.run(c, settings, log=lambda s: None)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dataset"] == "fashion-mnist" and summary["attack"]["images"] == 4
    assert [r["eps"] for r in summary["robust"]] == [0.5, 1.0, 0.03]
    assert 0 <= summary["robust"][-1]["robust_accuracy"] <= summary["clean_accuracy"] <= 1
