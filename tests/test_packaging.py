"""The layout is the architecture: four distributions under the `advex` namespace, and what
each one pulls in. The client install never brings torch, the engine install never brings
grpc; a clean virtualenv with only the client runs the README's client commands end to end."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from advex.client import Client
from advex.service.inprocess import InProcessServer

from conftest import require_builtin

ROOT = Path(__file__).resolve().parent.parent


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def closure(dist: str, extras: tuple[str, ...] = ()) -> set[str]:
    """Every distribution that installing `dist[extras]` pulls in (from installed metadata)."""
    seen: set[str] = set()
    todo = [(dist, extras)]
    while todo:
        name, wanted = todo.pop()
        if _name(name) in seen and not wanted:
            continue
        seen.add(_name(name))
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, tuple(req.extras)))
    return seen


def test_each_folder_is_its_own_distribution():
    for folder, dist in (("protos", "advex-protos"), ("client", "advex-client"), ("engine", "advex-engine"),
                         ("service", "advex-server")):
        assert f'name = "{dist}"' in (ROOT / folder / "pyproject.toml").read_text()
        assert metadata.version(dist) == metadata.version("advex")
    import advex.client
    import advex.engine
    import advex.service
    import advex.v1

    for module, folder in ((advex.client, "client"), (advex.engine, "engine"), (advex.service, "service"),
                           (advex.v1, "protos")):
        assert Path(module.__file__).resolve().is_relative_to(ROOT / folder)
    assert not (ROOT / "src").exists()


def test_the_client_install_pulls_in_no_torch_and_the_engine_install_no_grpc():
    client = closure("advex")  # `pip install advex` is the client
    assert {"advex-client", "advex-protos", "grpcio", "protobuf"} <= client
    assert not client & {"torch", "torchvision", "advex-engine", "advex-server", "onnxruntime-gpu"}
    assert not closure("advex-client", ("plot",)) & {"torch", "torchvision"}
    notebook = closure("advex-client", ("notebook",))
    assert {"pandas", "matplotlib", "ipywidgets"} <= notebook and not notebook & {"torch", "torchvision"}
    engine = closure("advex-engine")
    assert "torch" in engine
    assert not engine & {"grpcio", "protobuf", "advex-protos", "advex-client", "advex-server"}
    # the ONNX extra brings protobuf through onnx itself (the format is protobuf), still no grpc
    assert not closure("advex-engine", ("onnx",)) & {"grpcio", "advex-protos", "advex-client", "advex-server"}
    assert {"advex-engine", "advex-protos", "grpcio", "torch"} <= closure("advex", ("server",))


def _imports_of(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, check=True)
    return {m.split(".")[0] for m in out.stdout.split()} | set(out.stdout.split())


def test_importing_the_whole_client_loads_no_torch_and_the_whole_engine_no_grpc():
    client = _imports_of("import advex.client.cli, advex.client.sdk, advex.client.demo, advex.client.reproduce, "
                         "advex.client.render, advex.client.plots, advex.client.results")
    assert "grpc" in client and not client & {"torch", "torchvision", "advex.engine", "advex.service"}
    # pandas and matplotlib are optional: imported by to_pandas() and plot(), never on import
    assert not client & {"pandas", "matplotlib", "IPython"}
    engine_modules = sorted(p.stem for p in (ROOT / "engine" / "advex" / "engine").glob("*.py") if p.stem != "__init__")
    engine = _imports_of("import " + ", ".join(f"advex.engine.{m}" for m in engine_modules))
    assert "torch" in engine and not engine & {"grpc", "advex.v1", "advex.service", "advex.client"}
    assert "google.protobuf" not in engine


@pytest.mark.slow
def test_a_clean_client_only_virtualenv_runs_the_readme_client_commands(tmp_path):
    """pip install advex[plot] (the client and its figures, no server) into a fresh virtualenv, then
    `advex --help`, `advex models list`, `advex demo` and `advex reproduce --preset tiny` against a server."""
    roots = require_builtin("fashion-mnist")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py, advex = env_dir / "bin" / "python", env_dir / "bin" / "advex"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(ROOT / "ci" / "constraints.txt"),
                              str(ROOT / "protos"), str(ROOT / "client"), f"{ROOT}[plot]"],
                             capture_output=True, text=True, timeout=900,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert install.returncode == 0, install.stderr[-3000:]
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is None, "
                            "u.find_spec('advex.service') is None, u.find_spec('advex.engine') is None)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.split() == ["True", "True", "True"], probe
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("ADVEX_")}

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(advex), *args], capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                              env=run_env)

    helped = run("--help")
    assert helped.returncode == 0 and "reproduce" in helped.stdout
    served = run("serve")
    assert served.returncode == 2 and "pip install 'advex[server]'" in served.stderr
    with InProcessServer(data_dir=str(tmp_path / "server"), data_roots=roots) as srv:
        with Client(srv.target) as c:
            model_id = c.train("linear", "fashion-mnist", limit=200, epochs=1).result(progress=False).model_id
        listed = run("--target", srv.target, "models", "list")
        assert listed.returncode == 0 and model_id in listed.stdout, listed
        demo = run("--target", srv.target, "demo", "--train-limit", "500", "--epochs", "1", "--eval-limit", "100",
                   "--steps", "2", "--out", "demo-out")
        assert demo.returncode == 0, demo.stderr[-3000:]
        assert (tmp_path / "demo-out" / "summary.json").exists()
        assert (tmp_path / "demo-out" / "adversarial_examples.png").stat().st_size > 1000
        rep = run("--target", srv.target, "reproduce", "--preset", "tiny", "--out", "rep")
        assert rep.returncode == 0, rep.stderr[-3000:]
        for name in ("report.md", "results.json", "figure2.png", "samples.png"):
            assert (tmp_path / "rep" / name).stat().st_size > 0, name
