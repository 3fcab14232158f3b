"""Batch sizes chosen for the device. On the CPU a batch only has to be large enough to amortize
Python; on a GPU a small one leaves the device waiting on kernel launches, so a batch is the largest
that fits (halving from a cap), measured once per model and input shape by a trial forward and
backward pass at twice the batch: the other half of the memory is left to the attack's own tensors
(iterates, best points, gradients)."""
from __future__ import annotations

import threading
from typing import Callable

import torch

#: The largest batch tried on a GPU.
CUDA_CAP = 2048
_FITTING = threading.Lock()


def largest_batch(trial: Callable[[int], None], start: int, floor: int = 1) -> int:
    """The largest of start, start/2, start/4, ... (not below floor) for which trial(batch) runs
    without running out of GPU memory."""
    batch = start
    while batch >= floor:
        try:
            trial(batch)
            return batch
        except torch.cuda.OutOfMemoryError:
            batch //= 2
        if torch.cuda.is_available():  # outside the except: its traceback no longer holds the trial's tensors
            torch.cuda.empty_cache()
    raise RuntimeError(f"not even a batch of {floor} fits on the device")


def attack_batch(model: torch.nn.Module, example_shape: tuple[int, ...], device: torch.device,
                 cpu_default: int, cap: int = CUDA_CAP) -> int:
    """The batch for attacking `model` on `device`: cpu_default on the CPU and for black boxes (an
    ONNX graph, an inference endpoint: nothing is sent to try); on CUDA the largest power-of-two
    fraction of `cap` whose forward+backward at twice the batch fits (cached on the model, per shape
    and device)."""
    if device.type != "cuda" or not getattr(model, "has_gradients", True):
        return cpu_default
    cache = model.__dict__.setdefault("_advex_fitted_batch", {})
    key = (tuple(example_shape), str(device), cap)
    with _FITTING:  # one trial at a time: two at once would each see the other's memory as taken
        if key in cache:
            return cache[key]

        def trial(batch: int) -> None:
            x = torch.zeros((2 * batch, *example_shape), device=device, requires_grad=True)
            torch.autograd.grad(model(x).float().sum(), x)

        cache[key] = largest_batch(trial, cap)
    return cache[key]
