"""APGD (Croce & Hein, ICML 2020): known answers on linear models, the paper's step-size schedule,
the DLR loss's sign, random starts, and agreement with torchattacks' APGD / APGD-T."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from advex.engine.apgd import apgd, checkpoint_fractions, checkpoints, halve_step
from advex.engine.objectives import dlr_loss
from advex.engine.threat import per_example_norm

from conftest import (LINEAR_DIM, LINEAR_MARGIN, flat_then_linear, linear_model, linear_points, require_module,
                      ten_class_data)

D, MARGIN = LINEAR_DIM, LINEAR_MARGIN


# ------------------------------------------------------------------ 1. closed form on a linear model

@pytest.mark.parametrize("norm,dual", [("Linf", 1.0), ("L2", 2.0)])
def test_linear_model_eps_just_above_minimum_flips_all_and_just_below_none(norm, dual):
    model, w, b = linear_model()
    x, y = linear_points(w, b)
    assert (model(x).argmax(1) == y).all()
    minimal = MARGIN / float(w.norm(p=dual))  # Linf: |f| / ||w||_1, L2: |f| / ||w||_2
    for factor, expect in ((1.05, True), (0.95, False)):
        eps = factor * minimal
        out = apgd(model, x, y, norm=norm, eps=eps, steps=20, loss="ce")
        assert bool(out.success.all()) if expect else not out.success.any(), (factor, out.success.float().mean())
        with torch.no_grad():
            assert ((model(out.x).argmax(1) != y) == out.success).all()
        dist = per_example_norm(out.x - x, math.inf if norm == "Linf" else 2.0)
        assert (dist <= eps * (1 + 1e-5)).all()
        assert out.x.min() >= 0 and out.x.max() <= 1


def test_no_box_lets_inputs_leave_the_unit_interval():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, generator=g)
    x = 5.0 + torch.rand((20, D), generator=g)
    model = lambda v: torch.stack([torch.zeros(len(v)), (v.flatten(1) - 5.5) @ w - 30], 1)  # noqa: E731
    y = torch.zeros(20, dtype=torch.long)
    out = apgd(model, x, y, norm="Linf", eps=0.5, steps=5, box=None)
    assert (per_example_norm(out.x - x, math.inf) <= 0.5 + 1e-5).all()
    assert out.x.min() > 4.0  # never clamped into [0, 1]
    # CE is increasing in the class-1 logit, linear in x: the best point is the corner x + eps sign(w)
    assert not out.success.any()
    assert torch.allclose(out.x, x + 0.5 * w.sign(), atol=1e-5)


# ------------------------------------------------------------------ 2. step-size schedule

def test_checkpoints_follow_the_paper_formula():
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    expected = [math.ceil(pj * 100) for pj in p if pj <= 1]
    assert expected == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(100) == expected
    assert checkpoint_fractions() == pytest.approx([float(q) for q in p])
    assert checkpoints(1000) == [math.ceil(pj * 1000) for pj in p if pj <= 1]
    assert checkpoints(10) == [0, 3, 5, 6, 7, 8, 9, 10]  # ceil(2.2)=3, ceil(4.1)=5, ...


def test_halving_condition():
    eta, same = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    best, best_last = torch.tensor([2.0, 2.0, 2.0, 2.0]), torch.tensor([1.0, 1.0, 2.0, 2.0])
    # interval 20: rho * 20 = 15 increasing steps needed to keep the step size
    increases = torch.tensor([14.0, 15.0, 15.0, 20.0])
    halved = torch.tensor([2.0, 2.0, 2.0, 0.5])  # eta changed at the last checkpoint
    assert halve_step(increases, 20, eta, same, best, best_last).tolist() == [True, False, True, True]
    # condition 2 needs both eta and the best loss unchanged
    assert halve_step(increases, 20, eta, halved, best, best_last).tolist() == [True, False, False, False]
    assert halve_step(torch.full((4,), 19.0), 20, eta, same, best, best_last, rho=1.0).all()


# ------------------------------------------------------------------ 3. DLR loss

def test_untargeted_dlr_grows_as_the_true_margin_shrinks():
    z = torch.tensor([[4.0, 2.0, 1.0, 0.0]])
    y = torch.tensor([0])
    values = [float(dlr_loss(z + torch.tensor([[-d, 0, 0, 0]]), y)) for d in (0.0, 0.5, 1.0, 1.5)]
    assert values == sorted(values) and values[0] < values[-1]
    assert values[0] == pytest.approx(-(4 - 2) / (4 - 1))
    assert float(dlr_loss(torch.tensor([[1.0, 3.0, 0.0, -1.0]]), y)) > 0  # misclassified: positive
    # invariant to shift and scale of the logits
    assert float(dlr_loss(3 * z + 7, y)) == pytest.approx(float(dlr_loss(z, y)))


def test_targeted_dlr_grows_as_the_target_catches_up():
    z = torch.tensor([[4.0, 2.0, 1.0, 0.0, -1.0]])
    y, t = torch.tensor([0]), torch.tensor([2])
    values = [float(dlr_loss(z + torch.tensor([[0, 0, d, 0, 0]]), y, t)) for d in (0.0, 0.5, 1.0)]
    assert values == sorted(values) and values[0] < values[-1]
    assert values[0] == pytest.approx(-(4 - 1) / (4 - (1 + 0) / 2))
    with pytest.raises(ValueError):
        dlr_loss(z[:, :3], y, t)


# ------------------------------------------------------------------ 4. random starts

def test_more_restarts_never_weaker_and_seed_matters(one_thread):
    x = torch.full((200, 8), 0.5)
    y = torch.zeros(200, dtype=torch.long)
    runs = {r: apgd(flat_then_linear, x, y, norm="Linf", eps=0.2, steps=10, restarts=r) for r in (0, 1, 3)}
    rates = {r: float(out.success.float().mean()) for r, out in runs.items()}
    assert 0.05 < rates[0] < 0.3, rates  # P(Binomial(8, 1/2) >= 6) = 0.145
    assert (runs[1].success >= runs[0].success).all() and (runs[3].success >= runs[1].success).all()
    assert rates[3] > rates[0] + 0.1, rates
    a = apgd(flat_then_linear, x, y, norm="Linf", eps=0.2, steps=10, seed=0)
    b = apgd(flat_then_linear, x, y, norm="Linf", eps=0.2, steps=10, seed=1)
    assert torch.equal(a.x, runs[0].x)  # reproducible
    assert not torch.equal(a.x, b.x) and not torch.equal(a.success, b.success)


# ------------------------------------------------------------------ cost accounting and callbacks

def test_pass_counts_and_step_callback():
    model, w, b = linear_model()
    x, y = linear_points(w, b, n=10)
    calls = []
    out = apgd(model, x, y, norm="Linf", eps=1e-4, steps=10, restarts=1, early_stop=False,
               on_step=lambda s, t: calls.append((s, t)))
    assert not out.success.any()
    assert (out.forwards == 1 + 2 * 11).all() and (out.backwards == 2 * 10).all()
    assert calls == [(s, 20) for s in range(1, 21)]

    class Cancel(Exception):
        pass

    def cancel(step, total):
        if step == 3:
            raise Cancel

    with pytest.raises(Cancel):
        apgd(model, x, y, norm="Linf", eps=1e-4, steps=10, on_step=cancel)


def test_early_stop_spends_nothing_on_misclassified_inputs():
    model, w, b = linear_model()
    x, y = linear_points(w, b, n=10)
    y = y.clone()
    y[:5] = 1 - y[:5]  # wrong labels: misclassified already
    out = apgd(model, x, y, norm="Linf", eps=1e-4, steps=10)
    assert out.success[:5].all() and not out.success[5:].any()
    assert torch.equal(out.x[:5], x[:5])
    assert (out.forwards[:5] == 1).all() and (out.backwards[:5] == 0).all()
    assert (out.forwards[5:] == 12).all() and (out.backwards[5:] == 10).all()


# ------------------------------------------------------------------ 5. agreement with torchattacks

@pytest.mark.parametrize("norm,eps", [("Linf", 0.09), ("L2", 0.6)])
@pytest.mark.parametrize("loss,targeted", [("ce", False), ("dlr", False), ("dlr", True)])
def test_robust_accuracy_agrees_with_torchattacks(ten_class_model, norm, eps, loss, targeted):
    torchattacks = require_module("torchattacks", "pip install --no-deps torchattacks scipy (scripts/test.sh does)")
    model = ten_class_model
    x, y = ten_class_data(300, seed=2)
    steps = 25
    if targeted:
        peer = torchattacks.APGDT(model, norm=norm, eps=eps, steps=steps, n_restarts=1, seed=0, n_classes=10)
    else:
        peer = torchattacks.APGD(model, norm=norm, eps=eps, steps=steps, n_restarts=1, seed=0, loss=loss)
    x_peer = peer(x, y)
    ours = apgd(model, x, y, norm=norm, eps=eps, steps=steps, loss=loss, targeted=targeted, target_classes=9)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
        peer_robust = float((model(x_peer).argmax(1) == y).float().mean())
        assert ((model(ours.x).argmax(1) != y) == ours.success).all()
    ours_robust = float((~ours.success).float().mean())
    assert 0.1 < peer_robust < clean - 0.1, "eps must make the comparison informative"
    assert ours_robust <= peer_robust + 0.02, (ours_robust, peer_robust)
    assert abs(ours_robust - peer_robust) <= 0.03, (ours_robust, peer_robust)
    dist = per_example_norm(ours.x - x, math.inf if norm == "Linf" else 2.0)
    assert (dist <= eps * (1 + 1e-5)).all() and ours.x.min() >= 0 and ours.x.max() <= 1


def test_dlr_on_a_two_class_model_runs_as_cross_entropy():
    """DLR needs 3 classes (targeted: 4): on a 2-class model APGD-DLR and APGD-T fall back to
    cross-entropy, as AutoAttack does, and still find the linear model's adversarial examples."""
    model, w, b = linear_model()
    x, y = linear_points(w, b, n=10)
    eps = 1.05 * MARGIN / float(w.norm(p=1.0))
    for targeted in (False, True):
        out = apgd(model.logits, x, y, norm="Linf", eps=eps, steps=20, loss="dlr", targeted=targeted)
        ce = apgd(model.logits, x, y, norm="Linf", eps=eps, steps=20, loss="ce", targeted=targeted)
        assert out.success.all() and torch.equal(out.x, ce.x)


