"""Threat models: the set an adversary may move an input within.

A threat model owns three operations of the projected-gradient loop:
``random_init`` (a uniform point of the ball), ``step`` (steepest ascent for the norm)
and ``project`` (back onto the ball around the clean input, then into the box).
Shapes: x is float32 [N, ...]; norms are taken per example over all other dims.
The radius is one number, or one per example (float32 [N], on x's device): ``rows(index)`` gives
the threat model of a subset of the batch, and a ``SegmentedGenerator`` draws the random start
of each segment of a merged batch as that segment alone would draw it.
"""
from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import Callable, Optional, Sequence, Union

import torch

Box = Optional[tuple[float, float]]
Radius = Union[float, torch.Tensor]  # one radius, or float32 [N]: one per example
Ascent = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (iterate, gradient) -> next iterate
_TINY = 1e-12


class SegmentedGenerator:
    """Random numbers for a batch merged from several requests: segment k (sizes[k] rows, in
    order) draws from a generator of its own seeded with `seed`, so each request's rows get
    exactly the draws it would get if it ran alone."""

    def __init__(self, sizes: Sequence[int], seed: int, device: torch.device | str = "cpu") -> None:
        if any(s <= 0 for s in sizes):
            raise ValueError(f"segment sizes must be positive, got {list(sizes)}")
        self.sizes = [int(s) for s in sizes]
        self.generators = [torch.Generator(device=device).manual_seed(seed) for _ in self.sizes]


