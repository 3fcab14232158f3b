"""Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020): PGD with momentum whose step size needs no tuning.

One run of N steps from a random start x^(0) in the threat model's set S (ball and box), P its
projection, eta its step size and f the loss being ascended:

    x^(1)   = P(x^(0) + eta * s(grad f(x^(0))))
    z       = P(x^(k) + eta * s(grad f(x^(k))))
    x^(k+1) = P(x^(k) + alpha (z - x^(k)) + (1 - alpha)(x^(k) - x^(k-1)))      alpha = 0.75

s is the threat model's steepest-ascent direction (sign for Linf, the normalized gradient for L2).
eta starts at 2 eps and is halved, per example, at the checkpoints w_j = ceil(p_j N) with
p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), when since the last
checkpoint either fewer than rho = 0.75 of the steps increased f (condition 1) or neither eta nor
the best loss changed (condition 2); a halved example restarts from its best (highest-loss) point.

APGD-CE ascends the cross-entropy, APGD-DLR the difference-of-logits-ratio loss (objectives.dlr_loss).
APGD-T (targeted=True) runs the targeted loss once for each of the top-k classes other than the
true one (ranked by the clean logits); as in the paper its goal is still misclassification.

Randomized models (eot > 1, expectation over transformation; Athalye et al. 2018, AutoAttack's
version='rand' with eot_iter=20): every point is evaluated with `eot` forward (and backward) passes
and the loss and its gradient are their means, so the step-size schedule and the best-point tracking
follow the expected loss, as the step does the expected gradient. An iterate (and the clean input)
counts as misclassified when more than half of its `eot` passes misclassify it (eot = 1: its one
pass); APGD-T ranks its target classes by the mean clean logits. On a randomized model the caller
scores the returned point once more (attacks.attack, eot > 1: one fresh pass, as AutoAttack does).

Cost, APGD-K with R = runs (1 + restarts; APGD-T: times the target classes): K forward+backward
passes per run (the random start and K - 1 steps) plus one forward for the last iterate, and one
forward at x for the clean prediction (none for untargeted APGD given `clean_pred` with eot = 1),
all times `eot`: forwards = eot * (1 + R * (K + 1)), backwards = eot * R * K per example without
early stopping. The prediction at the returned point and the clean one come with those passes
(APGDResult.pred, .clean_pred): no further pass. The step loop keeps its state on the device and
does not synchronize with the host except at checkpoints, where examples already misclassified are
dropped (early_stop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from advex.engine.objectives import Forward, dlr_loss
from advex.engine.threat import Box, make_threat_model

ALPHA = 0.75        # momentum
RHO = 0.75          # fraction of increasing steps below which the step size is halved
P1, DECAY, MIN_INTERVAL = 0.22, 0.03, 0.06  # checkpoint schedule
LOSSES = ("ce", "dlr")
MAX_EOT = 100       # expectation over transformation: at most this many passes per evaluated point


@dataclass
class APGDResult:
    x: torch.Tensor          # adversarial examples: the first misclassified iterate found, else the
                             # highest-loss iterate (x itself for inputs misclassified already)
    success: torch.Tensor    # bool [N]: misclassified (at x or at some iterate)
    loss: torch.Tensor       # float [N]: highest loss reached on failed examples (-inf on the others)
    forwards: torch.Tensor   # int64 [N]: forward passes spent on each example
    backwards: torch.Tensor  # int64 [N]: backward passes spent on each example
    pred: torch.Tensor       # int64 [N]: argmax of the logits at x (the returned point), from the pass(es)
                             # that scored it (eot > 1: of their mean logits)
    clean_pred: torch.Tensor # int64 [N]: argmax at the clean input (the caller's clean_pred where used)


def checkpoint_fractions() -> list[float]:
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), up to the first p_j >= 1."""
    p = [0.0, P1]
    while p[-1] < 1.0:
        p.append(round(p[-1] + max(p[-1] - p[-2] - DECAY, MIN_INTERVAL), 9))
    return p


