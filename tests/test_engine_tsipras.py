"""Tsipras et al. (2019) distribution (PAPER.md): a standard-trained model is accurate and
non-robust (Linf eps = 2*eta drives its accuracy near 0); an adversarially trained one keeps
accuracy near p under attack, and the theorem's bound holds."""
from __future__ import annotations

import pytest
import torch

from advex.engine import zoo
from advex.engine.attacks import AttackConfig
from advex.engine.data import TsiprasParams, tsipras
from advex.engine.evaluate import AttackSweep, evaluate
from advex.engine.models import ModelInfo, ModelWrapper
from advex.engine.train import TrainConfig, train

PARAMS = TsiprasParams(d=100, p=0.95)  # eta = 0.3
EPS = 2 * PARAMS.eta_value


def fit(adversarial: bool, arch: str = "linear") -> ModelWrapper:
    torch.manual_seed(0)
    d = PARAMS.d + 1
    model = ModelWrapper(zoo.build(arch, (d,), 2), ModelInfo(arch, (d,), 2))
    adv = AttackConfig(norm="Linf", eps=EPS, steps=10) if adversarial else None
    cfg = TrainConfig(epochs=3, batch_size=100, lr=0.1, momentum=0.9, weight_decay=0.0,
                      schedule="constant", adversarial=adv, seed=0)
    train(model, tsipras(4000, PARAMS, seed=1), cfg)
    return model


@pytest.fixture(scope="module")
def test_set():
    return tsipras(2000, PARAMS, seed=2)


def robust_report(model, data):
    sweep = AttackSweep(AttackConfig(norm="Linf", steps=20), eps=(EPS,))
    return evaluate(model, data, [sweep], batch_size=500)


def test_standard_model_is_accurate_but_not_robust(test_set):
    rep = robust_report(fit(adversarial=False), test_set)
    assert rep.clean_accuracy > 0.97
    assert rep.rows[0].robust_accuracy < 0.05
    # Tsipras et al. theorem: standard accuracy >= 1 - delta => robust <= p/(1-p) * delta
    delta = 1 - rep.clean_accuracy
    assert rep.rows[0].robust_accuracy <= PARAMS.p / (1 - PARAMS.p) * delta + 0.02


def test_adversarially_trained_model_keeps_accuracy_near_p(test_set):
    model = fit(adversarial=True)
    rep = robust_report(model, test_set)
    assert abs(rep.rows[0].robust_accuracy - PARAMS.p) < 0.03
    assert abs(rep.clean_accuracy - PARAMS.p) < 0.03
    w = model.net.head.weight[1] - model.net.head.weight[0]
    assert w[0].abs() > 5 * w[1:].abs().mean(), "robust model must lean on the robust feature x1"


def test_training_is_deterministic_given_a_seed():
    a, b = fit(adversarial=False, arch="mlp"), fit(adversarial=False, arch="mlp")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
