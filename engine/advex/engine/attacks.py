"""Attacks: FGSM and PGD as configurations of the projected-gradient loop (L2 and Linf,
untargeted or targeted, with restarts), APGD (Croce & Hein 2020: APGD-CE, APGD-DLR and APGD-T,
advex.engine.apgd), targeted FAB (FAB-T, minimal norm, advex.engine.fab) and the black-box Square
attack."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional, Sequence

import torch

from advex.engine.apgd import MAX_EOT  # noqa: F401  (re-exported: the service validates against it)
from advex.engine.objectives import CrossEntropyTargeted, CrossEntropyUntargeted, Forward
from advex.engine.optimize import StepCallback, optimize
from advex.engine.threat import Box, Radius, SegmentedGenerator, make_threat_model

# loss, multi-targeted (apgd runs DLR as cross-entropy on models with too few classes for it)
APGD_METHODS = {"apgd-ce": ("ce", False), "apgd-dlr": ("dlr", False), "apgd-t": ("dlr", True)}
METHODS = ("pgd", "fgsm", "square") + tuple(APGD_METHODS) + ("fab-t",)
GRADIENT_FREE = ("square",)
APGD_TARGET_CLASSES = 9  # APGD-T and FAB-T: the classes with the highest clean logits other than the true one
MULTI_TARGETED = ("apgd-t", "fab-t")  # a run per target class
NORMS = ("L2", "Linf")


@dataclass(frozen=True)
class AttackConfig:
    """An attack's full settings. Zero / None fields take defaults in ``resolved()``."""

    norm: str = "Linf"
    eps: float = 8 / 255
    method: str = "pgd"
    steps: int = 0
    step_size: float = 0.0
    random_start: Optional[bool] = None
    restarts: int = 0
    targeted: bool = False
    seed: int = 0
    eot: int = 0  # APGD only: forward+backward samples averaged per step (randomized models); 0 = 1

    def resolved(self) -> "AttackConfig":
        """Fill defaults: PGD 10 steps of 2.5*eps/steps with a random start (Madry et al.);
        FGSM one step of eps from x. eot (expectation over transformation, Athalye et al. 2018):
        APGD averages each step's loss and gradient over `eot` passes of a randomized model
        (AutoAttack's version='rand' uses 20); 0 = 1, at most MAX_EOT; other methods refuse eot > 1."""
        method = self.method.lower() or "pgd"
        if method not in METHODS:
            raise ValueError(f"unknown attack method {self.method!r}; expected one of {METHODS}")
        norm = {"l2": "L2", "linf": "Linf"}.get(self.norm.lower())
        if norm is None:
            raise ValueError(f"unknown norm {self.norm!r}; expected 'L2' or 'Linf'")
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be finite and >= 0, got {self.eps}")
        eot = self.eot or 1
        if not 1 <= eot <= MAX_EOT:
            raise ValueError(f"eot must be in [1, {MAX_EOT}] (0 = 1), got {self.eot}")
        if eot > 1 and method not in APGD_METHODS:
            raise ValueError(f"eot (expectation over transformation) is supported by {tuple(APGD_METHODS)} only, "
                             f"not {method}")
        if method == "fgsm":
            steps = 1
            step_size = self.step_size or self.eps
            random_start = bool(self.random_start)
        elif method == "square":  # steps = query budget per example; no gradient steps
            steps = self.steps or 1000
            step_size = 0.0
            random_start = True
        elif method in APGD_METHODS or method == "fab-t":  # parameter-free (APGD's schedule, FAB's projections)
            if self.targeted:
                raise ValueError(f"{method} measures untargeted robustness (APGD-T picks its own target classes); "
                                 "targeted=True is for pgd and fgsm")
            steps = self.steps or 100
            step_size = 0.0
            random_start = True
        else:
            steps = self.steps or 10
            step_size = self.step_size or 2.5 * self.eps / steps
            random_start = True if self.random_start is None else self.random_start
        return replace(self, method=method, norm=norm, steps=steps, step_size=step_size,
                       random_start=random_start, eot=eot)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AttackOutput:
    x_adv: torch.Tensor       # float32, same shape as x
    success: torch.Tensor     # bool [N]: misclassified (untargeted) / target hit (targeted)
    clean_pred: torch.Tensor  # int64 [N]
    adv_pred: torch.Tensor    # int64 [N]
    distance: torch.Tensor    # float32 [N], ||x_adv - x|| in the attack's norm
    config: AttackConfig      # resolved settings
    queries: Optional[torch.Tensor] = None  # int64 [N], model queries (black-box attacks)


