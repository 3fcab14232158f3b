"""Request validation and conversion between protocol messages and engine settings.
Every error names the offending field (INVALID_ARGUMENT); a request over its work budget is
RESOURCE_EXHAUSTED naming the setting (check_cost)."""
from __future__ import annotations

import math

import numpy as np

from typing import Sequence, Union

from advex.engine.attacks import (APGD_METHODS, APGD_TARGET_CLASSES, GRADIENT_FREE, MAX_EOT, METHODS,
                                  MULTI_TARGETED, AttackConfig)
from advex.engine.builders import PAPER_RELABEL_ATTACK, BuildConfig, InversionConfig
from advex.engine.evaluate import SUITES, AttackSweep, suite_sweeps
from advex.engine.stats import clopper_pearson
from advex.engine.train import PRESETS, SCHEDULES, TrainConfig, preset
from advex.service.config import ServerConfig, env_name, flag_name
from advex.service.errors import exhausted, invalid
from advex.service.text import quote
from advex.v1 import resources_pb2 as res
from advex.v1 import results_pb2 as results
from advex.v1 import robustness_pb2 as rpc
from advex.v1.wire import WireError, from_tensor

NORM_NAMES = {results.L2: "L2", results.LINF: "Linf"}
NORM_ENUM = {v: k for k, v in NORM_NAMES.items()}


def check_eps(eps: float, norm: str, field: str, dim: int, boxed: bool) -> None:
    if not (math.isfinite(eps) and eps > 0):
        raise invalid(field, f"must be a finite number > 0, got {eps}")
    if boxed:
        # Beyond these radii the ball contains the whole [0,1] box: no threat model left to test.
        limit = 1.0 if norm == "Linf" else math.sqrt(dim)
        if eps > limit:
            raise invalid(field, f"{norm} eps {eps} exceeds {limit:g}, the diameter of the [0,1] box")


def _wire(tensor, field: str) -> np.ndarray:
    """A request's tensor as an array; a malformed one is INVALID_ARGUMENT naming its field."""
    try:
        return from_tensor(tensor, field)
    except WireError as exc:
        raise invalid(exc.field, str(exc).split(": ", 1)[1]) from exc


def per_example_eps(request: rpc.AttackRequest, cfg: AttackConfig, n: int, dim: int, boxed: bool) -> np.ndarray | None:
    """An Attack's radii, one per example (float32 [n]), or None when it has one (attack.eps).
    Each is checked as attack.eps is; attack.eps must then be left 0. Methods other than PGD and
    FGSM run once per distinct radius: at most MAX_EPS_PER_SWEEP of them."""
    if not request.HasField("eps"):
        return None
    eps = _wire(request.eps, "eps")
    if eps.dtype != np.float32 or eps.shape != (n,):
        raise invalid("eps", f"expected float32 [{n}] (a radius per example), got {request.eps.dtype} {list(eps.shape)}")
    if request.attack.eps:
        raise invalid("attack.eps", "leave it 0 when eps gives a radius per example")
    worst = int(np.argmax(np.where(np.isfinite(eps), eps, np.inf)))  # a non-finite one first, else the largest
    check_eps(float(eps[worst]), cfg.norm, f"eps[{worst}]", dim, boxed)
    smallest = int(np.argmin(eps))
    check_eps(float(eps[smallest]), cfg.norm, f"eps[{smallest}]", dim, boxed)
    distinct = len(np.unique(eps))
    if cfg.method not in ("pgd", "fgsm") and distinct > MAX_EPS_PER_SWEEP:
        raise invalid("eps", f"{cfg.method} runs once per distinct radius: at most {MAX_EPS_PER_SWEEP} of them, "
                             f"got {distinct} (pgd and fgsm take any number)")
    return eps


