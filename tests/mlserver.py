"""pytest plugin: a real MLServer (Open Inference Protocol) for the tests, one per session.

Registered by tests/conftest.py (`pytest_plugins`). Tests that use it carry
`@pytest.mark.mlserver` so they can be selected (`-m mlserver`) or deselected.

* The MLServer venv is separate from advex's (MLServer 1.7.1 needs protobuf<7, advex needs
  protobuf>=7.35). It is built on demand from tests/oip_server/mlserver-constraints.txt and
  cached at $ADVEX_MLSERVER_VENV, or else at
  ~/.cache/advex-tests/mlserver-<sha256(constraints + Python version)[:12]>; an fcntl lock
  guards the build (pytest-xdist workers) and a `.complete` file, written last, marks it usable.
  A failed build FAILS the tests with pip's output: there is no switch to skip them
  (CI must cache or build the venv: about a minute and 330 MB, no system packages).
* The server (`mlserver` fixture) serves the models in tests/oip_server (see
  advex_oip_runtime.py) from a copy in a temporary folder, with deterministic weights, on free
  ports of 127.0.0.1, and is stopped at the end of the session.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

SERVER_SRC = Path(__file__).resolve().parent / "oip_server"
CONSTRAINTS = SERVER_SRC / "mlserver-constraints.txt"
REQUIREMENTS = ("mlserver==1.7.1", "uvloop<0.22")
VENV_ENV = "ADVEX_MLSERVER_VENV"
READY_TIMEOUT_S = 90.0
MODELS = ("linear", "linear-slow", "linear-broken", "linear-flaky", "linear-unavailable")
_PORT_IN_USE_RC = 3  # `mlserver start` exits with 3 when a port is taken


def pytest_configure(config):
    config.addinivalue_line("markers", "mlserver: needs the session's MLServer (builds its venv on first use)")


# ---------------------------------------------------------------- the venv
def venv_dir() -> Path:
    """Where the MLServer venv lives: $ADVEX_MLSERVER_VENV or a cache folder keyed by its inputs."""
    if os.environ.get(VENV_ENV):
        return Path(os.environ[VENV_ENV]).expanduser().resolve()
    key = hashlib.sha256(CONSTRAINTS.read_bytes() + "\n".join(REQUIREMENTS).encode()
                         + ".".join(map(str, sys.version_info[:3])).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "advex-tests" / f"mlserver-{key}"


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:] if len(text) > n else text


def ensure_venv() -> Path:
    """Build the venv unless it is complete; pytest.fail with pip's output when that fails.

    An existing, incomplete venv (an interrupted build, or one made by hand) is completed in
    place with the same pip command, which is a quick no-op when everything is installed;
    nothing is ever deleted."""
    venv = venv_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".complete").exists():
            return venv
        steps = []
        if not (venv / "bin" / "python").exists():
            steps.append([sys.executable, "-m", "venv", str(venv)])
        steps.append([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                      "-c", str(CONSTRAINTS), *REQUIREMENTS])
        for cmd in steps:
            try:
                done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
            except (OSError, subprocess.TimeoutExpired) as e:
                pytest.fail(f"cannot build the MLServer venv at {venv}: {e}", pytrace=False)
            if done.returncode != 0:
                pytest.fail(f"cannot build the MLServer venv at {venv}: {' '.join(cmd)} exited with "
                            f"{done.returncode}:\n{_tail(done.stdout)}", pytrace=False)
        (venv / ".complete").write_text("\n".join(REQUIREMENTS) + "\n")
    return venv


# ---------------------------------------------------------------- the server
def make_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """nn.Linear(784, 10)'s layout: weight (10, 784), bias (10,), float32; logits O(1..10) on [0,1]."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(0.0, 0.25, (10, 784)).astype(np.float32)
    bias = rng.normal(0.0, 0.5, 10).astype(np.float32)
    return weight, bias


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MLServer:
    """A running MLServer: REST at .rest_url, gRPC at .grpc_url (both on .host)."""

    host = "127.0.0.1"

    def __init__(self, venv: Path, root: Path):
        self.venv = venv
        self.root = root          # the model repository (cwd of the server)
        self.weight, self.bias = make_weights()
        self.http_port = self.grpc_port = 0
        self.log_path = root / "mlserver.log"
        self.proc: subprocess.Popen | None = None
        self.ready_s = 0.0

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.grpc_port}"

    def counts(self, model: str) -> dict:
        """What the server counted for `model`: {"calls", "rows", "failures"} (zeros if never called)."""
        path = self.root / "counts" / f"{model}.json"
        if not path.exists():
            return {"calls": 0, "rows": 0, "failures": 0}
        return json.loads(path.read_text())

    def served(self, model: str) -> tuple[int, int]:
        """(calls, rows) the server counted for `model`, failed calls included; (0, 0) if none."""
        c = self.counts(model)
        return c["calls"], c["rows"]

    def log_tail(self, n: int = 4000) -> str:
        try:
            return _tail(self.log_path.read_text(errors="replace"), n)
        except OSError:
            return ""

    def start(self) -> None:
        np.savez(self.root / "weights.npz", weight=self.weight, bias=self.bias)
        settings = json.loads((self.root / "settings.template.json").read_text())
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER_")}
        t0 = time.monotonic()
        for _ in range(5):
            self.http_port, self.grpc_port = _free_port(), _free_port()
            if self.http_port == self.grpc_port:
                continue
            settings.update(http_port=self.http_port, grpc_port=self.grpc_port)
            (self.root / "settings.json").write_text(json.dumps(settings, indent=2))
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([str(self.venv / "bin" / "mlserver"), "start", "."], cwd=self.root,
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             env=env, start_new_session=True)
            rc = self._wait_ready(t0)
            if rc is None:
                self.ready_s = time.monotonic() - t0
                return
            if rc != _PORT_IN_USE_RC:
                break
        pytest.fail(f"MLServer exited with {self.proc.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}", pytrace=False)

    def _wait_ready(self, t0: float) -> int | None:
        """None once /v2/health/ready answers 200, or the exit status if the server died."""
        url = f"{self.rest_url}/v2/health/ready"
        while True:
            rc = self.proc.poll()
            if rc is not None:
                return rc
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return None
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() - t0 > READY_TIMEOUT_S:
                self.stop()
                pytest.fail(f"MLServer not ready after {READY_TIMEOUT_S:.0f} s; log {self.log_path}:\n"
                            f"{self.log_tail()}", pytrace=False)
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM the server's process group (it drains in-flight calls), SIGKILL after 15 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def mlserver_venv() -> Path:
    return ensure_venv()


@pytest.fixture(scope="session")
def mlserver(mlserver_venv, tmp_path_factory):
    """The session's MLServer serving the test models (see tests/oip_server/advex_oip_runtime.py):
    `linear` (max 256 rows per request), `linear-slow` (2 s per call), `linear-broken` (always 500),
    `linear-flaky` (503 on its 1st, 3rd, 5th, ... call), `linear-unavailable` (always 503), and two that
    answer a one-row request normally but misbehave on batches: `linear-slow-batches` (3 s) and
    `linear-fails-batches` (503)."""
    root = tmp_path_factory.mktemp("mlserver")
    shutil.copytree(SERVER_SRC, root, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "mlserver-constraints.txt"))
    server = MLServer(mlserver_venv, root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
