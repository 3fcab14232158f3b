"""Standard and adversarial training (Madry et al. inner loop), deterministic on CPU
given a seed: SGD with momentum and weight decay, step / cosine / constant schedules,
optional random-crop + flip augmentation. Training can stop at any batch boundary and go on
from a ``TrainState`` exactly as if it had never stopped (the weights come out bit for bit the
same on CPU): the state holds the weights, the momentum buffers, the epoch's order, the random
generators and the running sums (and, in fp16, the gradient scaler's state).

Mixed precision (``train(..., precision=)``, the values of models.PRECISIONS): "bf16" runs the
network's forward and backward under bf16 autocast, "fp16" under fp16 autocast with a
torch.amp.GradScaler on the parameter gradients (the loss scaled up before backward, the gradients
unscaled before the step, a step with an inf or nan gradient skipped and the scale lowered, as
GradScaler does), "auto" is bf16 / fp16 / fp32 by the training device (models.resolve_precision).
The parameters (master weights), their gradients, the loss and the optimizer state stay fp32; on
CUDA a convolutional network runs channels-last. The adversarial inner attack runs at the same
precision (the wrapper's set_precision, which the model keeps after training). "fp32", the
default, is the plain fp32 loop, bit for bit as without the option."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from advex.engine.attacks import AttackConfig, attack
from advex.engine.data import ArrayDataset, batch_float
from advex.engine.models import ModelWrapper, resolve_precision

SCHEDULES = ("step", "cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    lr_step_epochs: int = 50
    lr_gamma: float = 0.1
    augment: bool = False
    adversarial: Optional[AttackConfig] = None  # inner-loop attack for adversarial training
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule == "step" and self.lr_step_epochs < 1:
            raise ValueError("lr_step_epochs must be >= 1 for the step schedule")

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's CIFAR-10 settings (PAPER.md) and a quick preset for CPU runs.
PAPER_CIFAR = dict(epochs=150, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4,
                   schedule="step", lr_step_epochs=50, lr_gamma=0.1, augment=True)
PRESETS: dict[str, dict] = {
    "cifar10_standard": PAPER_CIFAR,
    "cifar10_l2_robust": dict(PAPER_CIFAR, adversarial=AttackConfig(
        norm="L2", eps=0.5, steps=7, step_size=0.1, random_start=True)),
    "quick": dict(epochs=2, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4,
                  schedule="cosine", augment=False),
}


def preset(name: str, **overrides) -> TrainConfig:
    if name and name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return replace(TrainConfig(**PRESETS.get(name, {})), **overrides)


@dataclass
class EpochStats:
    epoch: int
    train_loss: float
    train_accuracy: float
    train_robust_accuracy: float  # accuracy on inner-loop adversarial examples (nan if standard)
    lr: float
    wall_seconds: float


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate for epoch (0-based)."""
    if cfg.schedule == "step":
        return cfg.lr * cfg.lr_gamma ** (epoch // cfg.lr_step_epochs)
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.lr


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding 4 for 32x32, 2 for smaller) + horizontal flip. x: [N,C,H,W] on any
    device; the offsets and flips are drawn from `generator` (CPU, so runs repeat on any device) and
    applied to the whole batch at once with one gather where x is."""
    n, c, h, w = x.shape
    pad = 4 if h >= 32 else 2
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)                     # [n, h]
    cols = (dx[:, None] + torch.where(flip[:, None], torch.arange(w - 1, -1, -1), torch.arange(w))).to(x.device)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


@dataclass
class TrainState:
    """Where a training run stands at a batch boundary: enough to go on bit for bit."""

    epoch: int                          # the epoch in progress, 0-based (cfg.epochs: finished)
    position: int                       # examples of that epoch already trained
    batches: int                        # batches trained in all
    order: Optional[torch.Tensor]       # that epoch's permutation (None before it starts)
    loss_sum: float
    correct: int
    robust_correct: int
    generator: torch.Tensor             # state of the run's generator (order, augmentation, attack seeds)
    global_rng: torch.Tensor            # torch's global CPU generator state
    weights: dict[str, torch.Tensor]    # the model's state_dict
    momentum: dict[int, torch.Tensor]   # SGD momentum buffer per parameter index
    history: list[EpochStats] = field(default_factory=list)
    scaler: dict = field(default_factory=dict)  # fp16: the GradScaler's state_dict (scale, growth tracker)


def save_state(state: TrainState, path: str | Path) -> None:
    """Write ``state`` as a safetensors file (tensors + JSON metadata, nothing pickled),
    atomically: a crash leaves the previous checkpoint or this one, never half of one."""
    from safetensors.torch import save

    tensors = {f"weights.{k}": v.detach().cpu().contiguous() for k, v in state.weights.items()}
    tensors.update({f"momentum.{i}": v.detach().cpu().contiguous() for i, v in state.momentum.items()})
    tensors["generator"] = state.generator.contiguous()
    tensors["global_rng"] = state.global_rng.contiguous()
    if state.order is not None:
        tensors["order"] = state.order.contiguous()
    meta = {"epoch": state.epoch, "position": state.position, "batches": state.batches,
            "loss_sum": state.loss_sum, "correct": state.correct, "robust_correct": state.robust_correct,
            "history": [asdict(h) for h in state.history]}
    if state.scaler:
        meta["scaler"] = state.scaler
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(save(tensors, metadata={"advex_train_state": json.dumps(meta)}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path: str | Path) -> TrainState:
    """The TrainState saved at path (ValueError when the file is not one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["advex_train_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return TrainState(
            epoch=int(meta["epoch"]), position=int(meta["position"]), batches=int(meta["batches"]),
            order=tensors.get("order"), loss_sum=float(meta["loss_sum"]), correct=int(meta["correct"]),
            robust_correct=int(meta["robust_correct"]), generator=tensors["generator"],
            global_rng=tensors["global_rng"],
            weights={k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")},
            momentum={int(k[len("momentum."):]): v for k, v in tensors.items() if k.startswith("momentum.")},
            history=[EpochStats(**h) for h in meta["history"]], scaler=dict(meta.get("scaler") or {}))
    except (KeyError, TypeError, ValueError, OSError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a training checkpoint: {exc}") from exc


#: Training data goes to the GPU (as stored: uint8 images stay uint8) when it takes at most this
#: share of the GPU's free memory; batches are then gathered, converted and augmented there.
DEVICE_DATA_SHARE = 0.25


def on_device(data: ArrayDataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) where batches are gathered: on a CUDA device when the data fits (DEVICE_DATA_SHARE of
    its free memory), else where they are (the host), copied a batch at a time."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        size = data.x.element_size() * data.x.nelement() + data.y.element_size() * data.y.nelement()
        if size <= DEVICE_DATA_SHARE * free:
            return data.x.to(device), data.y.to(device)
    return data.x, data.y


EpochCallback = Callable[[EpochStats], None]
BatchCallback = Callable[[int, int], None]
StateCallback = Callable[[TrainState], None]


def train(model: ModelWrapper, data: ArrayDataset, cfg: TrainConfig, device: torch.device | str = "cpu",
          on_epoch: Optional[EpochCallback] = None, on_batch: Optional[BatchCallback] = None, *,
          resume: Optional[TrainState] = None, on_checkpoint: Optional[StateCallback] = None,
          on_interrupt: Optional[StateCallback] = None, precision: str = "fp32") -> list[EpochStats]:
    """Train ``model`` in place on ``data``; the history of every epoch (resumed ones included).

    on_batch(done, total) after every batch; it may raise to stop the run (cancellation), and
    then on_interrupt(state) gets the state after that batch first. on_checkpoint(state) after
    every epoch. resume: a state from either, to go on from (with the same data and cfg).
    precision: "fp32" (default), "bf16", "fp16" or "auto" for `device` (see the module's docstring).
    """
    cfg.validate()
    if cfg.augment and data.x.dim() != 4:
        raise ValueError("augment needs image data [N,C,H,W]")
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    model.to(device)
    if precision != "fp32" or model.precision != "fp32":  # fp32 on an fp32 wrapper: untouched, as before
        model.set_precision(precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    xs, ys = on_device(data, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(data)
    per_epoch = math.ceil(n / cfg.batch_size)
    total = per_epoch * cfg.epochs
    history: list[EpochStats] = []
    done, first_epoch, position, order = 0, 0, 0, None
    loss_sum, correct, robust_correct = 0.0, 0, 0
    if resume is not None:
        model.load_state_dict(resume.weights)
        for i, buf in resume.momentum.items():
            opt.state[params[i]]["momentum_buffer"] = buf.to(device).clone()
        gen.set_state(resume.generator)
        torch.set_rng_state(resume.global_rng)
        history = list(resume.history)
        done, first_epoch, position, order = resume.batches, resume.epoch, resume.position, resume.order
        loss_sum, correct, robust_correct = resume.loss_sum, resume.correct, resume.robust_correct
        if scaler is not None and resume.scaler:
            scaler.load_state_dict(resume.scaler)

    # the epoch's running sums stay on the device: nothing is read back per batch
    sums = torch.tensor([loss_sum], dtype=torch.float64, device=device)
    counts = torch.tensor([correct, robust_correct], dtype=torch.long, device=device)

    def state(epoch: int) -> TrainState:
        momentum = {i: opt.state[p]["momentum_buffer"] for i, p in enumerate(params)
                    if opt.state.get(p, {}).get("momentum_buffer") is not None}
        hits = counts.tolist()
        return TrainState(epoch, position, done, order, float(sums[0]), hits[0], hits[1], gen.get_state(),
                          torch.get_rng_state(), model.state_dict(), momentum, list(history),
                          scaler.state_dict() if scaler is not None else {})

    for epoch in range(first_epoch, cfg.epochs):
        t0 = time.perf_counter()
        lr = lr_at(cfg, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        if order is None:
            order = torch.randperm(n, generator=gen)
        order_here = order.to(xs.device)  # one copy of the epoch's order where the data is
        while position < n:
            idx = order_here[position:position + cfg.batch_size]
            x = batch_float(xs[idx])
            if cfg.augment:
                x = augment_batch(x, gen)
            x, y = x.to(device), ys[idx].to(device)
            if cfg.adversarial is not None:
                model.eval()
                adv_cfg = replace(cfg.adversarial, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                x_in = attack(model.logits, x, y, adv_cfg, box=data.box, clean=False).x_adv
            else:
                x_in = x
            model.train()
            # the network at the wrapper's precision; in fp16 the GradScaler scales the loss, so the
            # wrapper's scaling of input gradients (for attacks) must not scale parameter gradients too
            out = model._run(model.net, x_in, scale_grad=False)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)  # unscales first; skipped when a gradient is inf or nan
                scaler.update()
            with torch.no_grad():
                sums += loss.detach().double() * len(idx)
                hits = (out.argmax(1) == y).sum()
                if cfg.adversarial is not None:
                    counts[1] += hits
                    model.eval()
                    counts[0] += (model.logits(x).argmax(1) == y).sum()
                else:
                    counts[0] += hits
            done += 1
            position += len(idx)
            if on_batch is not None:
                try:
                    on_batch(done, total)
                except BaseException:
                    if on_interrupt is not None:
                        model.eval()
                        on_interrupt(state(epoch))
                    raise
        loss_sum, (correct, robust_correct) = float(sums[0]), counts.tolist()  # one read-back per epoch
        stats = EpochStats(epoch + 1, loss_sum / n, correct / n,
                           robust_correct / n if cfg.adversarial is not None else float("nan"),
                           lr, time.perf_counter() - t0)
        history.append(stats)
        position, order = 0, None
        sums.zero_()
        counts.zero_()
        if on_checkpoint is not None:
            on_checkpoint(state(epoch + 1))
        if on_epoch is not None:
            on_epoch(stats)
    model.eval()
    return history