def attack_config(spec: results.AttackSpec, field: str, cfg: ServerConfig, dim: int, boxed: bool,
                  check_radius: bool = True) -> AttackConfig:
    if spec.norm not in NORM_NAMES:
        raise invalid(f"{field}.norm", "required: L2 or LINF")
    norm = NORM_NAMES[spec.norm]
    method = spec.method.lower() or "pgd"
    if method not in METHODS:
        raise invalid(f"{field}.method", f"unknown method {spec.method!r}; expected one of {list(METHODS)}")
    if check_radius:
        check_eps(spec.eps, norm, f"{field}.eps", dim, boxed)
    if not 0 <= spec.steps <= cfg.max_steps:
        raise invalid(f"{field}.steps", f"must be in [0, {cfg.max_steps}] (0 = default), got {spec.steps}")
    if not 0 <= spec.restarts <= cfg.max_restarts:
        raise invalid(f"{field}.restarts", f"must be in [0, {cfg.max_restarts}], got {spec.restarts}")
    if not (math.isfinite(spec.step_size) and spec.step_size >= 0):
        raise invalid(f"{field}.step_size", f"must be finite and >= 0 (0 = default), got {spec.step_size}")
    if (method in APGD_METHODS or method == "fab-t") and spec.targeted:
        raise invalid(f"{field}.targeted", f"{method} measures untargeted robustness (apgd-t picks its own target "
                                           "classes); targeted attacks are pgd and fgsm")
    eot = int(spec.eot)
    if not 0 <= eot <= MAX_EOT:
        raise invalid(f"{field}.eot", f"must be in [0, {MAX_EOT}] (0 = 1 pass per step), got {eot}")
    if eot > 1 and method not in APGD_METHODS:
        raise invalid(f"{field}.eot", f"expectation over transformation is for {', '.join(APGD_METHODS)}, not {method}")
    return AttackConfig(norm=norm, eps=spec.eps, method=method, steps=spec.steps, step_size=spec.step_size,
                        random_start=spec.random_start if spec.HasField("random_start") else None,
                        restarts=spec.restarts, targeted=spec.targeted, seed=spec.seed, eot=eot)


def attack_spec(cfg: AttackConfig) -> results.AttackSpec:
    spec = results.AttackSpec(method=cfg.method, norm=NORM_ENUM[cfg.norm], eps=cfg.eps, step_size=cfg.step_size,
                              steps=cfg.steps, random_start=bool(cfg.random_start), restarts=cfg.restarts,
                              targeted=cfg.targeted, seed=cfg.seed)
    if cfg.eot > 1:  # unset = one pass per step
        spec.eot = cfg.eot
    return spec


MAX_SWEEPS = 32          # attacks of one Evaluate
MAX_EPS_PER_SWEEP = 64   # radii of one of them


def sweeps(request: rpc.EvaluateRequest, cfg: ServerConfig, dim: int, boxed: bool) -> list[AttackSweep]:
    if len(request.attacks) > MAX_SWEEPS:
        raise invalid("attacks", f"at most {MAX_SWEEPS} attacks, got {len(request.attacks)}")
    if request.suite and request.suite not in SUITES:
        raise invalid("suite", f"unknown suite {quote(request.suite)}; expected one of {sorted(SUITES)}")
    if request.suite and not request.attacks:
        raise invalid("attacks", f"suite {request.suite!r} needs the radii: give attacks with a norm and eps")
    out = []
    for i, sweep in enumerate(request.attacks):
        field = f"attacks[{i}]"
        if len(sweep.eps) > MAX_EPS_PER_SWEEP:
            raise invalid(f"{field}.eps", f"at most {MAX_EPS_PER_SWEEP} radii, got {len(sweep.eps)}")
        if sweep.attack.targeted:
            raise invalid(f"{field}.attack.targeted", "Evaluate measures untargeted robust accuracy")
        base = attack_config(sweep.attack, f"{field}.attack", cfg, dim, boxed, check_radius=not sweep.eps)
        for j, eps in enumerate(sweep.eps):
            check_eps(eps, base.norm, f"{field}.eps[{j}]", dim, boxed)
        radii = tuple(float(e) for e in sweep.eps) or (base.eps,)
        if request.suite:
            spec = sweep.attack
            if (spec.method or spec.steps or spec.restarts or spec.step_size or spec.HasField("random_start")
                    or spec.eot):
                raise invalid(f"{field}.attack", f"with suite {request.suite!r} give only norm, eps and seed: the "
                                                 "suite fixes its attacks and their settings")
            out += suite_sweeps(request.suite, base.norm, radii, seed=base.seed)
        else:
            out.append(AttackSweep(base, tuple(float(e) for e in sweep.eps)))
    return out


def distance_norms(request: rpc.EvaluateRequest) -> list[str]:
    """EvaluateRequest.minimal_distance as norm names: each L2 or LINF, each once."""
    norms = []
    for k, norm in enumerate(request.minimal_distance):
        if norm not in NORM_NAMES:
            raise invalid(f"minimal_distance[{k}]", "must be L2 or LINF")
        if NORM_NAMES[norm] in norms:
            raise invalid(f"minimal_distance[{k}]", f"{NORM_NAMES[norm]} is listed twice")
        norms.append(NORM_NAMES[norm])
    return norms


