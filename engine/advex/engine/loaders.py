"""Loading and saving models without arbitrary pickle execution.

Formats: "safetensors" (weights for a zoo architecture), "torchscript" (torch.jit archive),
"torch_export" (torch.export program, .pt2). Plain pickled checkpoints are never unpickled
with code execution; ``load_checkpoint_weights`` uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from advex.engine import zoo
from advex.engine.models import ModelInfo, ModelWrapper

FORMATS = ("safetensors", "torchscript", "torch_export", "onnx")


class ModelLoadError(ValueError):
    """The file is not a loadable model of the declared format / architecture."""


def load_model(path: str | Path, fmt: str, info: ModelInfo, device: torch.device | str = "cpu",
               layout: str = "NCHW", value_range: str = "0-1") -> ModelWrapper:
    """A ready-to-use wrapper in eval mode on ``device``; raises ModelLoadError.
    layout / value_range: what an ONNX graph's input expects (ignored for torch formats)."""
    path = Path(path)
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            net = zoo.build(info.architecture, info.input_shape, info.num_classes, info.arch_args)
            state = load_file(str(path), device="cpu")
            _check_state(net, state, info)
            net.load_state_dict(state)
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript is deprecated from torch 2.14
                net = torch.jit.load(str(path), map_location="cpu")
        elif fmt == "torch_export":
            net = torch.export.load(str(path)).module()
        elif fmt == "onnx":
            from advex.engine.onnx_model import OnnxNet

            net = OnnxNet(path, info.input_shape, layout or "NCHW", value_range or "0-1", device)
        else:
            raise ModelLoadError(f"unknown model format {fmt!r}; expected one of {FORMATS}")
    except ModelLoadError:
        raise
    except Exception as exc:  # any parse/shape error of an untrusted file
        hint = ""
        if fmt == "onnx" and "external data" in str(exc).lower():
            hint = (" (the graph keeps its weights in a separate file; upload a single file: "
                    "torch.onnx.export(..., external_data=False))")
        raise ModelLoadError(f"cannot load {fmt} model: {type(exc).__name__}: {exc}{hint}") from exc
    model = ModelWrapper(net, info).to(device)
    model.eval()
    return model


def _check_state(net: nn.Module, state: dict, info: ModelInfo) -> None:
    """Keys and shapes of the file against the architecture, reported briefly."""
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"{k} missing" for k in want if k not in have]
    problems += [f"{k} unexpected" for k in have if k not in want]
    problems += [f"{k} is {list(have[k])} in the file, {list(want[k])} in the architecture"
                 for k in want if k in have and have[k] != want[k]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelLoadError(f"weights do not match architecture {info.architecture!r} with input "
                             f"{list(info.input_shape)}, {info.num_classes} classes, arch_args {info.arch_args}: "
                             + "; ".join(problems[:3]) + more)


def check_model(model: ModelWrapper, device: torch.device | str = "cpu") -> None:
    """Run a dummy batch of two through the model: it must give logits [2, num_classes]
    (a batch of two also catches programs exported with a static batch size of 1)."""
    info = model.info
    x = torch.rand((2, *info.input_shape), device=device)
    try:
        with torch.no_grad():
            out = model.logits(x)
    except Exception as exc:
        hint = ""
        if "Guard failed" in str(exc) or "size()[0]" in str(exc):
            hint = (" (the batch dimension must be dynamic: export with "
                    "dynamic_shapes={'x': {0: torch.export.Dim('batch')}})")
        raise ModelLoadError(f"model fails on an input of shape {[2, *info.input_shape]}: {exc}{hint}") from exc
    if tuple(out.shape) != (2, info.num_classes):
        raise ModelLoadError(f"model returns shape {list(out.shape)} for a batch of two; "
                             f"expected [2, {info.num_classes}] (num_classes)")


def safetensors_bytes(net: nn.Module) -> bytes:
    """Weights of a zoo network as a safetensors file's bytes (contiguous CPU tensors)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})


def save_safetensors(net: nn.Module, path: str | Path) -> None:
    Path(path).write_bytes(safetensors_bytes(net))


def load_checkpoint_weights(path: str | Path) -> dict:
    """A plain PyTorch checkpoint's tensors, with pickle restricted to tensors and containers."""
    return torch.load(str(path), map_location="cpu", weights_only=True)
