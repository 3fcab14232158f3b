"""The model zoo: architectures that expose ``features(x)`` (penultimate layer) and a
linear ``head``, so that logits = head(features(x)).

Inputs arrive already normalized (the wrapper in ``models.py`` does it).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class ZooNet(nn.Module):
    """Base: subclasses define ``body`` (input -> penultimate features) and ``head``."""

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


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
    if architecture in ("small_cnn", "resnet18", "resnet50"):
        if len(input_shape) != 3:
            raise ValueError(f"{architecture} needs image inputs [C,H,W], got {list(input_shape)}")
        if architecture == "small_cnn" and min(input_shape[1:]) < 4:
            raise ValueError(f"small_cnn needs inputs of at least 4x4, got {list(input_shape)}")
    return builder(tuple(int(s) for s in input_shape), int(num_classes), dict(arch_args or {}))
