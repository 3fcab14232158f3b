"""Generated dataset files: written shard by shard into memory-mapped .npy files, then packed
into one uncompressed .npz (arrays x, y) that is streamed from disk: a large build never holds
the whole dataset in memory, and the stored file is what DownloadDataset sends, byte for byte."""
from __future__ import annotations

import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np

CHUNK = 1 << 20


class NpzShardWriter:
    def __init__(self, folder: Path, n: int, example_shape: tuple[int, ...]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.n = n
        self.x = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.float32, shape=(n, *example_shape))
        self.y = np.lib.format.open_memmap(folder / "y.npy", mode="w+", dtype=np.int64, shape=(n,))
        self.written = 0

    def write(self, start: int, x: np.ndarray, y: np.ndarray) -> None:
        self.x[start:start + len(x)] = x
        self.y[start:start + len(y)] = y
        self.written += len(x)

    def finish(self, dest: Path) -> tuple[str, int]:
        """Pack into dest (.npz); returns (sha256, size). The working files are removed."""
        if self.written != self.n:
            raise RuntimeError(f"wrote {self.written} of {self.n} examples")
        self.x.flush()
        self.y.flush()
        del self.x, self.y  # close the memory maps before reading the files back
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.write(self.folder / "x.npy", "x.npy")
            zf.write(self.folder / "y.npy", "y.npy")
        shutil.rmtree(self.folder, ignore_errors=True)
        return file_sha256(dest), dest.stat().st_size


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def npz_bytes(x: np.ndarray, y: np.ndarray, lossy_uint8: bool = False) -> bytes:
    """An .npz of (x, y) written for one request; lossy_uint8 rounds float32 images in [0,1] to uint8."""
    if lossy_uint8 and x.dtype == np.float32:
        x = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    return buf.getvalue()
