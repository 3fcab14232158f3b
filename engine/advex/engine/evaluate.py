"""Standard and robust accuracy of a model on a dataset, over attacks x eps.

Robust accuracy at (attack, eps) = fraction of examples classified correctly *and* still
classified correctly under the attack. Only clean-correct examples are attacked (the
others count as non-robust already), and the attack stops early per example once it
succeeds: both change no number, only the work done.

A suite (SUITES: "pgd", "autoattack-fast", "autoattack", "rand") is a fixed list of attacks run as a cascade at each
(norm, eps): each attack runs only on the points every earlier one failed on, so its row is the
robust accuracy *after* it and the suite's last row is its worst case per example (AutoAttack's
protocol, Croce & Hein 2020).

"rand" is AutoAttack's version for randomized defenses: APGD-CE then APGD-DLR, 100 steps each, every
step averaging the loss and gradient over 20 passes of the model (EOT, expectation over
transformation). A randomized model's verdicts are random too: as in AutoAttack, each point an
attack returns is scored with one fresh pass (the clean pass likewise), so a robust accuracy is one
draw of the accuracy under attack: its expectation over the model's randomness is the mean of the
per-example probabilities of a correct answer at the adversarial points. Nothing is scored twice in
the model's favour (an example broken by any attack of the cascade stays broken).

evaluate checks whether the model is randomized with one extra forward pass of the first batch of
clean inputs (its logits must repeat): attacks without EOT on a randomized model get a masking note
(stochastic gradients, Athalye et al. 2018), and EOT on a deterministic model an informative one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from advex.engine.attacks import GRADIENT_FREE, AttackConfig, attack, predict
from advex.engine.data import ArrayDataset, batch_float
from advex.engine.models import ModelWrapper
from advex.engine.optimize import StepCallback


@dataclass(frozen=True)
class AttackSweep:
    """One attack evaluated at every eps of ``eps`` (config.eps ignored when eps is non-empty);
    `suite`: the suite it belongs to (it then runs only on what the suite's earlier attacks left)."""

    config: AttackConfig
    eps: tuple[float, ...] = ()
    suite: str = ""

    def configs(self) -> list[AttackConfig]:
        radii = self.eps or (self.config.eps,)
        return [replace(self.config, eps=float(e)).resolved() for e in radii]


# Each suite's attacks, in the order they run (their settings are the references' standard ones).
SUITES: dict[str, tuple[AttackConfig, ...]] = {
    "pgd": (AttackConfig(method="pgd", steps=50),),
    "autoattack-fast": (AttackConfig(method="apgd-ce", steps=100), AttackConfig(method="apgd-t", steps=100)),
    "autoattack": (AttackConfig(method="apgd-ce", steps=100), AttackConfig(method="apgd-t", steps=100),
                   AttackConfig(method="fab-t", steps=100), AttackConfig(method="square", steps=5000)),
    # AutoAttack's version='rand' (randomized defenses): one run each, eot_iter=20
    "rand": (AttackConfig(method="apgd-ce", steps=100, eot=20), AttackConfig(method="apgd-dlr", steps=100, eot=20)),
}


def suite_sweeps(suite: str, norm: str, eps: tuple[float, ...], seed: int = 0) -> list[AttackSweep]:
    """The sweeps of `suite` at these radii (ValueError for an unknown suite)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; expected one of {sorted(SUITES)}")
    return [AttackSweep(replace(cfg, norm=norm, seed=seed), tuple(eps), suite=suite) for cfg in SUITES[suite]]


@dataclass
class RobustRow:
    config: AttackConfig
    robust_correct: int
    total: int
    clean_correct: int
    per_class: list[float]
    wall_seconds: float
    robust_mask: torch.Tensor  # bool [N]
    mean_queries: float = 0.0  # black-box attacks: model queries per attacked example
    suite: str = ""            # set: the robust accuracy after this attack and the suite's earlier ones
    randomized: Optional[bool] = None  # the model's logits did not repeat on the same inputs (None: not checked)

    @property
    def robust_accuracy(self) -> float:
        return self.robust_correct / self.total if self.total else 0.0

    @property
    def success_rate(self) -> float:
        broken = self.clean_correct - self.robust_correct
        return broken / self.clean_correct if self.clean_correct else 0.0


@dataclass
class WorstCaseRow:
    norm: str
    eps: float
    robust_mask: torch.Tensor  # bool [N]

    @property
    def robust_correct(self) -> int:
        return int(self.robust_mask.sum())


@dataclass
class EvalReport:
    num_examples: int
    clean_correct: int
    per_class_accuracy: list[float]
    per_class_count: list[int]
    rows: list[RobustRow] = field(default_factory=list)
    worst_case: list[WorstCaseRow] = field(default_factory=list)
    wall_seconds: float = 0.0
    randomized: Optional[bool] = None  # see is_randomized; None: no examples to check on
    notes: list[str] = field(default_factory=list)  # informative, not masking (gradient_masking_notes has those)

    @property
    def clean_accuracy(self) -> float:
        return self.clean_correct / self.num_examples if self.num_examples else 0.0


ProgressFn = Callable[[int, int, str], None]


def per_class_rate(mask: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1)
    hits = torch.bincount(y[mask], minlength=num_classes)
    return (hits.float() / counts.float()).tolist()


@torch.no_grad()
def clean_predictions(model: ModelWrapper, data: ArrayDataset, batch_size: int, device) -> torch.Tensor:
    return torch.cat([predict(model.logits, x, batch_size).cpu() for x, _ in data.batches(batch_size, device)]) \
        if len(data) else torch.zeros(0, dtype=torch.long)


RANDOMNESS_RTOL = 1e-5  # logits that differ by more (relative to their scale) on the same inputs: randomized


@torch.no_grad()
def is_randomized(forward, x: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether a second forward pass of x gives other logits than `logits` (the first pass's): a
    randomized model (noise, random transforms, dropout left on). One forward pass; the tolerance
    absorbs the nondeterminism of GPU kernels, not a randomized defense's noise."""
    again = forward(x)
    scale = float(logits.abs().max()) if logits.numel() else 0.0
    return bool(((again - logits).abs() > RANDOMNESS_RTOL * (1.0 + scale)).any())


def randomness_notes(randomized: Optional[bool], rows: list["RobustRow"]) -> list[str]:
    """Informative notes for EvalReport.notes: EOT spent on a deterministic model; on a randomized
    one, how its random verdicts are scored. (Attacks without EOT on a randomized model are a
    masking note: gradient_masking_notes.)"""
    with_eot = sorted({r.suite or r.config.method for r in rows if r.config.eot > 1})
    if randomized is False and with_eot:
        k = max(r.config.eot for r in rows)
        return [f"the model is deterministic (its logits repeat on the same inputs): EOT is unnecessary for "
                f"{', '.join(with_eot)}, whose steps average up to {k} identical passes (cost x{k}) and find what "
                "one pass finds; suite autoattack-fast or autoattack is the better use of the time"]
    if randomized:
        return ["the model is randomized (its logits differ between passes on the same inputs): clean and robust "
                "accuracies are single draws (each point scored with one fresh pass, as AutoAttack does) and may "
                "move between runs"]
    return []


def evaluate(model: ModelWrapper, data: ArrayDataset, sweeps: list[AttackSweep], *, batch_size: int = 256,
             device: torch.device | str = "cpu", on_progress: Optional[ProgressFn] = None,
             surrogate: Optional[ModelWrapper] = None, on_step: Optional[StepCallback] = None) -> EvalReport:
    """Clean accuracy, then every (attack, eps) of ``sweeps`` on the clean-correct examples.
    surrogate: white-box attacks are crafted on it and judged on ``model`` (transfer attacks, for
    models without gradients); gradient-free attacks always query ``model`` itself.
    on_progress(done, total, stage) counts images: the clean pass, then attacked images.
    on_step: passed to every attack (called after each of its steps; an exception raised there stops
    the evaluation within one step: cancellation)."""
    t_start = time.perf_counter()
    model.eval()
    configs = [(cfg, sweep.suite) for sweep in sweeps for cfg in sweep.configs()]
    n = len(data)
    report_progress = on_progress or (lambda d, t, s: None)
    report_progress(0, n, "clean")
    preds = []
    randomized: Optional[bool] = None
    with torch.no_grad():
        for x, _ in data.batches(batch_size, device):
            logits = model.logits(x)
            if randomized is None:  # the check's one extra forward pass: the first batch again
                randomized = is_randomized(model.logits, x, logits)
            preds.append(logits.argmax(1).cpu())
    pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    correct = pred == data.y
    n_correct = int(correct.sum())
    report = EvalReport(n, n_correct, per_class_rate(correct, data.y, data.num_classes),
                        torch.bincount(data.y, minlength=data.num_classes).tolist(), randomized=randomized)
    total = n + n_correct * len(configs)
    done = n
    report_progress(done, total, "clean")
    idx_correct = correct.nonzero().flatten()
    worst: dict[tuple[str, float], torch.Tensor] = {}
    left: dict[tuple[str, str, float], torch.Tensor] = {}  # per suite and radius: what is still robust
    for cfg, suite in configs:
        t0 = time.perf_counter()
        robust = torch.zeros(n, dtype=torch.bool)
        queries = 0
        stage = f"{suite + ': ' if suite else ''}{cfg.method} {cfg.norm} eps={cfg.eps:g}"
        targets = left[(suite, cfg.norm, cfg.eps)].nonzero().flatten() if suite and (suite, cfg.norm, cfg.eps) in left \
            else idx_correct
        done += len(idx_correct) - len(targets)  # points an earlier attack of the suite broke: no work
        for start in range(0, len(targets), batch_size):
            rows = targets[start:start + batch_size]
            x = batch_float(data.x[rows]).to(device)
            y = data.y[rows].to(device)
            if surrogate is not None and cfg.method not in GRADIENT_FREE:
                crafted = attack(surrogate.logits, x, y, replace(cfg, seed=cfg.seed + start), box=data.box,
                                 early_stop=True, on_step=on_step)  # the surrogate's clean predictions are not known here
                with torch.no_grad():
                    fooled = model.logits(crafted.x_adv).argmax(1) != y
                out = replace(crafted, success=fooled, queries=None)
            else:
                # only clean-correct examples are attacked: their clean prediction is y
                out = attack(model.logits, x, y, replace(cfg, seed=cfg.seed + start), box=data.box, early_stop=True,
                             clean_pred=y, on_step=on_step)
                if randomized and cfg.eot <= 1:  # the pass that chose a point is no verdict on it: one fresh pass
                    with torch.no_grad():
                        out = replace(out, success=model.logits(out.x_adv).argmax(1) != y)
            robust[rows] = ~out.success.cpu()
            if out.queries is not None:
                queries += int(out.queries.sum())
            done += len(rows)
            report_progress(done, total, stage)
        report.rows.append(RobustRow(cfg, int(robust.sum()), n, n_correct,
                                     per_class_rate(robust, data.y, data.num_classes),
                                     time.perf_counter() - t0, robust, queries / max(len(targets), 1), suite,
                                     randomized))
        if suite:
            left[(suite, cfg.norm, cfg.eps)] = robust
        key = (cfg.norm, cfg.eps)
        worst[key] = worst[key] & robust if key in worst else robust.clone()
    report.worst_case = [WorstCaseRow(norm, eps, mask) for (norm, eps), mask in worst.items()]
    report.notes = randomness_notes(randomized, report.rows)
    report.wall_seconds = time.perf_counter() - t_start
    return report


MAX_CURVE_POINTS = 256


def minimal_distances(model: ModelWrapper, data: ArrayDataset, norm: str, *, steps: int = 100, batch_size: int = 256,
                      device: torch.device | str = "cpu", seed: int = 0,
                      on_progress: Optional[ProgressFn] = None) -> torch.Tensor:
    """The smallest adversarial perturbation FAB-T finds per example (float32 [N], in `norm`):
    0 where the model is wrong already, inf where none was found. Robust accuracy at any eps is
    then the fraction with distance > eps (an upper bound, like every attack's)."""
    from advex.engine.fab import fab

    model.eval()
    pred = clean_predictions(model, data, batch_size, device)
    distance = torch.zeros(len(data))
    idx = (pred == data.y).nonzero().flatten()
    for start in range(0, len(idx), batch_size):
        rows = idx[start:start + batch_size]
        x, y = batch_float(data.x[rows]).to(device), data.y[rows].to(device)
        res = fab(model.logits, x, y, norm=norm, eps=None, steps=steps, box=data.box, seed=seed + start,
                  early_stop=False)
        distance[rows] = res.distance.float().cpu()
        if on_progress is not None:
            on_progress(start + len(rows), len(idx), f"fab-t {norm} minimal distance")
    return distance


def robustness_curve(distance: torch.Tensor, max_points: int = MAX_CURVE_POINTS) -> list[tuple[float, int]]:
    """(eps, robust count) where the count changes: at eps = a distance d, the examples whose
    distance is <= d are broken. At most max_points points, evenly spread by rank."""
    finite = distance[torch.isfinite(distance) & (distance > 0)].unique()  # sorted
    if finite.numel() == 0:
        return []
    keep = torch.unique(torch.linspace(0, finite.numel() - 1, min(max_points, finite.numel())).round().long())
    return [(float(finite[k]), int((distance > finite[k]).sum())) for k in keep]


def gradient_masking_notes(rows: list[RobustRow]) -> list[str]:
    """Where a black-box attack breaks more examples than every white-box attack at the same
    (norm, eps), gradients are likely masked (Athalye et al., 2018): say so, with the numbers.
    On a randomized model (rows' `randomized`), attacks without EOT follow stochastic gradients,
    the third kind of obfuscated gradients there: say so too, naming them and the remedy."""
    notes = []
    no_eot = sorted({r.suite or r.config.method for r in rows if r.randomized and r.config.eot <= 1})
    if no_eot:
        notes.append(f"the model is randomized (its logits differ between passes on the same inputs): "
                     f"{', '.join(no_eot)} saw one random draw of it per step (stochastic gradients or scores, "
                     "Athalye et al. 2018) and may overstate its robustness; evaluate it with suite rand (APGD-CE "
                     "and APGD-DLR averaging 20 passes per step: expectation over transformation, EOT)")
    previous: dict[tuple[str, str, float], RobustRow] = {}
    for r in rows:  # in a suite, a black-box attack that breaks what the gradient attacks left
        key = (r.suite, r.config.norm, r.config.eps)
        before = previous.get(key)
        if r.suite and before is not None and r.config.method in GRADIENT_FREE and r.robust_correct < before.robust_correct:
            notes.append(f"gradient masking suspected at {r.config.norm} eps={r.config.eps:g}: in suite {r.suite}, "
                         f"black-box {r.config.method} broke {before.robust_correct - r.robust_correct} examples "
                         "that every white-box attack before it failed on")
        previous[key] = r
    standalone = [r for r in rows if not r.suite]  # suite rows are cumulative: not comparable one by one
    for norm, eps in sorted({(r.config.norm, r.config.eps) for r in standalone}):
        here = [r for r in standalone if (r.config.norm, r.config.eps) == (norm, eps)]
        black = [r for r in here if r.config.method in GRADIENT_FREE]
        white = [r for r in here if r.config.method not in GRADIENT_FREE]
        if not black or not white:
            continue
        b = min(black, key=lambda r: r.robust_correct)
        w = min(white, key=lambda r: r.robust_correct)
        if b.robust_correct < w.robust_correct:
            notes.append(f"gradient masking suspected at {norm} eps={eps:g}: black-box {b.config.method} leaves "
                         f"{b.robust_accuracy:.1%} robust, white-box {w.config.method} {w.robust_accuracy:.1%}; "
                         "trust the lower number")
    return notes
