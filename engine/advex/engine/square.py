"""The Square attack (Andriushchenko et al., ECCV 2020): a score-based black-box attack that needs
only the model's outputs, never its gradients.

Random search over perturbations on the eps sphere: each iteration proposes a change confined
to a random square window (one per example) and keeps it when the margin loss improves. The
window's area is a fraction p of the image, shrinking on the paper's schedule as queries are
spent. One iteration costs one query per example still being attacked; the starting point costs
one more. Examples stop as soon as they are misclassified (or reach the target).

Linf: the window takes the values +-eps (a random sign per channel), as in the paper.
L2: the window's content is replaced by a Gaussian bump of random sign per channel, scaled so that
||delta||_2 stays eps. (The paper moves mass between two windows to keep the norm; this single-
window version keeps the same invariant with a simpler proposal.)

Inputs of any shape [N, ...] are viewed as [N, C, H, W] images; vectors [N, D] as [N, 1, 1, D].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from advex.engine.threat import Box, per_example_norm

Forward = Callable[[torch.Tensor], torch.Tensor]
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


@dataclass
class SquareResult:
    x: torch.Tensor        # adversarial examples, same shape as x
    success: torch.Tensor  # bool [N]
    queries: torch.Tensor  # int64 [N]: model queries spent per example (never more than the budget)


def p_schedule(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of the image a window covers at iteration `it` of `n_iters`: halved at the paper's
    milestones (given for 10,000 iterations, rescaled to the budget)."""
    t = int(it / max(n_iters, 1) * 10000)
    for milestone, divisor in _SCHEDULE:
        if t <= milestone:
            return p_init / divisor
    return p_init / 512


def _margin(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Untargeted: z_y - max_{j != y} z_j. Targeted: max_{j != t} z_j - z_t. Goal reached when < 0."""
    picked = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -torch.inf).amax(1)
    return others - picked if targeted else picked - others


def _as_images(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        return x[:, None]
    return x.reshape(x.shape[0], 1, 1, -1)


def _window(n: int, h: int, w: int, s: int, gen: torch.Generator, device) -> torch.Tensor:
    """bool [n, 1, h, w]: one random s x s window per example."""
    top = torch.randint(0, h - s + 1, (n,), generator=gen).to(device)
    left = torch.randint(0, w - s + 1, (n,), generator=gen).to(device)
    rows = torch.arange(h, device=device)[None, :, None]
    cols = torch.arange(w, device=device)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < top[:, None, None] + s)
              & (cols >= left[:, None, None]) & (cols < left[:, None, None] + s))
    return inside[:, None]


def square_attack(forward: Forward, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, queries: int,
                  p_init: Optional[float] = None, targeted: bool = False, box: Box = (0.0, 1.0),
                  seed: int = 0, on_step: Optional[Callable[[int, int], None]] = None) -> SquareResult:
    """x: float32 [N, ...]; y: labels (or targets); queries: budget per example (>= 1)."""
    if norm not in ("L2", "Linf"):
        raise ValueError(f"norm must be 'L2' or 'Linf', got {norm!r}")
    if queries < 1:
        raise ValueError("the Square attack needs a query budget >= 1")
    gen = torch.Generator().manual_seed(seed)
    shape = x.shape
    xi = _as_images(x.detach())
    n, c, h, w = xi.shape
    dev = x.device
    p_init = p_init if p_init is not None else (0.05 if norm == "Linf" else 0.1)

    def clip(v: torch.Tensor) -> torch.Tensor:
        return v if box is None else v.clamp(box[0], box[1])

    def query(v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _margin(forward(v.reshape(len(rows), *shape[1:])), y[rows], targeted)

    # starting point: vertical stripes of +-eps (Linf) or a random direction of norm eps (L2)
    if norm == "Linf":
        stripes = torch.randint(0, 2, (n, c, 1, w), generator=gen).float().to(dev) * 2 - 1
        delta = eps * stripes.expand(n, c, h, w).clone()
    else:
        g = torch.randn((n, c, h, w), generator=gen).to(dev)
        delta = eps * g / per_example_norm(g, 2.0).clamp_min(1e-12).view(n, 1, 1, 1)
    x_best = clip(xi + delta)
    everyone = torch.arange(n, device=dev)
    margin = query(x_best, everyone)
    spent = torch.ones(n, dtype=torch.long, device=dev)  # the starting point's query
    for it in range(queries - 1):
        active = (margin >= 0).nonzero().flatten()
        if active.numel() == 0:
            break
        m = active.numel()
        s = max(1, min(h, w, int(round(math.sqrt(p_schedule(p_init, it, queries) * h * w)))))
        window = _window(m, h, w, s, gen, dev)
        cur = x_best[active] - xi[active]
        signs = (torch.randint(0, 2, (m, c, 1, 1), generator=gen).float().to(dev) * 2 - 1)
        if norm == "Linf":
            proposal = torch.where(window, eps * signs.expand(m, c, h, w), cur)
        else:
            outside = cur * ~window
            room = (eps ** 2 - per_example_norm(outside, 2.0) ** 2).clamp_min(0).sqrt()
            r = torch.arange(s, device=dev, dtype=torch.float32) - (s - 1) / 2
            bump2d = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * max(s / 4, 0.5) ** 2))
            bump = torch.zeros((m, c, h, w), device=dev)
            bump[window.expand(m, c, h, w)] = bump2d.flatten().repeat(m * c)
            bump = bump * signs
            bump = bump * (room / per_example_norm(bump, 2.0).clamp_min(1e-12)).view(m, 1, 1, 1)
            proposal = outside + bump
        candidate = clip(xi[active] + proposal)
        new_margin = query(candidate, active)
        spent[active] += 1
        better = new_margin < margin[active]
        x_best[active[better]] = candidate[better]
        margin[active[better]] = new_margin[better]
        if on_step is not None:
            on_step(it + 1, queries - 1)
    return SquareResult(x_best.reshape(shape), margin < 0, spent)
