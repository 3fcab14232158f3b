"""The model zoo: architectures that expose ``features(x)`` (penultimate layer) and a
linear ``head``, so that logits = head(features(x)).

Inputs arrive already normalized (the wrapper in ``models.py`` does it).

Every architecture takes ``input_noise_std`` (arch_args, default 0): a randomized defense that adds
fresh Gaussian noise N(0, std^2) to the network's (normalized) input on every forward pass, in
training and at inference alike (Gaussian data augmentation, then noisy predictions as in
randomized-smoothing-style defenses). Such a model answers differently on every call: evaluate it
with suite "rand" (EOT). The noise has no parameters: the weights are the same as without it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn


MAX_INPUT_NOISE_STD = 1.0


def input_noise_std(arch_args: dict) -> float:
    """arch_args' input_noise_std as a float in [0, MAX_INPUT_NOISE_STD] (ValueError otherwise)."""
    raw = arch_args.get("input_noise_std", 0.0)
    try:
        std = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"input_noise_std must be a number, got {raw!r}") from None
    if not (math.isfinite(std) and 0.0 <= std <= MAX_INPUT_NOISE_STD):
        raise ValueError(f"input_noise_std must be finite and in [0, {MAX_INPUT_NOISE_STD:g}], got {raw!r}")
    return std


class ZooNet(nn.Module):
    """Base: subclasses define ``body`` (input -> penultimate features) and ``head``.
    noise_std > 0: Gaussian noise on the input of every pass (a randomized model; see above)."""

    def __init__(self) -> None:
        super().__init__()
        self.noise_std: float = 0.0

    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise_std > 0:
            return x + self.noise_std * torch.randn_like(x)
        return x

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.noisy(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.noisy(x)))


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus}


class SmallCNN(ZooNet):
    """Two blocks of two 3x3 conv + BatchNorm + ReLU (the second block widened), then global
    average pooling, for 28x28 (MNIST-like) or 32x32 (CIFAR-like) inputs. Like a ResNet, the
    representation g is the pooled ReLU maps: a small fully connected ReLU layer there instead has
    flat regions (g(z) = 0) where representation inversion (D_R / D_NR) stalls with zero gradient."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *conv(in_channels, width), *conv(width, width), nn.MaxPool2d(2),
            *conv(width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2),
            *conv(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)


class CifarResNet(ZooNet):
    """ResNet with the CIFAR stem (3x3 conv, stride 1, no max-pool), from torchvision's blocks."""

    def __init__(self, depth: int = 18, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        from torchvision.models import resnet

        block, layers = {18: (resnet.BasicBlock, [2, 2, 2, 2]),
                         50: (resnet.Bottleneck, [3, 4, 6, 3])}[depth]
        net = resnet.ResNet(block, layers, num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.head = net.fc
        net.fc = nn.Identity()
        self.body = net  # ends with avgpool + flatten: the penultimate layer


class MLP(ZooNet):
    """One hidden layer on flattened inputs (synthetic distributions); g is the hidden layer's
    output after its activation, as in SmallCNN. activation: relu (default), gelu or softplus."""

    def __init__(self, in_features: int, num_classes: int = 2, hidden: int = 64, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), ACTIVATIONS[activation]())
        self.head = nn.Linear(hidden, num_classes)


class Linear(ZooNet):
    """A linear classifier on flattened inputs; features are the inputs themselves."""

    def __init__(self, in_features: int, num_classes: int = 2) -> None:
        super().__init__()
        self.body = nn.Flatten()
        self.head = nn.Linear(in_features, num_classes)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


Builder = Callable[[tuple[int, ...], int, dict], ZooNet]

ARCHITECTURES: dict[str, Builder] = {
    "small_cnn": lambda shape, c, a: SmallCNN(shape[0], c, int(a.get("width", 32))),
    "resnet18": lambda shape, c, a: CifarResNet(18, shape[0], c),
    "resnet50": lambda shape, c, a: CifarResNet(50, shape[0], c),
    "mlp": lambda shape, c, a: MLP(_numel(shape), c, int(a.get("hidden", 64)), a.get("activation", "relu")),
    "linear": lambda shape, c, a: Linear(_numel(shape), c),
}


def build(architecture: str, input_shape: tuple[int, ...], num_classes: int,
          arch_args: dict | None = None) -> ZooNet:
    """A freshly initialised zoo network. input_shape excludes the batch dim, e.g. (1, 28, 28)."""
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}") from None
    noise_std = input_noise_std(arch_args or {})
    if architecture in ("small_cnn", "resnet18", "resnet50"):
        if len(input_shape) != 3:
            raise ValueError(f"{architecture} needs image inputs [C,H,W], got {list(input_shape)}")
        if architecture == "small_cnn" and min(input_shape[1:]) < 4:
            raise ValueError(f"small_cnn needs inputs of at least 4x4, got {list(input_shape)}")
    net = builder(tuple(int(s) for s in input_shape), int(num_classes), dict(arch_args or {}))
    net.noise_std = noise_std
    return net
