"""The one batched projected-gradient loop. Attacks (FGSM, PGD), the paper's dataset
builders and the inner loop of adversarial training are configurations of it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from advex.engine.objectives import Forward, Objective
from advex.engine.threat import Radius, SegmentedGenerator, ThreatModel

StepCallback = Callable[[int, int], None]


#: With early stopping on a GPU, examples that reached the goal leave the batch every this many
#: steps: a host-device synchronisation per COMPACT_EVERY steps instead of one per step. In between
#: they are stepped but their best iterate (the first successful one) no longer changes. On the CPU
#: there is no device to wait for, and they leave at every step.
COMPACT_EVERY = 4


def compaction_interval(device: torch.device) -> int:
    """Steps between two compactions of the batch under early stopping (see COMPACT_EVERY)."""
    return 1 if device.type == "cpu" else COMPACT_EVERY


@dataclass
class OptimizeResult:
    x: torch.Tensor        # best iterate per example, same shape as the input
    score: torch.Tensor    # objective score of that iterate, float [N]
    success: torch.Tensor  # bool [N]: goal reached (all False if the objective has none)
    pred: torch.Tensor     # int64 [N]: argmax of the output at that iterate (the adversarial prediction)
    # int64 [N]: argmax of the output at x itself when the first forward pass was at x (no random
    # start, no x_init): the clean prediction, for free; None otherwise
    first_pred: Optional[torch.Tensor] = None


def optimize(
    forward: Forward,
    x: torch.Tensor,
    objective: Objective,
    threat: ThreatModel,
    steps: int,
    step_size: Radius,
    *,
    random_start: bool = False,
    restarts: int = 0,
    x_init: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator | SegmentedGenerator] = None,
    early_stop: bool = False,
    on_step: Optional[StepCallback] = None,
) -> OptimizeResult:
    """Ascend ``objective`` from x (or x_init, or a random start) in ``threat``'s set.

    x: float32 [N, ...], the clean inputs that the threat model's ball is centred on.
    Every iterate, the starting point and the final one included, is scored, and the best
    per example is kept across all (1 + restarts) runs: goal reached first, then score.
    The passes: `steps` forward+backward per run, plus one forward for the last iterate; the
    gradient step's forward scores its iterate, and the best iterate's prediction is kept with it.
    Nothing in a step waits for the device (no .item(), .any() or boolean-mask indexing).
    early_stop: examples that reach the goal keep their first successful iterate and leave the
    batch (every compaction_interval steps); it saves work when only success matters (robust accuracy).
    on_step(step, total_steps) is called after every gradient step (progress, cancellation).
    step_size: one length, or float [N], one per example (with a threat model of per-example radii).
    generator: a SegmentedGenerator draws each segment's random start on its own (merged requests).
    """
    if steps < 0 or restarts < 0:
        raise ValueError("steps and restarts must be >= 0")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    x = x.detach()
    n = x.shape[0]
    best_x = x.clone()
    best_score = torch.full((n,), -torch.inf, device=x.device)
    best_success = torch.zeros(n, dtype=torch.bool, device=x.device)
    best_pred = torch.full((n,), -1, dtype=torch.long, device=x.device)
    first_pred: Optional[torch.Tensor] = None
    total_steps = steps * (restarts + 1)
    rows_of = (-1,) + (1,) * (x.dim() - 1)
    compact_every = compaction_interval(x.device)

    def keep_best(cand: torch.Tensor, index: torch.Tensor, whole: bool, out: torch.Tensor, score: torch.Tensor,
                  succ: Optional[torch.Tensor]) -> None:
        """whole: `index` is still the whole batch in order (nothing has left it, a fact the loop
        tracks, so no sync): the best tensors are updated in place, no gathers nor scatters."""
        score = score.detach()
        if succ is None:
            succ = torch.zeros_like(score, dtype=torch.bool)
        old_succ, old_score = (best_success, best_score) if whole else (best_success[index], best_score[index])
        better = (succ & ~old_succ) | ((succ == old_succ) & (score > old_score))
        if early_stop:  # a success is final: the first successful iterate stays
            better &= ~old_succ
        pred = out.detach().argmax(1) if out.dim() == 2 else None
        if whole:  # `better` is computed before the first write below, so aliasing the olds is safe
            torch.where(better.view(rows_of), cand.detach(), best_x, out=best_x)
            torch.where(better, score, best_score, out=best_score)
            torch.where(better, succ, best_success, out=best_success)
            if pred is not None:
                torch.where(better, pred, best_pred, out=best_pred)
            return
        best_x.index_copy_(0, index, torch.where(better.view(rows_of), cand.detach(), best_x[index]))
        best_score.index_copy_(0, index, torch.where(better, score, old_score))
        best_success.index_copy_(0, index, torch.where(better, succ, old_succ))
        if pred is not None:
            best_pred.index_copy_(0, index, torch.where(better, pred, best_pred[index]))

    for run in range(restarts + 1):
        if x_init is not None and run == 0:
            cur = threat.project(x_init.detach().clone(), x)
        elif random_start or run > 0:
            cur = threat.random_start(x, generator)
        else:
            cur = x.clone()
        at_x = run == 0 and x_init is None and not random_start
        index = torch.arange(n, device=x.device)
        whole = True  # index is still arange(n): no example has left the batch in this run
        # The step-and-project of the rows in `index`, with what depends on their x, radii and step
        # sizes computed once; it overwrites the iterate and the gradient, which the loop owns
        # (every `cur` below is a fresh tensor: a clone, a random start, a gather or its own update).
        ascend = threat.ascent(x, step_size)
        for t in range(steps + 1):
            if early_stop and t % compact_every == 0:
                keep = ~(best_success if whole else best_success[index])
                if not bool(keep.all()):
                    index, cur, whole = index[keep], cur[keep], False
                    live_step = step_size[index] if isinstance(step_size, torch.Tensor) else step_size
                    ascend = threat.rows(index).ascent(x[index], live_step)
                if index.numel() == 0:
                    break
            if t == steps:  # the last iterate is only scored
                with torch.no_grad():
                    out = forward(cur)
                    keep_best(cur, index, whole, out, *objective(out, index))
                if t == 0 and at_x:
                    first_pred = out.argmax(1) if out.dim() == 2 else None
                break
            cur.requires_grad_(True)
            with torch.enable_grad():
                out = forward(cur)
                score, success = objective(out, index)
                keep_best(cur, index, whole, out, score, success)
                grad, = torch.autograd.grad(score.sum(), cur)
            if t == 0 and at_x and out.dim() == 2:
                first_pred = out.detach().argmax(1)
            with torch.no_grad():
                # a gradient that is a broadcast view (stride 0) cannot be overwritten: copy it then
                # (a dense one, channels-last from a CUDA network included, is used as it is)
                dense = grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)
                cur = ascend(cur.detach(), grad if dense else grad.contiguous())
            if on_step is not None:
                on_step(run * steps + t + 1, total_steps)
        if early_stop and bool(best_success.all()):
            break
    return OptimizeResult(best_x, best_score, best_success, best_pred, first_pred)
