"""No traffic and no files outside the data dir: a real `advex serve` process with HOME, TMPDIR and
its working directory pointed at empty folders (XDG_CACHE_HOME and the other cache variables
unset) takes an ONNX upload (checked in the sandbox child), a dataset, an Evaluate with the Square
attack, an Attack, an ONNX export, and lists; then it stops, and

- HOME, TMPDIR and the working directory are still empty, /var/tmp holds no new SQLite temporary
  file (etilqs_*), and the data dir holds the store, the models and its tmp and cache folders;
- Python's audit hooks in the server process saw no socket connect, send or name lookup, no
  urllib or http.client use, and no file written or folder made outside the data dir;
- under strace (when installed; CI fails without it), no process of the server (the upload
  checks included) connected or sent to an address other than loopback, or to port 53 at all,
  or made or wrote a file outside the data dir, /dev (/dev/null, and the POSIX semaphores
  multiprocessing makes and unlinks at once in /dev/shm) and /proc: this sees what native code
  does (onnxruntime's telemetry upload, SQLite's temporary files), which the hooks cannot.

The server is kept up until 15 s after its first onnxruntime session: onnxruntime 1.31's
telemetry looks its collector up about 10 s after one (measured), so it would show here."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from advex.client import Client
from advex.engine.loaders import safetensors_bytes
from advex.engine.zoo import build

STRACE = shutil.which("strace")
SYSCALLS = ("open,openat,creat,mkdir,mkdirat,rename,renameat,renameat2,link,linkat,symlink,symlinkat,truncate,"
            "connect,sendto,sendmsg,sendmmsg")
CACHE_VARIABLES = ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TMPDIR", "TMP", "TEMP", "SQLITE_TMPDIR", "TORCH_HOME",
                   "TORCHINDUCTOR_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "TRITON_HOME", "TRITON_CACHE_DIR",
                   "CUDA_CACHE_PATH", "MPLCONFIGDIR", "ORT_DISABLE_TELEMETRY")
TELEMETRY_WAIT_S = 15.0

# Installed in the server process before advex is imported: every audit event that reaches the
# network or writes a file goes to fd HOOK_FD as one JSON line (os.write raises no event).
HOOK = r'''
import json, os, sys
fd = int(os.environ.pop("ADVEX_TEST_HOOK_FD"))
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
NET = {"socket.connect", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
       "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.getnameinfo", "http.client.connect",
       "urllib.Request", "ftplib.connect", "smtplib.connect", "webbrowser.open"}
FILES = {"os.mkdir": (0,), "os.rename": (1,), "os.replace": (1,), "os.link": (1,), "os.symlink": (1,),
         "shutil.copyfile": (1,), "shutil.copytree": (1,), "tempfile.mkstemp": (0,), "tempfile.mkdtemp": (0,),
         "os.truncate": (0,)}

def _path(p):
    if isinstance(p, int):
        return None
    p = os.fsdecode(os.fspath(p))
    return os.path.abspath(p)

def _emit(kind, event, detail):
    os.write(fd, (json.dumps({"kind": kind, "event": event, "detail": detail}, default=repr) + "\n").encode())

def hook(event, args):
    try:
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS
            if writes and _path(path) is not None:
                _emit("file", event, _path(path))
        elif event in FILES:
            for k in FILES[event]:
                if _path(args[k]) is not None:
                    _emit("file", event, _path(args[k]))
        elif event in NET:
            sock = args[0] if args and hasattr(args[0], "family") else None
            rest = list(args[1:] if sock is not None else args)
            _emit("net", event, {"family": int(sock.family) if sock is not None else None, "args": rest})
    except Exception as exc:
        _emit("error", event, repr(exc))

sys.addaudithook(hook)
print(f"pid {os.getpid()}", flush=True)  # the server's (under strace, the test signals it, not strace)
from advex.client.cli import main
sys.exit(main(sys.argv[1:]))
'''


LOOPBACK = ("localhost", "::1", "::ffff:127.0.0.1")


def local(event: dict) -> bool:
    """An audited network event that stays on this machine: a Unix socket (the upload checks'
    socket pairs), a send on a connected socket, or loopback (the address checks before the
    server binds), never port 53."""
    detail = event["detail"]
    if event["event"] in ("http.client.connect", "urllib.Request", "ftplib.connect", "smtplib.connect",
                          "webbrowser.open"):
        return False
    if detail["family"] == socket.AF_UNIX:
        return True
    args = detail["args"]
    if event["event"].startswith("socket.get"):  # a name lookup: only of loopback
        host = args[0] if args else None
        return host is None or host in LOOPBACK or str(host).startswith("127.")
    address = args[0] if args else None
    if address is None:
        return True
    host, port = (address[0], address[1]) if isinstance(address, (list, tuple)) else (address, None)
    return (str(host).startswith("127.") or host in LOOPBACK) and port != 53


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sqlite_temp_files() -> set[str]:
    try:
        return {p.name for p in Path("/var/tmp").iterdir() if p.name.startswith(("etilqs_", "sqlite_"))}
    except OSError:
        return set()


def tiny_onnx_graph() -> bytes:
    """A 2-class linear model on [N,1,4,4] images, written with onnx.helper (no torch export)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(16, 2)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(2, np.float32), "b")
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1), helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


