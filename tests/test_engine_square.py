"""The Square attack on linear models with closed-form answers: it respects eps, the box and the
query budget, lowers accuracy, and needs no gradients."""
from __future__ import annotations

import pytest
import torch

from advex.engine.attacks import AttackConfig, attack
from advex.engine.square import p_schedule

from test_engine_linear import MARGIN, linear_model, points


def no_grad_forward(model):
    def forward(x):  # a black box: the attack must never differentiate through it
        with torch.no_grad():
            return model(x.detach())
    return forward


@pytest.mark.parametrize("norm,dual", [("Linf", 1.0), ("L2", 2.0)])
def test_square_respects_eps_box_and_budget_and_lowers_accuracy(norm, dual):
    model, w, b = linear_model()
    x, y = points(w, b)
    minimal = MARGIN / float(w.norm(p=dual))
    budget = 300
    out = attack(no_grad_forward(model), x, y, AttackConfig(norm=norm, eps=3 * minimal, method="square",
                                                            steps=budget, seed=1))
    assert (out.distance <= 3 * minimal * (1 + 1e-5)).all()
    assert out.x_adv.min() >= 0 and out.x_adv.max() <= 1
    assert (out.queries >= 1).all() and (out.queries <= budget).all()
    assert out.success.float().mean() > 0.5            # accuracy falls from 100% ...
    assert (out.queries[out.success] < budget).any()   # ... and successes stop early
    below = attack(no_grad_forward(model), x, y, AttackConfig(norm=norm, eps=0.95 * minimal, method="square",
                                                              steps=100, seed=1))
    assert not below.success.any()                     # no attack can beat the minimal distance


def test_square_targeted_and_schedule():
    model, w, b = linear_model()
    x, y = points(w, b)
    out = attack(no_grad_forward(model), x, 1 - y, AttackConfig(norm="Linf", eps=3 * MARGIN / float(w.norm(p=1)),
                                                                method="square", steps=300, targeted=True))
    assert (out.adv_pred[out.success] == 1 - y[out.success]).all() and out.success.float().mean() > 0.5
    assert p_schedule(0.05, 0, 10000) == 0.05 and p_schedule(0.05, 30, 10000) == 0.025
    assert p_schedule(0.05, 9000, 10000) == 0.05 / 512 and p_schedule(0.05, 5, 100) == 0.05 / 8  # 5 of 100 = 500 of 10,000: the (200, 500] band


def test_evaluate_flags_gradient_masking():
    """A model whose gradient is zero everywhere (a hard step in front of a linear model) defeats
    PGD but not the Square attack: Evaluate must notice."""
    from advex.engine.data import ArrayDataset
    from advex.engine.evaluate import AttackSweep, evaluate, gradient_masking_notes

    model, w, b = linear_model()
    x, y = points(w, b)

    class Masked(torch.nn.Module):  # quantizes its input: the gradient is zero almost everywhere
        def logits(self, v):
            return model(torch.round(v * 255) / 255)

    eps = 3 * MARGIN / float(w.norm(p=1))
    data = ArrayDataset(x, y, 2)
    rep = evaluate(Masked(), data, [AttackSweep(AttackConfig(norm="Linf", steps=10), eps=(eps,)),
                                    AttackSweep(AttackConfig(norm="Linf", method="square", steps=300), eps=(eps,))])
    pgd, square = rep.rows
    assert square.robust_correct < pgd.robust_correct and square.mean_queries > 0
    notes = gradient_masking_notes(rep.rows)
    assert len(notes) == 1 and "gradient masking suspected at Linf" in notes[0]
    assert rep.worst_case[0].robust_correct == square.robust_correct  # the suite takes the worst
