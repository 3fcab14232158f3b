"""Tensors on the wire (advex.v1.Tensor) <-> numpy arrays. numpy only: shared by the client
SDK and the service. Raw little-endian, row-major bytes; dtype by name; int64 shape."""
from __future__ import annotations

import numpy as np

from advex.v1 import tensor_pb2

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "uint8": np.dtype("u1"),
    "int64": np.dtype("<i8"),
    "bool": np.dtype("?"),
}


class WireError(ValueError):
    """A tensor message that does not describe a valid array; .field names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def to_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """numpy array (float32, uint8, int64, bool; other floats/ints are converted) -> Tensor."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        name = "bool"
    elif a.dtype == np.uint8:
        name = "uint8"
    elif np.issubdtype(a.dtype, np.floating):
        name = "float32"
    elif np.issubdtype(a.dtype, np.integer):
        name = "int64"
    else:
        raise TypeError(f"cannot send arrays of dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=DTYPES[name])
    return tensor_pb2.Tensor(dtype=name, shape=list(a.shape), data=a.tobytes())


def from_tensor(t: tensor_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """Tensor -> read-only numpy array in native byte order; raises WireError naming `field`."""
    if t.dtype not in DTYPES:
        raise WireError(field, f"unsupported dtype {t.dtype!r}; expected one of {sorted(DTYPES)}")
    if any(s < 0 for s in t.shape):
        raise WireError(field, f"negative dimension in shape {list(t.shape)}")
    dt = DTYPES[t.dtype]
    count = int(np.prod(t.shape, dtype=np.int64)) if len(t.shape) else 1
    if count * dt.itemsize != len(t.data):
        raise WireError(field, f"shape {list(t.shape)} of {t.dtype} needs {count * dt.itemsize} bytes, got {len(t.data)}")
    return np.frombuffer(t.data, dtype=dt).reshape(tuple(t.shape)).astype(dt.newbyteorder("="), copy=False)