def inline_batch(request: rpc.AttackRequest, model: res.Model, cfg: ServerConfig) -> tuple[np.ndarray, np.ndarray]:
    """x as float32 (uint8 scaled to [0,1]) and y as int64, both checked against the model."""
    x = _wire(request.x, "x")
    y = _wire(request.y, "y")
    shape = tuple(model.spec.input_shape)
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != shape:
        raise invalid("x", f"expected shape [N, {', '.join(map(str, shape))}] for model {model.id!r}, got {list(x.shape)}")
    n = x.shape[0]
    if n == 0:
        raise invalid("x", "empty batch")
    if n > cfg.max_batch:
        raise invalid("x", f"batch of {n} exceeds the inline limit of {cfg.max_batch}; use Evaluate for datasets")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif x.dtype != np.float32:
        raise invalid("x", f"dtype must be float32 or uint8, got {request.x.dtype}")
    elif not np.isfinite(x).all():
        raise invalid("x", "contains NaN or infinite values")
    elif request.domain == res.IMAGE and (x.min() < 0 or x.max() > 1):
        raise invalid("x", "IMAGE-domain values must be in [0, 1] (send domain=REAL for unbounded features)")
    if y.dtype != np.int64 or y.shape != (n,):
        raise invalid("y", f"expected int64 [{n}], got {request.y.dtype} {list(y.shape)}")
    if y.min() < 0 or y.max() >= model.spec.num_classes:
        raise invalid("y", f"labels must be in [0, {model.spec.num_classes})")
    return x, y


def train_config(request: rpc.TrainRequest, cfg: ServerConfig, dim: int, boxed: bool) -> TrainConfig:
    if request.preset and request.preset not in PRESETS:
        raise invalid("preset", f"unknown preset {request.preset!r}; expected one of {sorted(PRESETS)}")
    overrides: dict = {"seed": int(request.seed)}
    for name in ("epochs", "batch_size", "lr_step_epochs"):
        value = getattr(request, name)
        if value < 0:
            raise invalid(name, f"must be >= 0 (0 = preset/default), got {value}")
        if value:
            overrides[name] = int(value)
    for name in ("lr", "momentum", "weight_decay", "lr_gamma", "augment"):
        if request.HasField(name):
            overrides[name] = getattr(request, name)
    for name in ("lr", "momentum", "weight_decay", "lr_gamma"):
        if name in overrides and not (math.isfinite(overrides[name]) and overrides[name] >= 0):
            raise invalid(name, f"must be finite and >= 0, got {overrides[name]}")
    if request.schedule:
        if request.schedule not in SCHEDULES:
            raise invalid("schedule", f"must be one of {list(SCHEDULES)}, got {request.schedule!r}")
        overrides["schedule"] = request.schedule
    if request.HasField("adversarial"):
        if request.adversarial.targeted:
            raise invalid("adversarial.targeted", "adversarial training uses an untargeted inner loop")
        overrides["adversarial"] = attack_config(request.adversarial, "adversarial", cfg, dim, boxed)
    tc = preset(request.preset, **overrides)
    if tc.epochs > 10000 or tc.batch_size > 65536:
        raise invalid("epochs" if tc.epochs > 10000 else "batch_size", "too large")
    try:
        tc.validate()
    except ValueError as exc:
        raise invalid("lr" if "lr" in str(exc) else "epochs", str(exc)) from exc
    return tc


def shapes_match(model: res.Model, dataset: res.Dataset, field: str = "dataset_id") -> None:
    if list(model.spec.input_shape) != list(dataset.example_shape):
        raise invalid(field, f"dataset {dataset.id!r} has examples of shape {list(dataset.example_shape)}, "
                             f"model {model.id!r} expects {list(model.spec.input_shape)}")
    if dataset.num_classes > model.spec.num_classes:
        raise invalid(field, f"dataset {dataset.id!r} has {dataset.num_classes} classes, "
                             f"model {model.id!r} only {model.spec.num_classes}")


def inversion_config(spec: rpc.InversionSpec, field: str, cfg: ServerConfig, boxed: bool) -> InversionConfig:
    """Unset fields take the paper's values: 1000 steps of 0.1 from another image, no radius."""
    if not 0 <= spec.steps <= cfg.max_steps:
        raise invalid(f"{field}.steps", f"must be in [0, {cfg.max_steps}] (0 = 1000), got {spec.steps}")
    for name in ("step_size", "eps"):
        value = getattr(spec, name)
        if not (math.isfinite(value) and value >= 0):
            raise invalid(f"{field}.{name}", f"must be finite and >= 0 (0 = default), got {value}")
    start = spec.start or "image"
    if start not in ("image", "noise"):
        raise invalid(f"{field}.start", f"must be 'image' or 'noise', got {spec.start!r}")
    if start == "noise" and not boxed:
        raise invalid(f"{field}.start", "noise starts need IMAGE-domain data (uniform noise in [0,1])")
    return InversionConfig(steps=spec.steps or 1000, step_size=spec.step_size or 0.1, start=start,
                           eps=spec.eps or math.inf)


