"""Pass accounting of the projected-gradient loop (issue: a GPU engine at full speed): PGD-K
costs K forward+backward passes and one forward for the last iterate; the adversarial prediction
comes from the best-iterate bookkeeping, the clean one from the first pass when it is at x.
Counted on a model that records every forward and backward, and checked against the model's
own predictions. No step reads a value back from the device (no bool(), .item())."""
from __future__ import annotations

import torch

from advex.engine.attacks import AttackConfig, attack, predict
from advex.engine import optimize
from advex.engine.optimize import COMPACT_EVERY

from conftest import ten_class_data


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, counter):
        ctx.counter = counter
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.backwards += 1
        return grad, None


class Counting(torch.nn.Module):
    """Wraps a model: .forwards lists (batch, with gradient) per forward; .backwards counts backward passes."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.forwards: list[tuple[int, bool]] = []
        self.backwards = 0

    def forward(self, x):
        grad = torch.is_grad_enabled() and x.requires_grad
        self.forwards.append((x.shape[0], grad))
        out = self.net(x)
        return _CountBackward.apply(out, self) if grad else out


def test_pgd_k_costs_k_forward_backward_and_one_forward(ten_class_model):
    x, y = ten_class_data(64, seed=7)
    K = 7
    cfg = AttackConfig(norm="Linf", eps=0.1, steps=K, seed=3)  # random start (the default)
    m = Counting(ten_class_model)
    clean = predict(ten_class_model, x)
    out = attack(m, x, y, cfg, clean_pred=clean)
    assert m.backwards == K and [g for _, g in m.forwards] == [True] * K + [False]
    # the adversarial prediction is the model's own at the returned iterate
    assert torch.equal(out.adv_pred, predict(ten_class_model, out.x_adv))
    assert torch.equal(out.success, out.adv_pred != y) and 0 < int(out.success.sum()) < len(y)

    m = Counting(ten_class_model)  # no clean predictions given, random start: one forward for them
    again = attack(m, x, y, cfg)
    assert m.backwards == K and len(m.forwards) == K + 2
    assert torch.equal(again.clean_pred, clean) and torch.equal(again.x_adv, out.x_adv)


def test_without_random_start_the_clean_prediction_is_the_first_pass(ten_class_model):
    x, y = ten_class_data(64, seed=8)
    m = Counting(ten_class_model)
    out = attack(m, x, y, AttackConfig(norm="L2", eps=0.5, steps=5, random_start=False))
    assert m.backwards == 5 and len(m.forwards) == 6
    assert torch.equal(out.clean_pred, predict(ten_class_model, x))
    assert torch.equal(out.adv_pred, predict(ten_class_model, out.x_adv))
    m = Counting(ten_class_model)  # FGSM: one step from x, two passes in all
    fgsm = attack(m, x, y, AttackConfig(norm="Linf", eps=0.05, method="fgsm"))
    assert m.backwards == 1 and len(m.forwards) == 2 and torch.equal(fgsm.clean_pred, out.clean_pred)


def test_adversarial_training_spends_no_pass_on_clean_predictions(ten_class_model):
    x, y = ten_class_data(32, seed=9)
    m = Counting(ten_class_model)
    out = attack(m, x, y, AttackConfig(norm="L2", eps=0.5, steps=3, seed=1), clean=False)
    assert len(m.forwards) == 4 and bool((out.clean_pred == -1).all())


def test_early_stop_drops_successes_every_few_steps_and_changes_no_verdict(ten_class_model, monkeypatch):
    """As on a GPU: the batch shrinks every COMPACT_EVERY steps (on the CPU, at every step)."""
    monkeypatch.setattr(optimize, "compaction_interval", lambda device: COMPACT_EVERY)
    x, y = ten_class_data(256, seed=10)
    K = 4 * COMPACT_EVERY
    cfg = AttackConfig(norm="Linf", eps=0.15, steps=K, seed=2)
    full = attack(ten_class_model, x, y, cfg)
    m = Counting(ten_class_model)
    early = attack(m, x, y, cfg, early_stop=True)
    assert torch.equal(early.success, full.success)
    assert torch.equal(early.adv_pred, predict(ten_class_model, early.x_adv))
    sizes = [b for b, g in m.forwards if g]
    assert len(sizes) == K and sizes[0] == len(y) and sizes[-1] < len(y) // 2
    # the batch shrinks only at compaction steps
    assert all(sizes[t] == sizes[t - 1] for t in range(1, K) if t % COMPACT_EVERY)


def test_a_pgd_step_reads_nothing_back_from_the_device(ten_class_model, monkeypatch):
    """bool() and .item() on a tensor wait for the device; the loop calls neither per step (with
    early stopping: once per COMPACT_EVERY steps on a GPU, to shrink the batch)."""
    monkeypatch.setattr(optimize, "compaction_interval", lambda device: COMPACT_EVERY)
    x, y = ten_class_data(64, seed=11)
    for early_stop in (False, True):
        reads = []
        real_bool, real_item = torch.Tensor.__bool__, torch.Tensor.item
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "__bool__", lambda t: reads.append("bool") or real_bool(t))
            patch.setattr(torch.Tensor, "item", lambda t: reads.append("item") or real_item(t))
            out = attack(ten_class_model, x, y, AttackConfig(norm="L2", eps=0.3, steps=12, seed=4),
                         clean_pred=torch.zeros_like(y), early_stop=early_stop)
        assert out.x_adv.shape == x.shape
        assert len(reads) <= (0 if not early_stop else 2 * (12 // COMPACT_EVERY + 1) + 1), (early_stop, reads)


def test_a_frozen_model_computes_the_same_function_without_batch_norm_or_parameter_gradients():
    import copy

    from advex.engine import zoo
    from advex.engine.models import ModelInfo, ModelWrapper, freeze

    for arch, shape, layers in (("small_cnn", (1, 12, 12), 5), ("resnet18", (3, 16, 16), 20)):
        torch.manual_seed(0)
        model = ModelWrapper(zoo.build(arch, shape, 10, {"width": 4} if arch == "small_cnn" else {}),
                             ModelInfo(arch, shape, 10))
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics to fold
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)
        model.eval()
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == layers
        frozen = freeze(copy.deepcopy(model))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
        assert not any(p.requires_grad for p in frozen.parameters())
        x = torch.rand(4, *shape)
        assert torch.allclose(frozen(x), model(x), atol=1e-4, rtol=1e-4)
        assert torch.allclose(frozen.features(x), model.features(x), atol=1e-4, rtol=1e-4)
        x.requires_grad_(True)  # input gradients still flow
        g_frozen, = torch.autograd.grad(frozen(x)[:, 0].sum(), x)
        g_model, = torch.autograd.grad(model(x)[:, 0].sum(), x)
        assert torch.allclose(g_frozen, g_model, atol=1e-4, rtol=1e-3)
