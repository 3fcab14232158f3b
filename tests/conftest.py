"""Shared fixtures. Real-data tests read ADVEX_DATA_ROOT (CI: ../shared/data)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_ROOT_ENV = "ADVEX_DATA_ROOT"
pytest_plugins = ["mlserver"]  # tests/mlserver.py: the session's MLServer (Open Inference Protocol)


def data_roots() -> list[str]:
    roots = [r for r in os.environ.get(DATA_ROOT_ENV, "").split(os.pathsep) if r]
    return roots + ["/usr/share/datasets"]


def require_builtin(name: str) -> list[str]:
    """Data roots holding built-in dataset `name`, or skip naming the setting (never in CI)."""
    from advex.engine.data import find_builtin

    roots = data_roots()
    if find_builtin(name, roots) is None:
        how = ("apt-get install dataset-fashion-mnist" if name == "fashion-mnist"
               else f"set {DATA_ROOT_ENV} to a folder holding it (e.g. ../shared/data)")
        msg = f"built-in dataset {name!r} not found: {how}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return roots


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An in-process server with no data roots (only the synthetic `tsipras` built-in), one per
    test module; modules that need other settings define their own `server`."""
    from advex.service.inprocess import InProcessServer

    with InProcessServer(data_dir=str(tmp_path_factory.mktemp("advex")), data_roots=[]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    """An SDK client of this module's `server`."""
    from advex.client import Client

    with Client(server.target) as c:
        yield c


@pytest.fixture
def tmp_data_dir(tmp_path: Path) -> Path:
    return tmp_path


def require_module(name: str, install_hint: str):
    """Import an optional dependency, or skip naming the install (under CI: fail)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        msg = f"{name} is not installed: {install_hint}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def block_import(monkeypatch, package: str) -> None:
    """Make `import <package>` (and its submodules) fail as if it were not installed."""
    import builtins

    real_import = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name.split(".")[0] == package:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)


DEVICE_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__")


def count_device_reads(patch, methods=DEVICE_READS) -> list[str]:
    """Patch (a monkeypatch or its context) the tensor methods that read a value back from the
    device; returns the list each call appends its method's name to."""
    import torch

    reads: list[str] = []
    for method in methods:
        real = getattr(torch.Tensor, method)
        patch.setattr(torch.Tensor, method, lambda t, *a, _m=method, _real=real: reads.append(_m) or _real(t, *a))
    return reads


# ---------------------------------------------------------------- a two-class linear model with known margins
LINEAR_DIM = 64     # inputs [1, 8, 8]
LINEAR_MARGIN = 0.5  # |f(x)| of linear_points: the minimal perturbation is MARGIN / ||w||_dual


def linear_model(seed: int = 0):
    """Two classes whose logit difference is exactly f(x) = w.x + b; returns (model, w, b)."""
    import torch

    from advex.engine import zoo
    from advex.engine.models import ModelInfo, ModelWrapper

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(LINEAR_DIM, generator=g)
    b = 0.3
    net = zoo.Linear(LINEAR_DIM, 2)
    with torch.no_grad():
        net.head.weight.copy_(torch.stack([-w / 2, w / 2]))
        net.head.bias.copy_(torch.tensor([-b / 2, b / 2]))
    return ModelWrapper(net, ModelInfo("linear", (1, 8, 8), 2)).eval(), w, b


def linear_points(w, b, n: int = 100, seed: int = 1):
    """Points well inside [0,1] with |f(x)| = LINEAR_MARGIN, half on each side: (x [n,1,8,8], y)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = 0.35 + 0.3 * torch.rand((n, LINEAR_DIM), generator=g)
    side = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    x = x + ((side * LINEAR_MARGIN - (x @ w + b)) / w.dot(w)).unsqueeze(1) * w
    assert x.min() > 0.1 and x.max() < 0.9
    return x.view(n, 1, 8, 8), (side > 0).long()


# ---------------------------------------------------------------- a ten-class model to compare attacks on
def ten_class_data(n: int, seed: int):
    """Images 1x8x8 in [0,1]: a fixed random prototype per class plus Gaussian noise."""
    import torch

    protos = torch.rand((10, 1, 8, 8), generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return (0.25 + 0.5 * protos[y] + 0.2 * torch.randn((n, 1, 8, 8), generator=g)).clamp(0, 1), y


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a busy machine for cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ten_class_model(one_thread):
    """An MLP trained on ten_class_data: a model the reference attacks can be compared on."""
    import torch

    from advex.engine import zoo
    from advex.engine.models import ModelInfo, ModelWrapper

    x, y = ten_class_data(3000, seed=1)
    torch.manual_seed(0)
    model = ModelWrapper(zoo.build("mlp", (1, 8, 8), 10), ModelInfo("mlp", (1, 8, 8), 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(10):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 100):
            batch = perm[i:i + 100]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def flat_then_linear(v: torch.Tensor) -> torch.Tensor:
    """Class 1 scores sum_i relu(|v_i - 0.5| - 0.1) - 0.55 over 8 coordinates, class 0 scores 0.
    At v = 0.5 the gradient is zero; within eps = 0.2 only a start with >= 6 coordinates beyond
    0.1 of the centre can be pushed to a misclassification (a start decides success)."""
    import torch

    s = torch.relu((v.flatten(1) - 0.5).abs() - 0.1).sum(1) - 0.55
    return torch.stack([torch.zeros_like(s), s], 1)
