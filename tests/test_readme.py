"""Every `advex …` line of the README runs: against an in-process server where it is cheap,
parsed (and checked) where it is not. A README line that no longer works fails here."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from advex.client import Client
from advex.client.cli import build_parser, main as cli_main
from advex.service.inprocess import InProcessServer

from conftest import require_builtin

README = Path(__file__).resolve().parent.parent / "README.md"
# Too long for the test suite (hours, or a whole demo): parsed and checked, not run.
PARSE_ONLY = ("advex demo", "advex reproduce", "--dataset cifar10")
# The README's endpoint examples name a deployment; the tests' MLServer stands in for it (its
# `linear` model takes [1, 28, 28] and answers 10 classes, as the examples declare).
ENDPOINT_NAMES = {"grpc://models.internal:8081": "{grpc}", "grpc://127.0.0.1:8081": "{grpc}",
                  '"fashion-clf", model_version="3"': '"linear", model_version="v1"',
                  "model_name: fashion-linear": "model_name: linear"}
CREDENTIAL_ENV = "ADVEX_TEST_README_CREDENTIAL"


def stand_in(text: str, mlserver) -> str:
    for name, replacement in ENDPOINT_NAMES.items():
        text = text.replace(name, replacement.format(grpc=mlserver.grpc_url))
    return text


def server_settings(mlserver) -> dict:
    return {"endpoint_hosts": [mlserver.host], "endpoint_credentials": [f"prod=env:{CREDENTIAL_ENV}"]}


def readme_commands() -> list[str]:
    """`advex …` lines of the README's shell blocks, continuation lines joined, comments dropped."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("advex "):
                lines.append(line)
    return lines


def test_the_readme_has_cli_lines_and_no_pseudo_syntax():
    commands = readme_commands()
    assert len(commands) >= 15
    for c in commands:
        assert "|" not in c, f"not a command a user can paste: {c}"


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlserver):
    """A server with Fashion-MNIST, one small trained model and the files the README names (the
    audit spec with the model's id and the MLServer standing in for the endpoint)."""
    roots = require_builtin("fashion-mnist")
    tmp = tmp_path_factory.mktemp("readme")
    with InProcessServer(data_dir=str(tmp / "server"), data_roots=roots, **server_settings(mlserver)) as srv, \
            Client(srv.target) as c:
        op = c.train("small_cnn", "fashion-mnist", limit=300, epochs=1, arch_args={"width": 4})
        model_id = op.result(progress=False).model_id
        x, y = c.download_dataset("fashion-mnist", split="test", limit=4)
        np.savez(tmp / "batch.npz", x=x, y=y)
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()
        example = torch.rand(2, 1, 28, 28)
        program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, str(tmp / "model.pt2"))
        spec = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)[0]
        (tmp / "nightly.yaml").write_text(stand_in(spec, mlserver).replace("m-…", model_id))
        yield srv, model_id, op.id, tmp


def _fill(line: str, model_id: str, op_id: str) -> list[str]:
    return shlex.split(line.replace("m-…", model_id).replace("op-…", op_id))[1:]


@pytest.mark.parametrize("line", readme_commands())
def test_readme_line(line, world, monkeypatch, capsys):
    srv, model_id, op_id, tmp = world
    monkeypatch.chdir(tmp)
    argv = _fill(line, model_id, op_id)
    if any(marker in line for marker in PARSE_ONLY):
        args = build_parser().parse_args(argv)
        assert args.server == "localhost:50051" and callable(args.fn)
        return
    if argv[0] == "serve" and "--help" not in argv:  # a server for real files: its flags must exist
        from advex.service.config import make_parser

        settings = make_parser("advex serve").parse_args(argv[1:])
        assert all(getattr(settings, a.dest) is not None for a in make_parser("x")._actions
                   if a.option_strings and any(o in argv for o in a.option_strings))
        return
    if argv[0] == "serve":
        with pytest.raises(SystemExit) as exit_:
            cli_main(argv)
        assert exit_.value.code == 0
        assert "ADVEX_PORT" in capsys.readouterr().out
        return
    code = cli_main(["--target", srv.target] + argv)
    captured = capsys.readouterr()
    if argv[:1] == ["audit"] and argv[1].endswith(".yaml"):  # 0 pass, 1 breach: the verdict is the model's
        assert code in (0, 1), f"{line}\n{captured.err}"
        report = json.loads((tmp / "audit-report" / "report.json").read_text())
        assert code == (0 if report["passed"] else 1), f"{line}\n{captured.err}"
        assert len(report["targets"]) == 2 and report["targets"][1]["queries"]["requests"] > 0
        return
    assert code == 0, f"{line}\n{captured.err}"
    if "--output" in argv:
        assert (tmp / argv[argv.index("--output") + 1]).stat().st_size > 0


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_python_snippets_run_in_order(tmp_path, monkeypatch, mlserver):
    """The SDK snippets, run as a user would paste them, one after the other (sizes as written);
    the tests' MLServer stands in for the endpoint they name."""
    roots = require_builtin("fashion-mnist")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CREDENTIAL_ENV, "a-token")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()
    torch.onnx.export(net, (torch.rand(2, 1, 28, 28),), str(tmp_path / "model.onnx"), input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    blocks = readme_python_blocks()
    assert len(blocks) >= 4 and 'Client("localhost:50051")' in blocks[0]
    with InProcessServer(data_dir=str(tmp_path / "server"), data_roots=roots, **server_settings(mlserver)) as srv:
        scope: dict = {}
        for block in blocks:
            block = stand_in(block.replace('"localhost:50051"', repr(srv.target)), mlserver)
            exec(compile(block, "README.md", "exec"), scope)
        scope["c"].close()
    ev = scope["ev"]
    assert ev.skipped and ev.robust[0].mean_queries > 0           # the ONNX model: Square ran, PGD skipped
    assert scope["d_det"].target_hit_rate > 0 and len(scope["r"].pairs) == 2
    usage = scope["served"].endpoint_usage                          # the endpoint: Square ran, counted
    assert usage.requests > 0 and usage.rows >= 500 and scope["m"].spec.endpoint.credential == "prod"
    # the notebook section: a DataFrame, a figure, and two evaluations run at once by the async client
    assert list(scope["df"].columns[:4]) == ["attack", "suite", "norm", "eps"] and len(scope["fig"].axes) >= 1
    assert [b.model_id for b in scope["both"]] == [scope["model_id"], scope["robust_id"]]
