"""compile_model / --compile: torch.compile for frozen attack models, where it pays (CUDA, or when
asked), one graph for every batch size, a failed compilation logged once and run eagerly for good,
black boxes and TorchScript never compiled, the setting checked like --precision."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from advex.engine import models
from advex.engine.models import ModelInfo, ModelWrapper, compile_model, freeze


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 6 * 6, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def frozen(seed: int = 0) -> ModelWrapper:
    torch.manual_seed(seed)
    return freeze(ModelWrapper(Net(), ModelInfo("cnn", (1, 8, 8), 3, (0.5,), (0.25,))))


def logits_and_grad(model: ModelWrapper, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model.logits(x)
    grad, = torch.autograd.grad(out.logsumexp(1).sum(), x)
    return out.detach(), grad


class FailsOnce(nn.Module):
    """What torch.compile hands back when inductor cannot build the graph: its first call raises."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("InductorError: CppCompileError: C++ compile error (no C compiler)")
        return self.net(x)


@pytest.fixture
def fake_compile(monkeypatch):
    """torch.compile replaced: records its arguments and returns `make(net)` (the net itself by default)."""
    made: list[dict] = []

    def fake(net, **kwargs):
        made.append(dict(kwargs, module=fake.make(net)))
        return made[-1]["module"]

    fake.make = lambda net: net
    monkeypatch.setattr(torch, "compile", fake)
    return fake, made


def test_a_compilation_that_fails_at_the_first_call_is_logged_once_and_the_model_runs_eagerly(
        fake_compile, caplog):
    fake, made = fake_compile
    fake.make = FailsOnce
    eager, model = frozen(), compile_model(frozen(), "on", "cpu", name="m-123")
    x = torch.rand(5, 1, 8, 8)
    with caplog.at_level(logging.WARNING, logger="advex.engine.models"):
        first = logits_and_grad(model, x)
        second = logits_and_grad(model, x[:3])
    expected = logits_and_grad(eager, x)
    assert torch.equal(first[0], expected[0]) and torch.equal(first[1], expected[1])
    assert torch.equal(second[0], expected[0][:3])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "m-123" in warnings[0].getMessage() and "C++ compile error" in warnings[0].getMessage()
    assert made[0]["module"].calls == 1 and not model.net.compiled  # the second call did not try again


def test_an_input_the_network_itself_refuses_raises_and_keeps_the_compiled_network(fake_compile, caplog):
    model = compile_model(frozen(), "on", "cpu")
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError):
        model.logits(torch.rand(2, 1, 5, 5))  # too small for the head: eager fails as well
    assert model.net.compiled and not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_really_compiled_model_matches_eager_and_keeps_one_graph_for_every_batch_size(precision):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = frozen().set_precision(precision, "cpu")
    model = compile_model(frozen().set_precision(precision, "cpu"), "on", "cpu", backend="eager")
    for n in (6, 3, 9, 2):
        x = torch.rand(n, 1, 8, 8)
        (a, ga), (b, gb) = logits_and_grad(model, x), logits_and_grad(eager, x)
        assert torch.allclose(a, b, atol=1e-6, rtol=0) and torch.allclose(ga, gb, atol=1e-6, rtol=0)
    assert model.net.compiled and counters["stats"]["unique_graphs"] == 1  # traced once, batch dimension dynamic
    assert model.has_features and torch.equal(model.features(x), eager.features(x))
    assert type(copy.deepcopy(model).net) is Net  # a copy (ONNX export) is the eager network


def test_auto_compiles_on_cuda_only_and_off_never(fake_compile):
    _, made = fake_compile
    for mode in ("auto", "off"):
        model = frozen()
        net = model.net
        assert compile_model(model, mode, "cpu").net is net
    assert compile_model(frozen(), "off", "cuda").net.__class__ is Net
    assert not made
    assert compile_model(frozen(), "auto", torch.device("cuda")).net.compiled  # (no GPU needed to wrap it)
    assert made[-1]["mode"] == models.INDUCTOR_MODE_CUDA == "max-autotune-no-cudagraphs"
    assert compile_model(frozen(), "on", "cpu").net.compiled and "mode" not in made[-1]  # inductor's default
    model = compile_model(frozen(), "on", "cpu")
    assert compile_model(model, "on", "cpu").net is model.net and len(made) == 3  # never wrapped twice
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_model(frozen(), "sometimes", "cpu")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_black_boxes_and_torchscript_are_never_compiled(fake_compile):
    _, made = fake_compile

    class Box(nn.Module):  # what an ONNX graph or an endpoint looks like to the wrapper
        has_gradients = False

        def forward(self, x):
            return x.flatten(1)[:, :3]

    box = ModelWrapper(Box(), ModelInfo("onnx", (1, 8, 8), 3))
    assert compile_model(box, "on", "cuda").net.__class__ is Box
    scripted = ModelWrapper(torch.jit.script(frozen().net), ModelInfo("cnn", (1, 8, 8), 3))
    assert isinstance(compile_model(scripted, "on", "cuda").net, torch.jit.ScriptModule)
    assert not made


def test_the_compile_setting_is_checked_like_precision_and_reaches_loaded_models(tmp_path, fake_compile):
    from advex.client import Client
    from advex.service import config as config_mod
    from advex.service.inprocess import InProcessServer

    assert config_mod.COMPILE_MODES == models.COMPILE_MODES
    assert config_mod.ServerConfig().compile == "auto"
    for bad in ("sometimes", "true", ""):
        with pytest.raises(config_mod.ConfigError, match="compile"):
            config_mod.from_kwargs(compile=bad)
    with pytest.raises(config_mod.ConfigError, match="ADVEX_COMPILE"):
        config_mod.load(env={"ADVEX_COMPILE": "max"})
    assert config_mod.load(env={"ADVEX_COMPILE": "off"}).compile == "off"
    _, made = fake_compile
    with InProcessServer(data_dir=str(tmp_path), data_roots=[], compile="on", precision="bf16") as srv, \
            Client(srv.target) as c:
        model_id = c.train("mlp", "tsipras", epochs=1, limit=64, seed=1).result(progress=False).model_id
        wrapper = srv.running.registry.load_model(model_id)[1]
        assert wrapper.net.compiled and wrapper.precision == "bf16" and len(made) == 1
        x, y = c.download_dataset("tsipras", split="test", limit=4)
        result = c.attack(model_id, x, y, norm="L2", eps=0.5, steps=2, domain="real")
        assert result.x_adv.shape == x.shape and wrapper.net.compiled  # ran through the (stand-in) compiled net
