"""The Square attack (Andriushchenko et al., "Square Attack: a query-efficient black-box adversarial
attack via random search", ECCV 2020): a score-based black-box attack that needs only the model's
outputs, never its gradients.

Random search: each iteration proposes a change confined to random square windows (drawn
independently for every example) and keeps it when the loss improves or the example becomes
misclassified. The window covers a fraction p of the image; p starts at p_init = 0.8 and is halved
at the paper's milestones (given for 10,000 iterations and rescaled to the budget). One iteration
costs one query per example still being attacked; the starting point costs one more. Examples stop
as soon as they are misclassified (or reach the target). Random numbers are drawn on the inputs'
device and the best points are updated with torch.where; the batch drops its successes at every
iteration on the CPU and every few on a GPU (optimize.compaction_interval), the only read-back.

Passes: a budget of Q queries is at most Q forwards (no backward): one for the starting point, one
per iteration over the examples still attacked. The prediction at the returned point comes with the
query that scored it (SquareResult.pred); no query is at x itself, so the clean prediction is the
caller's to make (attacks.attack: one forward unless given or not wanted).

Linf (the paper's Algorithm 2): start from vertical stripes of +-eps (one sign per channel and
column); a proposal sets a window of side s = max(round(sqrt(p * h * w)), 1) to +-eps with one
random sign per channel for the whole window. A proposal that would leave the window unchanged is
redrawn (as the authors' code does), so no query is wasted on it.

L2 (the paper's Algorithm 3): start from a grid of "meta pseudo-gaussian" blocks (two opposite-sign
halves of concentric-square bumps) with random signs, rescaled to norm eps; a proposal draws two
windows W1, W2 (side >= 3, odd), moves all the mass of W1 u W2 (per channel) plus the unused budget
eps^2 - ||delta||^2 into W1 along (old W1 content, normalized) + (random-sign bump), and zeroes W2:
||delta||_2 stays exactly eps before the box clip, so the iterate never leaves the ball.

Loss: untargeted uses the margin z_y - max_{j != y} z_j; targeted uses the cross-entropy towards
the target as the paper does (loss="margin" selects max_{j != t} z_j - z_t instead). Success is
always decided by the margin.

Inputs of any shape [N, ...] are viewed as [N, C, H, W] images; vectors [N, D] as [N, 1, 1, D]
(windows then become rectangles of the same area, 1 x round(p * D)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from advex.engine.optimize import compaction_interval
from advex.engine.threat import Box

Forward = Callable[[torch.Tensor], torch.Tensor]
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))
_TINY = 1e-12


@dataclass
class SquareResult:
    x: torch.Tensor        # adversarial examples, same shape as x
    success: torch.Tensor  # bool [N]
    queries: torch.Tensor  # int64 [N]: model queries spent per example (never more than the budget)
    pred: torch.Tensor     # int64 [N]: argmax of the logits at x (the returned point), from its query


def p_schedule(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of the image a window covers at iteration `it` (0-based) of `n_iters`: p_init up to
    iteration 10 of 10,000, then halved after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000;
    for other budgets the iteration is rescaled to int(it / n_iters * 10000) first."""
    t = int(it / max(n_iters, 1) * 10000)
    for milestone, divisor in _SCHEDULE:
        if t <= milestone:
            return p_init / divisor
    return p_init / 512