def per_example_norm(v: torch.Tensor, p: float) -> torch.Tensor:
    """||v_i||_p for every example i: float [N]."""
    flat = v.flatten(1)
    if p == math.inf:
        return flat.abs().amax(dim=1)
    return flat.norm(p=p, dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, 1, ...] so it broadcasts against `like`."""
    return v.view(-1, *([1] * (like.dim() - 1)))


class ThreatModel(ABC):
    """An eps ball in some norm, intersected with an optional box (default [0,1] images)."""

    name: str
    p: float

    def __init__(self, eps: Radius, box: Box = (0.0, 1.0)) -> None:
        if isinstance(eps, torch.Tensor):
            if eps.dim() != 1 or not bool(torch.isfinite(eps).all()) or bool((eps < 0).any()):
                raise ValueError("per-example eps must be a 1-D tensor of finite radii >= 0")
            self.eps: Radius = eps.float()
        else:
            if not eps >= 0:
                raise ValueError(f"eps must be >= 0, got {eps}")
            self.eps = float(eps)
        self.box = box

    @property
    def per_example(self) -> bool:
        return isinstance(self.eps, torch.Tensor)

    def radius(self, like: torch.Tensor) -> Radius:
        """The radius, broadcastable against `like` ([N, ...])."""
        return _bcast(self.eps, like) if self.per_example else self.eps

    def rows(self, index) -> "ThreatModel":
        """This threat model for the rows `index` (a tensor of indices or a slice) of the batch."""
        if not self.per_example:
            return self
        part = copy.copy(self)  # no new checks of radii already checked (they would read the device)
        part.eps = self.eps[index]
        return part

    def random_start(self, x: torch.Tensor, generator) -> torch.Tensor:
        """random_init, or, for a SegmentedGenerator, each segment's own draws concatenated."""
        if not isinstance(generator, SegmentedGenerator):
            return self.random_init(x, generator)
        if sum(generator.sizes) != len(x):
            raise ValueError(f"segments {generator.sizes} do not add up to the batch of {len(x)}")
        parts, start = [], 0
        for size, gen in zip(generator.sizes, generator.generators):
            part = slice(start, start + size)
            parts.append(self.rows(part).random_init(x[part], gen))
            start += size
        return torch.cat(parts)

    def clip_box(self, x: torch.Tensor) -> torch.Tensor:
        if self.box is None:
            return x
        return x.clamp(self.box[0], self.box[1])

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example distance in this norm: float [N]."""
        return per_example_norm(x_adv - x, self.p)

    @abstractmethod
    def random_init(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A uniformly random point of the ball around x (then boxed)."""

    @abstractmethod
    def step(self, x: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        """One steepest-ascent step of length step_size (in this norm) along grad."""

    @abstractmethod
    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Back into the ball of radius eps around x, then into the box."""

    def ascent(self, x: torch.Tensor, step_size: Radius) -> Ascent:
        """project(step(cur, grad, step_size), x) as one function of (cur, grad), for a loop that
        keeps x and step_size over many steps and owns cur and grad: it may overwrite both (it
        returns the new iterate, possibly in cur's storage), and what depends on x alone is computed
        once here. Same values as the composition, bit for bit (L2Ball: but for the sign of a zero
        coordinate of an iterate that is -0.0 on the box's lower face)."""
        return lambda cur, grad: self.project(self.step(cur, grad, step_size), x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps}, box={self.box})"


class LinfBall(ThreatModel):
    name = "Linf"
    p = math.inf

    def random_init(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        return self.clip_box(x + (2 * u - 1) * self.radius(x))

    def step(self, x: torch.Tensor, grad: torch.Tensor, step_size: Radius) -> torch.Tensor:
        return x + _steps(step_size, x) * grad.sign()

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        eps = self.radius(x)
        x_adv = torch.max(torch.min(x_adv, x + eps), x - eps)
        return self.clip_box(x_adv)

    def ascent(self, x: torch.Tensor, step_size: Radius) -> Ascent:
        # The ball and the box are both per-coordinate intervals: one clamp into their intersection,
        # bounds computed once, instead of five passes a step. hi is itself kept in the box so that
        # where the two do not meet (x outside the box) the result is the box's face nearest the
        # ball, as project's clamp-then-clamp gives (torch.clamp returns max where min > max).
        eps = self.radius(x)
        lo, hi = x - eps, x + eps
        if self.box is not None:
            lo, hi = lo.clamp_min_(self.box[0]), hi.clamp_(self.box[0], self.box[1])
        step = _steps(step_size, x)

        def ascend(cur: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            direction = grad.sign_()
            if isinstance(step, torch.Tensor):
                cur.add_(direction.mul_(step))
            else:  # step * ±1 is exact, so fusing it into the add rounds as step() does
                cur.add_(direction, alpha=step)
            return cur.clamp_(lo, hi)

        return ascend


class L2Ball(ThreatModel):
    """L2 ball. eps = inf gives the unbounded threat model (box only), used by
    representation inversion (D_R / D_NR)."""

    name = "L2"
    p = 2.0

    def random_init(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not self.per_example and math.isinf(self.eps):
            raise ValueError("no uniform random start in an unbounded L2 ball")
        n, d = x.shape[0], x[0].numel()
        dev = generator.device
        direction = torch.randn((n, d), generator=generator, device=dev, dtype=x.dtype)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(_TINY)
        # radius ~ eps * U^(1/d): uniform in volume
        eps = self.eps.view(-1, 1).to(dev) if self.per_example else self.eps
        radius = eps * torch.rand((n, 1), generator=generator, device=dev, dtype=x.dtype) ** (1.0 / d)
        delta = (direction * radius).view_as(x).to(x.device)
        return self.clip_box(x + delta)

    def step(self, x: torch.Tensor, grad: torch.Tensor, step_size: Radius) -> torch.Tensor:
        """A step of L2 length step_size along the gradient's feasible part: components that push
        a coordinate already on the box's boundary outward are dropped before normalizing, so the
        clipping that follows does not eat the step (on mostly-black images it would eat most)."""
        if self.box is not None:
            blocked = ((x <= self.box[0]) & (grad < 0)) | ((x >= self.box[1]) & (grad > 0))
            grad = grad.masked_fill(blocked, 0.0)
        g_norm = per_example_norm(grad, 2.0).clamp_min(_TINY)
        return x + _steps(step_size, grad) * grad / _bcast(g_norm, grad)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.per_example or not math.isinf(self.eps):
            delta = x_adv - x
            norms = per_example_norm(delta, 2.0)
            factor = (self.eps / norms.clamp_min(_TINY)).clamp(max=1.0)
            x_adv = x + delta * _bcast(factor, delta)
        # Clamping into the box only shrinks each coordinate of delta (x is in the box),
        # so the result stays inside the ball.
        return self.clip_box(x_adv)

    def ascent(self, x: torch.Tensor, step_size: Radius) -> Ascent:
        # step() then project(), in place on the loop's own tensors: the same operations in the
        # same order (products and sums only swapped, which IEEE rounding does not see).
        step = _steps(step_size, x)
        bounded = self.per_example or not math.isinf(self.eps)
        box = self.box

        def ascend(cur: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
            if box is not None:
                # step()'s masking in float passes only (on the CPU, comparisons into bool masks and
                # masked_fill cost several times more): grad is clamped into [lo, hi], lo = 0 where
                # cur <= box[0] else -inf, hi = 0 where cur >= box[1] else +inf; (cur - b) * -inf is
                # -inf, +inf, or NaN where cur == b, and nan_to_num maps those to the bounds. Same
                # values, but a -0.0 component on a face may turn +0.0, which changes the next
                # iterate only at a coordinate of cur that is itself -0.0.
                lo = (cur - box[0]).mul_(-math.inf).nan_to_num_(0.0, 0.0, -math.inf)
                hi = (cur - box[1]).mul_(-math.inf).nan_to_num_(0.0, math.inf, 0.0)
                grad.clamp_(lo, hi)
            g_norm = per_example_norm(grad, 2.0).clamp_min_(_TINY)
            cur.add_(grad.mul_(step).div_(_bcast(g_norm, grad)))
            if bounded:
                delta = cur.sub_(x)
                factor = (self.eps / per_example_norm(delta, 2.0).clamp_min(_TINY)).clamp(max=1.0)
                cur = delta.mul_(_bcast(factor, delta)).add_(x)
            return cur if box is None else cur.clamp_(box[0], box[1])

        return ascend


def _steps(step_size: Radius, like: torch.Tensor) -> Radius:
    """A step size, or one per example (float [N]) made broadcastable against `like`."""
    return _bcast(step_size, like) if isinstance(step_size, torch.Tensor) else step_size


def make_threat_model(norm: str, eps: Radius, box: Box = (0.0, 1.0)) -> ThreatModel:
    """norm: "L2" or "Linf" (case-insensitive); eps: one radius, or float32 [N], one per example."""
    key = norm.lower()
    if key == "l2":
        return L2Ball(eps, box)
    if key in ("linf", "l_inf", "inf"):
        return LinfBall(eps, box)
    raise ValueError(f"unknown norm {norm!r}; expected 'L2' or 'Linf'")
