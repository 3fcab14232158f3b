"""The paper's constructed training sets, as configurations of the one projected-gradient loop.

- D_R / D_NR (Ilyas et al. §3.1): representation inversion. For each (x, y), start from another
  training image (or noise) and minimize ||g(z) - g(x)||_2 over z in the box with normalized L2
  steps and no radius limit (FeatureMatching objective, L2Ball(inf)); keep y. g is the
  penultimate layer of a robust model (D_R) or of a standard one (D_NR).
- D_rand / D_det (§3.2): targeted L2 PGD toward t (uniformly random other class, or (y+1) mod C);
  label t.

Work is yielded batch by batch (a caller that stores it checkpoints every few batches: a
"shard"), and every random choice (start image, noise, target) is a function of the seed and the
example's index alone, so shard boundaries change nothing and a build started again at any batch
boundary (``start``) gives the rest of the dataset bit for bit: the same seed, the same dataset.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterator, Optional

import torch

from advex.engine.attacks import AttackConfig, attack
from advex.engine.data import ArrayDataset, batch_float
from advex.engine.models import ModelWrapper
from advex.engine.objectives import FeatureMatching
from advex.engine.optimize import optimize
from advex.engine.threat import L2Ball, per_example_norm

MODES = ("d_r", "d_nr", "d_rand", "d_det")


@dataclass(frozen=True)
class InversionConfig:
    """Representation inversion: the paper's CIFAR settings by default."""

    steps: int = 1000
    step_size: float = 0.1
    start: str = "image"  # "image": another training image; "noise": uniform noise in [0,1]
    eps: float = math.inf  # radius around the start image; inf = box only

    def validate(self) -> None:
        if self.steps < 1 or not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise ValueError("inversion needs steps >= 1 and a finite step_size > 0")
        if self.start not in ("image", "noise"):
            raise ValueError(f"start must be 'image' or 'noise', got {self.start!r}")
        if not self.eps > 0:
            raise ValueError("eps must be > 0 (inf for no radius limit)")


# D_rand / D_det: targeted L2 PGD, eps 0.5, step 0.1, 100 iterations, no random start (PAPER.md).
PAPER_RELABEL_ATTACK = AttackConfig(norm="L2", eps=0.5, method="pgd", steps=100, step_size=0.1,
                                    random_start=False, targeted=True)


@dataclass(frozen=True)
class BuildConfig:
    mode: str                                   # one of MODES
    inversion: InversionConfig = InversionConfig()
    attack: AttackConfig = PAPER_RELABEL_ATTACK
    seed: int = 0
    batch_size: int = 128
    shard_size: int = 4096                      # examples between checkpoints, rounded up to whole batches

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("batch_size and shard_size must be >= 1")
        if self.mode in ("d_r", "d_nr"):
            self.inversion.validate()
        elif not self.attack.targeted:
            raise ValueError("D_rand / D_det need a targeted attack")

    @property
    def shard_examples(self) -> int:
        return math.ceil(self.shard_size / self.batch_size) * self.batch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.mode in ("d_r", "d_nr"):
            d.pop("attack")
        else:
            d.pop("inversion")
        return d


@dataclass
class Shard:
    """One batch of the constructed dataset (examples start .. start + len(x))."""

    start: int                # index of its first example
    x: torch.Tensor           # float32 [S, ...] in the box
    y: torch.Tensor           # int64 [S]: y (D_R, D_NR) or the target t (D_rand, D_det)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # per-example diagnostics [S]


# ------------------------------------------------------------------ per-example randomness

def _example_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63 - 1))


