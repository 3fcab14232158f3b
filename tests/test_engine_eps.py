"""Per-example radii and merged batches in the engine: one batch whose rows have different eps
must act, row for row, as the runs of each radius alone, and a batch merged from several requests
(segments) must give each request exactly what it gets alone."""
from __future__ import annotations

import pytest
import torch

from advex.engine.attacks import AttackConfig, attack
from advex.engine.threat import L2Ball, LinfBall, SegmentedGenerator

from test_engine_linear import MARGIN, linear_model, points


@pytest.mark.parametrize("norm,dual", [("L2", 2.0), ("Linf", 1.0)])
@pytest.mark.parametrize("method", ["pgd", "fgsm", "apgd-ce"])
def test_each_row_is_attacked_within_its_own_radius(norm, dual, method):
    """Closed form: a linear model's points are flipped exactly when their own eps is above
    MARGIN / ||w||_dual. Rows alternate just above and just below: only the first kind fall."""
    model, w, b = linear_model()
    x, y = points(w, b, n=40)
    minimal = MARGIN / float(w.norm(p=dual))
    above = torch.arange(40) % 2 == 0
    eps = torch.where(above, 1.05 * minimal, 0.95 * minimal)
    steps = {"pgd": 50, "fgsm": 0, "apgd-ce": 20}[method]
    out = attack(model, x, y, AttackConfig(norm=norm, eps=0.0, method=method, steps=steps), eps=eps)
    assert torch.equal(out.success, above)
    assert (out.distance <= eps * (1 + 1e-5)).all()
    assert torch.equal(out.adv_pred, model(out.x_adv).argmax(1))


@pytest.mark.parametrize("norm", ["L2", "Linf"])
@pytest.mark.parametrize("method", ["pgd", "fgsm", "apgd-ce"])
def test_per_example_radii_match_one_run_per_radius(norm, method):
    model, w, b = linear_model()
    x, y = points(w, b, n=24)
    radii = (0.02, 0.05, 0.0)
    eps = torch.tensor([radii[i % 3] for i in range(24)])
    steps = 0 if method == "fgsm" else 7
    start = {} if method == "apgd-ce" else {"random_start": False}  # the same start alone and together
    out = attack(model, x, y, AttackConfig(norm=norm, eps=0.0, method=method, steps=steps, **start), eps=eps)
    for r in radii:
        rows = (eps == r).nonzero().flatten()
        alone = attack(model, x[rows], y[rows], AttackConfig(norm=norm, eps=r, method=method, steps=steps, **start))
        torch.testing.assert_close(out.x_adv[rows], alone.x_adv, rtol=0, atol=1e-6)
        assert torch.equal(out.success[rows], alone.success)
    assert torch.equal(out.x_adv[eps == 0], x[eps == 0])  # a zero radius leaves the row where it is


@pytest.mark.parametrize("norm", ["L2", "Linf"])
@pytest.mark.parametrize("method", ["pgd", "fgsm"])
def test_merged_requests_get_exactly_what_they_get_alone(norm, method):
    """Segments draw their random starts from their own generators: a merged batch of three
    requests equals the three requests run one by one (up to the float rounding of a larger
    matrix product), with the same verdicts."""
    model, w, b = linear_model()
    x, y = points(w, b, n=30)
    cfg = AttackConfig(norm=norm, eps=0.04, method=method, steps=2, step_size=0.01, restarts=1, random_start=True,
                       seed=3)  # short steps: the result still depends on where each run started
    sizes = [7, 1, 22]
    merged = attack(model, x, y, cfg, segments=sizes)
    start = 0
    for size in sizes:
        alone = attack(model, x[start:start + size], y[start:start + size], cfg)
        torch.testing.assert_close(merged.x_adv[start:start + size], alone.x_adv, rtol=0, atol=1e-6)
        assert torch.equal(merged.adv_pred[start:start + size], alone.adv_pred)
        assert torch.equal(merged.clean_pred[start:start + size], alone.clean_pred)
        start += size
    # without segments the batch draws one stream: the rows of the later requests differ
    whole = attack(model, x, y, cfg)
    assert (whole.x_adv[7:] - merged.x_adv[7:]).abs().max() > 1e-3


@pytest.mark.parametrize("ball", [L2Ball, LinfBall])
def test_threat_model_rows_and_segmented_random_start(ball):
    eps = torch.tensor([0.1, 0.0, 0.3, 0.2])
    x = torch.full((4, 1, 4, 4), 0.5)
    threat = ball(eps)
    start = threat.random_start(x, SegmentedGenerator([1, 3], seed=0))
    assert (threat.distance(start, x) <= eps * (1 + 1e-6)).all()
    assert torch.equal(start[1], x[1])
    far = x + 1.0
    assert torch.allclose(threat.rows(torch.tensor([2, 3])).distance(
        threat.rows(torch.tensor([2, 3])).project(far[2:], x[2:]), x[2:]), eps[2:])
    alone = ball(eps[:1]).random_init(x[:1], torch.Generator().manual_seed(0))
    assert torch.equal(start[:1], alone)


def test_bad_per_example_radii_and_segments_are_refused():
    model, w, b = linear_model()
    x, y = points(w, b, n=6)
    cfg = AttackConfig(norm="Linf", eps=0.0, steps=2)
    for eps in (torch.ones(5), torch.tensor([0.1] * 5 + [-0.1]), torch.tensor([0.1] * 5 + [float("nan")])):
        with pytest.raises(ValueError, match="eps"):
            attack(model, x, y, cfg, eps=eps)
    with pytest.raises(ValueError, match="do not add up"):
        attack(model, x, y, cfg, segments=[2, 3])
    with pytest.raises(ValueError, match="merged batches"):
        attack(model, x, y, AttackConfig(norm="Linf", eps=0.1, method="apgd-ce", steps=2), segments=[3, 3])
