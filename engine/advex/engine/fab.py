"""FAB, the fast adaptive boundary attack (Croce & Hein, "Minimally distorted adversarial examples
with a fast adaptive boundary attack", ICML 2020), targeted version as in AutoAttack (FAB-T).

FAB looks for the adversarial example of smallest norm. For a target class t and the true class y
let g = f_t - f_y (g > 0 beyond the boundary between y and t). One step at x^(i), x_0 the clean
point, C the box:

    pi        = {z : g(x^(i)) + <grad g(x^(i)), z - x^(i)> = 0}    the linearized boundary
    d         = proj_p(x^(i), pi ∩ C) - x^(i)                      (minimal ||.||_p move onto pi in C)
    d_0       = proj_p(x_0,   pi ∩ C) - x_0
    alpha     = min(||d|| / (||d|| + ||d_0||), alpha_max)           biased towards x_0
    x^(i+1)   = clip_C((1 - alpha)(x^(i) + eta d) + alpha (x_0 + eta d_0))
    if x^(i+1) is misclassified:  record it if closest so far;  x^(i+1) = x_0 + beta (x^(i+1) - x_0)

with alpha_max = 0.1, eta = 1.05, beta = 0.9. The projection onto a hyperplane intersected with a
box is solved exactly (``project_hyperplane_box``): the minimizer moves every coordinate by
lambda * w_i (L2) or by t * sign(w_i) (Linf) clipped to the box, and the scalar lambda / t solving
<w, d> = r is found from the sorted breakpoints in O(D log D). Where the hyperplane misses the box
the projection returns the box point that goes furthest towards it.

FAB-T runs, for each of the `target_classes` classes with the highest clean logits other than y,
1 + restarts runs of `steps` steps; run 0 starts at x_0, a restart at a random point of the sphere
of radius min(eps, best distance so far) / 2 around x_0 (the reference's restart radius; with
eps=None and nothing found yet the norm's AutoAttack default eps stands in for eps). A final search
bisects the segment between x_0 and the closest adversarial found to bring it to the boundary.

Goal: misclassification (argmax != y), as in the reference; the target only picks the boundary.
Cost of FAB-K per attacked example, R = target classes x (1 + restarts) runs: 1 forward at x (the
clean prediction and the target ranking), K forward+backward at x^(i) and K forwards at x^(i+1) per
run, and `search_steps` forwards in the final search for examples with an adversarial:
1 + 2 R K + search_steps forwards, R K backwards. Clean-misclassified inputs cost the one forward.
The predictions at x and at the returned point come with those passes (FABResult.clean_pred,
.pred): no further pass. With eps given and early_stop, examples found adversarial within eps
leave the batch between runs (one host sync per run).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from advex.engine.objectives import Forward
from advex.engine.threat import Box, make_threat_model, per_example_norm

ALPHA_MAX = 0.1     # largest weight of the step from the clean point
ETA = 1.05          # extrapolation beyond the linearized boundary
BETA = 0.9          # backward step towards the clean point after an adversarial iterate
SEARCH_STEPS = 10   # bisection steps of the final search
DEFAULT_EPS = {"Linf": 0.3, "L2": 1.0}  # restart radius stand-in when eps=None (AutoAttack defaults)
NORMS = ("Linf", "L2")


@dataclass
class FABResult:
    x: torch.Tensor          # the closest adversarial found (x itself where none, or misclassified already)
    success: torch.Tensor    # bool [N]: distance <= eps (eps=None: an adversarial was found)
    distance: torch.Tensor   # float [N]: smallest adversarial distance found (0: misclassified already,
                             # inf: none found)
    forwards: torch.Tensor   # int64 [N]: forward passes spent on each example
    backwards: torch.Tensor  # int64 [N]: backward passes spent on each example
    pred: torch.Tensor       # int64 [N]: argmax of the logits at x (the returned point), from the pass there
    clean_pred: torch.Tensor # int64 [N]: argmax of the logits at the clean input (the first pass)


def _norm_key(norm: str) -> str:
    key = {"linf": "Linf", "l_inf": "Linf", "inf": "Linf", "l2": "L2"}.get(norm.lower())
    if key is None:
        raise ValueError(f"norm must be 'L2' or 'Linf', got {norm!r}")
    return key


def project_hyperplane_box(w: torch.Tensor, r: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                           norm: str) -> torch.Tensor:
    """Row-wise argmin ||d||_p subject to <w, d> = r and lo <= d <= hi (lo <= 0 <= hi), p = inf or 2.

    w, lo, hi: [M, D] (lo / hi may be -inf / inf); r: [M]. Where no such d exists the box point
    maximizing sign(r) <w, d> is returned (coordinates with w_i = 0 stay 0).
    Both norms: with s = sign(r) and v = s w (so <v, d> = |r| >= 0), the minimizer is
    d_i = clip(lam * v_i, lo_i, hi_i) (L2) or d_i = sign(v_i) min(t, cap_i) (Linf, cap_i the room
    along sign(v_i)) for the smallest lam / t >= 0 reaching |r|; the reached value is a nondecreasing
    piecewise-linear function of lam / t with one breakpoint per coordinate."""
    key = _norm_key(norm)
    s = torch.where(r < 0, -1.0, 1.0).to(w.dtype)
    v = w * s[:, None]
    target = r.abs()
    sv = v.sign()
    # room along sign(v_i); w_i = 0 never moves
    cap = torch.where(v > 0, hi, torch.where(v < 0, -lo, torch.zeros_like(v))).clamp_min(0)
    active = v != 0
    if key == "Linf":
        a = v.abs()                                    # weight of coordinate i in <v, d>
        bp = torch.where(active, cap, torch.full_like(cap, math.inf))  # t at which i saturates
        sat_val = a * torch.where(active, cap, torch.zeros_like(cap))   # its contribution once saturated
    else:
        a = v * v
        bp = torch.where(active, cap / v.abs().clamp_min(1e-30), torch.full_like(cap, math.inf))
        sat_val = v.abs() * torch.where(active, cap, torch.zeros_like(cap))
    bp_sorted, order = bp.sort(dim=1)
    a_sorted = a.gather(1, order)
    sat_sorted = sat_val.gather(1, order).nan_to_num(posinf=0.0)  # inf room only with inf breakpoint
    sat_incl = sat_sorted.cumsum(1)                                 # saturated up to and incl. k
    rest_excl = a_sorted.flip(1).cumsum(1).flip(1) - a_sorted       # weight still free after k
    rest_excl = rest_excl.clamp_min(0)
    finite = torch.isfinite(bp_sorted)
    # value reached at breakpoint k; an infinite breakpoint is reached only if weight is still free
    at_inf = torch.where(rest_excl + a_sorted > 0, math.inf, sat_incl[:, -1:].expand_as(sat_incl))
    reach = torch.where(finite, sat_incl + torch.where(finite, bp_sorted, torch.zeros_like(bp_sorted)) * rest_excl,
                        at_inf)
    m = (reach < target[:, None]).sum(1)                            # breakpoints passed before |r|
    dim = w.shape[1]
    feasible = m < dim
    mi = m.clamp(max=dim - 1)[:, None]
    zero = torch.zeros_like(target[:, None])
    sat_before = torch.where(mi > 0, sat_incl.gather(1, (mi - 1).clamp_min(0)), zero)
    free = (rest_excl.gather(1, mi) + a_sorted.gather(1, mi))       # weight not saturated at lam
    scalar = ((target[:, None] - sat_before) / free.clamp_min(1e-30)).clamp_min(0)
    scalar = torch.where(feasible[:, None], scalar, torch.full_like(scalar, math.inf))
    if key == "Linf":
        d = sv * torch.minimum(scalar, cap)
    else:
        d = torch.where(active, (scalar * v).clamp(lo, hi), torch.zeros_like(v))
    return torch.where(active, d, torch.zeros_like(d)).nan_to_num(nan=0.0)


def fab(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "Linf",
    eps: Optional[float] = None,
    steps: int = 100,
    restarts: int = 0,
    targeted: bool = True,
    target_classes: int = 9,
    box: Box = (0.0, 1.0),
    seed: int = 0,
    alpha_max: float = ALPHA_MAX,
    eta: float = ETA,
    beta: float = BETA,
    search_steps: int = SEARCH_STEPS,
    early_stop: bool = True,
    on_step: Optional[Callable[[int, int], None]] = None,
) -> FABResult:
    """Run FAB-T on one batch.

    forward: float32 [N, ...] -> logits [N, C]. y: int64 [N] true labels.
    eps: None for the minimal-distance attack (every run runs for every attacked example); a
    number makes success = distance <= eps, sets the restart radius, and (early_stop) drops
    examples adversarial within eps between runs, as AutoAttack does.
    restarts: extra runs from random starts, per target class.
    targeted: must be True (FAB-T; the untargeted variant is not implemented).
    box: None for unbounded (REAL-domain) inputs.
    on_step(step, total): after every step of every run; an exception raised in it stops the attack.
    """
    key = _norm_key(norm)
    if not targeted:
        raise NotImplementedError("only the targeted FAB (FAB-T) is implemented")
    if steps < 0 or restarts < 0 or search_steps < 0:
        raise ValueError("steps, restarts and search_steps must be >= 0")
    if eps is not None and not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if target_classes < 1:
        raise ValueError("FAB-T needs target_classes >= 1")
    threat = make_threat_model(key, math.inf if eps is None else eps, box)
    p = threat.p
    gen = torch.Generator(device=x.device if x.device.type == "cuda" else "cpu").manual_seed(seed)
    x, y = x.detach(), y.to(x.device)
    n, dev = x.shape[0], x.device

    def bc(v: torch.Tensor) -> torch.Tensor:  # [M] -> [M, 1, 1, ...]
        return v.view(-1, *([1] * (x.dim() - 1)))

    with torch.no_grad():
        clean_logits = forward(x)
    num_classes = clean_logits.shape[1]
    if num_classes < 2:
        raise ValueError("FAB-T needs at least 2 classes")
    forwards = torch.ones(n, dtype=torch.long, device=dev)
    backwards = torch.zeros(n, dtype=torch.long, device=dev)
    clean_pred = clean_logits.argmax(1)
    wrong = clean_pred != y
    distance = torch.where(wrong, 0.0, math.inf).to(x.dtype)
    x_out = x.clone()
    out_pred = clean_pred.clone()  # the prediction at x_out, kept with it

    k = min(target_classes, num_classes - 1)
    ranked = clean_logits.scatter(1, y[:, None], -torch.inf).argsort(dim=1, descending=True)[:, :k]
    runs = [(j, r) for j in range(k) for r in range(restarts + 1)]
    total = steps * len(runs)
    restart_eps = DEFAULT_EPS[key] if eps is None else eps

    def gradient(v, yc, tc, idx):
        """(g = f_t - f_y [M], grad g [M, ...]) at v; one forward and one backward."""
        forwards.index_add_(0, idx, torch.ones_like(idx))
        backwards.index_add_(0, idx, torch.ones_like(idx))
        v = v.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = forward(v)
            g = logits.gather(1, tc[:, None]).squeeze(1) - logits.gather(1, yc[:, None]).squeeze(1)
            grad, = torch.autograd.grad(g.sum(), v)
        return g.detach(), grad.detach()

    def misclassified(v, yc, idx):
        """(misclassified [M], prediction [M]) at v; one forward."""
        forwards.index_add_(0, idx, torch.ones_like(idx))
        with torch.no_grad():
            pred = forward(v).argmax(1)
        return pred != yc, pred

    def random_start(xc, radius):
        if key == "Linf":
            u = 2 * torch.rand(xc.shape, generator=gen, device=gen.device, dtype=xc.dtype).to(dev) - 1
        else:
            u = torch.randn(xc.shape, generator=gen, device=gen.device, dtype=xc.dtype).to(dev)
        u = u / bc(per_example_norm(u, p).clamp_min(1e-12))
        return threat.clip_box(xc + bc(radius) * u)

    for run_no, (j, r) in enumerate(runs):
        attack = ~wrong
        if early_stop and eps is not None:
            attack &= distance > eps
        idx = attack.nonzero().flatten()
        if idx.numel() == 0:
            break
        x0, yc, tc = x[idx], y[idx], ranked[idx, j]
        flat0 = x0.flatten(1)
        if box is None:
            lo_box = hi_box = None
        else:
            lo_box, hi_box = box
        if r == 0:
            cur = x0.clone()
        else:
            cur = random_start(x0, 0.5 * torch.clamp(distance[idx], max=restart_eps))
        for step in range(steps):
            g, grad = gradient(cur, yc, tc, idx)
            with torch.no_grad():
                m = len(idx)
                w = grad.flatten(1)
                fc = cur.flatten(1)
                # the hyperplane g + <w, z - cur> = 0: move d with <w, d> = r from each point
                r_cur = -g
                r_orig = -g - (w * (flat0 - fc)).sum(1)
                pts = torch.cat((fc, flat0), 0)
                if box is None:
                    lo = torch.full_like(pts, -math.inf)
                    hi = torch.full_like(pts, math.inf)
                else:
                    lo, hi = lo_box - pts, hi_box - pts
                d = project_hyperplane_box(torch.cat((w, w), 0), torch.cat((r_cur, r_orig), 0), lo, hi, key)
                d_norm = per_example_norm(d, p).clamp_min(1e-8)
                a = (d_norm[:m] / (d_norm[:m] + d_norm[m:])).clamp(0.0, alpha_max)
                nxt = (1 - a[:, None]) * (fc + eta * d[:m]) + a[:, None] * (flat0 + eta * d[m:])
                nxt = threat.clip_box(nxt.view_as(x0))
            adv, pred = misclassified(nxt, yc, idx)
            with torch.no_grad():
                dist = per_example_norm(nxt - x0, p)
                better = adv & (dist < distance[idx])
                x_out.index_copy_(0, idx, torch.where(bc(better), nxt, x_out[idx]))
                out_pred.index_copy_(0, idx, torch.where(better, pred, out_pred[idx]))
                distance.index_copy_(0, idx, torch.where(better, dist, distance[idx]))
                cur = torch.where(bc(adv), x0 + beta * (nxt - x0), nxt)
            if on_step is not None:
                on_step(run_no * steps + step + 1, total)

    # final search: bisect [x_0, closest adversarial] for the point nearest the boundary
    found = torch.isfinite(distance) & ~wrong
    idx = found.nonzero().flatten()
    if idx.numel() and search_steps:
        x0, yc, xa = x[idx], y[idx], x_out[idx]
        lo_s = torch.zeros(len(idx), device=dev, dtype=x.dtype)
        hi_s = torch.ones_like(lo_s)
        pred_hi = out_pred[idx]  # the prediction at x0 + hi_s (xa - x0)
        for _ in range(search_steps):
            mid = (lo_s + hi_s) / 2
            adv, pred = misclassified(x0 + bc(mid) * (xa - x0), yc, idx)
            hi_s = torch.where(adv, mid, hi_s)
            lo_s = torch.where(adv, lo_s, mid)
            pred_hi = torch.where(adv, pred, pred_hi)
        with torch.no_grad():
            # hi_s = 1 (no midpoint was adversarial): xa itself, the point that was evaluated
            # (x0 + 1 * (xa - x0) equals it only up to rounding, and was never passed through the model)
            xs = torch.where(bc(hi_s < 1), x0 + bc(hi_s) * (xa - x0), xa)
            ds = per_example_norm(xs - x0, p)
            better = ds < distance[idx]
            x_out.index_copy_(0, idx, torch.where(bc(better), xs, xa))
            out_pred.index_copy_(0, idx, torch.where(better, pred_hi, out_pred[idx]))
            distance.index_copy_(0, idx, torch.where(better, ds, distance[idx]))
    success = torch.isfinite(distance) if eps is None else distance <= eps
    return FABResult(x_out, success, distance, forwards, backwards, out_pred, clean_pred)
