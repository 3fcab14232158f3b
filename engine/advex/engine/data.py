"""Data sources: the built-in datasets (read in place from a data root, never downloaded),
uploaded .npz arrays, and the synthetic Tsipras et al. (2019) distribution.

Examples are kept as stored (uint8 0..255 or float32); ``batch_float`` converts a batch
to float32 in [0,1] only when it is used.
"""
from __future__ import annotations

import hashlib
import io
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from advex.engine import idx

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class DataError(ValueError):
    """A dataset file is missing, malformed or not what it claims to be."""


@dataclass
class ArrayDataset:
    """x: uint8 or float32 [N, C, H, W] (images) or float32 [N, D] (REAL domain); y: int64 [N]."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    domain: str = "image"  # "image" (box [0,1]) or "real" (no box)
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"x has {len(self.x)} examples but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def box(self) -> Optional[tuple[float, float]]:
        return (0.0, 1.0) if self.domain == "image" else None

    def subset(self, limit: int) -> "ArrayDataset":
        if limit <= 0 or limit >= len(self):
            return self
        return ArrayDataset(self.x[:limit], self.y[:limit], self.num_classes, self.domain, self.class_names)

    def batches(self, batch_size: int, device: torch.device | str = "cpu") -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self), batch_size):
            yield batch_float(self.x[i:i + batch_size]).to(device), self.y[i:i + batch_size].to(device)


def batch_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 [0,1]; float stays float32."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


# ------------------------------------------------------------------ IDX (MNIST family)

def load_idx_split(folder: Path, split: str, class_names: list[str]) -> ArrayDataset:
    try:
        x, y = idx.read_split(folder, split)
    except idx.IdxError as exc:
        raise DataError(str(exc)) from exc
    return ArrayDataset(torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)),
                        10, "image", class_names)


# ------------------------------------------------------------------ CIFAR-10 (python pickles)

class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR-10 batches hold dicts of bytes, lists and numpy arrays: nothing else may load."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"CIFAR-10 batch refers to {module}.{name}, which is not allowed")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as f:
        d = _CifarUnpickler(f, encoding="bytes").load()
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    y = np.asarray(d[b"labels"], dtype=np.int64)
    return x, y


def load_cifar10_split(folder: Path, split: str) -> ArrayDataset:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = []
    for name in names:
        if not (folder / name).is_file():
            raise DataError(f"missing {name} in {folder}")
        parts.append(_read_cifar_batch(folder / name))
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), 10, "image", CIFAR10_CLASSES)


# ------------------------------------------------------------------ built-ins and roots

@dataclass(frozen=True)
class BuiltinSource:
    name: str
    subdirs: tuple[str, ...]     # candidates below each data root
    probe: str                   # a file whose presence marks the folder
    example_shape: tuple[int, ...]
    splits: dict
    class_names: tuple[str, ...]


BUILTINS = {
    "cifar10": BuiltinSource("cifar10", ("cifar10/cifar-10-batches-py", "cifar-10-batches-py"), "test_batch",
                             (3, 32, 32), {"train": 50000, "test": 10000}, tuple(CIFAR10_CLASSES)),
    "mnist": BuiltinSource("mnist", ("mnist/MNIST/raw", "MNIST/raw"), "t10k-labels-idx1-ubyte",
                           (1, 28, 28), {"train": 60000, "test": 10000}, tuple(MNIST_CLASSES)),
    "fashion-mnist": BuiltinSource("fashion-mnist", ("fashion-mnist", "FashionMNIST/raw", "fashion-mnist/raw"),
                                   "t10k-labels-idx1-ubyte", (1, 28, 28), {"train": 60000, "test": 10000},
                                   tuple(FASHION_MNIST_CLASSES)),
}

DEFAULT_DATA_ROOTS = ("/usr/share/datasets",)


def find_builtin(name: str, roots: Sequence[str | Path]) -> Optional[Path]:
    """The folder holding built-in dataset ``name`` under the first root that has it."""
    src = BUILTINS[name]
    for root in roots:
        for sub in src.subdirs:
            folder = Path(root) / sub
            if (folder / src.probe).is_file() or (folder / (src.probe + ".gz")).is_file():
                return folder
    return None


def load_builtin(name: str, split: str, roots: Sequence[str | Path]) -> ArrayDataset:
    if name not in BUILTINS:
        raise DataError(f"unknown built-in dataset {name!r}")
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; expected 'train' or 'test'")
    folder = find_builtin(name, roots)
    if folder is None:
        raise DataError(f"built-in dataset {name!r} not found under data roots {list(map(str, roots))}")
    if name == "cifar10":
        return load_cifar10_split(folder, split)
    return load_idx_split(folder, split, list(BUILTINS[name].class_names))


# ------------------------------------------------------------------ .npz uploads

def load_npz(data: bytes) -> ArrayDataset:
    """Parse an uploaded .npz (arrays 'x' and 'y'); pickled object arrays are refused."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if "x" not in z.files or "y" not in z.files:
                raise DataError(f".npz must hold arrays 'x' and 'y'; found {z.files}")
            x, y = z["x"], z["y"]
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"not a readable .npz without pickles: {exc}") from exc
    if x.dtype not in (np.uint8, np.float32):
        raise DataError(f"x: dtype must be uint8 or float32, got {x.dtype}")
    if x.ndim not in (2, 4):
        raise DataError(f"x: expected [N,C,H,W] images or [N,D] vectors, got shape {list(x.shape)}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"y: expected integer labels [N], got {y.dtype} {list(y.shape)}")
    if x.dtype == np.float32 and not np.isfinite(x).all():
        raise DataError("x: contains NaN or infinite values")
    if len(y) and y.min() < 0:
        raise DataError("y: labels must be >= 0")
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)),
                        int(y.max()) + 1 if len(y) else 0, "image" if x.ndim == 4 else "real")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ Tsipras et al. (2019)

