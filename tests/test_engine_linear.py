"""Closed-form checks on linear models: for f(x) = w.x + b the minimal L2 perturbation that
changes the sign of f is |f(x)|/||w||_2, the minimal Linf one |f(x)|/||w||_1 (PAPER.md)."""
from __future__ import annotations

import math

import pytest
import torch

from advex.engine.attacks import AttackConfig, attack
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.threat import L2Ball, LinfBall, per_example_norm
from advex.engine.zoo import Linear

from conftest import flat_then_linear

D = 64
MARGIN = 0.5  # |f(x)| for every point


def linear_model(seed: int = 0) -> tuple[ModelWrapper, torch.Tensor, float]:
    """Two-class linear model whose logit difference is exactly f(x) = w.x + b."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D, generator=g)
    b = 0.3
    net = Linear(D, 2)
    with torch.no_grad():
        net.head.weight.copy_(torch.stack([-w / 2, w / 2]))
        net.head.bias.copy_(torch.tensor([-b / 2, b / 2]))
    return ModelWrapper(net, ModelInfo("linear", (1, 8, 8), 2)).eval(), w, b


def points(w: torch.Tensor, b: float, n: int = 200, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Points well inside [0,1] with |f(x)| = MARGIN exactly, half on each side."""
    g = torch.Generator().manual_seed(seed)
    x = 0.35 + 0.3 * torch.rand((n, D), generator=g)
    side = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    f = x @ w + b
    x = x + ((side * MARGIN - f) / w.dot(w)).unsqueeze(1) * w
    assert x.min() > 0.1 and x.max() < 0.9, "test points must stay well inside the box"
    return x.view(n, 1, 8, 8), (side > 0).long()


@pytest.mark.parametrize("norm,dual", [("L2", 2.0), ("Linf", 1.0)])
@pytest.mark.parametrize("method", ["pgd", "fgsm"])
def test_eps_just_above_minimum_flips_all_and_just_below_flips_none(norm, dual, method):
    model, w, b = linear_model()
    x, y = points(w, b)
    assert (model(x).argmax(1) == y).all()
    minimal = MARGIN / float(w.norm(p=dual))
    # FGSM is exact for linear models (one step of eps along the dual direction).
    cfg = dict(norm=norm, method=method, steps=0 if method == "fgsm" else 50)
    above = attack(model, x, y, AttackConfig(eps=1.05 * minimal, **cfg))
    below = attack(model, x, y, AttackConfig(eps=0.95 * minimal, **cfg))
    assert above.success.float().mean() >= 0.99
    assert not below.success.any()
    for out, eps in ((above, 1.05 * minimal), (below, 0.95 * minimal)):
        assert (out.distance <= eps * (1 + 1e-5)).all()
        assert out.x_adv.min() >= 0 and out.x_adv.max() <= 1


@pytest.mark.parametrize("threat_cls", [L2Ball, LinfBall])
def test_projection_stays_in_ball_and_box(threat_cls):
    g = torch.Generator().manual_seed(3)
    x = torch.rand((32, 3, 8, 8), generator=g)
    far = x + 5 * torch.randn((32, 3, 8, 8), generator=g)
    threat = threat_cls(0.3)
    proj = threat.project(far, x)
    assert (threat.distance(proj, x) <= 0.3 + 1e-6).all()
    assert proj.min() >= 0 and proj.max() <= 1
    start = threat.random_init(x, torch.Generator().manual_seed(4))
    assert (threat.distance(start, x) <= 0.3 + 1e-6).all()


def test_l2_step_has_exact_length_and_unbounded_ball_only_boxes():
    g = torch.Generator().manual_seed(5)
    x = 0.5 + 0.01 * torch.randn((4, 10), generator=g)
    grad = torch.randn((4, 10), generator=g)
    threat = L2Ball(math.inf, box=None)
    stepped = threat.step(x, grad, 0.1)
    assert torch.allclose(per_example_norm(stepped - x, 2.0), torch.full((4,), 0.1), atol=1e-6)
    far = x + 100.0
    assert torch.equal(threat.project(far, x), far)


def test_targeted_attack_reaches_target_on_linear_model():
    model, w, b = linear_model()
    x, y = points(w, b)
    target = 1 - y
    out = attack(model, x, target, AttackConfig(norm="L2", eps=1.05 * MARGIN / float(w.norm()), steps=50, targeted=True))
    assert (out.adv_pred == target).float().mean() >= 0.99


def test_restarts_keep_the_best_iterate_and_seed_is_reproducible():
    model, w, b = linear_model()
    x, y = points(w, b)
    eps = 1.0 * MARGIN / float(w.norm())
    cfg = AttackConfig(norm="L2", eps=eps, steps=3, restarts=2, seed=7)
    a, b2 = attack(model, x, y, cfg), attack(model, x, y, cfg)
    assert torch.equal(a.x_adv, b2.x_adv)
    # with restarts, the loss is never lower than with one run of the same seed
    one = attack(model, x, y, AttackConfig(norm="L2", eps=eps, steps=3, restarts=0, seed=7))
    margin_a = (model(a.x_adv)[:, 1] - model(a.x_adv)[:, 0]) * (2 * y - 1)
    margin_one = (model(one.x_adv)[:, 1] - model(one.x_adv)[:, 0]) * (2 * y - 1)
    assert (margin_a <= margin_one + 1e-5).all()


def _flat(v: torch.Tensor) -> torch.Tensor:
    """Constant logits with a zero gradient: a Linf step (sign(0) = 0) never moves an iterate, so
    the best iterate PGD returns is its starting point."""
    return v.flatten(1).sum(1, keepdim=True) * 0 + torch.tensor([1.0, 0.0])


def test_pgd_starts_at_a_uniform_point_of_the_ball_unless_random_start_is_false():
    x, y, eps = torch.full((400, 1, 8, 8), 0.5), torch.zeros(400, dtype=torch.long), 0.1
    out = attack(_flat, x, y, AttackConfig(norm="Linf", eps=eps, method="pgd", steps=5, seed=3))
    delta = out.x_adv - x
    assert delta.abs().max() <= eps + 1e-6
    assert abs(float(delta.abs().mean()) - eps / 2) < 0.005  # U[-eps, eps] per pixel: E|d| = eps/2
    assert abs(float(delta.mean())) < 0.005
    again = attack(_flat, x, y, AttackConfig(norm="Linf", eps=eps, method="pgd", steps=5, seed=4))
    assert not torch.equal(again.x_adv, out.x_adv)  # the seed draws the start
    fixed = attack(_flat, x, y, AttackConfig(norm="Linf", eps=eps, method="pgd", steps=5, seed=3, random_start=False))
    assert torch.equal(fixed.x_adv, x)


def test_pgd_restarts_raise_the_success_rate_where_only_the_start_decides():
    x, y = torch.full((400, 8), 0.5), torch.zeros(400, dtype=torch.long)
    runs = {r: attack(flat_then_linear, x, y, AttackConfig(norm="Linf", eps=0.2, method="pgd", steps=10, restarts=r))
            for r in (0, 3)}
    rate = {r: float(out.success.float().mean()) for r, out in runs.items()}
    assert 0.05 < rate[0] < 0.3, rate  # P(Binomial(8, 1/2) >= 6) = 0.145
    assert (runs[3].success >= runs[0].success).all()  # run 0 is the same draw
    assert rate[3] > 1 - (1 - 0.145) ** 4 - 0.1, rate  # 4 independent starts: ~0.47
