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


MAX_DIMS = 8
_MAX_NOMINAL_BYTES = 1 << 62  # numpy's own limit on shape x itemsize (zero dims counted as 1)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def from_tensor(t: tensor_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """Tensor -> read-only numpy array in native byte order; raises WireError naming `field` for
    anything that does not describe an array: an unknown dtype, more than MAX_DIMS dims, a
    negative dim, a shape too large for any array (computed exactly: no int64 wrap-around), or a
    byte count that does not match the shape."""
    if t.dtype not in DTYPES:
        raise WireError(field, f"unsupported dtype {_short(t.dtype)}; expected one of {sorted(DTYPES)}")
    shape = [int(s) for s in t.shape]
    if len(shape) > MAX_DIMS:
        raise WireError(field, f"{len(shape)} dims; at most {MAX_DIMS} are supported")
    if any(s < 0 for s in shape):
        raise WireError(field, f"negative dimension in shape {shape}")
    dt = DTYPES[t.dtype]
    nominal = dt.itemsize
    for s in shape:  # Python ints: no silent int64 wrap-around
        nominal *= max(s, 1)
    if nominal >= _MAX_NOMINAL_BYTES:
        raise WireError(field, f"shape {shape} of {t.dtype} is too large to describe an array")
    count = 1
    for s in shape:
        count *= s
    if count * dt.itemsize != len(t.data):
        raise WireError(field, f"shape {shape} of {t.dtype} needs {count * dt.itemsize} bytes, got {len(t.data)}")
    return np.frombuffer(t.data, dtype=dt).reshape(tuple(shape)).astype(dt.newbyteorder("="), copy=False)
