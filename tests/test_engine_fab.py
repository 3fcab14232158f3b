"""FAB-T (Croce & Hein, ICML 2020): the exact hyperplane-and-box projection, known minimal distances
on linear models (with and without a binding box), coverage of the top-k target classes, pass
counts and the step callback, and agreement with torchattacks' FAB (multi_targeted)."""
from __future__ import annotations

import math

import pytest
import torch

from advex.engine.fab import fab, project_hyperplane_box
from advex.engine.threat import per_example_norm

from conftest import LINEAR_DIM, LINEAR_MARGIN, linear_model, linear_points, require_module, ten_class_data

D, MARGIN = LINEAR_DIM, LINEAR_MARGIN
DUAL = {"Linf": 1.0, "L2": 2.0}
P = {"Linf": math.inf, "L2": 2.0}


# ------------------------------------------------------------------ 1. the projection

@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_projection_matches_a_generic_solver(norm, one_thread):
    require_module("scipy", "pip install scipy")
    import numpy as np
    from scipy.optimize import linprog, minimize

    g = torch.Generator().manual_seed(0)
    m, dim = 30, 6
    w = torch.randn(m, dim, generator=g, dtype=torch.float64)
    w[0, 2] = 0.0
    p = torch.rand(m, dim, generator=g, dtype=torch.float64)
    r = 0.5 * torch.randn(m, generator=g, dtype=torch.float64)
    lo, hi = -p, 1 - p
    d = project_hyperplane_box(w, r, lo, hi, norm)
    assert torch.allclose((w * d).sum(1), r, atol=1e-9)
    assert (d >= lo - 1e-12).all() and (d <= hi + 1e-12).all()
    for i in range(m):
        wi, ri = w[i].numpy(), float(r[i])
        bounds = list(zip(lo[i].tolist(), hi[i].tolist()))
        if norm == "Linf":  # min t s.t. -t <= d <= t, <w, d> = r, in the box
            a_ub = np.vstack([np.c_[np.eye(dim), -np.ones(dim)], np.c_[-np.eye(dim), -np.ones(dim)]])
            res = linprog(np.r_[np.zeros(dim), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * dim),
                          A_eq=np.r_[wi, 0.0][None], b_eq=[ri], bounds=bounds + [(0, None)])
            assert res.status == 0
            assert abs(res.fun - float(d[i].abs().max())) < 1e-7, i
        else:
            res = minimize(lambda z: (z ** 2).sum(), np.zeros(dim), jac=lambda z: 2 * z, method="SLSQP",
                           constraints=[{"type": "eq", "fun": lambda z: wi @ z - ri}], bounds=bounds,
                           options={"ftol": 1e-14, "maxiter": 500})
            assert abs(wi @ res.x - ri) < 1e-7
            assert np.allclose(res.x, d[i].numpy(), atol=1e-5), i


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_projection_without_box_and_when_the_box_misses_the_hyperplane(norm):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 10, generator=g, dtype=torch.float64)
    r = torch.randn(8, generator=g, dtype=torch.float64)
    inf = torch.full_like(w, math.inf)
    d = project_hyperplane_box(w, r, -inf, inf, norm)
    assert torch.allclose((w * d).sum(1), r)
    assert torch.allclose(per_example_norm(d, P[norm]), r.abs() / w.norm(p=DUAL[norm], dim=1))
    # unreachable: the box point going furthest towards the hyperplane
    lo, hi = torch.full_like(w, -0.01), torch.full_like(w, 0.01)
    big = 10 * torch.sign(r)
    d = project_hyperplane_box(w, big, lo, hi, norm)
    assert torch.allclose(d, 0.01 * torch.sign(w) * torch.sign(big)[:, None])
    # zero gradient: no move, no NaN
    d = project_hyperplane_box(torch.zeros_like(w), r, lo, hi, norm)
    assert torch.equal(d, torch.zeros_like(d))


# ------------------------------------------------------------------ 2. known minimal distances

