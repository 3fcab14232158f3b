"""Transferability (Ilyas et al. §3.3): how often one model's adversarial examples fool others.

Adversarial examples are crafted once per source model and reused for every target. For each
(source, target) pair, over N examples with labels y (targeted attacks aim at t = (y + 1) mod C):

- correct_on_source / correct_on_target: clean examples each model classifies correctly;
- successful_on_source: the source's own (white-box) successes: untargeted, correct on x and
  wrong on x_adv; targeted, x_adv classified as t;
- white-box success rate = successful_on_source / correct_on_source (targeted: / N);
- transferred: successes on the source that also fool the target (untargeted: the target
  misclassifies x_adv; targeted: the target assigns x_adv to t);
- transfer rate = transferred / successful_on_source;
- conditional transfer rate (the paper's reading): the same among the examples the target
  classifies correctly on x, so that a target's own clean errors do not count as transferred:
  transferred_target_correct / successful_target_correct;
- unconditional rate: untargeted, the fraction of the target's clean-correct examples that the
  source's x_adv makes it misclassify; targeted, the fraction of all x_adv it assigns to t.

For a target identical to its source, the transfer rate is 1 and the unconditional rate equals
the white-box success rate.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

from advex.engine.attacks import AttackConfig, attack, predict
from advex.engine.data import ArrayDataset, batch_float
from advex.engine.models import ModelWrapper

DEFINITION = (
    "transfer rate = (source successes that also fool the target) / (source successes); "
    "conditional transfer rate = the same among examples the target classifies correctly on x; "
    "white-box success rate = source successes / source clean-correct (targeted: / examples); "
    "unconditional rate = target clean-correct examples misclassified on the source's x_adv / target clean-correct "
    "(targeted: x_adv assigned to t by the target / examples). Untargeted success: correct on x, wrong on x_adv; "
    "targeted success: x_adv classified as t = (y + 1) mod C. Adversarial examples are crafted once per source.")


@dataclass
class PairCounts:
    examples: int = 0
    correct_on_source: int = 0
    correct_on_target: int = 0
    successful_on_source: int = 0
    transferred: int = 0
    fooled_target: int = 0          # numerator of the unconditional rate
    successful_target_correct: int = 0   # source successes on examples the target gets right on x
    transferred_target_correct: int = 0  # ... that also fool the target
    targeted: bool = False

    def fractions(self) -> dict[str, tuple[int, int]]:
        """Each rate as (numerator, denominator): the rates below, and their intervals."""
        return {"white_box_success_rate": (self.successful_on_source,
                                           self.examples if self.targeted else self.correct_on_source),
                "transfer_rate": (self.transferred, self.successful_on_source),
                "conditional_transfer_rate": (self.transferred_target_correct, self.successful_target_correct),
                "unconditional_rate": (self.fooled_target, self.examples if self.targeted else self.correct_on_target)}

    def _rate(self, name: str) -> float:
        k, n = self.fractions()[name]
        return k / n if n else 0.0

    @property
    def white_box_success_rate(self) -> float:
        return self._rate("white_box_success_rate")

    @property
    def transfer_rate(self) -> float:
        return self._rate("transfer_rate")

    @property
    def conditional_transfer_rate(self) -> float:
        return self._rate("conditional_transfer_rate")

    @property
    def unconditional_rate(self) -> float:
        return self._rate("unconditional_rate")


def transfer_rates(sources: Sequence[ModelWrapper], targets: Sequence[ModelWrapper], data: ArrayDataset,
                   cfg: AttackConfig, *, batch_size: int = 256, device: torch.device | str = "cpu",
                   on_progress: Optional[Callable[[int, int, str], None]] = None) -> list[list[PairCounts]]:
    """counts[i][j] for source i and target j. on_progress(done, total, stage) counts attacked images."""
    cfg = cfg.resolved()
    n = len(data)
    for m in (*sources, *targets):
        m.eval()
    goal = (data.y + 1) % data.num_classes if cfg.targeted else data.y
    clean = {id(m): torch.cat([predict(m.logits, x).cpu() for x, _ in data.batches(batch_size, device)])
             for m in {id(m): m for m in (*sources, *targets)}.values()}
    counts = [[PairCounts(examples=n, targeted=cfg.targeted) for _ in targets] for _ in sources]
    total, done = n * len(sources), 0
    for i, source in enumerate(sources):
        src_ok = clean[id(source)] == data.y
        for start in range(0, n, batch_size):
            rows = slice(start, min(start + batch_size, n))
            x = batch_float(data.x[rows]).to(device)
            g = goal[rows].to(device)
            out = attack(source.logits, x, g, replace(cfg, seed=cfg.seed + start), box=data.box,
                         clean_pred=clean[id(source)][rows].to(device))
            if cfg.targeted:
                success = out.success.cpu()
            else:
                success = src_ok[rows] & out.success.cpu()
            for j, target in enumerate(targets):
                tgt_ok = clean[id(target)][rows] == data.y[rows]
                adv_pred = predict(target.logits, out.x_adv).cpu()
                fooled = adv_pred == goal[rows] if cfg.targeted else adv_pred != data.y[rows]
                c = counts[i][j]
                c.correct_on_source += int(src_ok[rows].sum())
                c.correct_on_target += int(tgt_ok.sum())
                c.successful_on_source += int(success.sum())
                c.transferred += int((success & fooled).sum())
                c.successful_target_correct += int((success & tgt_ok).sum())
                c.transferred_target_correct += int((success & tgt_ok & fooled).sum())
                c.fooled_target += int(fooled.sum()) if cfg.targeted else int((tgt_ok & fooled).sum())
            done += rows.stop - rows.start
            if on_progress is not None:
                on_progress(done, total, f"source {i + 1}/{len(sources)}")
    return counts
