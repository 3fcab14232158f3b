"""The server as users run it: `advex serve` in its own process (graceful SIGTERM), the
Prometheus endpoint's content, and the CLI."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from advex.client import Client
from advex.client.cli import main as cli_main
from advex.service.inprocess import InProcessServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_stops_gracefully_and_records_cancelled_work(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "advex.client.cli", "serve", "--port", str(port),
                             "--metrics-port", "0", "--data-dir", str(tmp_path), "--shutdown-grace-s", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert f"serving on 127.0.0.1:{port}" in line, line
        with Client(f"127.0.0.1:{port}") as c:  # an evaluation (training would checkpoint and resume)
            model_id = c.train("linear", "tsipras", epochs=1, batch_size=100, limit=500).result(
                timeout=60, progress=False).model_id
            op = c.evaluate(model_id, "tsipras", attacks=[{"norm": "L2", "eps": [0.5], "steps": 5000}])
            for snap in op.watch():
                if snap.progress.done > 0:
                    break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
    with InProcessServer(data_dir=str(tmp_path), data_roots=[]) as srv, Client(srv.target) as c:
        after = c.get_operation(op.id)
        assert after.state == "CANCELLED" and "shut down" in after.proto.error.message
        assert 0 < after.proto.progress.done < after.proto.progress.total


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(f"{name} {labels} not in metrics")


def test_metrics_endpoint_reports_requests_operations_and_accuracy(tmp_path):
    mport = free_port()
    with InProcessServer(data_dir=str(tmp_path), data_roots=[], metrics_port=mport) as srv, \
            Client(srv.target) as c:
        model_id = c.train("linear", "tsipras", epochs=1, batch_size=100, limit=1000).result(
            timeout=60, progress=False).model_id
        ev = c.evaluate(model_id, "tsipras", limit=200,
                        attacks=[{"norm": "Linf", "eps": [0.6], "steps": 5}]).result(timeout=60, progress=False)
        c.attack(model_id, np.zeros((3, 101), np.float32), [0, 1, 0], norm="Linf", eps=0.1, domain="real")
        with pytest.raises(Exception):
            c.get_model("m-missing")
        text = scrape(mport)
    assert metric(text, "advex_requests_total", method="Attack", code="OK") == 1
    assert metric(text, "advex_requests_total", method="GetModel", code="NOT_FOUND") == 1
    assert metric(text, "advex_operations_total", kind="train", state="SUCCEEDED") == 1
    assert metric(text, "advex_operations_total", kind="evaluate", state="SUCCEEDED") == 1
    assert metric(text, "advex_images_processed_total", kind="attack") == 3
    assert metric(text, "advex_clean_accuracy", model=model_id, dataset="tsipras") == pytest.approx(ev.clean_accuracy)
    assert metric(text, "advex_robust_accuracy", model=model_id, dataset="tsipras", norm="Linf", eps="0.6") \
        == pytest.approx(ev.worst_case[0].robust_accuracy)
    assert metric(text, "advex_request_latency_seconds_count", method="Evaluate") == 1
    assert re.search(r"^advex_queue_depth\{pool=\"operations\"\} 0\.0$", text, re.M)


def test_cli_lists_trains_and_reports_errors(tmp_path, capsys):
    with InProcessServer(data_dir=str(tmp_path), data_roots=[]) as srv:
        t = ["--target", srv.target]
        assert cli_main(t + ["datasets", "list"]) == 0
        assert "tsipras" in capsys.readouterr().out
        assert cli_main(t + ["train", "--arch", "linear", "--dataset", "tsipras", "--epochs", "1",
                             "--limit", "500", "--no-wait"]) == 0
        op_id = capsys.readouterr().out.strip()
        assert op_id.startswith("op-")
        assert cli_main(t + ["ops", "wait", op_id]) == 0
        assert '"model_id"' in capsys.readouterr().out
        assert cli_main(t + ["models", "list"]) == 0
        assert "safetensors" in capsys.readouterr().out  # the format by name, not enum number
        assert cli_main(t + ["models", "get", "m-missing"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
        x = np.random.default_rng(0).random((2, 101), dtype=np.float32)
        np.savez(tmp_path / "batch.npz", x=x, y=np.array([0, 1]))
        np.savez(tmp_path / "up.npz", x=np.zeros((3, 4), np.float32), y=np.array([0, 1, 0]))
        assert cli_main(t + ["datasets", "upload", str(tmp_path / "up.npz")]) == 0
        ds_id = capsys.readouterr().out.strip()
        assert Client(srv.target).get_dataset(ds_id).splits["train"] == 3  # upload defaults to train
        assert cli_main(t + ["datasets", "download", ds_id, "--output", str(tmp_path / "down.npz")]) == 0
        assert (tmp_path / "down.npz").read_bytes() == (tmp_path / "up.npz").read_bytes()  # stored bytes
        capsys.readouterr()
        model_id = next(m.id for m in Client(srv.target).list_models())
        # tsipras models take REAL features: an IMAGE-domain attack on values in [0,1] is still valid
        assert cli_main(t + ["attack", "--model", model_id, "--input", str(tmp_path / "batch.npz"), "--eps", "0.1",
                             "--output", str(tmp_path / "adv.npz")]) == 0
        with np.load(tmp_path / "adv.npz") as z:
            assert z["x_adv"].shape == (2, 101) and np.abs(z["x_adv"] - x).max() <= 0.1 + 1e-6