def checkpoints(steps: int) -> list[int]:
    """The checkpoints w_j = ceil(p_j * steps) that are <= steps, increasing, duplicates dropped
    (for steps = 100: 0, 22, 41, 57, 70, 80, 87, 93, 99)."""
    out: list[int] = []
    for p in checkpoint_fractions():
        w = math.ceil(round(p * steps, 6))
        if w > steps:
            break
        if not out or w > out[-1]:
            out.append(w)
    return out


def halve_step(increases: torch.Tensor, interval: int, eta: torch.Tensor, eta_last: torch.Tensor,
               best: torch.Tensor, best_last: torch.Tensor, rho: float = RHO) -> torch.Tensor:
    """bool [M]: halve the step size at this checkpoint. increases: how many of the `interval`
    steps since the last checkpoint increased the loss; eta / best: step size and best loss now,
    eta_last / best_last: at the last checkpoint (eta before that checkpoint's halving)."""
    condition1 = increases < rho * interval
    condition2 = (eta == eta_last) & (best == best_last)
    return condition1 | condition2


def apgd(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str = "Linf",
    eps: float,
    steps: int = 100,
    restarts: int = 0,
    loss: str = "ce",
    targeted: bool = False,
    target_classes: int = 9,
    box: Box = (0.0, 1.0),
    seed: int = 0,
    early_stop: bool = True,
    rho: float = RHO,
    on_step: Optional[Callable[[int, int], None]] = None,
    eot: int = 1,
    clean_pred: Optional[torch.Tensor] = None,
) -> APGDResult:
    """Run APGD on one batch.

    forward: float32 [N, ...] -> logits [N, C]. y: int64 [N] true labels.
    restarts: extra runs from fresh random starts (APGD-T: per target class).
    targeted: APGD-T, one run (times 1 + restarts) for each of the `target_classes` classes with the
    highest clean logits other than y; loss "dlr" is the targeted DLR loss, "ce" -CE(f(x'), t).
    DLR needs 3 classes (targeted: 4); with fewer, loss "dlr" runs as cross-entropy, as AutoAttack does.
    box: None for unbounded (REAL-domain) inputs.
    early_stop: only attack inputs still classified correctly (clean misclassified ones are not
    attacked; an example leaves the batch at the first checkpoint after it is misclassified, and
    later runs attack only the survivors). False: every example runs every run to the end.
    on_step(step, total): after every step of every run; an exception raised in it stops the attack.
    eot: passes averaged per evaluated point, for randomized models (1 <= eot <= MAX_EOT; see above).
    clean_pred: int64 [N], the model's predictions at x when the caller has them: untargeted APGD with
    eot = 1 then spends no pass at x (APGD-T and eot > 1 make their own clean passes and ignore it).
    """
    if norm not in ("L2", "Linf"):
        raise ValueError(f"norm must be 'L2' or 'Linf', got {norm!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if steps < 0 or restarts < 0:
        raise ValueError("steps and restarts must be >= 0")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if not (isinstance(eot, int) and 1 <= eot <= MAX_EOT):
        raise ValueError(f"eot must be an integer in [1, {MAX_EOT}], got {eot!r}")
    if targeted and target_classes < 1:
        raise ValueError("APGD-T needs target_classes >= 1")
    threat = make_threat_model(norm, eps, box)
    gen = torch.Generator(device=x.device if x.device.type == "cuda" else "cpu").manual_seed(seed)
    x, y = x.detach(), y.to(x.device)
    n, dev = x.shape[0], x.device

    def bc(v: torch.Tensor) -> torch.Tensor:  # [M] -> [M, 1, 1, ...]
        return v.view(-1, *([1] * (x.dim() - 1)))

    if clean_pred is not None and not targeted and eot == 1:  # the clean pass is the caller's
        clean_pred = clean_pred.to(dev, torch.long)
        success = clean_pred != y
        forwards = torch.zeros(n, dtype=torch.long, device=dev)
    else:
        with torch.no_grad():
            clean_logits = forward(x)
            wrong = (clean_logits.argmax(1) != y).long()
            for _ in range(eot - 1):  # a randomized model: the mean logits, and a majority of misclassifications
                logits = forward(x)
                clean_logits = clean_logits + logits
                wrong += (logits.argmax(1) != y).long()
        clean_pred = clean_logits.argmax(1)
        success = 2 * wrong > eot
        forwards = torch.full((n,), eot, dtype=torch.long, device=dev)
    backwards = torch.zeros(n, dtype=torch.long, device=dev)
    x_out = x.clone()
    out_pred = clean_pred.clone()  # the prediction at x_out, kept with it
    out_loss = torch.full((n,), -torch.inf, device=dev, dtype=x.dtype)

    if targeted:
        k = min(target_classes, clean_logits.shape[1] - 1)
        ranked = clean_logits.scatter(1, y[:, None], -torch.inf).argsort(dim=1, descending=True)[:, :k]
        runs = [(j, r) for j in range(k) for r in range(restarts + 1)]
    else:
        ranked = None
        runs = [(-1, r) for r in range(restarts + 1)]
    total = steps * len(runs)
    intervals = {}
    ws = checkpoints(steps)
    for w_prev, w in zip(ws, ws[1:]):
        if w < steps:
            intervals[w] = w - w_prev

    def loss_fn(logits: torch.Tensor, yc: torch.Tensor, tc: Optional[torch.Tensor]) -> torch.Tensor:
        if loss == "dlr" and logits.shape[1] >= (4 if targeted else 3):  # fewer classes: CE, as AutoAttack does
            return dlr_loss(logits, yc, tc)
        if tc is None:
            return F.cross_entropy(logits, yc, reduction="none")
        return -F.cross_entropy(logits, tc, reduction="none")

    def evaluate_once(v, yc, tc, need_grad):
        """(loss [M], logits [M, C], grad or None) of one pass at v."""
        if need_grad:
            v = v.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = forward(v)
                value = loss_fn(logits, yc, tc)
                grad, = torch.autograd.grad(value.sum(), v)
        else:
            with torch.no_grad():
                logits = forward(v)
                value = loss_fn(logits, yc, tc)
            grad = None
        return value.detach(), logits.detach(), grad

    def evaluate(v, idx, yc, tc, need_grad):
        """(loss [M], misclassified [M], prediction [M], grad or None) at v, over `eot` passes: the
        mean loss and gradient, misclassified by more than half of them, the argmax of the mean
        logits; counts the passes (no host sync)."""
        passes = torch.full_like(idx, eot)
        forwards.index_add_(0, idx, passes)
        if need_grad:
            backwards.index_add_(0, idx, passes)
        value, logits, grad = evaluate_once(v, yc, tc, need_grad)
        pred = logits.argmax(1)
        if eot == 1:
            return value, pred != yc, pred, grad
        wrong = (pred != yc).long()
        for _ in range(eot - 1):
            value_i, logits_i, grad_i = evaluate_once(v, yc, tc, need_grad)
            value = value + value_i
            logits = logits + logits_i
            wrong += (logits_i.argmax(1) != yc).long()
            if need_grad:
                grad = grad + grad_i
        return value / eot, 2 * wrong > eot, logits.argmax(1), grad / eot if need_grad else None

    def write_back(idx, found, adv_x, adv_p, best_x, best_p, best_loss):
        """Fold one run's outcome for examples idx into the call's results, each point with its
        prediction (no host sync)."""
        newly = found & ~success[idx]
        x_out.index_copy_(0, idx, torch.where(bc(newly), adv_x, x_out[idx]))
        out_pred.index_copy_(0, idx, torch.where(newly, adv_p, out_pred[idx]))
        success.index_copy_(0, idx, success[idx] | found)
        better = ~success[idx] & (best_loss > out_loss[idx])
        x_out.index_copy_(0, idx, torch.where(bc(better), best_x, x_out[idx]))
        out_pred.index_copy_(0, idx, torch.where(better, best_p, out_pred[idx]))
        out_loss.index_copy_(0, idx, torch.where(better, best_loss, out_loss[idx]))

    for run_no, (j, _) in enumerate(runs):
        if early_stop:
            idx = (~success).nonzero().flatten()
            if idx.numel() == 0:
                break
        else:
            idx = torch.arange(n, device=dev)
        xc, yc = x[idx], y[idx]
        tc = ranked[idx, j] if ranked is not None else None
        cur = threat.random_init(xc, gen)
        loss_cur, found, pred, grad = evaluate(cur, idx, yc, tc, steps > 0)
        adv_x, adv_p = cur.clone(), pred  # the first misclassified iterate and its prediction
        best_x, best_p, best_loss = cur.clone(), pred, loss_cur.clone()
        best_grad = grad.clone() if grad is not None else None
        eta = torch.full((len(idx),), 2.0 * eps, device=dev, dtype=x.dtype)
        eta_last, best_last = eta.clone(), best_loss.clone()
        increases = torch.zeros(len(idx), device=dev)
        prev = cur
        for k in range(steps):
            with torch.no_grad():
                z = threat.project(threat.step(cur, grad, bc(eta)), xc)
                if k == 0:
                    nxt = z
                else:
                    nxt = threat.project(cur + ALPHA * (z - cur) + (1 - ALPHA) * (cur - prev), xc)
            prev, cur = cur, nxt
            last = k + 1 == steps
            loss_new, adv, pred, grad = evaluate(cur, idx, yc, tc, not last)
            increases += (loss_new > loss_cur).float()
            loss_cur = loss_new
            adv_x = torch.where(bc(adv & ~found), cur, adv_x)
            adv_p = torch.where(adv & ~found, pred, adv_p)
            found = found | adv
            improved = loss_new > best_loss
            best_x = torch.where(bc(improved), cur, best_x)
            best_p = torch.where(improved, pred, best_p)
            best_loss = torch.where(improved, loss_new, best_loss)
            if not last:
                best_grad = torch.where(bc(improved), grad, best_grad)
            if k + 1 in intervals:
                halve = halve_step(increases, intervals[k + 1], eta, eta_last, best_loss, best_last, rho)
                eta_last, best_last = eta, best_loss
                eta = torch.where(halve, eta / 2, eta)
                hb = bc(halve)
                cur = torch.where(hb, best_x, cur)
                prev = torch.where(hb, best_x, prev)  # no momentum across a restart
                grad = torch.where(hb, best_grad, grad)
                loss_cur = torch.where(halve, best_loss, loss_cur)
                increases = torch.zeros_like(increases)
                if early_stop and bool(found.any()):  # the checkpoint's one host sync
                    write_back(idx, found, adv_x, adv_p, best_x, best_p, best_loss)
                    keep = ~found
                    (idx, xc, yc, cur, prev, grad, loss_cur, found, adv_x, adv_p, best_x, best_p, best_loss,
                     best_grad, eta, eta_last, best_last, increases) = (
                        t[keep] for t in (idx, xc, yc, cur, prev, grad, loss_cur, found, adv_x, adv_p, best_x,
                                          best_p, best_loss, best_grad, eta, eta_last, best_last, increases))
                    if tc is not None:
                        tc = tc[keep]
            if on_step is not None:
                on_step(run_no * steps + k + 1, total)
            if idx.numel() == 0:
                break
        write_back(idx, found, adv_x, adv_p, best_x, best_p, best_loss)
    out_loss = torch.where(success, torch.full_like(out_loss, -torch.inf), out_loss)
    return APGDResult(x_out, success, out_loss, forwards, backwards, out_pred, clean_pred)