# ------------------------------------------------------------------------------------ strace
_CALL = re.compile(r"^(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>-?\d+|\?)(?P<err>.*)$")
_STRING = r'"((?:[^"\\]|\\.)*)"'
_PATH_ARGS = {"open": [0], "creat": [0], "mkdir": [0], "truncate": [0], "rename": [1], "link": [1],
              "symlink": [1], "openat": [0], "mkdirat": [0], "renameat": [1], "renameat2": [1], "linkat": [1],
              "symlinkat": [1]}
_ADDRESS = re.compile(r"sa_family=(?P<family>AF_INET6?)[^}]*?(?:sin6?_port=htons\((?P<port>\d+)\))"
                      r"[^}]*?(?:inet_addr\(\"(?P<v4>[^\"]+)\"\)|inet_pton\(AF_INET6, \"(?P<v6>[^\"]+)\")")


def _unescape(s: str) -> str:
    return s.encode("latin-1", "backslashreplace").decode("unicode_escape", "replace")


def strace_findings(folder: Path, cwd: Path, allowed: list[Path]) -> tuple[list[str], list[str], dict]:
    """(files made or written outside `allowed`, connections and sends off this machine or to
    DNS, facts) from the strace -ff -y logs in `folder`. Relative paths are taken from `cwd`."""
    files, net = [], []
    facts = {"processes": 0, "creates_inside": 0}
    for log in sorted(folder.glob("trace.*")):
        facts["processes"] += 1
        for line in log.read_text(errors="replace").splitlines():
            m = _CALL.match(line)
            if not m:
                continue
            name, args, ret = m["name"], m["args"], m["ret"]
            if name in ("connect", "sendto", "sendmsg", "sendmmsg"):
                for a in _ADDRESS.finditer(args):
                    host = a["v4"] or a["v6"]
                    loopback = host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")
                    if not loopback or a["port"] == "53":
                        net.append(f"{log.name}: {line[:300]}")
                if "AF_UNIX" in args and "resolve" in args:
                    net.append(f"{log.name}: {line[:300]}")
                continue
            if name not in _PATH_ARGS or ret == "?" or int(ret) < 0:
                continue  # nothing was made
            at = name.endswith("at") or name == "renameat2"
            strings = re.findall(_STRING, args)
            if not strings:
                continue
            if name in ("open", "openat"):
                flags = args.split('", ', 1)[1] if '", ' in args else ""
                if not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND", flags):
                    continue
            k = _PATH_ARGS[name][0]
            path = _unescape(strings[min(k, len(strings) - 1)])
            base = cwd
            if at:
                dirs = re.findall(r"(?:^|, )(-?\d+)<([^>]*)>", args)
                if not path.startswith("/") and dirs:
                    base = Path(_unescape(dirs[min(k, len(dirs) - 1)][1]))
            full = Path(os.path.normpath(base / path))
            if any(full == a or a in full.parents for a in allowed[:1]):
                facts["creates_inside"] += 1
                continue
            if any(full == a or a in full.parents for a in allowed[1:]):
                continue
            files.append(f"{log.name}: {name} {full}")
    return files, net, facts


