"""The Square attack on linear models with closed-form answers: it respects eps, the box and the
query budget, lowers accuracy, and needs no gradients."""
from __future__ import annotations

import pytest
import torch

from advex.engine.attacks import AttackConfig, attack
from advex.engine.square import meta_pseudo_gaussian, p_schedule, square_attack

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


# ---- the reference algorithm (Andriushchenko et al., ECCV 2020) ------------------------------------

def _recorder(net):
    """A black box that remembers every batch it is asked about."""
    seen = []

    def forward(v):
        seen.append(v.detach().clone())
        with torch.no_grad():
            return net(v)
    return forward, seen


def test_p_schedule_at_the_reference_milestones():
    # 10,000 queries: p_init through iteration 10, then halved after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000
    for it, div in [(0, 1), (10, 1), (11, 2), (50, 2), (51, 4), (200, 4), (201, 8), (500, 8), (501, 16),
                    (1000, 16), (1001, 32), (2000, 32), (2001, 64), (4000, 64), (4001, 128), (6000, 128),
                    (6001, 256), (8000, 256), (8001, 512), (9999, 512)]:
        assert p_schedule(0.8, it, 10000) == 0.8 / div, it
    # 1,000 queries: the same milestones rescaled by int(it / 1000 * 10000)
    for it, div in [(0, 1), (1, 1), (2, 2), (5, 2), (6, 4), (20, 4), (21, 8), (50, 8), (51, 16), (100, 16),
                    (101, 32), (200, 32), (201, 64), (400, 64), (401, 128), (600, 128), (601, 256), (800, 256),
                    (801, 512), (999, 512)]:
        assert p_schedule(0.8, it, 1000) == 0.8 / div, it


def test_meta_pseudo_gaussian_is_the_papers_eta():
    eta = meta_pseudo_gaussian(5, 5)
    assert torch.allclose(eta[1], eta[0].T) and torch.allclose(eta.flatten(1).norm(dim=1), torch.ones(2))
    top, bottom = eta[0, :2], eta[0, 2:]
    assert (top > 0).all() and (bottom < 0).all() and torch.isclose(top.norm(), bottom.norm())
    # concentric squares: centre (2, 2) of the bottom half weighs 1 + 1/4 + 1/9, its first ring 1/4 + 1/9, ...
    ring = bottom / bottom[1, 2]
    assert torch.allclose(ring[1], torch.tensor([1 / 9, 13 / 36, 1 + 13 / 36, 13 / 36, 1 / 9]) / (1 + 13 / 36))


def test_linf_window_has_one_sign_per_channel_and_the_starting_point_is_stripes():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    with torch.no_grad():
        net[1].weight.zero_(); net[1].bias.copy_(torch.tensor([5.0, 0, 0, 0]))  # never fooled
    x = torch.full((6, 3, 16, 16), 0.5)
    eps = 0.1
    forward, seen = _recorder(net)
    square_attack(forward, x, torch.zeros(6, dtype=torch.long), norm="Linf", eps=eps, queries=2, seed=3)
    start, proposal = seen[0] - x, seen[1] - x
    assert torch.allclose(start.abs(), torch.full_like(start, eps))
    assert (start == start[:, :, :1, :]).all()                  # vertical stripes: constant down each column
    s = round((0.8 * 16 * 16) ** 0.5)                           # p_init = 0.8 at the first iteration
    for i in range(6):
        inside = (proposal[i] != start[i]).any(0)               # where the proposal differs from the start
        rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
        assert rows.max() - rows.min() < s and cols.max() - cols.min() < s and inside.any()
        top, left = int(rows.min()), int(cols.min())
        top, left = min(top, 16 - s), min(left, 16 - s)
        window = proposal[i, :, top:top + s, left:left + s]
        assert window.shape[1:] == (s, s)
        # one sign per channel for the whole window (per-pixel signs would fail this)
        assert torch.allclose(window, window[:, :1, :1].expand_as(window)), "signs must be drawn per channel"
        assert torch.allclose(window.abs(), torch.full_like(window, eps))


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_every_iterate_stays_in_the_ball_and_the_box(norm):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 5))
    x = torch.rand((20, 3, 12, 12))                             # many pixels near the box edges: clipping happens
    y = net(x).argmax(1).detach()
    eps = 0.05 if norm == "Linf" else 0.7
    forward, seen = _recorder(net)
    res = square_attack(forward, x, y, norm=norm, eps=eps, queries=120, seed=0)
    assert len(seen) > 2
    for v in seen + [res.x]:
        assert v.min() >= 0 and v.max() <= 1
    # distances: the final iterate, and every batch in which all examples were still attacked (same rows)
    dual = float("inf") if norm == "Linf" else 2.0
    for v in [s for s in seen if len(s) == len(x)] + [res.x]:
        assert ((v - x).flatten(1).norm(p=dual, dim=1) <= eps * (1 + 1e-5)).all()
    assert res.queries.dtype == torch.int64 and (res.queries <= 120).all()


