"""The check of an uploaded program (torch_export, TorchScript, ONNX: parse, load, run a batch of
two) in a child process under a memory limit (RLIMIT_AS) and a wall-clock timeout, so that a
hostile or huge program cannot take the server down: past either limit the child is killed and
the upload refused, naming the limit.

Children are forked by a helper process (``python -c ...``, started on the first check, gone
when the server's end of its socket closes) that has torch, the engine and the contract imported
once, so a check costs a fork, not a fresh interpreter. (multiprocessing's forkserver would do the
same but re-imports the parent's __main__ script in every child.) Each check gets its own socket
pair: the job goes in as JSON, the child answers its pid and then its result as JSON: never a
pickle, since the parent does not unpickle what a process that ran an untrusted program sends."""
from __future__ import annotations

import importlib
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from advex.service.config import ServerConfig

DEFAULT_TIMEOUT_S = ServerConfig.upload_check_timeout_s   # the settings' defaults: one place for each fact
DEFAULT_MEMORY_MB = ServerConfig.upload_check_memory_mb
PRELOAD = ["advex.service.registry", "onnxruntime"]
_MAX_ANSWER = 1 << 20


@dataclass(frozen=True)
class Limits:
    """timeout_s: wall-clock seconds for the whole check (load + a batch of two).
    memory_mb: address space the check may add to the (already loaded) interpreter.
    threads: torch threads in the child."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    memory_mb: int = DEFAULT_MEMORY_MB
    threads: int = 2


class LimitExceeded(Exception):
    """The check ran past a limit; ``limit`` is "timeout" or "memory"."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class CheckCrashed(Exception):
    """The child died without answering, or answered something that is not a result."""


class _Helper:
    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        code = ("import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
                "from advex.service.sandbox import _serve; _serve(int(sys.argv[2]))")
        # few malloc arenas: each thread's arena reserves 64 MiB of the address space RLIMIT_AS counts
        env = dict(os.environ, MALLOC_ARENA_MAX=os.environ.get("MALLOC_ARENA_MAX", "4"))
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(sys.path), str(child.fileno())],
                                     pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, close_fds=True, env=env)
        child.close()
        self.sock = parent

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_lock = threading.Lock()
_helper: Optional[_Helper] = None


def _send_job(mine: socket.socket, theirs: socket.socket) -> None:
    global _helper
    with _lock:
        for attempt in (0, 1):
            if _helper is None or not _helper.alive():
                if _helper is not None:
                    _helper.close()
                _helper = _Helper()
            try:
                socket.send_fds(_helper.sock, [b"J"], [theirs.fileno()])
                return
            except OSError:
                _helper.close()
                _helper = None
                if attempt:
                    raise


def run(func_name: str, args: list, limits: Limits) -> dict:
    """``module:function`` called with JSON-able ``args`` in a child under ``limits``; returns its
    JSON-able dict. Raises LimitExceeded or CheckCrashed."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _send_job(mine, theirs)
        theirs.close()
        mine.sendall(json.dumps({"func": func_name, "args": args, "memory_mb": int(limits.memory_mb),
                                 "threads": int(limits.threads)}).encode())
        mine.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + float(limits.timeout_s)
        received = bytearray()
        pid: Optional[int] = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([mine], [], [], left)[0]:
                if pid is not None:
                    _kill(pid)
                raise LimitExceeded("timeout", f"took longer than the limit of {limits.timeout_s:g} s")
            block = mine.recv(1 << 16)
            if not block:
                break
            received += block
            if pid is None and b"\n" in received:
                line, _, rest = bytes(received).partition(b"\n")
                pid, received = int(line), bytearray(rest)
            if len(received) > _MAX_ANSWER:
                raise CheckCrashed("the check answered more than a result")
    finally:
        mine.close()
        theirs.close()
    if not received:
        raise CheckCrashed(f"the check died without an answer (killed or crashed; past the memory limit of "
                           f"{limits.memory_mb} MiB?)")
    try:
        answer = json.loads(bytes(received))
    except ValueError as exc:
        raise CheckCrashed(f"the check answered something that is not a result ({exc})") from exc
    if not isinstance(answer, dict):
        raise CheckCrashed("the check answered something that is not a result")
    if answer.get("limit") == "memory":
        raise LimitExceeded("memory", f"needed more memory than the limit of {limits.memory_mb} MiB "
                                      f"({str(answer.get('detail', ''))[:300]})")
    return answer


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------ in the helper process

def _serve(fd: int) -> None:
    """The helper: preload, then fork one child per job until the server's socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the server's Ctrl-C is the server's; EOF ends us
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    _warm_up()
    control = socket.socket(fileno=fd)
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(control, 16, 4)
        except (OSError, ValueError):
            break
        if not msg:
            break
        for job_fd in fds:
            if os.fork() == 0:
                control.close()
                _child(job_fd)  # never returns
            os.close(job_fd)


def _warm_up() -> None:
    """Export, save, load and run a tiny program once, so that the lazy imports and caches of
    torch.export (sympy, the serializer, dynamo's guards) are in the helper, not redone per check."""
    try:
        import io
        import warnings

        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
            ep = torch.export.export(net, (torch.rand(2, 1, 2, 2),), dynamic_shapes=({0: torch.export.Dim("batch")},))
            buf = io.BytesIO()
            torch.export.save(ep, buf)
            buf.seek(0)
            with torch.no_grad():
                torch.export.load(buf).module()(torch.rand(3, 1, 2, 2))
    except Exception:  # only a speed-up
        pass


def _child(fd: int) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    conn = socket.socket(fileno=fd)
    answer: Any
    try:
        conn.sendall(f"{os.getpid()}\n".encode())
        raw = bytearray()
        while True:
            block = conn.recv(1 << 16)
            if not block:
                break
            raw += block
        job = json.loads(bytes(raw))
        _limit_memory(job["memory_mb"])
        import torch

        torch.set_num_threads(max(1, int(job["threads"])))
        module, _, name = job["func"].partition(":")
        answer = getattr(importlib.import_module(module), name)(*job["args"])
    except BaseException as exc:  # noqa: BLE001 - whatever the program did, answer in JSON
        answer = ({"limit": "memory", "detail": _text(exc)} if is_memory_error(exc)
                  else {"crash": f"{type(exc).__name__}: {_text(exc)}"})
    try:
        conn.sendall(json.dumps(answer).encode())
        conn.close()
    finally:
        os._exit(0)


def _limit_memory(memory_mb: int) -> None:
    """RLIMIT_AS: what this process has mapped now (the interpreter, torch, ...) plus memory_mb."""
    mapped = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                mapped = int(line.split()[1]) * 1024
    want = mapped + (int(memory_mb) << 20)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_AS, (want, want if hard == resource.RLIM_INFINITY else hard))


_MEMORY_TEXTS = ("can't allocate memory", "cannot allocate memory", "bad_alloc", "out of memory",
                 "failed to allocate", "memory allocation")


def is_memory_error(exc: Optional[BaseException]) -> bool:
    """exc, or what it was raised from, is an allocation failure."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, MemoryError):
            return True
        text = str(exc).lower()
        if any(t in text for t in _MEMORY_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _text(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + "..."
