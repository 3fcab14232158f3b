"""IDX files (the MNIST family's format), numpy only: shared by the engine's data sources
and the client's demo."""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np


class IdxError(ValueError):
    pass


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (optionally .gz): uint8 images [N, H, W] or labels [N]."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise IdxError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = math.prod(dims)
    if len(raw) - offset != count:
        raise IdxError(f"{path}: expected {count} bytes of data, found {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def find_idx(folder: Path, stem: str) -> Path:
    """folder/stem or folder/stem.gz."""
    for name in (stem, stem + ".gz"):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise IdxError(f"missing {stem}[.gz] in {folder}")


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W], labels uint8 [N]) of the 'train' or 'test' split."""
    prefix = "train" if split == "train" else "t10k"
    return (read_idx(find_idx(folder, f"{prefix}-images-idx3-ubyte")),
            read_idx(find_idx(folder, f"{prefix}-labels-idx1-ubyte")))
