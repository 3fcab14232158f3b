"""Pass accounting of APGD, Square and FAB-T in attack(): each costs exactly the passes of its
algorithm. The prediction at the returned point comes from the pass that scored it, the clean one
from the algorithm's own pass at x (APGD, FAB) or one forward (Square, which never queries x):
attack() runs no predict() of its own (eot > 1 excepted: a randomized model's points are scored
afresh). Counted on a model that records every forward and backward (test_engine_passes.Counting)
and checked against the model's own predictions and the attack functions called directly."""
from __future__ import annotations

import pytest
import torch

from advex.engine import attacks, square
from advex.engine.apgd import apgd
from advex.engine.attacks import APGD_TARGET_CLASSES, AttackConfig, attack
from advex.engine.fab import fab
from advex.engine.optimize import COMPACT_EVERY

from conftest import count_device_reads, ten_class_data
from test_engine_passes import Counting

N = 32


def _argmax(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


def _exact(model, out, x, y, targeted: bool = False) -> None:
    """clean_pred and adv_pred are the model's own predictions at x and x_adv; success follows adv_pred."""
    assert torch.equal(out.clean_pred, _argmax(model, x))
    assert torch.equal(out.adv_pred, _argmax(model, out.x_adv))
    assert torch.equal(out.success, out.adv_pred == y if targeted else out.adv_pred != y)


@pytest.fixture
def no_predict(monkeypatch):
    """attack() must not call predict(): every pass belongs to the attack itself."""
    calls = []
    real = attacks.predict
    monkeypatch.setattr(attacks, "predict", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture
def reads(monkeypatch):
    """Host-device reads (bool(), .item()) made while the attack runs."""
    return count_device_reads(monkeypatch, ("__bool__", "item"))


# ------------------------------------------------------------------ APGD

def test_apgd_ce_costs_k_forward_backward_and_one_forward_per_run_plus_one_clean_forward(ten_class_model, no_predict):
    x, y = ten_class_data(N, seed=21)
    K, R = 5, 2  # one restart: two runs
    cfg = AttackConfig(norm="Linf", eps=0.1, method="apgd-ce", steps=K, restarts=R - 1, seed=3)
    m = Counting(ten_class_model)
    out = attack(m, x, y, cfg)
    # the clean pass at x, then per run: K forward+backward (start and K - 1 steps), the last iterate
    assert m.forwards == [(N, False)] + R * ([(N, True)] * K + [(N, False)])
    assert m.backwards == R * K and no_predict == []
    _exact(ten_class_model, out, x, y)
    assert 0 < int(out.success.sum()) < N
    direct = apgd(ten_class_model, x, y, norm="Linf", eps=0.1, steps=K, restarts=R - 1, loss="ce",
                  target_classes=APGD_TARGET_CLASSES, seed=3, early_stop=False)
    assert torch.equal(out.x_adv, direct.x) and torch.equal(direct.pred, out.adv_pred)
    assert torch.equal(direct.clean_pred, out.clean_pred)

    # given the clean predictions, untargeted APGD spends no pass at x; nothing else changes
    m = Counting(ten_class_model)
    given = attack(m, x, y, cfg, clean_pred=out.clean_pred)
    assert m.forwards == R * ([(N, True)] * K + [(N, False)]) and m.backwards == R * K
    for field in ("x_adv", "success", "clean_pred", "adv_pred"):
        assert torch.equal(getattr(given, field), getattr(out, field)), field


def test_apgd_t_costs_one_clean_forward_and_k_plus_one_per_target_class(ten_class_model, no_predict, reads):
    x, y = ten_class_data(N, seed=22)
    K = 4
    cfg = AttackConfig(norm="L2", eps=0.6, method="apgd-t", steps=K, seed=4)
    m = Counting(ten_class_model)
    out = attack(m, x, y, cfg, clean_pred=_argmax(ten_class_model, x))  # APGD-T ranks targets by the clean pass
    runs = min(APGD_TARGET_CLASSES, 9)
    assert m.forwards == [(N, False)] + runs * ([(N, True)] * K + [(N, False)])
    assert m.backwards == runs * K and no_predict == [] and reads == []
    _exact(ten_class_model, out, x, y)
    assert 0 < int(out.success.sum()) < N


def test_apgd_early_stop_rows_are_exactly_apgds_own_forwards_and_predictions_survive_compaction(
        ten_class_model, no_predict):
    """Examples leave the batch at checkpoints; the predictions kept with the points leave with them."""
    x, y = ten_class_data(64, seed=23)
    K = 10  # checkpoints 3, 5, 6, 7, 8, 9
    for method, loss, targeted in (("apgd-ce", "ce", False), ("apgd-dlr", "dlr", False), ("apgd-t", "dlr", True)):
        cfg = AttackConfig(norm="Linf", eps=0.12, method=method, steps=K, restarts=1, seed=5)
        m = Counting(ten_class_model)
        out = attack(m, x, y, cfg, early_stop=True)
        direct = apgd(ten_class_model, x, y, norm="Linf", eps=0.12, steps=K, restarts=1, loss=loss,
                      targeted=targeted, target_classes=APGD_TARGET_CLASSES, seed=5, early_stop=True)
        assert sum(b for b, _ in m.forwards) == int(direct.forwards.sum()), method
        assert sum(b for b, g in m.forwards if g) == int(direct.backwards.sum())
        assert m.backwards == sum(1 for _, g in m.forwards if g)
        assert no_predict == [] and torch.equal(out.x_adv, direct.x)
        assert 0 < int(out.success.sum()) < len(y) and min(b for b, _ in m.forwards) < len(y) // 2, method
        _exact(ten_class_model, out, x, y)


def test_apgd_returns_the_predictions_of_its_passes_and_eot_still_scores_afresh(ten_class_model):
    """apgd() itself: pred is the argmax at the returned point, clean_pred at x (eot > 1: of the
    mean logits). attack() with eot > 1 keeps the fresh scoring of a randomized model: two forwards."""
    x, y = ten_class_data(N, seed=24)
    for eot in (1, 2):
        res = apgd(ten_class_model, x, y, norm="L2", eps=0.5, steps=6, seed=1, eot=eot, early_stop=False)
        assert torch.equal(res.pred, _argmax(ten_class_model, res.x))
        assert torch.equal(res.clean_pred, _argmax(ten_class_model, x))
        assert torch.equal(res.success, res.pred != y)
    m = Counting(ten_class_model)
    out = attack(m, x, y, AttackConfig(norm="L2", eps=0.5, method="apgd-ce", steps=6, seed=1, eot=2))
    assert len(m.forwards) == 2 * (1 + 6 + 1) + 2 and m.backwards == 2 * 6
    _exact(ten_class_model, out, x, y)


# ------------------------------------------------------------------ Square

@pytest.mark.parametrize("norm,eps,targeted", [("Linf", 0.05, False), ("L2", 1.0, False), ("Linf", 0.1, True)])
def test_square_costs_its_query_budget_and_one_clean_forward(ten_class_model, no_predict, norm, eps, targeted):
    x, y = ten_class_data(N, seed=25)
    goal = (y + 1) % 10 if targeted else y
    Q = 40
    cfg = AttackConfig(norm=norm, eps=eps, method="square", steps=Q, seed=6, targeted=targeted)
    clean = _argmax(ten_class_model, x)
    m = Counting(ten_class_model)
    out = attack(m, x, goal, cfg, clean_pred=clean)
    # not every example succeeds: the budget is spent, Q forwards, one row per query counted
    assert 0 < int(out.success.sum()) < N
    assert len(m.forwards) == Q and m.backwards == 0 and not any(g for _, g in m.forwards)
    assert m.forwards[0] == (N, False) and sum(b for b, _ in m.forwards) == int(out.queries.sum())
    assert no_predict == []
    _exact(ten_class_model, out, x, goal, targeted)
    direct = square.square_attack(ten_class_model, x, goal, norm=norm, eps=eps, queries=Q, targeted=targeted, seed=6)
    assert torch.equal(out.x_adv, direct.x) and torch.equal(direct.pred, out.adv_pred)

    # Square never queries x: the clean predictions cost one forward, or nothing when not wanted
    m = Counting(ten_class_model)
    again = attack(m, x, goal, cfg)
    assert len(m.forwards) == Q + 1 and sum(b for b, _ in m.forwards) == int(out.queries.sum()) + N
    assert torch.equal(again.clean_pred, clean) and torch.equal(again.x_adv, out.x_adv)
    m = Counting(ten_class_model)
    training = attack(m, x, goal, cfg, clean=False)
    assert len(m.forwards) == Q and bool((training.clean_pred == -1).all())
    assert torch.equal(training.adv_pred, out.adv_pred)


def test_square_on_a_gpu_schedule_keeps_each_points_prediction_between_compactions(
        ten_class_model, monkeypatch, no_predict, reads):
    """Every COMPACT_EVERY iterations (as on a GPU) successes leave; in between they are queried
    but neither their point nor its prediction changes."""
    monkeypatch.setattr(square, "compaction_interval", lambda device: COMPACT_EVERY)
    x, y = ten_class_data(48, seed=26)
    Q = 6 * COMPACT_EVERY + 1
    m = Counting(ten_class_model)
    out = attack(m, x, y, AttackConfig(norm="Linf", eps=0.15, method="square", steps=Q, seed=7),
                 clean_pred=y)
    assert len(m.forwards) == Q and no_predict == [] and reads == []
    assert sum(b for b, _ in m.forwards) > int(out.queries.sum())  # the stragglers between compactions
    assert torch.equal(out.adv_pred, _argmax(ten_class_model, out.x_adv))
    assert torch.equal(out.success, out.adv_pred != y) and 0 < int(out.success.sum()) < len(y)


def test_square_on_a_black_box_sends_no_finished_row_again_even_on_a_gpu_schedule(ten_class_model, monkeypatch):
    """An ONNX graph or an endpoint bills every row it is sent: there finished rows leave at once,
    whatever the device's compaction schedule, and the rows sent equal the queries reported."""
    monkeypatch.setattr(square, "compaction_interval", lambda device: COMPACT_EVERY)

    class BlackBox(Counting):
        has_gradients = False

    x, y = ten_class_data(48, seed=26)
    m = BlackBox(ten_class_model)
    out = attack(m, x, y, AttackConfig(norm="Linf", eps=0.15, method="square", steps=6 * COMPACT_EVERY + 1,
                                       seed=7), clean_pred=y)
    assert 0 < int(out.success.sum()) < len(y)
    assert sum(b for b, _ in m.forwards) == int(out.queries.sum())


# ------------------------------------------------------------------ FAB-T

def test_fab_t_costs_one_clean_forward_two_forwards_and_one_backward_per_step_and_the_search(
        ten_class_model, no_predict, reads):
    x, y = ten_class_data(N, seed=27)
    K, S = 3, 10  # steps per run, the final search's bisection steps (fab's default)
    eps = 0.06
    cfg = AttackConfig(norm="Linf", eps=eps, method="fab-t", steps=K, seed=8)
    m = Counting(ten_class_model)
    out = attack(m, x, y, cfg)
    direct = fab(ten_class_model, x, y, norm="Linf", eps=eps, steps=K, target_classes=APGD_TARGET_CLASSES,
                 seed=8, early_stop=False)
    wrong = direct.clean_pred != y
    found = torch.isfinite(direct.distance) & ~wrong
    nc, nf, runs = int((~wrong).sum()), int(found.sum()), min(APGD_TARGET_CLASSES, 9)
    assert 0 < nf <= nc
    assert m.forwards == [(N, False)] + runs * K * [(nc, True), (nc, False)] + S * [(nf, False)]
    assert m.backwards == runs * K and sum(b for b, _ in m.forwards) == int(direct.forwards.sum())
    assert no_predict == [] and reads == []
    _exact(ten_class_model, out, x, y)
    inside = direct.success.view(-1, 1, 1, 1)
    assert torch.equal(out.x_adv, torch.where(inside, direct.x, x))
    assert 0 < int(out.success.sum()) < nf  # some found beyond eps: x itself, with the clean prediction
    # fab() itself: the prediction at its returned point (beyond eps too) and at x
    assert torch.equal(direct.pred, _argmax(ten_class_model, direct.x))
    assert torch.equal(direct.clean_pred, _argmax(ten_class_model, x))

    # its first pass is at x: the clean predictions are real even when not wanted (adversarial training)
    m = Counting(ten_class_model)
    training = attack(m, x, y, cfg, clean=False)
    assert len(m.forwards) == 1 + 2 * runs * K + S and torch.equal(training.clean_pred, out.clean_pred)


def test_fab_t_with_early_stop_and_restarts_keeps_exact_predictions(ten_class_model, no_predict):
    """Examples adversarial within eps leave between runs; restarts start at random points."""
    x, y = ten_class_data(64, seed=28)
    for norm, eps in (("Linf", 0.08), ("L2", 0.5)):
        cfg = AttackConfig(norm=norm, eps=eps, method="fab-t", steps=4, restarts=1, seed=9)
        m = Counting(ten_class_model)
        out = attack(m, x, y, cfg, early_stop=True)
        direct = fab(ten_class_model, x, y, norm=norm, eps=eps, steps=4, restarts=1,
                     target_classes=APGD_TARGET_CLASSES, seed=9, early_stop=True)
        assert sum(b for b, _ in m.forwards) == int(direct.forwards.sum()), norm
        assert m.backwards == sum(1 for _, g in m.forwards if g) and no_predict == []
        assert 0 < int(out.success.sum()) < len(y)
        _exact(ten_class_model, out, x, y)