# ------------------------------------------------------------------------------------ the test
def test_server_sends_nothing_and_writes_only_in_its_data_dir(tmp_path):
    home, tmp, cwd, data, traces = (tmp_path / n for n in ("home", "tmp", "cwd", "data", "traces"))
    for d in (home, tmp, cwd, traces):
        d.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    # PYTHONDONTWRITEBYTECODE: the interpreter would cache the bytecode of source files changed since
    # the last run beside them (the install's business, not the server's: it writes none once started)
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    read_hook, write_hook = os.pipe()
    env["ADVEX_TEST_HOOK_FD"] = str(write_hook)
    serve = [sys.executable, "-c", HOOK, "serve", "--port", str(port), "--metrics-port", "0",
             "--data-dir", str(data), "--shutdown-grace-s", "1"]
    if STRACE:
        serve = [STRACE, "-ff", "-qq", "-y", "-e", f"trace={SYSCALLS}", "-e", "signal=none",
                 "-o", str(traces / "trace")] + serve
    var_tmp = sqlite_temp_files()
    proc = subprocess.Popen(serve, cwd=cwd, env=env, pass_fds=(write_hook,), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    os.close(write_hook)
    try:
        first = proc.stdout.readline()
        assert first.startswith("pid "), first + proc.stdout.read()
        server_pid = int(first.split()[1])
        line = proc.stdout.readline()
        assert f"serving on 127.0.0.1:{port}" in line, line + proc.stdout.read()
        torch.manual_seed(0)
        cnn = build("small_cnn", (1, 4, 4), 2, {"width": 2}).eval()
        x = (np.random.default_rng(0).random((8, 1, 4, 4)) * 255).astype(np.uint8)
        y = np.arange(8) % 2
        with Client(f"127.0.0.1:{port}") as c:
            onnx_model = c.upload_model(tiny_onnx_graph(), format="onnx", name="tiny onnx")  # checked in the child
            first_session = time.monotonic()
            torch_model = c.upload_model(safetensors_bytes(cnn), format="safetensors", architecture="small_cnn",
                                         num_classes=2, input_shape=[1, 4, 4], arch_args={"width": 2})
            ds = c.upload_dataset((x, y), num_classes=2, split="test")
            ev = c.evaluate(onnx_model.id, ds.id, attacks=[{"method": "square", "norm": "Linf", "eps": [0.1],
                                                            "steps": 10}]).result(timeout=300, progress=False)
            assert ev.clean_accuracy >= 0
            exported = c.export_model(torch_model.id, ds.id, name="exported").result(timeout=300, progress=False)
            assert exported.agreement_rate == 1.0
            adv = c.attack(exported.model_id, x[:4].astype(np.float32) / 255, y[:4], method="square", eps=0.1,
                           steps=10)
            assert adv.x_adv.shape == (4, 1, 4, 4)
            assert {m.id for m in c.list_models(page_size=1)} == {onnx_model.id, torch_model.id, exported.model_id}
            assert ds.id in {d.id for d in c.list_datasets()}
            assert len(c.list_operations(page_size=1)) == 2
            time.sleep(max(0.0, TELEMETRY_WAIT_S - (time.monotonic() - first_session)))
        os.kill(server_pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, line + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with os.fdopen(read_hook) as f:
        events = [json.loads(line) for line in f if line.strip()]

    assert list(home.iterdir()) == [], f"files in HOME: {sorted(map(str, home.rglob('*')))}"
    assert list(tmp.iterdir()) == [], f"files in TMPDIR: {sorted(map(str, tmp.rglob('*')))}"
    assert list(cwd.iterdir()) == [], f"files in the working directory: {sorted(map(str, cwd.rglob('*')))}"
    assert sqlite_temp_files() <= var_tmp, f"SQLite temporary files in /var/tmp: {sqlite_temp_files() - var_tmp}"
    assert (data / "advex.sqlite3").is_file() and len(list((data / "artifacts" / "models").iterdir())) == 3
    assert (data / "tmp").is_dir() and (data / "cache").is_dir()
    telemetry = [p for p in (data / "cache" / "Microsoft", data / "tmp" / ".ses") if p.exists()]
    assert not telemetry, f"onnxruntime's telemetry ran (its device id and event cache): {telemetry}"

    root = data.resolve()
    errors = [e for e in events if e["kind"] == "error"]
    net = [e for e in events if e["kind"] == "net"]
    outside = [e for e in events if e["kind"] == "file" and not Path(e["detail"]).resolve().is_relative_to(root)
               and not e["detail"].startswith(("/dev/", "/proc/"))]
    inside = [e for e in events if e["kind"] == "file" and Path(e["detail"]).resolve().is_relative_to(root)]
    assert not errors, errors[:5]
    net = [e for e in net if not local(e)]
    assert not net, f"network calls from the server's Python code: {net[:10]}"
    assert not outside, f"files written outside the data dir: {outside[:10]}"
    assert inside, "the audit hook saw no write at all, not even the uploads' in the data dir"

    if STRACE is None:
        msg = ("strace is not installed: native code (onnxruntime, SQLite) was not watched for network "
               "traffic and files; apt-get install strace")
        if os.environ.get("CI"):
            pytest.fail(msg)
        warnings.warn(msg)
        return
    files, connections, facts = strace_findings(traces, cwd, [root, Path("/dev"), Path("/proc")])
    assert facts["processes"] >= 3, facts  # the server, the upload-check helper, its child for the check
    assert facts["creates_inside"] > 0, "strace saw no file made even in the data dir"
    assert not connections, "\n".join(["connections off this machine or to DNS:"] + connections[:20])
    assert not files, "\n".join(["files made or written outside the data dir:"] + files[:40])


SORT_SCRIPT = r'''
import os, sqlite3, sys
from advex.service.store import Store
path = sys.argv[2]
db = sqlite3.connect(path, isolation_level=None) if sys.argv[1] == "plain" else Store(path)._db
db.execute("CREATE TABLE t (k REAL, v BLOB)")
db.execute("BEGIN")
db.executemany("INSERT INTO t VALUES (?, ?)", ((float(i % 97), os.urandom(2000)) for i in range(5000)))
db.execute("COMMIT")
db.execute("PRAGMA cache_size=10")
db.execute("SELECT v FROM t ORDER BY k").fetchall()  # a sort larger than the cache: it spills
print(db.execute("PRAGMA temp_store").fetchone()[0])
'''


def test_the_store_keeps_sqlite_temporary_files_in_memory(tmp_path):
    """SQLite reads its temporary folder (SQLITE_TMPDIR, TMPDIR, else /var/tmp) once per process,
    when the sqlite3 module loads, before server code can point it anywhere: the store keeps
    temporary files in memory (temp_store=MEMORY) instead. A sort larger than the cache spills to
    a temporary file on a connection with SQLite's defaults, and not on the store's."""
    from advex.service.store import Store

    store = Store(tmp_path / "s.db")
    assert store._db.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    store.close()
    if STRACE is None:
        if os.environ.get("CI"):
            pytest.fail("strace is not installed (apt-get install strace)")
        pytest.skip("strace is not installed: the temporary files themselves are not watched")
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    traced = {}
    for mode in ("plain", "store"):
        log = tmp_path / f"{mode}.trace"
        out = subprocess.run([STRACE, "-f", "-qq", "-e", "trace=open,openat", "-o", str(log), sys.executable, "-c",
                              SORT_SCRIPT, mode, str(tmp_path / f"{mode}.db")], capture_output=True, text=True,
                             timeout=120, env=env, check=True).stdout
        traced[mode] = (out.strip(), "etilqs_" in log.read_text())
    assert traced["plain"] == ("0", True), "the sort did not spill with SQLite's defaults: the check proves nothing"
    assert traced["store"] == ("2", False)