@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_two_class_linear_model_minimal_distance_is_exact(norm):
    model, w, b = linear_model()
    x, y = linear_points(w, b, n=40)
    minimal = MARGIN / float(w.norm(p=DUAL[norm]))
    out = fab(model, x, y, norm=norm, steps=10, target_classes=1)
    assert out.success.all()
    assert torch.allclose(out.distance, torch.full_like(out.distance, minimal), rtol=0.01), (out.distance, minimal)
    with torch.no_grad():
        assert (model(out.x).argmax(1) != y).all()
    assert torch.allclose(per_example_norm(out.x - x, P[norm]), out.distance, rtol=1e-5)
    # eps just above / below the minimum
    assert fab(model, x, y, norm=norm, eps=1.02 * minimal, steps=10).success.all()
    assert not fab(model, x, y, norm=norm, eps=0.98 * minimal, steps=10).success.any()


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_multi_class_linear_model_minimal_distance_is_exact(norm):
    """Misclassified iff some f_t > f_y: the minimal distance is min_t (f_y - f_t) / ||w_y - w_t||_dual."""
    c, n = 5, 30
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(c, D, generator=g), 0.1 * torch.randn(c, generator=g)
    model = lambda v: v.flatten(1) @ weight.T + bias  # noqa: E731
    x = 0.4 + 0.2 * torch.rand((n, 1, 8, 8), generator=g)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    gap = logits.gather(1, y[:, None]) - logits                               # [n, c]
    wdiff = (weight[y][:, None, :] - weight[None, :, :]).norm(p=DUAL[norm], dim=2)  # [n, c]
    exact = (gap / wdiff).scatter(1, y[:, None], math.inf).amin(1)
    assert exact.max() < 0.05 if norm == "Linf" else exact.max() < 0.35  # the box never binds
    out = fab(model, x, y, norm=norm, steps=20, target_classes=c - 1)
    assert torch.allclose(out.distance, exact, rtol=0.01), (out.distance / exact)
    assert (out.distance >= exact * (1 - 1e-4)).all()
    assert out.x.min() >= 0 and out.x.max() <= 1


def test_the_box_binds():
    """g(x) = w.(x - x_c) with one coordinate 0.05 from the box's edge: moving it alone would need
    0.2 / 1.3 > 0.05 (Linf), so the minimal point moves it by 0.05 and the others by t, 0.05 + 0.3 t = 0.2
    (t = 0.5 in Linf); in L2 d = (0.05, 0.5, 0.5, 0.5) (lambda w_i clipped, 0.05 + 0.03 lambda = 0.2)."""
    w = torch.tensor([1.0, 0.1, 0.1, 0.1])
    x = torch.tensor([[0.95, 0.3, 0.3, 0.3]]).repeat(3, 1)
    c0 = float(x[0] @ w) + 0.2

    def model(v):
        z = v.flatten(1) @ w - c0
        return torch.stack([torch.zeros_like(z), z], 1)

    y = torch.zeros(3, dtype=torch.long)
    expect = {"Linf": 0.5, "L2": math.sqrt(0.05 ** 2 + 3 * 0.5 ** 2)}
    unboxed = {"Linf": 0.2 / 1.3, "L2": 0.2 / float(w.norm())}
    for norm in ("Linf", "L2"):
        out = fab(model, x, y, norm=norm, steps=20, target_classes=1)
        assert out.x.min() >= 0 and out.x.max() <= 1
        assert torch.allclose(out.distance, torch.full((3,), expect[norm]), rtol=0.01), (norm, out.distance)
        free = fab(model, x, y, norm=norm, steps=20, target_classes=1, box=None)
        assert torch.allclose(free.distance, torch.full((3,), unboxed[norm]), rtol=0.01), (norm, free.distance)
        assert free.x.max() > 1


