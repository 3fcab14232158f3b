"""Mixed-precision training (train(..., precision=)): bf16 autocast learns what fp32 learns with fp32
weights; fp16 goes through a GradScaler (loss scaled, overflowing steps skipped, its state resumed);
fp32 is the plain fp32 loop, bit for bit; the adversarial inner attack runs at the same precision;
the server passes its --precision to training."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advex.engine.attacks import AttackConfig
from advex.engine.data import ArrayDataset, tsipras
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.train import TrainConfig, load_state, save_state, train

D = 8


def separable(n: int = 512, seed: int = 0, scale: float = 1.0) -> ArrayDataset:
    """Two classes split by a hyperplane through the centre of [0,1]^D, a margin of 0.1 kept clear."""
    g = torch.Generator().manual_seed(seed)
    w = torch.linspace(-1.0, 1.0, D)
    x = torch.rand(4 * n, D, generator=g)
    score = (x - 0.5) @ w
    keep = score.abs() > 0.1
    x, score = x[keep][:n], score[keep][:n]
    return ArrayDataset((x * scale).contiguous(), (score > 0).long(), 2, domain="real")


def fresh(seed: int = 0) -> ModelWrapper:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 2))
    return ModelWrapper(net, ModelInfo("mlp", (D,), 2))


def accuracy(model: ModelWrapper, data: ArrayDataset) -> float:
    with torch.no_grad():
        return float((model.logits(data.x).argmax(1) == data.y).float().mean())


def weights(model: ModelWrapper) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def autocast_log(model: ModelWrapper) -> list[tuple[bool, bool, torch.dtype]]:
    """(training mode, autocast on, autocast dtype) of every pass through the network."""
    seen: list[tuple[bool, bool, torch.dtype]] = []
    model.net.register_forward_pre_hook(lambda m, args: seen.append(
        (m.training, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    return seen


QUICK = TrainConfig(epochs=4, batch_size=32, lr=0.1, schedule="constant", weight_decay=0.0, seed=3)


def test_bf16_training_learns_what_fp32_learns_with_fp32_weights_loss_and_optimizer_state():
    data, held_out = separable(512, seed=0), separable(512, seed=1)
    fp32, bf16 = fresh(), fresh()
    h32 = train(fp32, data, QUICK)
    passes = autocast_log(bf16)
    states = []
    h16 = train(bf16, data, QUICK, precision="bf16", on_checkpoint=states.append)
    assert passes and all(on and dtype == torch.bfloat16 for _, on, dtype in passes)  # autocast really ran
    acc32, acc16 = accuracy(fp32, held_out), accuracy(bf16, held_out)
    assert acc32 >= 0.95 and acc16 >= 0.95 and abs(acc32 - acc16) <= 0.03, (acc32, acc16)
    assert abs(h32[-1].train_accuracy - h16[-1].train_accuracy) <= 0.03
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert all(b.dtype == torch.float32 for b in states[-1].momentum.values()) and states[-1].momentum
    assert all(isinstance(h.train_loss, float) for h in h16) and bf16.precision == "bf16"
    assert not any(torch.equal(a, b) for a, b in zip(fp32.parameters(), bf16.parameters()))  # not fp32 in disguise


class SpyScaler(torch.amp.GradScaler):
    made: list["SpyScaler"] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = self.updates = self.scaled = 0
        SpyScaler.made.append(self)

    def scale(self, outputs):
        self.scaled += 1
        return super().scale(outputs)

    def step(self, optimizer, *args, **kwargs):
        self.steps += 1
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale=None):
        self.updates += 1
        return super().update(new_scale)


@pytest.fixture
def spy_scaler(monkeypatch):
    SpyScaler.made = []
    monkeypatch.setattr(torch.amp, "GradScaler", SpyScaler)
    return SpyScaler.made


def test_fp16_training_goes_through_a_grad_scaler_and_only_fp16_does(spy_scaler):
    data = separable(256)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.1, schedule="constant", seed=1)
    model = fresh()
    passes = autocast_log(model)
    train(model, data, cfg, precision="fp16")
    assert len(spy_scaler) == 1
    scaler = spy_scaler[0]
    assert scaler.scaled == scaler.steps == scaler.updates == 2 * 4  # every batch: scale, step, update
    assert all(on and dtype == torch.float16 for _, on, dtype in passes)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for precision in ("fp32", "bf16"):
        train(fresh(), data, cfg, precision=precision)
    assert len(spy_scaler) == 1


def test_one_fp16_step_is_the_fp32_step_not_one_scaled_by_the_attack_gradient_scale():
    """The parameter gradient comes back unscaled (GradScaler's scale, and not the wrapper's
    FP16_GRAD_SCALE for attacks, which would make this step 1024 times too long)."""
    data = separable(256, scale=0.1)  # small inputs: no overflow at GradScaler's first scale
    cfg = TrainConfig(epochs=1, batch_size=256, lr=0.5, momentum=0.0, weight_decay=0.0, schedule="constant")
    before = weights(fresh())
    steps = {}
    for precision in ("fp32", "fp16"):
        model = fresh()
        train(model, data, cfg, precision=precision)
        steps[precision] = torch.cat([(model.state_dict()[k] - before[k]).flatten() for k in before])
    assert steps["fp32"].norm() > 1e-4
    assert torch.allclose(steps["fp16"], steps["fp32"], rtol=2e-2, atol=2e-4 * steps["fp32"].abs().max())


def test_an_fp16_step_with_an_overflowing_gradient_is_skipped_and_the_scale_lowered():
    data = separable(64, scale=1e4)  # gradients far beyond fp16's range at any useful scale
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.1, schedule="constant")
    model, states = fresh(), []
    before = weights(model)
    train(model, data, cfg, precision="fp16", on_checkpoint=states.append)
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert states[-1].scaler["scale"] == 65536.0 / 2  # GradScaler's backoff after one skipped step


def test_interrupted_fp16_training_resumes_with_its_grad_scaler_bit_for_bit(tmp_path):
    """The scaler's scale is part of the state: a fresh scaler would skip steps the whole run made."""
    data = separable(256, scale=16.0)  # the first steps overflow at GradScaler's first scale
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, schedule="constant", seed=2)
    whole = fresh()
    train(whole, data, cfg, precision="fp16")
    saved = tmp_path / "state.safetensors"

    def stop(done: int, total: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(fresh(), data, cfg, precision="fp16", on_batch=stop, on_interrupt=lambda s: save_state(s, saved))
    state = load_state(saved)
    assert state.scaler and state.scaler["scale"] < 65536.0  # steps were skipped before the stop
    resumed = fresh()
    train(resumed, data, cfg, precision="fp16", resume=state)
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp32_is_the_plain_fp32_loop_bit_for_bit():
    data = separable(200)
    cfg = TrainConfig(epochs=1, batch_size=48, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="constant",
                      seed=5)
    runs = {}
    for precision in (None, "fp32", "auto"):  # auto is fp32 on the CPU
        model = fresh()
        passes = autocast_log(model)
        train(model, data, cfg, **({} if precision is None else {"precision": precision}))
        assert not any(on for _, on, _ in passes)
        runs[precision] = weights(model)
    # the loop written out: the epoch's order from the seed, SGD on the cross-entropy, nothing else
    reference = fresh()
    opt = torch.optim.SGD(reference.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))
    reference.train()
    for i in range(0, len(data), cfg.batch_size):
        idx = order[i:i + cfg.batch_size]
        loss = F.cross_entropy(reference.net(data.x[idx]), data.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    runs["reference"] = weights(reference)
    for name, got in runs.items():
        assert all(torch.equal(got[k], runs[None][k]) for k in got), name
    with pytest.raises(ValueError, match="precision must be one of"):
        train(fresh(), data, cfg, precision="fp8")


def test_the_adversarial_inner_attack_runs_at_the_training_precision():
    data = tsipras(96, seed=1)
    dim = data.example_shape[0]
    torch.manual_seed(0)
    model = ModelWrapper(nn.Sequential(nn.Linear(dim, 8), nn.ReLU(), nn.Linear(8, 2)), ModelInfo("mlp", (dim,), 2))
    passes = autocast_log(model)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, schedule="constant", seed=1,
                      adversarial=AttackConfig(norm="L2", eps=0.5, steps=3, step_size=0.3))
    history = train(model, data, cfg, precision="bf16")
    attack_passes = [p for p in passes if not p[0]]  # the attack and the clean count run in eval mode
    assert len(attack_passes) >= 3 * 3 and len(passes) > len(attack_passes)
    assert all(on and dtype == torch.bfloat16 for _, on, dtype in passes)
    assert model.precision == "bf16" and history[0].train_robust_accuracy == history[0].train_robust_accuracy


def test_the_server_trains_at_its_precision_setting(tmp_path, monkeypatch):
    from advex.client import Client
    from advex.service import servicer
    from advex.service.inprocess import InProcessServer

    seen = []
    real_train = servicer.train

    def spy(*args, **kwargs):
        seen.append(kwargs.get("precision"))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(servicer, "train", spy)
    with InProcessServer(data_dir=str(tmp_path), data_roots=[], precision="bf16") as srv, Client(srv.target) as c:
        c.train("mlp", "tsipras", epochs=1, limit=64, seed=1).result(progress=False)
    assert seen == ["bf16"]


def test_fp32_training_of_a_wrapper_left_in_bf16_runs_in_fp32():
    """The wrapper is set back to fp32, and trains as a fresh fp32 wrapper does."""
    data = separable(64)
    model = fresh().set_precision("bf16", "cpu")
    twin = copy.deepcopy(model).set_precision("fp32", "cpu")
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.1, schedule="constant")
    train(model, data, cfg, precision="fp32")
    train(twin, data, cfg)
    assert model.precision == "fp32"
    a, b = weights(model), weights(twin)
    assert all(torch.equal(a[k], b[k]) for k in a)
