"""The projected-gradient loop's fast paths give the plain computation's results, bit for bit:
- a threat model's `ascent` (step and projection in place, bounds precomputed) equals
  project(step(...)) and leaves the centre alone;
- the loop (best-iterate bookkeeping in place while no example has left the batch, gathers and
  scatters once some have) equals a plain loop written here, with early stopping on the CPU's
  schedule and on a GPU's, with restarts, per-example radii and step sizes;
- and it reads nothing back from the device between compactions.
No timing is asserted: figures live in bench/results."""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from advex.engine import optimize
from advex.engine.objectives import CrossEntropyUntargeted
from advex.engine.optimize import COMPACT_EVERY
from advex.engine.threat import L2Ball, LinfBall, ThreatModel

from conftest import count_device_reads, ten_class_data


def same_bits(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    return a.shape == b.shape and torch.equal(a, b)


def awkward_points(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres, iterates and gradients [n, 1, 6, 6] with coordinates exactly on the box's faces,
    a few centres (and iterates) outside the box (where ball and box do not meet), and zero
    gradient components."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, 6, 6)
    x = torch.rand(shape, generator=g)
    x[torch.rand(shape, generator=g) < 0.2] = 0.0
    x[torch.rand(shape, generator=g) < 0.1] = 1.0
    x[:2] += 0.5 * torch.randn((2, 1, 6, 6), generator=g)  # outside the box in places
    cur = (x + 0.2 * torch.randn(shape, generator=g)).clamp(0, 1)
    cur[torch.rand(shape, generator=g) < 0.2] = 0.0
    cur[torch.rand(shape, generator=g) < 0.1] = 1.0
    cur[:2] = x[:2]  # the first iterate without a random start: the centre itself, outside the box
    grad = torch.randn(shape, generator=g)
    grad[torch.rand(shape, generator=g) < 0.1] = 0.0
    grad[-1] = 0.0  # an all-zero gradient
    return x, cur, grad


@pytest.mark.parametrize("cls", [LinfBall, L2Ball])
@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("box", [(0.0, 1.0), None])
def test_ascent_is_step_then_project_bit_for_bit(cls, per_example, box):
    x, cur, grad = awkward_points()
    n = len(x)
    g = torch.Generator().manual_seed(1)
    radii = [0.0, 0.05, 0.3, 2.0] + ([math.inf] if cls is L2Ball and not per_example else [])  # inf: unbounded
    for eps in radii:
        for step_size in (0.07, 0.5):
            if per_example:
                e = eps * (0.5 + torch.rand(n, generator=g))
                s: float | torch.Tensor = step_size * torch.rand(n, generator=g)
            else:
                e, s = eps, step_size
            threat = cls(e, box)
            centre = x.clone()
            ascend = threat.ascent(centre, s)
            expect, got = cur, cur.clone()
            for turn in range(3):  # what it computed once serves step after step
                direction = grad.roll(turn, dims=0)
                expect = threat.project(threat.step(expect, direction, s), centre)
                got = ascend(got, direction.clone())
                assert same_bits(got, expect), (cls.__name__, eps, step_size, turn)
            assert same_bits(centre, x)  # the centre is only read


def test_the_base_class_ascent_is_the_composition():
    class Clip(ThreatModel):  # a threat model with no fast path of its own
        name, p = "clip", math.inf

        def random_init(self, x, generator):
            return x.clone()

        def step(self, x, grad, step_size):
            return x + step_size * grad

        def project(self, x_adv, x):
            return self.clip_box(x_adv)

    x, cur, grad = awkward_points(6)
    threat = Clip(0.1)
    assert same_bits(threat.ascent(x, 0.3)(cur, grad), threat.project(threat.step(cur, grad, 0.3), x))


class RowWise(torch.nn.Module):
    """Ten logits from 64 inputs by correctly rounded elementwise operations only (products, sums,
    ReLU): each row's output and gradient are the same bit for bit whatever else is in the batch
    (a matrix product's rounding may depend on the batch size, and a transcendental's on whether
    an element falls in a vector or in the scalar tail), so a compacted batch must reproduce the
    whole one exactly."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = 3 * torch.randn((64, 10), generator=g)
        self.b = torch.randn((64, 10), generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1)
        out = torch.zeros((len(x), 10), dtype=x.dtype)
        for k in range(v.shape[1]):
            out = out + torch.relu(v[:, k:k + 1] * self.w[k] + self.b[k])
        return out


def plain_loop(model, x, y, threat, steps, step_size, random_start, restarts, generator, early_stop):
    """The loop's contract written plainly: every example stepped at every step, whole-batch
    bookkeeping, project(step(...)); a success is final under early stopping."""
    n = len(x)
    best_x, best_score = x.clone(), torch.full((n,), -torch.inf)
    best_succ, best_pred = torch.zeros(n, dtype=torch.bool), torch.full((n,), -1)
    first_pred = None

    def keep(cand, out):
        score = F.cross_entropy(out, y, reduction="none").detach()
        pred = out.detach().argmax(1)
        succ = pred != y
        better = (succ & ~best_succ) | ((succ == best_succ) & (score > best_score))
        if early_stop:
            better &= ~best_succ
        best_x[better] = cand.detach()[better]
        best_score[better], best_succ[better], best_pred[better] = score[better], succ[better], pred[better]
        return score

    for run in range(restarts + 1):
        cur = threat.random_start(x, generator) if random_start or run > 0 else x.clone()
        for t in range(steps + 1):
            if t == steps:
                with torch.no_grad():
                    out = model(cur)
                    keep(cur, out)
                break
            cur.requires_grad_(True)
            out = model(cur)
            if run == 0 and t == 0 and not random_start:
                first_pred = out.detach().argmax(1)
            score = F.cross_entropy(out, y, reduction="none")
            keep(cur, out)
            grad, = torch.autograd.grad(score.sum(), cur)
            with torch.no_grad():
                cur = threat.project(threat.step(cur.detach(), grad, step_size), x)
    return best_x, best_score, best_succ, best_pred, first_pred


@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("schedule", ["cpu", "gpu"])
def test_the_loop_equals_the_plain_loop_compacted_or_not(norm, schedule, monkeypatch, one_thread):
    if schedule == "gpu":  # examples that succeed stay in the batch until the next compaction
        monkeypatch.setattr(optimize, "compaction_interval", lambda device: COMPACT_EVERY)
    model = RowWise()
    x, _ = ten_class_data(48, seed=21)
    with torch.no_grad():
        y = model(x).argmax(1)  # every example starts correctly classified
    gen = torch.Generator().manual_seed(5)
    eps_of = {"Linf": 0.12, "L2": 0.9}
    per_example_eps = eps_of[norm] * (0.2 + 1.6 * torch.rand(len(x), generator=gen))
    settings = [
        dict(eps=eps_of[norm], step_size=eps_of[norm] / 3, random_start=True, restarts=0),
        dict(eps=eps_of[norm], step_size=eps_of[norm] / 3, random_start=False, restarts=2),
        dict(eps=per_example_eps, step_size=per_example_eps / 3, random_start=True, restarts=1),
        dict(eps=per_example_eps, step_size=0.05, random_start=False, restarts=0),
    ]
    threat_cls = LinfBall if norm == "Linf" else L2Ball
    compacted = False
    for s in settings:
        for early_stop in (False, True):
            threat = threat_cls(s["eps"])
            got = optimize.optimize(model, x, CrossEntropyUntargeted(y), threat, 9, s["step_size"],
                                    random_start=s["random_start"], restarts=s["restarts"],
                                    generator=torch.Generator().manual_seed(7), early_stop=early_stop)
            want = plain_loop(model, x, y, threat, 9, s["step_size"], s["random_start"], s["restarts"],
                              torch.Generator().manual_seed(7), early_stop)
            for name, a, b in zip(("x", "score", "success", "pred", "first_pred"),
                                  (got.x, got.score, got.success, got.pred, got.first_pred), want):
                assert same_bits(a, b), (name, s, early_stop)
            successes = int(got.success.sum())
            compacted |= early_stop and 0 < successes < len(x)
    assert compacted  # some examples left the batch while others went on: both paths ran


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_no_step_reads_back_from_the_device(norm, monkeypatch, one_thread):
    """bool(), .item(), .tolist() and int() wait for a device: not one per step without early
    stopping, and under it only the compactions' (every COMPACT_EVERY steps on a GPU)."""
    monkeypatch.setattr(optimize, "compaction_interval", lambda device: COMPACT_EVERY)
    model = RowWise()
    x, _ = ten_class_data(32, seed=22)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = torch.full((len(x),), 0.1 if norm == "Linf" else 0.8)
    steps, restarts = 12, 1
    threat = (LinfBall if norm == "Linf" else L2Ball)(eps)  # (checking the radii reads them back)
    for early_stop in (False, True):
        with monkeypatch.context() as patch:
            reads = count_device_reads(patch)
            optimize.optimize(model, x, CrossEntropyUntargeted(y), threat, steps, eps / 4, random_start=True,
                              restarts=restarts, generator=torch.Generator().manual_seed(1), early_stop=early_stop)
        compactions = (steps // COMPACT_EVERY + 1) * (restarts + 1)
        assert len(reads) <= (0 if not early_stop else 2 * compactions + restarts + 1), (early_stop, reads)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_a_broadcast_gradient_is_copied_before_the_step_overwrites_it(norm, one_thread):
    """A network whose input gradient is a broadcast view (a sum over the pixels first: stride 0):
    the in-place step must not write into it (an error, or one value shared by every pixel)."""
    scale = torch.tensor([1.0, -1.0, 0.25, -0.5, 2.0])

    def summing(v: torch.Tensor) -> torch.Tensor:
        return v.flatten(1).sum(1, keepdim=True) * scale - 8.0 * scale.abs()

    x, _ = ten_class_data(20, seed=23)
    with torch.no_grad():
        y = summing(x).argmax(1)
    threat = (LinfBall if norm == "Linf" else L2Ball)(0.05 if norm == "Linf" else 0.6)
    got = optimize.optimize(summing, x, CrossEntropyUntargeted(y), threat, 5, 0.02 if norm == "Linf" else 0.3,
                            random_start=True, generator=torch.Generator().manual_seed(2))
    want = plain_loop(summing, x, y, threat, 5, 0.02 if norm == "Linf" else 0.3, True, 0,
                      torch.Generator().manual_seed(2), False)
    assert all(same_bits(a, b) for a, b in zip((got.x, got.score, got.success, got.pred), want[:4]))
    assert float((got.x - x).flatten(1).abs().amax(1).min()) > 0  # it moved