def test_queries_on_step_cancellation_and_seed_determinism():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    x = torch.rand((10, 3, 8, 8))
    y = net(x).argmax(1).detach()
    calls = []
    a = square_attack(no_grad_forward(net), x, y, norm="L2", eps=0.5, queries=40, seed=7,
                      on_step=lambda i, n: calls.append((i, n)))
    b = square_attack(no_grad_forward(net), x, y, norm="L2", eps=0.5, queries=40, seed=7)
    assert torch.equal(a.x, b.x) and torch.equal(a.queries, b.queries)
    assert calls == [(i + 1, 39) for i in range(len(calls))] and len(calls) >= 1
    assert (a.queries[~a.success] == 40).all()                  # the starting point + 39 iterations

    class Stop(Exception):
        pass

    def cancel(i, n):
        if i == 3:
            raise Stop
    with pytest.raises(Stop):
        square_attack(no_grad_forward(net), x, y, norm="Linf", eps=0.01, queries=40, on_step=cancel)


def _tiny_problem(seed: int = 0, n_train: int = 4000, n_test: int = 300, side: int = 8, classes: int = 10):
    """Image-like 3 x 8 x 8 inputs in [0,1] labelled by a random conv teacher; a small CNN trained on
    them for a few seconds. Returns the model and the test points it classifies correctly."""
    g = torch.Generator().manual_seed(seed)

    def images(n):
        low = torch.rand((n, 3, side // 4, side // 4), generator=g)
        x = torch.nn.functional.interpolate(low, size=side, mode="bilinear", align_corners=False)
        return (0.15 + 0.7 * x + 0.05 * torch.randn((n, 3, side, side), generator=g)).clamp(0, 1)
    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(4),
                                  torch.nn.Flatten(), torch.nn.Linear(8 * (side // 4) ** 2, classes))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(16 * (side // 4) ** 2, classes))
    xtr, xte = images(n_train), images(n_test)
    with torch.no_grad():
        ytr, yte = teacher(xtr).argmax(1), teacher(xte).argmax(1)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(8):
        perm = torch.randperm(n_train, generator=g)
        for i in range(0, n_train, 100):
            idx = perm[i:i + 100]
            loss = torch.nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        ok = net(xte).argmax(1) == yte
    return net, xte[ok], yte[ok]


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 1.0)])
def test_agrees_with_torchattacks_square(norm, eps):
    """Same model, points and number of model calls (torchattacks' n_queries counts iterations; ours
    counts the starting point too). Measured (seed 0, 288 points): Linf 0.1 -> advex 28.1% vs 31.2%;
    L2 1.0 -> 53.1% vs 55.2%. advex is a little stronger: its windows can sit anywhere in the image,
    torchattacks' random_int(0, h - s) never puts one in the last row/column."""
    torchattacks = pytest.importorskip("torchattacks")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, x, y = _tiny_problem()
        assert len(y) >= 250
        queries = 1000
        ours = square_attack(no_grad_forward(net), x, y, norm=norm, eps=eps, queries=queries, seed=0)
        torch.manual_seed(0)
        ref = torchattacks.Square(net, norm=norm, eps=eps, n_queries=queries - 1, n_restarts=1, seed=0)(x, y)
        with torch.no_grad():
            ours_acc = (net(ours.x).argmax(1) == y).float().mean().item() * 100
            ref_acc = (net(ref).argmax(1) == y).float().mean().item() * 100
    finally:
        torch.set_num_threads(threads)
    assert ours_acc <= ref_acc + 2, (ours_acc, ref_acc)
    assert abs(ours_acc - ref_acc) <= 5, (ours_acc, ref_acc)
    assert ours_acc < 70                                        # the attack does work at this eps