@torch.no_grad()
def predict(forward: Forward, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """argmax predictions, int64 [N]."""
    return torch.cat([forward(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def attack(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    config: AttackConfig,
    *,
    box: Box = (0.0, 1.0),
    early_stop: bool = False,
    on_step: Optional[StepCallback] = None,
    clean_pred: Optional[torch.Tensor] = None,
    clean: bool = True,
    eps: Optional[torch.Tensor] = None,
    segments: Optional[Sequence[int]] = None,
) -> AttackOutput:
    """Adversarial examples for one batch.

    forward: maps float32 [N, ...] inputs in the box to logits [N, C].
    y: int64 [N], true labels (untargeted) or target classes (targeted).
    clean_pred: the model's predictions on x when the caller already has them (saves a forward pass).
    clean=False: the caller has no use for clean predictions (adversarial training): PGD and FGSM
    spend no pass on them, and clean_pred is -1 where the loop did not see x itself.
    Passes of PGD-K (and FGSM, K=1): K forward+backward and one forward for the last iterate; the
    adversarial prediction comes with the best iterate, the clean one from the first pass when it
    is at x (no random start), else from one more forward unless given or not wanted.
    on_step(step, total): called after every step of every run (PGD, FGSM's one step) and after
    every query round of Square; an exception raised in it stops the attack there (the service
    raises one when the caller has gone away, so no more than one step runs on for nobody).
    Verdicts (success, adv_pred) are those of the pass that chose each point: exact for a deterministic
    model; on a randomized one they favour the attack unless eot > 1 (evaluate scores such points again).
    eps: float32 [N], a radius per example, in place of config.eps (which should be 0; a step_size
    of 0 then means the default per example: 2.5 * eps_i / steps for PGD, eps_i for FGSM). PGD and
    FGSM run the batch as one; the other methods run once per distinct radius.
    segments: PGD and FGSM on a batch merged from requests of these sizes (in order): each draws its
    random start from its own generator seeded with config.seed, as it would alone.
    """
    if eps is not None or segments is not None:
        return _attack_per_example(forward, x, y, config, eps, segments, box=box, early_stop=early_stop,
                                   on_step=on_step, clean_pred=clean_pred, clean=clean)
    cfg = config.resolved()
    threat = make_threat_model(cfg.norm, cfg.eps, box)
    if cfg.method == "square":
        from advex.engine.square import square_attack

        res = square_attack(forward, x, y, norm=cfg.norm, eps=cfg.eps, queries=cfg.steps, targeted=cfg.targeted,
                            box=box, seed=cfg.seed, on_step=on_step, compact_every=1 if _black_box(forward) else None)
        if clean_pred is None:  # Square never queries x itself: one forward, unless not wanted
            clean_pred = predict(forward, x) if clean else torch.full_like(y, -1)
        adv_pred = res.pred  # from the query that scored the returned point: no pass
        success = adv_pred == y if cfg.targeted else adv_pred != y
        return AttackOutput(res.x, success, clean_pred, adv_pred, threat.distance(res.x, x), cfg, res.queries)
    if cfg.method in APGD_METHODS:
        from advex.engine.apgd import apgd

        loss, multi_targeted = APGD_METHODS[cfg.method]
        res = apgd(forward, x, y, norm=cfg.norm, eps=cfg.eps, steps=cfg.steps, restarts=cfg.restarts, loss=loss,
                   targeted=multi_targeted, target_classes=APGD_TARGET_CLASSES, box=box, seed=cfg.seed,
                   early_stop=early_stop, on_step=on_step, eot=cfg.eot,
                   clean_pred=clean_pred if cfg.eot == 1 else None)
        if cfg.eot > 1:  # a randomized model: x and the returned point each scored by one fresh pass
            clean_pred = predict(forward, x) if clean_pred is None else clean_pred
            adv_pred = predict(forward, res.x)
        else:  # both come with apgd's own passes (its clean pass is at x)
            clean_pred = res.clean_pred if clean_pred is None else clean_pred
            adv_pred = res.pred
        return AttackOutput(res.x, adv_pred != y, clean_pred, adv_pred, threat.distance(res.x, x), cfg)
    if cfg.method == "fab-t":  # minimal-norm; what it finds beyond eps is no adversarial example here
        from advex.engine.fab import fab

        res = fab(forward, x, y, norm=cfg.norm, eps=cfg.eps, steps=cfg.steps, restarts=cfg.restarts,
                  target_classes=APGD_TARGET_CLASSES, box=box, seed=cfg.seed, early_stop=early_stop, on_step=on_step)
        inside = res.success.view(-1, *([1] * (x.dim() - 1)))
        x_adv = torch.where(inside, res.x, x)
        # fab's first pass is at x; x_adv is res.x or x, each with its prediction: no pass
        clean_pred = res.clean_pred if clean_pred is None else clean_pred
        adv_pred = torch.where(res.success, res.pred, res.clean_pred)
        return AttackOutput(x_adv, adv_pred != y, clean_pred, adv_pred, threat.distance(x_adv, x), cfg)
    gen = torch.Generator(device=_generator_device(x)).manual_seed(cfg.seed)
    return _pgd(forward, x, y, cfg, cfg.eps, cfg.step_size, gen, box=box, early_stop=early_stop, on_step=on_step,
                clean_pred=clean_pred, clean=clean)


def _black_box(forward: Forward) -> bool:
    """Whether forward is (a method of) a model without gradients: an ONNX graph, an endpoint."""
    return not getattr(getattr(forward, "__self__", forward), "has_gradients", True)


def _generator_device(x: torch.Tensor) -> str | torch.device:
    return x.device if x.device.type == "cuda" else "cpu"


def _pgd(forward: Forward, x: torch.Tensor, y: torch.Tensor, cfg: AttackConfig, radius: Radius, step_size: Radius,
         generator: torch.Generator | SegmentedGenerator, *, box: Box, early_stop: bool,
         on_step: Optional[StepCallback], clean_pred: Optional[torch.Tensor], clean: bool) -> AttackOutput:
    """PGD and FGSM (cfg resolved): the projected-gradient loop with one radius or one per example.
    The adversarial prediction is the best iterate's (no pass); the clean one is free when the first
    pass was at x, else one forward unless given or not wanted."""
    threat = make_threat_model(cfg.norm, radius, box)
    objective = CrossEntropyTargeted(y) if cfg.targeted else CrossEntropyUntargeted(y)
    res = optimize(forward, x, objective, threat, cfg.steps, step_size, random_start=cfg.random_start,
                   restarts=cfg.restarts, generator=generator, early_stop=early_stop, on_step=on_step)
    if clean_pred is None:
        clean_pred = res.first_pred if res.first_pred is not None else (
            predict(forward, x) if clean else torch.full_like(y, -1))
    success = res.pred == y if cfg.targeted else res.pred != y
    return AttackOutput(res.x, success, clean_pred, res.pred, threat.distance(res.x, x), cfg)


def _attack_per_example(forward: Forward, x: torch.Tensor, y: torch.Tensor, config: AttackConfig,
                        eps: Optional[torch.Tensor], segments: Optional[Sequence[int]], **kwargs) -> AttackOutput:
    """attack() with per-example radii and/or merged segments (see attack). The radii's values are
    checked where they are used (the threat model; AttackConfig for one run per radius)."""
    cfg = config.resolved()
    n = len(x)
    if segments is not None and sum(segments) != n:
        raise ValueError(f"segments {list(segments)} do not add up to the batch of {n}")
    if eps is not None:
        eps = eps.to(device=x.device, dtype=torch.float32)
        if eps.shape != (n,):
            raise ValueError(f"per-example eps must have shape [{n}], got {list(eps.shape)}")
    if cfg.method not in ("pgd", "fgsm"):
        if segments is not None and len(segments) > 1:
            raise ValueError(f"merged batches (segments) are for pgd and fgsm, not {cfg.method}")
        if eps is None:
            return attack(forward, x, y, config, **kwargs)
        return _attack_by_radius(forward, x, y, config, eps, **kwargs)
    radius, step_size = cfg.eps, cfg.step_size
    if eps is not None:  # a step_size of 0 is each radius' default
        radius, step_size = eps, config.step_size or (eps if cfg.method == "fgsm" else 2.5 * eps / cfg.steps)
    gen = SegmentedGenerator(list(segments) if segments is not None else [n], cfg.seed, _generator_device(x))
    return _pgd(forward, x, y, cfg, radius, step_size, gen, **kwargs)


def _attack_by_radius(forward: Forward, x: torch.Tensor, y: torch.Tensor, config: AttackConfig, eps: torch.Tensor,
                      **kwargs) -> AttackOutput:
    """A method without per-example radii (APGD, FAB, Square) run once per distinct radius."""
    radii = torch.unique(eps)
    clean_pred = kwargs.pop("clean_pred")
    parts = []
    for r in radii.tolist():
        rows = (eps == r).nonzero().flatten()
        given = clean_pred[rows] if clean_pred is not None else None
        parts.append((rows, attack(forward, x[rows], y[rows], replace(config, eps=r), clean_pred=given, **kwargs)))
    first = parts[0][1]

    def gather(field: str) -> Optional[torch.Tensor]:
        if getattr(first, field) is None:
            return None
        out = torch.empty((len(x),) + getattr(first, field).shape[1:], dtype=getattr(first, field).dtype,
                          device=x.device)
        for rows, part in parts:
            out[rows] = getattr(part, field)
        return out

    return AttackOutput(gather("x_adv"), gather("success"), gather("clean_pred"), gather("adv_pred"),
                        gather("distance"), replace(first.config, eps=config.eps), gather("queries"))