def start_indices(n: int, seed: int) -> torch.Tensor:
    """For every example i, another example's index j != i (a seeded permutation with its
    fixed points moved one place on)."""
    if n < 2:
        raise ValueError("starting from another training image needs at least 2 examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fixed = perm == torch.arange(n)
    perm[fixed] = (perm[fixed] + 1) % n
    return perm


def relabel_targets(y: torch.Tensor, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    """D_det: (y + 1) mod C. D_rand: uniform over the classes other than y."""
    if mode == "d_det":
        return (y + 1) % num_classes
    shift = torch.randint(1, num_classes, y.shape, generator=torch.Generator().manual_seed(seed + 7919))
    return (y + shift) % num_classes


# ------------------------------------------------------------------ the builders

def invert(model: ModelWrapper, x_target: torch.Tensor, x_start: torch.Tensor, cfg: InversionConfig,
           box=(0.0, 1.0), on_step=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """z minimizing ||g(z) - g(x_target)|| from x_start. Returns z and per-example diagnostics:
    relative feature distance at the start and at z, and ||z - x_start||_2."""
    with torch.no_grad():
        target = model.features(x_target).flatten(1)
        # relative to ||g(x)||, floored at a millionth of the batch's mean norm: a target whose
        # representation is (nearly) empty must not turn the diagnostics into 1e12s
        norms = target.norm(dim=1)
        ref = norms.clamp_min(1e-6 * float(norms.mean()) + 1e-12)
        start_dist = (model.features(x_start).flatten(1) - target).norm(dim=1) / ref
    res = optimize(model.features, x_start, FeatureMatching(target), L2Ball(cfg.eps, box), cfg.steps,
                   cfg.step_size, x_init=x_start, on_step=on_step)
    return res.x, {"feature_distance_start": start_dist.cpu(), "feature_distance": (-res.score / ref).cpu(),
                   "l2_from_start": per_example_norm(res.x - x_start, 2.0).cpu()}


def build(model: ModelWrapper, data: ArrayDataset, cfg: BuildConfig, device: torch.device | str = "cpu",
          on_batch: Optional[Callable[[int, int], None]] = None,
          on_step: Optional[Callable[[int, int], None]] = None, start: int = 0) -> Iterator[Shard]:
    """Yield the constructed dataset batch by batch, from example ``start`` (0, or a batch
    boundary where an interrupted build stopped: the batches are the same as an uninterrupted
    build's). on_batch(done_examples, total) after each batch; on_step(step, steps) after every
    optimizer step (a cancellation point)."""
    cfg.validate()
    if cfg.mode in ("d_r", "d_nr") and not model.has_features:
        raise ValueError("representation inversion needs a model that exposes its penultimate layer (features)")
    if cfg.mode in ("d_r", "d_nr") and cfg.inversion.start == "noise" and data.box is None:
        raise ValueError("noise starts need image data in the [0,1] box")
    n = len(data)
    if not (0 <= start <= n and (start % cfg.batch_size == 0 or start == n)):
        raise ValueError(f"start must be a batch boundary in [0, {n}], got {start}")
    model.eval()
    starts = start_indices(n, cfg.seed) if cfg.mode in ("d_r", "d_nr") and cfg.inversion.start == "image" else None
    targets = relabel_targets(data.y, data.num_classes, cfg.mode, cfg.seed) if cfg.mode in ("d_rand", "d_det") else None
    for b0 in range(start, n, cfg.batch_size):
        rows = torch.arange(b0, min(b0 + cfg.batch_size, n))
        x = batch_float(data.x[rows]).to(device)
        if targets is not None:
            t = targets[rows].to(device)
            out = attack(model.logits, x, t, replace(cfg.attack, seed=cfg.seed + b0), box=data.box, on_step=on_step)
            piece = Shard(b0, out.x_adv.detach().cpu(), t.cpu(),
                          {"target_hit": out.success.cpu().float(), "l2": per_example_norm(out.x_adv - x, 2.0).cpu()})
        else:
            if starts is not None:
                x0 = batch_float(data.x[starts[rows]]).to(device)
            else:
                x0 = torch.stack([torch.rand(x.shape[1:], generator=_example_generator(cfg.seed, int(i)))
                                  for i in rows]).to(device)
            z, stats = invert(model, x, x0, cfg.inversion, data.box, on_step=on_step)
            piece = Shard(b0, z.detach().cpu(), data.y[rows].clone(), stats)
        if on_batch is not None:
            on_batch(int(rows[-1]) + 1, n)
        yield piece


def summarize(mode: str, stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """The diagnostics a researcher needs to trust a build."""
    if mode in ("d_rand", "d_det"):
        return {"target_hit_rate": float(stats["target_hit"].mean()), "mean_l2": float(stats["l2"].mean()),
                "max_l2": float(stats["l2"].max())}
    d = stats["feature_distance"]
    return {"feature_distance_mean": float(d.mean()), "feature_distance_p95": float(torch.quantile(d, 0.95)),
            "feature_distance_start_mean": float(stats["feature_distance_start"].mean()),
            "mean_l2_from_start": float(stats["l2_from_start"].mean())}


def build_all(model: ModelWrapper, data: ArrayDataset, cfg: BuildConfig, device="cpu") -> tuple[ArrayDataset, dict]:
    """The whole dataset in memory plus its diagnostics (library use and tests)."""
    shards = list(build(model, data, cfg, device))
    stats = {k: torch.cat([s.stats[k] for s in shards]) for k in shards[0].stats}
    out = ArrayDataset(torch.cat([s.x for s in shards]), torch.cat([s.y for s in shards]), data.num_classes,
                       data.domain, data.class_names)
    return out, summarize(cfg.mode, stats)
