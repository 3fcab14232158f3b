"""The one batched projected-gradient loop. Attacks (FGSM, PGD), the paper's dataset
builders and the inner loop of adversarial training are configurations of it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from advex.engine.objectives import Forward, Objective
from advex.engine.threat import ThreatModel

StepCallback = Callable[[int, int], None]


@dataclass
class OptimizeResult:
    x: torch.Tensor        # best iterate per example, same shape as the input
    score: torch.Tensor    # objective score of that iterate, float [N]
    success: torch.Tensor  # bool [N]: goal reached (all False if the objective has none)


def optimize(
    forward: Forward,
    x: torch.Tensor,
    objective: Objective,
    threat: ThreatModel,
    steps: int,
    step_size: float,
    *,
    random_start: bool = False,
    restarts: int = 0,
    x_init: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    early_stop: bool = False,
    on_step: Optional[StepCallback] = None,
) -> OptimizeResult:
    """Ascend ``objective`` from x (or x_init, or a random start) in ``threat``'s set.

    x: float32 [N, ...], the clean inputs that the threat model's ball is centred on.
    Every iterate, the starting point and the final one included, is scored, and the best
    per example is kept across all (1 + restarts) runs: goal reached first, then score.
    early_stop: drop examples from the batch once they reach the goal (they keep the
    first successful iterate); it saves work when only success matters (robust accuracy).
    on_step(step, total_steps) is called after every gradient step (progress, cancellation).
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
    total_steps = steps * (restarts + 1)

    def keep_best(cand: torch.Tensor, index: torch.Tensor, score: torch.Tensor, success: Optional[torch.Tensor]) -> None:
        score = score.detach()
        succ = success if success is not None else torch.zeros_like(best_success[index])
        old_succ, old_score = best_success[index], best_score[index]
        better = (succ & ~old_succ) | ((succ == old_succ) & (score > old_score))
        if better.any():
            rows = index[better]
            best_x[rows] = cand[better].detach()
            best_score[rows] = score[better]
            best_success[rows] = succ[better]

    for run in range(restarts + 1):
        if x_init is not None and run == 0:
            cur = threat.project(x_init.detach().clone(), x)
        elif random_start or run > 0:
            cur = threat.random_init(x, generator)
        else:
            cur = x.clone()
        index = torch.arange(n, device=x.device)
        for t in range(steps + 1):
            if early_stop:
                keep = ~best_success[index]
                if not keep.all():
                    index, cur = index[keep], cur[keep]
                if index.numel() == 0:
                    break
            if t == steps:  # the last iterate is only scored
                with torch.no_grad():
                    keep_best(cur, index, *objective(forward(cur), index))
                break
            cur.requires_grad_(True)
            with torch.enable_grad():
                score, success = objective(forward(cur), index)
                keep_best(cur, index, score, success)
                grad, = torch.autograd.grad(score.sum(), cur)
            with torch.no_grad():
                cur = threat.project(threat.step(cur.detach(), grad, step_size), x[index])
            if on_step is not None:
                on_step(run * steps + t + 1, total_steps)
        if early_stop and bool(best_success.all()):
            break
    return OptimizeResult(best_x, best_score, best_success)
