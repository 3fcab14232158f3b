"""Models known only by their outputs: a torch module around a function from a batch of inputs
to logits (an inference endpoint's client). advex feeds every model float32 NCHW in [0,1]; a black
box may want another layout or value range, declared by its owner, and `to_layout` converts.
Such a module has no gradients: only gradient-free (black-box) and transfer attacks apply."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

LAYOUTS = ("NCHW", "NHWC")
VALUE_RANGES = ("0-1", "0-255")


def check_layout(layout: str, value_range: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if value_range not in VALUE_RANGES:
        raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}")


def layout_tensor(x: torch.Tensor, layout: str, value_range: str) -> torch.Tensor:
    """x (float32 NCHW in [0,1], or [N, D]) as the model wants it, still a tensor (a view where it can be)."""
    v = x.detach()
    if layout == "NHWC" and v.dim() == 4:
        v = v.permute(0, 2, 3, 1)
    if value_range == "0-255":
        v = v * 255.0
    return v


def to_layout(x: torch.Tensor, layout: str, value_range: str) -> np.ndarray:
    """x (float32 NCHW in [0,1], or [N, D]) as the model wants it: a contiguous float32 array."""
    return np.ascontiguousarray(layout_tensor(x, layout, value_range).cpu().numpy(), dtype=np.float32)


def layout_shape(input_shape: tuple[int, ...], layout: str) -> list[int]:
    """The shape of one example as the model receives it ([C,H,W] becomes [H,W,C] in NHWC)."""
    shape = [int(s) for s in input_shape]
    return [shape[1], shape[2], shape[0]] if layout == "NHWC" and len(shape) == 3 else shape


class BlackBoxNet(nn.Module):
    """logits = predict(inputs) for a `predict` that takes a float32 array [N, ...] in the model's
    layout and value range and returns float32 logits [N, K]."""

    has_gradients = False

    def __init__(self, predict: Callable[[np.ndarray], np.ndarray], layout: str = "NCHW",
                 value_range: str = "0-1") -> None:
        super().__init__()
        check_layout(layout, value_range)
        self.predict = predict
        self.layout, self.value_range = layout, value_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.predict(to_layout(x, self.layout, self.value_range))
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)
