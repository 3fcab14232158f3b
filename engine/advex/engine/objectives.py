"""Objectives for the projected-gradient loop.

An objective scores a batch of iterates per example; the loop *ascends* the score.
It also says which examples have reached the goal (``success``), which the loop uses
to keep the best iterate: reached goal first, higher score second.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch
import torch.nn.functional as F

Forward = Callable[[torch.Tensor], torch.Tensor]


class Objective(ABC):
    @abstractmethod
    def __call__(self, out: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """out: model output for the active examples; index: their positions [M] in the
        full batch. Returns (score float [M] to maximize, success bool [M] or None)."""


class CrossEntropyUntargeted(Objective):
    """Maximize CE(f(x'), y): success when argmax f(x') != y."""

    def __init__(self, y: torch.Tensor) -> None:
        self.y = y

    def __call__(self, out, index):
        y = self.y[index]
        score = F.cross_entropy(out, y, reduction="none")
        return score, out.argmax(1) != y


class CrossEntropyTargeted(Objective):
    """Minimize CE(f(x'), t): success when argmax f(x') == t."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target

    def __call__(self, out, index):
        t = self.target[index]
        score = -F.cross_entropy(out, t, reduction="none")
        return score, out.argmax(1) == t


class FeatureMatching(Objective):
    """Minimize ||g(z) - g(x)||_2 (representation inversion, Ilyas et al. §3.1): the loop's
    forward is the model's penultimate layer g; target holds g(x) for the batch [N, F].
    No goal to reach: the closest iterate is kept."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target

    def __call__(self, out, index):
        return -(out.flatten(1) - self.target[index]).norm(dim=1), None


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Difference-of-logits-ratio loss (Croce & Hein, ICML 2020), per example, float [N]; to be
    *maximized* by an attack. With z sorted descending as z_pi1 >= z_pi2 >= ...:
    untargeted  -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)        (needs >= 3 classes)
    targeted    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)          (needs >= 4 classes)
    Invariant to shifting and rescaling the logits; positive once x is misclassified (untargeted)."""
    need = 3 if target is None else 4
    if logits.shape[1] < need:
        raise ValueError(f"the {'targeted ' if target is not None else ''}DLR loss needs at least {need} classes, "
                         f"got {logits.shape[1]}")
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    if target is None:
        others = logits.scatter(1, y[:, None], -torch.inf).amax(1)
        return -(z_y - others) / (top[:, 0] - top[:, 2] + 1e-12)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + 1e-12)
