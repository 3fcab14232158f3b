"""The model wrapper: every model the engine touches takes float32 inputs in [0,1]
(or raw features for REAL-domain data), normalizes inside, and exposes ``logits(x)`` and,
when the network has one, ``features(x)`` (the penultimate layer)."""
from __future__ import annotations

import copy
import logging
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
        self.precision = "fp32"  # see set_precision
        self._autocast: Optional[tuple[str, torch.dtype]] = None
        self._channels_last = False

    def set_precision(self, precision: str, device: torch.device | str = "cpu") -> "ModelWrapper":
        """How the network's passes run on `device`: "fp32", "bf16" or "fp16" (autocast: the
        network's matrix products in 16 bits, its outputs returned in fp32; fp16 scales the gradient
        that flows back through the network by FP16_GRAD_SCALE and unscales it at the input, so that
        small gradients do not vanish), or "auto": bf16 on a CUDA GPU that has it, fp16 on an older
        one, fp32 on the CPU. On CUDA a convolutional network also runs channels-last. Everything
        outside the network (the iterate, the projection, the objective) stays fp32. A black box
        (an ONNX graph) always runs as it was built."""
        device = torch.device(device)
        precision = resolve_precision(precision, device)
        if not self.has_gradients:  # a black box (ONNX graph) runs as it was built
            precision = "fp32"
        self.precision = precision
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self._autocast = None if dtype is None else (device.type, dtype)
        self._channels_last = (device.type == "cuda" and len(self.info.input_shape) == 3 and self.has_gradients
                               and not isinstance(self.net, torch.jit.ScriptModule))
        if self._channels_last:
            self.net.to(memory_format=torch.channels_last)
        return self

    def _run(self, fn, x: torch.Tensor, scale_grad: bool = True) -> torch.Tensor:
        """fn (the network or its features) on normalized x, at the wrapper's precision. scale_grad
        False: no fp16 scaling of the gradient that flows back (training scales its loss instead)."""
        z = self.normalize(x)
        if self._channels_last and z.dim() == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        if self._autocast is None:
            return fn(z)
        device_type, dtype = self._autocast
        scale = FP16_GRAD_SCALE if dtype == torch.float16 and scale_grad else 1.0
        if scale != 1.0 and z.requires_grad:
            z = _GradScale.apply(z, 1.0 / scale)
        with torch.autocast(device_type, dtype=dtype):
            out = fn(z)
        out = out.float()
        return _GradScale.apply(out, scale) if scale != 1.0 and out.requires_grad else out

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
        return self._run(self.net, x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer representation g(x): float32 [N, F]."""
        if not self.has_features:
            raise NotImplementedError("this model exposes no penultimate layer (features)")
        return self._run(self.net.features, x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    def train(self, mode: bool = True) -> "ModelWrapper":
        self.training = mode
        try:
            self.net.train(mode)
        except NotImplementedError:  # torch.export programs keep the mode they were exported in
            pass
        return self


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FP16_GRAD_SCALE = 1024.0  # input gradients of a loss on logits are at most ~1 per logit: no overflow


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> bf16 on CUDA GPUs that support it, fp16 on older CUDA GPUs, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class _GradScale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` on the way back."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


COMPILE_MODES = ("auto", "off", "on")
#: torch.compile mode on CUDA. Not "reduce-overhead": its CUDA graphs record one graph per batch size
#: (early-stop compaction makes many), hand back outputs that the next replay overwrites (attacks keep
#: logits and iterates across steps) and keep per-thread state (workers share a loaded model). Autotuned
#: kernels without graphs pay at attack scale: a loaded model is cached and runs for thousands of steps.
INDUCTOR_MODE_CUDA = "max-autotune-no-cudagraphs"
_log = logging.getLogger("advex.engine.models")


def compile_model(model: ModelWrapper, mode: str = "auto", device: torch.device | str = "cpu", *,
                  name: str = "", backend: str = "inductor") -> ModelWrapper:
    """Run `model.net` through torch.compile, in place, when `mode` asks: "on", "off", or "auto" (on
    for CUDA only: on the CPU compiling costs more than it saves). For frozen attack models, after
    freeze and set_precision. Black boxes (ONNX graphs, endpoints) and TorchScript modules are never
    compiled. Inductor runs INDUCTOR_MODE_CUDA on CUDA, its default elsewhere; `backend` is for tests
    ("eager": the same tracing, no code generation).

    Compilation happens at the first call. Should that call (or a later recompile) fail (no C
    compiler, an inductor bug, an op dynamo cannot trace) where the eager network succeeds, one
    WARNING names the model (`name`, else its architecture) and the error, that call's result comes
    from the eager network, and the model stays eager for good. Batch sizes vary (compaction): the
    batch dimension is marked dynamic (torch._dynamo.maybe_mark_dynamic), so all sizes share one
    graph per grad mode and precision (size 1 may get its own). A deep copy is the eager network."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    device = torch.device(device)
    wanted = mode == "on" or (mode == "auto" and device.type == "cuda")
    net = model.net
    if (not wanted or not model.has_gradients or isinstance(net, (torch.jit.ScriptModule, _CompiledNet))):
        return model
    options: dict = {"backend": backend}
    if backend == "inductor" and device.type == "cuda":
        options["mode"] = INDUCTOR_MODE_CUDA
    model.net = _CompiledNet(net, torch.compile(net, **options), name or model.info.architecture)
    return model


class _CompiledNet(nn.Module):
    """The eager network (registered as `eager`; its attributes, such as `features` and
    `has_gradients`, read through) and its compiled form, used until it fails once."""

    def __init__(self, eager: nn.Module, compiled, name: str) -> None:
        super().__init__()
        self.eager = eager
        object.__setattr__(self, "_compiled", compiled)  # not a submodule: no second copy of the weights
        self._name = name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        compiled = self.__dict__["_compiled"]
        if compiled is None or torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self.eager(x, *args, **kwargs)
        if x.dim() > 0 and x.shape[0] > 1:
            torch._dynamo.maybe_mark_dynamic(x, 0)
        try:
            return compiled(x, *args, **kwargs)
        except torch.cuda.OutOfMemoryError:  # the batch's fault, not the compiler's: compiling stays on
            raise
        except Exception as exc:  # noqa: BLE001 - dynamo / inductor raise many kinds
            out = self.eager(x, *args, **kwargs)  # raises too when the input is at fault: then keep compiling
            object.__setattr__(self, "_compiled", None)
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            _log.warning("model %s: torch.compile failed (%s: %s); running it eagerly from now on",
                         self._name, type(exc).__name__, first)
            return out

    @property
    def compiled(self) -> bool:
        """Whether calls still go through the compiled network."""
        return self.__dict__["_compiled"] is not None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            eager = self.__dict__.get("_modules", {}).get("eager")
            if eager is None:
                raise
            return getattr(eager, name)

    def __deepcopy__(self, memo: dict) -> nn.Module:
        return copy.deepcopy(self.eager, memo)


def freeze(model: ModelWrapper) -> ModelWrapper:
    """Make an eval-mode model cheaper to attack, in place: parameter gradients off (attacks want
    input gradients only) and every batch norm that follows a convolution folded into it (one
    convolution instead of a convolution and a normalisation, the same function up to float
    rounding). A frozen model is for inference and attacks, not training."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if not isinstance(model.net, torch.jit.ScriptModule):  # TorchScript modules cannot be rebuilt in place
        fold_batch_norm(model.net)
    return model


def fold_batch_norm(module: nn.Module) -> int:
    """Fold eval-mode BatchNorm2d layers into the Conv2d right before them, in place: adjacent in an
    nn.Sequential, or the (convK, bnK) pairs of torchvision's ResNet stem and blocks. Returns how
    many were folded. Other layouts are left as they are (folding them would need the graph)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for child in list(module.children()):
        folded += fold_batch_norm(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if _foldable(conv, bn):
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
                folded += 1
    elif _torchvision_resnet_part(module):
        for k in (1, 2, 3):
            conv, bn = getattr(module, f"conv{k}", None), getattr(module, f"bn{k}", None)
            if _foldable(conv, bn):
                setattr(module, f"conv{k}", fuse_conv_bn_eval(conv, bn))
                setattr(module, f"bn{k}", nn.Identity())
                folded += 1
    return folded


def _foldable(conv, bn) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and not bn.training
            and not conv.training and bn.track_running_stats and bn.running_mean is not None
            and conv.out_channels == bn.num_features)


def _torchvision_resnet_part(module: nn.Module) -> bool:
    """torchvision's ResNet, BasicBlock and Bottleneck apply convK then bnK, nothing between."""
    try:
        from torchvision.models import resnet
    except ImportError:  # pragma: no cover
        return False
    return type(module) in (resnet.ResNet, resnet.BasicBlock, resnet.Bottleneck)


def device_for(name: Optional[str] = None) -> torch.device:
    """'auto' / None -> cuda when available, else cpu."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