@dataclass(frozen=True)
class TsiprasParams:
    """y uniform in {-1,+1} (stored as class 0 / 1); x1 = y w.p. p else -y (the robust feature);
    x2..x_{d+1} ~ N(eta*y, 1) (weak non-robust features). Defaults: d=100, p=0.95, eta=3/sqrt(d)."""

    d: int = 100
    p: float = 0.95
    eta: float = 0.0  # 0 -> 3 / sqrt(d)

    @property
    def eta_value(self) -> float:
        return self.eta or 3.0 / math.sqrt(self.d)


def tsipras(n: int, params: TsiprasParams = TsiprasParams(), seed: int = 0) -> ArrayDataset:
    """n examples of the Tsipras et al. distribution: x float32 [n, d+1], y int64 in {0,1}."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    agree = torch.rand(n, generator=g) < params.p
    x1 = torch.where(agree, sign, -sign).float()
    weak = torch.randn((n, params.d), generator=g) + params.eta_value * sign.float().unsqueeze(1)
    x = torch.cat([x1.unsqueeze(1), weak], dim=1)
    return ArrayDataset(x, (sign > 0).long(), 2, "real", ["-1", "+1"])


TSIPRAS_SPLITS = {"train": (10000, 1), "test": (2000, 2)}  # size, seed


# ------------------------------------------------------------------ planted L2 features

@dataclass(frozen=True)
class PlantedParams:
    """A distribution with one robust and one non-robust feature for an L2 adversary.
    y uniform in {-1,+1} (class 0 / 1). x1 = r*y w.p. p else -r*y: robust (moving it across 0
    takes an L2 budget of r) but only p-accurate. x2..x_{k+1} = s*y + N(0, sigma^2): together a
    near-perfect signal of L2 size s*sqrt(k) along u = (1,...,1)/sqrt(k), flipped by an L2 budget
    of about s*sqrt(k). Defaults: r=3, p=0.9, k=100, s=0.05 (signal 0.5), sigma=0.1.
    Tsipras et al.'s distribution is built for Linf; this one is the L2 analogue the paper's
    experiments (L2 eps 0.25 / 0.5 on CIFAR) call for."""

    r: float = 3.0
    p: float = 0.9
    k: int = 100
    s: float = 0.05
    sigma: float = 0.1


def planted_l2(n: int, params: PlantedParams = PlantedParams(), seed: int = 0) -> ArrayDataset:
    """n examples: x float32 [n, k+1] (x[:, 0] is the robust feature), y int64 in {0,1}."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    sign = (2 * y - 1).float()
    agree = torch.rand(n, generator=g) < params.p
    x1 = torch.where(agree, sign, -sign) * params.r
    weak = params.s * sign.unsqueeze(1) + params.sigma * torch.randn((n, params.k), generator=g)
    return ArrayDataset(torch.cat([x1.unsqueeze(1), weak], dim=1), y, 2, "real", ["-1", "+1"])
