"""The model wrapper: every model the engine touches takes float32 inputs in [0,1]
(or raw features for REAL-domain data), normalizes inside, and exposes ``logits(x)`` and,
when the network has one, ``features(x)`` (the penultimate layer)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn


@dataclass
class ModelInfo:
    architecture: str
    input_shape: tuple[int, ...]
    num_classes: int
    mean: Sequence[float] = ()
    std: Sequence[float] = ()
    arch_args: dict = field(default_factory=dict)


class ModelWrapper(nn.Module):
    """net: maps normalized inputs to logits [N, num_classes]. mean/std: per channel
    (dim 1), empty for none. forward(x) == logits(x), so peers (torchattacks) can use it."""

    def __init__(self, net: nn.Module, info: ModelInfo) -> None:
        super().__init__()
        self.net = net
        self.info = info
        shape = [1, -1] + [1] * (len(info.input_shape) - 1)
        mean = torch.tensor(list(info.mean) or [0.0], dtype=torch.float32).view(shape)
        std = torch.tensor(list(info.std) or [1.0], dtype=torch.float32).view(shape)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self._normalize = bool(info.mean) or bool(info.std)

    @property
    def has_gradients(self) -> bool:
        """False for black boxes (ONNX graphs): only gradient-free attacks apply."""
        return getattr(self.net, "has_gradients", True)

    @property
    def has_features(self) -> bool:
        return hasattr(self.net, "features") and callable(getattr(self.net, "features"))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self._normalize else x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 [N, *input_shape] in [0,1] -> logits float32 [N, num_classes]."""
        return self.net(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer representation g(x): float32 [N, F]."""
        if not self.has_features:
            raise NotImplementedError("this model exposes no penultimate layer (features)")
        return self.net.features(self.normalize(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    def train(self, mode: bool = True) -> "ModelWrapper":
        self.training = mode
        try:
            self.net.train(mode)
        except NotImplementedError:  # torch.export programs keep the mode they were exported in
            pass
        return self


def device_for(name: Optional[str] = None) -> torch.device:
    """'auto' / None -> cuda when available, else cpu."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