def relabel_attack(spec: results.AttackSpec, field: str, cfg: ServerConfig, dim: int, boxed: bool) -> AttackConfig:
    """D_rand / D_det attack: unset fields take the paper's values; always targeted."""
    paper = PAPER_RELABEL_ATTACK
    filled = results.AttackSpec()
    filled.CopyFrom(spec)
    filled.norm = spec.norm or NORM_ENUM[paper.norm]
    filled.eps = spec.eps or paper.eps
    filled.steps = spec.steps or paper.steps
    filled.step_size = spec.step_size or paper.step_size
    if not spec.HasField("random_start"):
        filled.random_start = bool(paper.random_start)
    filled.targeted = True
    return attack_config(filled, field, cfg, dim, boxed)


def build_sizes(batch_size: int, shard_size: int) -> tuple[int, int]:
    if not 0 <= batch_size <= 4096:
        raise invalid("batch_size", f"must be in [0, 4096] (0 = 128), got {batch_size}")
    if not 0 <= shard_size <= 1_000_000:
        raise invalid("shard_size", f"must be in [0, 1000000] (0 = 4096), got {shard_size}")
    return batch_size or 128, shard_size or 4096


# ---------------------------------------------------------------------- work budgets
Work = Union[AttackConfig, InversionConfig, BuildConfig, TrainConfig]


def examples_in(dataset: res.Dataset, split: str, limit: int) -> int:
    """How many examples a dataset request works on: min(limit or the split's size, the split's size)."""
    size = int(dataset.splits[split])
    return min(int(limit) or size, size)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _per_example(item: Work) -> tuple[int, str]:
    """(example-steps per example, how they come about) of one piece of work."""
    if isinstance(item, AttackConfig):
        a = item.resolved()
        if a.method in GRADIENT_FREE:  # Square: `steps` is the query budget, one forward pass each
            return a.steps, f"{a.method} {a.steps:,} {'query' if a.steps == 1 else 'queries'}"
        runs = (a.restarts + 1) * (APGD_TARGET_CLASSES if a.method in MULTI_TARGETED else 1)  # a run per target
        how = f"{a.method} {_plural(a.steps, 'step')}" + (f" × {runs:,} runs" if runs > 1 else "")
        return a.steps * runs * a.eot, how + (f" × {a.eot} EOT passes" if a.eot > 1 else "")
    if isinstance(item, InversionConfig):
        return item.steps, f"inversion {_plural(item.steps, 'step')}"
    if isinstance(item, BuildConfig):
        return _per_example(item.inversion if item.mode in ("d_r", "d_nr") else item.attack)
    if isinstance(item, TrainConfig):
        inner, how = _per_example(item.adversarial) if item.adversarial is not None else (0, "")
        epochs = _plural(item.epochs, "epoch")
        return item.epochs * (inner + 1), f"{epochs} × ({how} + 1)" if inner else epochs
    raise TypeError(f"no cost for {type(item).__name__}")


def check_cost(cfg: ServerConfig, setting: str, examples: int, work: Sequence[Work], *, sources: int = 1) -> int:
    """The one measure of a request's work: example-steps (one forward and backward pass of one
    example, or one query of a black-box attack), summed over every attack, inversion or training
    run the request asks for and multiplied by its examples (and, for TransferRate, its source
    models). Over `setting` (max_attack_cost, max_operation_cost): RESOURCE_EXHAUSTED naming it.
    Returns the cost."""
    parts = [_per_example(item) for item in work]
    total = examples * sources * sum(n for n, _ in parts)
    limit = getattr(cfg, setting)
    if total <= limit:
        return total
    grouped: dict[str, int] = {}
    for _, how in parts:
        grouped[how] = grouped.get(how, 0) + 1
    terms = [how if k == 1 else f"{k} × {how}" for how, k in grouped.items()]
    if len(terms) > 6:
        terms = terms[:6] + [f"{len(terms) - 6} more"]
    what = " + ".join(terms)
    factors = [_plural(examples, "example")] + ([_plural(sources, "source model")] if sources != 1 else [])
    factors.append(what if len(terms) == 1 else f"({what})")
    fewer = ("fewer examples, steps or restarts (Evaluate takes datasets)" if setting == "max_attack_cost"
             else "fewer examples (limit), attacks, steps, restarts or epochs")
    raise exhausted(f"cost {total:,} example-steps ({' × '.join(factors)}) exceeds {setting} {limit:,} "
                    f"({flag_name(setting)}, {env_name(setting)}): ask for {fewer}")


def interval(target, k: int, n: int) -> None:
    """Fill an advex.v1.Interval message with the 95% Clopper-Pearson interval of k of n
    (left unset when n is 0)."""
    bounds = clopper_pearson(k, n)
    if bounds is not None:
        target.lower, target.upper = bounds
