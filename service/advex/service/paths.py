"""No traffic and no files outside the data dir: where the libraries the server runs would put
temporary files and caches, pointed inside it, and onnxruntime's telemetry off.

What wrote outside it (measured on Linux): onnxruntime's telemetry (a device id and an event cache
in ~/.cache/Microsoft and $TMPDIR, and uploads to Microsoft: see advex.engine.onnx_model);
torch.export / torch.onnx (the ONNX export) making $TMPDIR/torchinductor_<user>; Python's
tempfile (the export's working folder); SQLite's temporary files in /var/tmp (the store keeps
them in memory instead: see store.Store). On a GPU, the CUDA driver's JIT cache (~/.nv) and
Triton's (~/.triton) would follow.

`confine` runs once, when the server starts, before the store is opened, a model is loaded or an
upload is checked; the processes the server starts afterwards (the upload checks) inherit it.
It changes the process environment: an in-process server (tests, notebooks) changes its host
process's, and the last one started wins."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from advex.engine import onnx_model

log = logging.getLogger("advex.server")

TMP = "tmp"      # <data_dir>/tmp: temporary files and folders (Python's tempfile, TMPDIR)
CACHE = "cache"  # <data_dir>/cache: caches of torch, Triton, CUDA, matplotlib


def environment(data_dir: str | Path) -> dict[str, str]:
    """The variables `confine` sets, for a data dir."""
    root = Path(data_dir).resolve()
    tmp, cache = root / TMP, root / CACHE
    env = {
        "TMPDIR": tmp, "TMP": tmp, "TEMP": tmp,      # tempfile and C libraries' temporary files
        "SQLITE_TMPDIR": tmp,                        # SQLite in processes started from here
        "XDG_CACHE_HOME": cache,                     # ~/.cache: torch's kernel cache, onnxruntime, ...
        "TORCH_HOME": cache / "torch",               # torch.hub
        "TORCHINDUCTOR_CACHE_DIR": cache / "torchinductor",  # else $TMPDIR/torchinductor_<user>
        "TORCH_EXTENSIONS_DIR": cache / "torch_extensions",
        "TRITON_HOME": cache,                        # else ~/.triton
        "TRITON_CACHE_DIR": cache / "triton",
        "CUDA_CACHE_PATH": cache / "nv",             # else ~/.nv/ComputeCache
        "MPLCONFIGDIR": cache / "matplotlib",        # else ~/.config/matplotlib, ~/.cache/matplotlib
        onnx_model.TELEMETRY_ENV: "1",
        "PYTHONDONTWRITEBYTECODE": "1",              # no __pycache__ beside the installed code
    }
    return {k: str(v) for k, v in env.items()}


def confine(data_dir: str | Path) -> dict[str, str]:
    """Point every temporary and cache folder of this process, and of the processes it starts,
    inside `data_dir` (making <data_dir>/tmp and <data_dir>/cache), and turn onnxruntime's
    telemetry off. Returns the variables it set."""
    env = environment(data_dir)
    for folder in (env["TMPDIR"], env["XDG_CACHE_HOME"]):
        Path(folder).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    tempfile.tempdir = env["TMPDIR"]  # gettempdir() caches its first answer: set it, not only TMPDIR
    sys.dont_write_bytecode = True
    if not onnx_model.disable_telemetry():
        log.warning("onnxruntime was imported before its telemetry could be turned off: it may still send "
                    "events from this process (set %s=1 in the environment to be sure)", onnx_model.TELEMETRY_ENV)
    return env
