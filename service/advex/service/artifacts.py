"""Generated dataset files: written shard by shard into memory-mapped .npy files, then packed
into one uncompressed .npz (arrays x, y) that is streamed from disk: a large build never holds
the whole dataset in memory, and the stored file is what DownloadDataset sends, byte for byte."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

CHUNK = 1 << 20


ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same arrays always make the same file bytes


class NpzShardWriter:
    """Examples written by index into memory-mapped x.npy / y.npy in `folder`. With
    resume=True the files a previous (interrupted) writer left are opened again, when they have
    this writer's shapes; what was checkpointed in them stays."""

    def __init__(self, folder: Path, n: int, example_shape: tuple[int, ...], *, resume: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.n = n
        shapes = {"x.npy": ((n, *example_shape), np.float32), "y.npy": ((n,), np.int64)}
        maps = {}
        for name, (shape, dtype) in shapes.items():
            path = folder / name
            existing = None
            if resume and path.exists():
                try:
                    existing = np.lib.format.open_memmap(path, mode="r+")
                except (OSError, ValueError):
                    existing = None
                if existing is not None and (existing.shape != shape or existing.dtype != dtype):
                    existing = None
            maps[name] = existing if existing is not None else \
                np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        self.x, self.y = maps["x.npy"], maps["y.npy"]

    def write(self, start: int, x: np.ndarray, y: np.ndarray) -> None:
        self.x[start:start + len(x)] = x
        self.y[start:start + len(y)] = y

    def flush(self) -> None:
        """Everything written so far to the files (before a checkpoint records it as done)."""
        self.x.flush()
        self.y.flush()

    def finish(self, dest: Path) -> tuple[str, int]:
        """Pack into dest (.npz, written under a temporary name and renamed); returns
        (sha256, size). The bytes depend only on the arrays. The working files are removed."""
        self.flush()
        del self.x, self.y  # close the memory maps before reading the files back
        tmp = dest.with_name(dest.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in ("x.npy", "y.npy"):
                info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
                info.external_attr = 0o644 << 16
                with (self.folder / name).open("rb") as src, zf.open(info, "w", force_zip64=True) as out:
                    shutil.copyfileobj(src, out, CHUNK)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
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


def write_atomic(path: Path, data: bytes) -> None:
    """path holds data, or (after a crash) what it held before: never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class BuildCheckpoint:
    """How far a dataset build got, in its job folder: progress.json (examples done, a batch
    boundary) and stats.npz (the per-example diagnostics of those examples). Saved after the
    examples themselves are flushed to the writer's files, so it never claims more than is there."""

    def __init__(self, folder: Path) -> None:
        self.progress = folder / "progress.json"
        self.stats = folder / "stats.npz"

    def load(self, n: int) -> tuple[int, dict[str, np.ndarray]]:
        """(examples done, their stats); (0, {}) when there is no usable checkpoint."""
        try:
            done = int(json.loads(self.progress.read_text())["done"])
            with np.load(self.stats, allow_pickle=False) as z:
                stats = {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
            return 0, {}
        if not 0 < done <= n or any(len(v) < done for v in stats.values()):
            return 0, {}
        return done, {k: v[:done] for k, v in stats.items()}  # (stats are saved first: they may run ahead)

    def save(self, done: int, stats: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **stats)
        write_atomic(self.stats, buf.getvalue())
        write_atomic(self.progress, json.dumps({"done": int(done)}).encode())