def _margin(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Untargeted: z_y - max_{j != y} z_j. Targeted: max_{j != t} z_j - z_t. Goal reached when <= 0."""
    picked = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -torch.inf).amax(1)
    return others - picked if targeted else picked - others


def _as_images(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return x
    if x.dim() == 3:
        return x[:, None]
    return x.reshape(x.shape[0], 1, 1, -1)


def _sides(p: float, h: int, w: int, min_side: int, odd: bool) -> tuple[int, int]:
    """Window sides (sh, sw) covering a fraction p of an h x w image: a square of side
    max(round(sqrt(p * h * w)), min_side) (made odd when asked), a rectangle of about the same area
    when the image is too narrow for it."""
    area = p * h * w
    s = max(int(round(math.sqrt(area))), min_side)
    if odd and s % 2 == 0:
        s += 1
    sh, sw = min(s, h), min(s, w)
    if sh < s and sw == s:
        sw = min(w, max(int(round(area / sh)), min_side))
    elif sw < s and sh == s:
        sh = min(h, max(int(round(area / sw)), min_side))
    return sh, sw


def _bump(a: int, b: int, device) -> torch.Tensor:
    """[a, b] concentric-rectangle bump of the paper (eq. 2): sum_{k=d}^{K-1} 1/(k+1)^2 where d is
    the Chebyshev distance to the centre (a//2, b//2) and K = max(a//2, b//2) + 1."""
    if a == 0 or b == 0:
        return torch.zeros((a, b), device=device)
    k_max = max(a // 2, b // 2) + 1
    tail = (1.0 / torch.arange(1, k_max + 1, device=device, dtype=torch.float32) ** 2).flip(0).cumsum(0).flip(0)
    d = torch.maximum((torch.arange(a, device=device) - a // 2).abs()[:, None],
                      (torch.arange(b, device=device) - b // 2).abs()[None, :])
    return tail[d]


def meta_pseudo_gaussian(a: int, b: int, device="cpu") -> torch.Tensor:
    """float [2, a, b], unit L2 norm each: the paper's eta (a bump on the first half of the rows, the
    negated bump on the second half, both halves of the same norm) in its two orientations (split along rows / along columns).
    When a side is 1 the split goes along the other side for both; a 1 x 1 window is just 1."""
    def split_rows(r: int, c: int) -> torch.Tensor:
        halves = [_bump(r // 2, c, device), -_bump(r - r // 2, c, device)]
        e = torch.cat([v / v.norm().clamp_min(_TINY) for v in halves], 0)  # two halves of equal mass
        return e / e.norm().clamp_min(_TINY)

    if a == 1 and b == 1:
        one = torch.ones((1, 1), device=device)
        return torch.stack([one, one])
    by_rows = split_rows(a, b) if a > 1 else split_rows(b, a).T
    by_cols = split_rows(b, a).T if b > 1 else by_rows
    if a == 1:
        by_rows = by_cols
    return torch.stack([by_rows, by_cols])


def _signs(shape, gen: torch.Generator, device) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=gen, device=device) * 2 - 1).to(dtype=torch.float32)


def _place(m: int, h: int, w: int, sh: int, sw: int, gen: torch.Generator, device):
    """One random sh x sw window per example: (mask bool [m, 1, h, w], row and column offsets inside
    the window, int64 [m, 1, h, 1] and [m, 1, 1, w], clamped to the window)."""
    top = torch.randint(0, h - sh + 1, (m,), generator=gen, device=device)
    left = torch.randint(0, w - sw + 1, (m,), generator=gen, device=device)
    dr = torch.arange(h, device=device)[None, :] - top[:, None]   # [m, h]
    dc = torch.arange(w, device=device)[None, :] - left[:, None]  # [m, w]
    in_r = (dr >= 0) & (dr < sh)
    in_c = (dc >= 0) & (dc < sw)
    mask = (in_r[:, :, None] & in_c[:, None, :])[:, None]
    return mask, dr.clamp(0, sh - 1)[:, None, :, None], dc.clamp(0, sw - 1)[:, None, None, :]


def _l2_init(n: int, c: int, h: int, w: int, eps: float, gen: torch.Generator, device) -> torch.Tensor:
    """The paper's L2 start: a grid of meta-pseudo-gaussian blocks of side h//5 (w//5), each with a
    random orientation per example and a random sign per example and channel, rescaled to norm eps."""
    bh, bw = max(h // 5, 1), max(w // 5, 1)
    oh, ow = max((h - 5 * bh) // 2, 0), max((w - 5 * bw) // 2, 0)
    nh, nw = (h - oh) // bh, (w - ow) // bw
    eta = meta_pseudo_gaussian(bh, bw, device)                                # [2, bh, bw]
    orient = torch.randint(0, 2, (n, 1, nh, nw), generator=gen, device=device)
    sign = _signs((n, c, nh, nw), gen, device)
    blocks = eta[orient.expand(n, 1, nh, nw)]                                 # [n, 1, nh, nw, bh, bw]
    blocks = blocks * sign[..., None, None]                                   # [n, c, nh, nw, bh, bw]
    grid = blocks.permute(0, 1, 2, 4, 3, 5).reshape(n, c, nh * bh, nw * bw)
    delta = torch.zeros((n, c, h, w), device=device)
    delta[:, :, oh:oh + nh * bh, ow:ow + nw * bw] = grid
    norm = delta.flatten(1).norm(dim=1).clamp_min(_TINY)
    return eps * delta / norm.view(n, 1, 1, 1)


def square_attack(forward: Forward, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, queries: int,
                  p_init: Optional[float] = None, targeted: bool = False, box: Box = (0.0, 1.0),
                  seed: int = 0, on_step: Optional[Callable[[int, int], None]] = None,
                  loss: Optional[str] = None, resample_unchanged: bool = True,
                  compact_every: Optional[int] = None) -> SquareResult:
    """x: float32 [N, ...]; y: labels (or targets); queries: budget per example (>= 1), the starting
    point included. p_init: starting window fraction (default 0.8, the paper's and AutoAttack's).
    loss: "margin" or "ce" (default: margin when untargeted, cross-entropy when targeted).
    resample_unchanged (Linf): redraw a proposal that would leave its window as it is (the authors'
    code does; torchattacks/AutoAttack do not and spend the query anyway).
    compact_every: query rounds between two compactions (default compaction_interval of the device);
    1 for a black box (an ONNX graph, an endpoint), where a finished row sent again is a real query."""
    if norm not in ("L2", "Linf"):
        raise ValueError(f"norm must be 'L2' or 'Linf', got {norm!r}")
    if queries < 1:
        raise ValueError("the Square attack needs a query budget >= 1")
    loss = loss if loss is not None else ("ce" if targeted else "margin")
    if loss not in ("margin", "ce"):
        raise ValueError(f"loss must be 'margin' or 'ce', got {loss!r}")
    p_init = 0.8 if p_init is None else p_init
    gen = torch.Generator(device=x.device).manual_seed(seed)  # random numbers made where they are used
    shape = x.shape
    xi = _as_images(x.detach())
    n, c, h, w = xi.shape
    dev = x.device
    iters = queries - 1

    def clip(v: torch.Tensor) -> torch.Tensor:
        return v if box is None else v.clamp(box[0], box[1])

    def query(v: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(margin, loss, prediction) [len(rows)]: lower is better for margin and loss."""
        with torch.no_grad():
            logits = forward(v.reshape(len(rows), *shape[1:])).float()
        target = y[rows]
        m = _margin(logits, target, targeted)
        if loss == "margin":
            return m, m, logits.argmax(1)
        ce = F.cross_entropy(logits, target, reduction="none")
        return m, (ce if targeted else -ce), logits.argmax(1)

    if norm == "Linf":
        delta = eps * _signs((n, c, 1, w), gen, dev).expand(n, c, h, w)
    else:
        delta = _l2_init(n, c, h, w, eps, gen, dev)
    x_best = clip(xi + delta)
    everyone = torch.arange(n, device=dev)
    margin, best, pred = query(x_best, everyone)  # pred: the prediction at x_best, kept with it
    spent = torch.ones(n, dtype=torch.long, device=dev)  # the starting point's query
    every, active = compact_every or compaction_interval(dev), everyone
    for it in range(iters):
        if it % every == 0:  # successes leave the batch (the only read-back from the device)
            active = active[margin[active] > 0]
            if active.numel() == 0:
                break
        live = margin[active] > 0  # between compactions a success is neither counted nor changed
        m = active.numel()
        p = p_schedule(p_init, it, iters)
        x0 = xi[active]
        cur = x_best[active]
        if norm == "Linf":
            sh, sw = _sides(p, h, w, 1, odd=False)
            window, _, _ = _place(m, h, w, sh, sw, gen, dev)
            signs = _signs((m, c, 1, 1), gen, dev)
            flip = torch.randint(0, 2, (m, c, 1, 1), generator=gen, device=dev).bool()
            forced = torch.randint(0, c, (m,), generator=gen, device=dev)
            target_vals = clip(x0 + eps * signs)
            same = ((target_vals - cur).abs() <= 1e-7) | ~window
            unchanged = same.flatten(1).all(1)
            # a proposal equal to the current window wastes a query: flip a non-empty set of channels
            flip[:, :, 0, 0] |= F.one_hot(forced, c).bool() & ~flip.flatten(1).any(1, keepdim=True)
            if resample_unchanged:
                signs = torch.where(unchanged.view(m, 1, 1, 1) & flip, -signs, signs)
            candidate = torch.where(window, clip(x0 + eps * signs), cur)
        else:
            sh, sw = _sides(p, h, w, 3, odd=True)
            nu = cur - x0
            w1, r1, c1 = _place(m, h, w, sh, sw, gen, dev)
            w2, _, _ = _place(m, h, w, sh, sw, gen, dev)
            eta = meta_pseudo_gaussian(sh, sw, dev)                         # [2, sh, sw]
            orient = torch.randint(0, 2, (m,), generator=gen, device=dev).view(m, 1, 1, 1)
            bump = eta[orient, r1, c1] * w1 * _signs((m, c, 1, 1), gen, dev)  # [m, c, h, w], unit norm per channel
            unused = (eps ** 2 - nu.flatten(1).pow(2).sum(1)).clamp_min(0).view(m, 1, 1, 1)
            in_w1 = nu * w1
            old = in_w1 / in_w1.pow(2).sum((2, 3), keepdim=True).sqrt().clamp_min(_TINY)
            avail = ((nu * (w1 | w2)).pow(2).sum((2, 3), keepdim=True) + unused / c).sqrt()
            moved = bump + old
            moved = moved / moved.pow(2).sum((2, 3), keepdim=True).sqrt().clamp_min(_TINY) * avail
            new = torch.where(w1, moved, torch.where(w2, torch.zeros_like(nu), nu))
            # exact in exact arithmetic; rescaling guards against drift so the iterate stays in the ball
            new = eps * new / new.flatten(1).norm(dim=1).clamp_min(_TINY).view(m, 1, 1, 1)
            candidate = clip(x0 + new)
        new_margin, new_loss, new_pred = query(candidate, active)
        spent.index_add_(0, active, live.long())
        better = live & ((new_loss < best[active]) | (new_margin <= 0))
        x_best.index_copy_(0, active, torch.where(better.view(m, 1, 1, 1), candidate, x_best[active]))
        margin.index_copy_(0, active, torch.where(better, new_margin, margin[active]))
        best.index_copy_(0, active, torch.where(better, new_loss, best[active]))
        pred.index_copy_(0, active, torch.where(better, new_pred, pred[active]))
        if on_step is not None:
            on_step(it + 1, iters)
    return SquareResult(x_best.reshape(shape), margin <= 0, spent, pred)
