"""Threat models: the set an adversary may move an input within.

A threat model owns three operations of the projected-gradient loop:
``random_init`` (a uniform point of the ball), ``step`` (steepest ascent for the norm)
and ``project`` (back onto the ball around the clean input, then into the box).
Shapes: x is float32 [N, ...]; norms are taken per example over all other dims.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Optional

import torch

Box = Optional[tuple[float, float]]
_TINY = 1e-12


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

    def __init__(self, eps: float, box: Box = (0.0, 1.0)) -> None:
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.eps = float(eps)
        self.box = box

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps}, box={self.box})"


class LinfBall(ThreatModel):
    name = "Linf"
    p = math.inf

    def random_init(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        return self.clip_box(x + (2 * u - 1) * self.eps)

    def step(self, x: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        return x + step_size * grad.sign()

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x_adv = torch.max(torch.min(x_adv, x + self.eps), x - self.eps)
        return self.clip_box(x_adv)


class L2Ball(ThreatModel):
    """L2 ball. eps = inf gives the unbounded threat model (box only), used by
    representation inversion (D_R / D_NR)."""

    name = "L2"
    p = 2.0

    def random_init(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if math.isinf(self.eps):
            raise ValueError("no uniform random start in an unbounded L2 ball")
        n, d = x.shape[0], x[0].numel()
        dev = generator.device
        direction = torch.randn((n, d), generator=generator, device=dev, dtype=x.dtype)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(_TINY)
        # radius ~ eps * U^(1/d): uniform in volume
        radius = self.eps * torch.rand((n, 1), generator=generator, device=dev, dtype=x.dtype) ** (1.0 / d)
        delta = (direction * radius).view_as(x).to(x.device)
        return self.clip_box(x + delta)

    def step(self, x: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        """A step of L2 length step_size along the gradient's feasible part: components that push
        a coordinate already on the box's boundary outward are dropped before normalizing, so the
        clipping that follows does not eat the step (on mostly-black images it would eat most)."""
        if self.box is not None:
            blocked = ((x <= self.box[0]) & (grad < 0)) | ((x >= self.box[1]) & (grad > 0))
            grad = grad.masked_fill(blocked, 0.0)
        g_norm = per_example_norm(grad, 2.0).clamp_min(_TINY)
        return x + step_size * grad / _bcast(g_norm, grad)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not math.isinf(self.eps):
            delta = x_adv - x
            norms = per_example_norm(delta, 2.0)
            factor = (self.eps / norms.clamp_min(_TINY)).clamp(max=1.0)
            x_adv = x + delta * _bcast(factor, delta)
        # Clamping into the box only shrinks each coordinate of delta (x is in the box),
        # so the result stays inside the ball.
        return self.clip_box(x_adv)


def make_threat_model(norm: str, eps: float, box: Box = (0.0, 1.0)) -> ThreatModel:
    """norm: "L2" or "Linf" (case-insensitive)."""
    key = norm.lower()
    if key == "l2":
        return L2Ball(eps, box)
    if key in ("linf", "l_inf", "inf"):
        return LinfBall(eps, box)
    raise ValueError(f"unknown norm {norm!r}; expected 'L2' or 'Linf'")