# ------------------------------------------------------------------ the schedule, iterate by iterate

PEAK, PEAK_EPS, PEAK_STEPS = 0.3, 1.0, 20


def _peak(v: torch.Tensor) -> torch.Tensor:
    """Two classes, y = 0; CE = softplus(-|v - PEAK|) peaks at v = PEAK inside the ball [-1, 1]; never misclassified."""
    return torch.stack([torch.zeros(len(v)), -(v[:, 0] - PEAK).abs()], 1)


def _ce(v):
    return F.cross_entropy(_peak(v), torch.zeros(len(v), dtype=torch.long), reduction="none")


def _reference(start: torch.Tensor) -> list[torch.Tensor]:
    """The paper's APGD iterates, one coordinate, x = 0, Linf ball of radius PEAK_EPS, no box."""
    ws = [0, 5, 9, 12, 14, 16, 18, 19, 20]  # ceil(p_j * 20), p = 0, .22, .41, .57, .70, .80, .87, .93, .99
    intervals = {w: w - v for v, w in zip(ws, ws[1:]) if w < PEAK_STEPS}
    clip, sign = (lambda v: v.clamp(-PEAK_EPS, PEAK_EPS)), (lambda v: torch.sign(PEAK - v))
    cur = prev = best = start
    l_cur = l_best = _ce(start)
    eta = torch.full_like(l_cur, 2 * PEAK_EPS)
    eta_last, best_last, inc, g, out = eta.clone(), l_best.clone(), torch.zeros_like(l_cur), sign(start), []
    for k in range(PEAK_STEPS):
        z = clip(cur + eta[:, None] * g)
        prev, cur = cur, (z if k == 0 else clip(cur + 0.75 * (z - cur) + 0.25 * (cur - prev)))
        out.append(cur)
        l_new = _ce(cur)
        inc, l_cur = inc + (l_new > l_cur).float(), l_new
        better = l_new > l_best
        best, l_best = torch.where(better[:, None], cur, best), torch.where(better, l_new, l_best)
        if k + 1 in intervals:
            halve = (inc < 0.75 * intervals[k + 1]) | ((eta == eta_last) & (l_best == best_last))
            eta_last, best_last, eta = eta, l_best, torch.where(halve, eta / 2, eta)
            cur = torch.where(halve[:, None], best, cur)  # restart from the best point,
            prev = torch.where(halve[:, None], best, prev)  # with no momentum
            l_cur, inc = torch.where(halve, l_best, l_cur), torch.zeros_like(inc)
        g = sign(cur)
    return out


def test_apgd_iterates_follow_the_papers_schedule_on_a_peaked_loss():
    seen = []
    forward = lambda v: (seen.append(v.detach().clone()), _peak(v))[1]
    x, y = torch.zeros(64, 1), torch.zeros(64, dtype=torch.long)
    apgd(forward, x, y, norm="Linf", eps=PEAK_EPS, steps=PEAK_STEPS, box=None, early_stop=False, seed=5)
    start, iterates = seen[1], seen[2:]  # seen[0]: the clean input
    expected = _reference(start)
    assert len(iterates) == PEAK_STEPS
    for k, (got, want) in enumerate(zip(iterates, expected)):
        assert torch.allclose(got, want, atol=1e-6), (k, (got - want).abs().max())