def test_targets_cover_the_top_k_classes():
    """Class 1 has the second-highest clean logit but lies beyond the box (x_1 > 1.5); class 2, ranked
    third, is reached at x_0 > 0.75. Only a run targeting the 2nd-ranked other class finds it."""
    def model(v):
        v = v.flatten(1)
        ones = torch.ones(len(v))
        return torch.stack([ones, 0.9 + 0.1 * (v[:, 1] - 0.5), 4 * (v[:, 0] - 0.5)], 1)

    x = torch.full((4, 2), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    one = fab(model, x, y, norm="Linf", steps=20, target_classes=1)
    assert torch.isinf(one.distance).all() and not one.success.any()
    assert torch.equal(one.x, x)
    two = fab(model, x, y, norm="Linf", steps=20, target_classes=2)
    assert torch.allclose(two.distance, torch.full((4,), 0.25), rtol=0.01)
    assert fab(model, x, y, norm="Linf", eps=0.26, steps=20, target_classes=2).success.all()


# ------------------------------------------------------------------ 3. cost accounting and callbacks

def test_pass_counts_and_step_callback():
    model, w, b = linear_model()
    x, y = linear_points(w, b, n=6)
    calls = []
    out = fab(model, x, y, norm="Linf", steps=5, restarts=1, search_steps=4,
              on_step=lambda s, t: calls.append((s, t)))
    assert calls == [(s, 10) for s in range(1, 11)]
    # clean forward + per step (forward+backward, forward) + final search
    assert (out.forwards == 1 + 2 * 10 + 4).all() and (out.backwards == 10).all()

    class Cancel(Exception):
        pass

    def cancel(step, total):
        if step == 3:
            raise Cancel

    with pytest.raises(Cancel):
        fab(model, x, y, norm="L2", steps=10, on_step=cancel)


def test_misclassified_inputs_cost_nothing_and_eps_stops_early():
    model, w, b = linear_model()
    x, y = linear_points(w, b, n=10)
    y = y.clone()
    y[:5] = 1 - y[:5]
    minimal = MARGIN / float(w.norm(p=1))
    out = fab(model, x, y, norm="Linf", eps=2 * minimal, steps=5, restarts=2, search_steps=3)
    assert out.success.all() and (out.distance[:5] == 0).all() and torch.equal(out.x[:5], x[:5])
    assert (out.forwards[:5] == 1).all() and (out.backwards[:5] == 0).all()
    # found within eps in run 0: the restarts are skipped
    assert (out.forwards[5:] == 1 + 2 * 5 + 3).all() and (out.backwards[5:] == 5).all()


# ------------------------------------------------------------------ 4. agreement with torchattacks

@pytest.mark.parametrize("norm,eps", [("Linf", 0.09), ("L2", 0.6)])
def test_agrees_with_torchattacks(ten_class_model, norm, eps):
    torchattacks = require_module("torchattacks", "pip install --no-deps torchattacks scipy (scripts/test.sh does)")
    model = ten_class_model
    x, y = ten_class_data(200, seed=2)
    steps, p = 20, P[norm]
    peer = torchattacks.FAB(model, norm=norm, eps=eps, steps=steps, n_restarts=1, multi_targeted=True,
                            n_classes=10, seed=0)
    x_peer = peer(x, y)
    ours = fab(model, x, y, norm=norm, eps=eps, steps=steps, target_classes=9)
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        peer_fooled = (model(x_peer).argmax(1) != y) & (per_example_norm(x_peer - x, p) <= eps * (1 + 1e-6))
        assert (model(ours.x).argmax(1) != y)[torch.isfinite(ours.distance)].all()
    peer_robust = float((clean & ~peer_fooled).float().mean())
    ours_robust = float((~ours.success).float().mean())
    assert 0.1 < peer_robust < float(clean.float().mean()) - 0.1, "eps must make the comparison informative"
    assert ours_robust <= peer_robust + 0.02, (ours_robust, peer_robust)
    assert abs(ours_robust - peer_robust) <= 0.03, (ours_robust, peer_robust)
    assert ours.x.min() >= 0 and ours.x.max() <= 1

    # minimal distances: ours over all 9 targets vs the reference's single runs per target class
    minimal = fab(model, x, y, norm=norm, steps=steps, target_classes=9)
    assert torch.equal(minimal.success, torch.isfinite(minimal.distance))
    assert ((minimal.distance > eps) == ~ours.success).float().mean() >= 0.97
    torch.manual_seed(0)
    ref = torch.full((len(x),), math.inf)
    for rank in range(2, 11):
        peer.target_class = rank  # the reference targets the rank-th highest clean logit
        xa = peer.attack_single_run_targeted(x, y)
        with torch.no_grad():
            fooled = (model(xa).argmax(1) != y) & clean
        ref = torch.where(fooled, torch.minimum(ref, per_example_norm(xa - x, p)), ref)
    ours_median, ref_median = float(minimal.distance[clean].median()), float(ref[clean].median())
    assert abs(ours_median - ref_median) <= 0.1 * ref_median, (ours_median, ref_median)
