"""Server configuration: one source, flags over environment (ADVEX_*) over defaults.

Every setting is one field of ``ServerConfig``; its default, its meaning (the help text of
`advex serve --help`) and its allowed values are declared next to it, and ``load`` is the one
place that reads, converts and checks them. A bad value raises ``ConfigError`` with one line
that names the setting, where the value came from (flag or environment variable) and the value.
"""
from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, get_type_hints

ENV_PREFIX = "ADVEX_"
DEFAULT_DATA_ROOT = "/usr/share/datasets"   # where Debian installs datasets (dataset-fashion-mnist)
LEGACY_DATA_ROOT_ENV = "ADVEX_DATA_ROOT"    # the tests' setting; one more source of data roots


class ConfigError(ValueError):
    """A setting cannot be used; str(error) is one line naming the setting, its source and value."""


def _setting(default: Any = MISSING, *, help: str, factory: Optional[Callable[[], Any]] = None,
             minimum: Optional[float] = None, maximum: Optional[float] = None,
             check: Optional[Callable[[Any], Optional[str]]] = None, expect: str = "",
             metavar: Optional[str] = None, shown: Optional[str] = None, sep: str = os.pathsep):
    """A ServerConfig field with its meaning (help), limits and, for odd values, a check that
    returns what was expected or None. ``shown``: the default as the help prints it; ``sep``: what
    separates a list's items in one environment variable."""
    meta = {"help": help, "minimum": minimum, "maximum": maximum, "check": check, "expect": expect,
            "metavar": metavar, "shown": shown, "sep": sep}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _check_host(value: str) -> Optional[str]:
    if not value or any(c.isspace() for c in value) or "[" in value or "]" in value:
        return "a host name, an IPv4 address, or an IPv6 address (::1 or [::1])"
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return "an IPv6 address such as ::1 or [::1] (a host name or IPv4 address has no ':')"
    return None


LOOPBACK = "loopback"


def _check_metrics_host(value: str) -> Optional[str]:
    return None if value == LOOPBACK else _check_host(value)


_HOST = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252})"
ENDPOINT_HOST = re.compile(rf"^{_HOST}(:[0-9]{{1,5}})?$")
# NAME[@HOST[:PORT]]=env:VARIABLE or =file:PATH; groups: name, host, ":port", kind, where
CREDENTIAL = re.compile(rf"^([A-Za-z][A-Za-z0-9_-]{{0,63}})(?:@{_HOST}(:[0-9]{{1,5}})?)?=(env|file):(.+)$")


def _check_endpoint_hosts(value: list) -> Optional[str]:
    for item in value:
        match = ENDPOINT_HOST.match(item)
        if not match or (match.group(2) and not 0 < int(match.group(2)[1:]) < 65536):
            return f"host or host:port entries ({item!r} is neither; IPv6 as [::1]:8081)"
    return None


def _check_credentials(value: list) -> Optional[str]:
    names = set()
    for item in value:
        match = CREDENTIAL.match(item)
        if not match:
            return "NAME=env:VARIABLE or NAME=file:PATH entries, NAME@HOST[:PORT]=... to bind one to a host"
        if match.group(1) in names:
            return f"each NAME once ({match.group(1)!r} is given twice)"
        names.add(match.group(1))
    return None


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # advex.engine.models.PRECISIONS (no torch import here)
ONNX_PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")  # advex.engine.onnx_model.ONNX_PROVIDERS
COMPILE_MODES = ("auto", "off", "on")  # advex.engine.models.COMPILE_MODES


def _check_device(value: str) -> Optional[str]:
    return None if DEVICE_PATTERN.match(value) else "one of auto, cpu, cuda, cuda:N"


def _check_nonempty(value: str) -> Optional[str]:
    return None if value.strip() else "a non-empty path"


@dataclass
class ServerConfig:
    host: str = _setting(
        "127.0.0.1", metavar="HOST", check=_check_host,
        help="address the gRPC server listens on: a host name, an IPv4 address, "
             "or an IPv6 address written ::1 or [::1]; 0.0.0.0 or :: for all interfaces (the metrics endpoint "
             "has its own --metrics-host)")
    port: int = _setting(
        50051, minimum=0, maximum=65535, metavar="PORT",
        help="gRPC port; 0 picks a free one. The server refuses a port another process listens on")
    metrics_port: int = _setting(
        9108, minimum=0, maximum=65535, metavar="PORT",
        help="port of the Prometheus endpoint http://METRICS_HOST:PORT/metrics; 0 = no metrics endpoint")
    metrics_host: str = _setting(
        LOOPBACK, metavar="HOST", check=_check_metrics_host,
        help="address the metrics endpoint listens on, apart from --host so that serving gRPC on 0.0.0.0 does "
             "not expose /metrics: 'loopback' = 127.0.0.1, or ::1 when --host is an IPv6 address; "
             "0.0.0.0 or :: to let another machine scrape it")
    data_dir: str = _setting(
        "advex-data", metavar="DIR", check=_check_nonempty,
        help="folder for the SQLite store (advex.sqlite3) and the uploaded and produced artifacts")
    data_roots: list[str] = _setting(
        factory=lambda: [DEFAULT_DATA_ROOT], metavar="DIR", shown=DEFAULT_DATA_ROOT,
        help="folders searched for built-in datasets (mnist, cifar10, fashion-mnist), in this order: "
             "--data-roots (repeatable), then ADVEX_DATA_ROOTS, then ADVEX_DATA_ROOT (both ':'-separated), "
             f"then {DEFAULT_DATA_ROOT}, which is always searched last; the first folder holding a dataset "
             "wins. Nothing is downloaded")
    device: str = _setting(
        "auto", check=_check_device, metavar="DEVICE",
        help="where models run: auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    precision: str = _setting(
        "auto", check=lambda v: None if v in PRECISIONS else "one of " + ", ".join(PRECISIONS), metavar="P",
        help="how models run in training, attacks, evaluations and builds: auto (bf16 on CUDA GPUs that have it, fp16 "
             "with gradient scaling on older ones, fp32 on the CPU), fp32, bf16 or fp16; the attack's iterate, "
             "projection and objective stay fp32, and 16-bit results agree with fp32 within their intervals")
    compile: str = _setting(
        "auto", check=lambda v: None if v in COMPILE_MODES else "one of " + ", ".join(COMPILE_MODES), metavar="MODE",
        help="torch.compile for models loaded for attacks, evaluations and builds: auto (on CUDA only; on the CPU "
             "compiling costs more than it saves), on or off. Inductor without CUDA graphs, the batch dimension "
             "dynamic; compiling happens at a model's first call, and a model whose compilation fails logs one "
             "warning and runs eagerly. ONNX graphs, endpoints and TorchScript are never compiled")
    onnx_provider: str = _setting(
        "auto", check=lambda v: None if v in ONNX_PROVIDERS else "one of " + ", ".join(ONNX_PROVIDERS),
        metavar="PROVIDER",
        help="onnxruntime execution provider of ONNX models: auto (CUDA when the device is a CUDA GPU and "
             "onnxruntime has it, else CPU), cpu, cuda or tensorrt (TensorRT with CUDA and CPU behind it, in fp16 "
             "when --precision is 16-bit on the GPU: bf16, fp16 or auto); a provider onnxruntime lacks or cannot "
             "start falls back to the next one with a warning")
    workers: int = _setting(
        1, minimum=1, metavar="N",
        help="long operations (train, evaluate, export, ...) that run at the same time")
    max_queue: int = _setting(
        16, minimum=1, metavar="N",
        help="queued + running operations; beyond it new ones get RESOURCE_EXHAUSTED")
    max_batch: int = _setting(
        1024, minimum=1, metavar="N",
        help="largest batch an inline Attack call accepts (use Evaluate for datasets)")
    attack_merge_rows: int = _setting(
        1024, minimum=0, metavar="N",
        help="concurrent Attack calls for the same model and PGD or FGSM settings are merged into one engine "
             "batch of at most this many rows (each call keeps its own random start); 0 = no merging")
    attack_merge_window_ms: float = _setting(
        2.0, minimum=0.0, maximum=1000.0, metavar="MS",
        help="how long an Attack call waits for others to merge with when none of its kind is running; "
             "while one runs, arriving calls gather for the next batch anyway")
    max_upload_mb: int = _setting(
        1024, minimum=1, metavar="MB",
        help="largest model or dataset upload, in MiB")
    max_steps: int = _setting(
        10000, minimum=1, metavar="N",
        help="most attack or training steps a request may ask for")
    max_restarts: int = _setting(
        100, minimum=0, metavar="N",
        help="most random restarts an attack may ask for (0 = none allowed)")
    max_attack_cost: int = _setting(
        1 << 20, minimum=1, metavar="EXAMPLE_STEPS",
        help="work budget of one Attack call (it runs in the small interactive pool, beside uploads), in "
             "example-steps: examples x steps x (restarts + 1); Square: examples x queries. Beyond it: "
             "RESOURCE_EXHAUSTED (use Evaluate for datasets). The default is 1024 examples x 1024 steps")
    max_operation_cost: int = _setting(
        10 ** 10, minimum=1, metavar="EXAMPLE_STEPS",
        help="work budget of one long operation, in example-steps summed over everything it asks: Evaluate "
             "examples x steps x (restarts + 1) per attack and eps, Train examples x epochs x (adversarial "
             "steps x (restarts + 1) + 1), Robustify / BuildNonRobustDataset examples x steps, TransferRate "
             "examples x sources x steps x (restarts + 1). Beyond it: RESOURCE_EXHAUSTED")
    max_dataset_mb: int = _setting(
        2048, minimum=1, metavar="MB",
        help="largest decompressed dataset (.npz) upload, in MiB; checked from the archive's headers before "
             "anything is decompressed (and an archive may expand at most 100:1)")
    upload_check_timeout_s: float = _setting(
        120.0, minimum=1.0, metavar="SECONDS",
        help="wall-clock limit for checking an uploaded program (torch.export, TorchScript, ONNX) in a child process")
    upload_check_memory_mb: int = _setting(
        4096, minimum=64, metavar="MB",
        help="memory (address space) the check of an uploaded program may add, in MiB")
    max_concurrent_rpcs: int = _setting(
        256, minimum=1, metavar="N",
        help="calls in progress at once, all methods and connections together (streams included); beyond it "
             "gRPC answers RESOURCE_EXHAUSTED")
    max_streams_per_connection: int = _setting(
        100, minimum=1, metavar="N",
        help="concurrent calls one HTTP/2 connection may open (grpc.max_concurrent_streams); a client's "
             "further calls wait for a free stream")
    max_connections: int = _setting(
        512, minimum=1, metavar="N",
        help="open client connections (each holds a file descriptor); further ones are closed at once "
             "(grpc.max_allowed_incoming_connections)")
    max_concurrent_uploads: int = _setting(
        8, minimum=1, metavar="N",
        help="UploadModel + UploadDataset calls in progress at once (each holds an open temporary file); "
             "beyond it RESOURCE_EXHAUSTED")
    max_watch_streams: int = _setting(
        128, minimum=1, metavar="N",
        help="WatchOperation streams open at once; beyond it RESOURCE_EXHAUSTED (WaitOperation polls instead)")
    upload_idle_timeout_s: float = _setting(
        60.0, minimum=0.1, metavar="SECONDS",
        help="an upload that sends no message for this long is ended with DEADLINE_EXCEEDED and its "
             "temporary file removed")
    keepalive_time_s: float = _setting(
        120.0, minimum=1.0, metavar="SECONDS",
        help="while a connection has calls in progress, ping the client after this long without traffic, "
             "so that streams of a vanished client are closed (grpc.keepalive_time_ms)")
    keepalive_timeout_s: float = _setting(
        20.0, minimum=1.0, metavar="SECONDS",
        help="a keepalive ping not answered within this long closes the connection (grpc.keepalive_timeout_ms)")
    keepalive_min_client_interval_s: float = _setting(
        60.0, minimum=1.0, metavar="SECONDS",
        help="shortest interval between a client's keepalive pings the server tolerates; a client pinging more "
             "often is disconnected (grpc.http2.min_ping_interval_without_data_ms)")
    max_connection_idle_s: float = _setting(
        900.0, minimum=0.0, metavar="SECONDS",
        help="close a connection that has had no call in progress for this long (clients reconnect by "
             "themselves); 0 = never (grpc.max_connection_idle_ms)")
    max_connection_age_s: float = _setting(
        7200.0, minimum=0.0, metavar="SECONDS",
        help="ask a client to reconnect (GOAWAY) once its connection is this old, +-10%; new calls go to a "
             "new connection, calls in progress continue; 0 = never (grpc.max_connection_age_ms)")
    max_connection_age_grace_s: float = _setting(
        86400.0, minimum=0.0, metavar="SECONDS",
        help="after max_connection_age_s, calls still in progress on the old connection (a WatchOperation of a "
             "day-long operation) get this long before the connection is closed (grpc.max_connection_age_grace_ms)")
    token: Optional[str] = _setting(
        None, metavar="TOKEN", shown="none",
        help="when set, every call must send the header 'authorization: Bearer TOKEN'. A flag is visible in "
             "the process list: prefer --token-file or the environment variable")
    token_file: Optional[str] = _setting(
        None, metavar="FILE", shown="none", check=_check_nonempty,
        help="file holding the bearer token (read at start; a trailing newline is ignored); not together "
             "with --token")
    reflection_requires_token: bool = _setting(
        True, metavar="BOOL",
        help="with a token set, gRPC reflection (grpc.reflection.*) also needs it; health checks never do. "
             "true or false")
    tls_cert: Optional[str] = _setting(
        None, metavar="FILE", shown="none", check=_check_nonempty,
        help="PEM file of the server's certificate chain: serve TLS instead of plaintext (needs --tls-key)")
    tls_key: Optional[str] = _setting(
        None, metavar="FILE", shown="none", check=_check_nonempty,
        help="PEM file of the private key of --tls-cert")
    tls_client_ca: Optional[str] = _setting(
        None, metavar="FILE", shown="none", check=_check_nonempty,
        help="PEM file of the CAs whose client certificates the server requires (mutual TLS; needs "
             "--tls-cert and --tls-key)")
    shutdown_grace_s: float = _setting(
        10.0, minimum=0.0, metavar="SECONDS",
        help="on SIGTERM: stop accepting; dataset builds and training checkpoint and stop at once (they resume at "
             "the next start); other running work may finish this long, then it is cancelled; the store is closed")
    endpoint_hosts: list[str] = _setting(
        factory=list, metavar="HOST[:PORT]", shown="none", sep=",", check=_check_endpoint_hosts,
        help="the inference endpoints' hosts advex may connect to (RegisterEndpoint; repeatable, or ','-separated "
             "in the environment): a host name or address as the endpoint's url writes it, alone (any port) or "
             "with a port. Nothing else is ever contacted; with none, endpoints cannot be registered")
    endpoint_credentials: list[str] = _setting(
        factory=list, metavar="NAME=env:VAR|NAME=file:PATH", shown="none", sep=",", check=_check_credentials,
        help="secrets endpoints are queried with, by name (repeatable, or ','-separated in the environment): an "
             "EndpointSpec names one, the server reads it from its own environment variable or file when it "
             "queries, and sends it as 'authorization: Bearer <secret>'. NAME@HOST[:PORT]=... binds it to that "
             "host (and port): it is then never sent anywhere else. Neither the secret nor its source is ever "
             "stored or returned")
    endpoint_ca_file: Optional[str] = _setting(
        None, metavar="FILE", shown="none", check=_check_nonempty,
        help="PEM file of the CAs that https:// and grpcs:// endpoints' certificates are checked against "
             "(default: the system's)")
    endpoint_max_batch: int = _setting(
        1024, minimum=1, maximum=65536, metavar="N",
        help="most examples one request to an inference endpoint may carry (EndpointSpec.max_batch_size)")
    log_level: str = _setting(
        "info", metavar="LEVEL", check=lambda v: None if v in ("debug", "info", "warning", "error") else
        "one of debug, info, warning, error",
        help="what the server logs: info = start and stop, one line per RPC and per operation event; other "
             "libraries log warnings and errors only")
    log_format: str = _setting(
        "text", metavar="FORMAT", check=lambda v: None if v in ("text", "json") else "text or json",
        help="text lines, or one JSON object per line (time, level, logger, message, request_id, method, code, "
             "duration_ms, operation_id, kind, ...) for a log collector")
    config: Optional[str] = _setting(
        None, metavar="FILE", shown="none", check=_check_nonempty,
        help="a TOML file of settings (keys are the setting names with underscores, e.g. data_dir = "
             "\"/var/lib/advex\"); flags win over the environment, which wins over the file, which wins over the "
             "defaults")
    torch_threads: int = _setting(
        0, minimum=0, metavar="N",
        help="CPU threads torch may use; 0 = torch's default")

    @property
    def metrics_bind_host(self) -> str:
        """Where the metrics endpoint binds: metrics_host, 'loopback' resolved for host's family."""
        if self.metrics_host == LOOPBACK:
            return "::1" if ":" in bare_host(self.host) else "127.0.0.1"
        return bare_host(self.metrics_host)

    @property
    def store_path(self) -> Path:
        return Path(self.data_dir) / "advex.sqlite3"

    @property
    def artifacts(self) -> Path:
        return Path(self.data_dir) / "artifacts"

    @property
    def jobs(self) -> Path:
        """Checkpoints of unfinished operations, one folder per operation id."""
        return self.artifacts / "jobs"


# ---------------------------------------------------------------------- addresses
def bare_host(host: str) -> str:
    """'[::1]' -> '::1' (how sockets, getaddrinfo and prometheus want it); others unchanged."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def address(host: str, port: int) -> str:
    """host:port as gRPC, URLs and logs write it: '[::1]:50051', '127.0.0.1:50051'."""
    host = bare_host(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------- flags and environment
def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


_TYPES = get_type_hints(ServerConfig)


def _kind(name: str) -> type:
    t = _TYPES[name]
    for k in (bool, int, float, list):
        if t is k or getattr(t, "__origin__", None) is k:
            return k
    return str


def _default_of(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def _expected(f) -> str:
    meta, kind = f.metadata, _kind(f.name)
    lo, hi = meta.get("minimum"), meta.get("maximum")
    what = {int: "an integer", float: "a number"}.get(kind, "")
    if lo is not None and hi is not None:
        return f"{what} from {lo} to {hi}"
    if lo is not None:
        return f"{what} >= {lo}"
    return meta.get("expect") or what


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _convert(f, raw: Any, source: str) -> Any:
    """raw (a string from a flag or the environment, or a Python value) -> a checked value."""
    kind, meta = _kind(f.name), f.metadata

    def fail(problem: str, expected: str) -> ConfigError:
        return ConfigError(f"{f.name}: {_show(raw)} from {source} {problem} (expected {expected})")

    value = raw
    if kind is bool:
        if isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and raw.strip().lower() in _BOOLS:
            value = _BOOLS[raw.strip().lower()]
        else:
            raise fail("is not true or false", "true or false (also yes/no, on/off, 1/0)")
    elif kind is int:
        if isinstance(raw, str):
            try:
                value = int(raw.strip())
            except ValueError:
                raise fail("is not an integer", _expected(f)) from None
        elif isinstance(raw, bool) or not isinstance(raw, int):
            raise fail("is not an integer", _expected(f))
    elif kind is float:
        if isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise fail("is not a number", _expected(f)) from None
        elif isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise fail("is not a number", _expected(f))
        value = float(value)
        if not math.isfinite(value):
            raise fail("is not a finite number", _expected(f))
    elif kind is list:
        if not isinstance(raw, (str, list, tuple)):
            raise fail("is not a list", "a list of strings")
        value = raw.split(meta.get("sep") or os.pathsep) if isinstance(raw, str) else list(raw)
        value = [str(p).strip() for p in value if str(p).strip()]
    elif raw is not None:
        value = str(raw).strip()
    lo, hi = meta.get("minimum"), meta.get("maximum")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise fail("is out of range", _expected(f))
    if f.name in ("host", "metrics_host") and value is not None:
        value = bare_host(value)
    check = meta.get("check")
    if check is not None and value is not None:
        expected = check(value)
        if expected:
            raise fail("is not valid", expected)
    return value


def describe_default(f) -> str:
    shown = f.metadata.get("shown")
    return shown if shown is not None else str(_default_of(f))


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2), like the settings do."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def make_parser(prog: str = "advex serve") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Run the advex gRPC server.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Every setting is a flag or an environment variable (ADVEX_<NAME>); a flag wins "
                            "over the\nenvironment, which wins over the default. An empty variable counts as unset. "
                            "A bad value\nstops the server with one line naming the setting, and exit code 2.")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field: --data-dir, --max-batch, ... (environment: ADVEX_DATA_DIR, ...)."""
    for f in fields(ServerConfig):
        helptext = (f"{f.metadata['help']} [default: {describe_default(f)}; env {env_name(f.name)}]"
                    .replace("%", "%%"))
        extra = {"action": "append"} if _kind(f.name) is list else {}
        parser.add_argument(flag_name(f.name), default=None, metavar=f.metadata.get("metavar"), help=helptext,
                            **extra)


def _data_roots(sources: list[tuple[Any, str]]) -> list[str]:
    """The one rule: roots from every source, flag first, then ADVEX_DATA_ROOTS, then
    ADVEX_DATA_ROOT; the default root always last; each folder once."""
    f = next(x for x in fields(ServerConfig) if x.name == "data_roots")
    roots: list[str] = []
    for raw, source in sources:
        roots += _convert(f, raw, source)
    roots.append(DEFAULT_DATA_ROOT)
    seen: set[str] = set()
    return [r for r in roots if not (r in seen or seen.add(r))]


MAX_CONFIG_BYTES = 1 << 20


def read_config_file(path: str) -> dict[str, Any]:
    """The settings in a TOML file, by name; ConfigError (one line) for a file that cannot be read
    or parsed, or a key that is not a setting."""
    import difflib

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    where = f"config file {path!r}"
    try:
        raw = Path(path).read_bytes()
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config: {where} is {len(raw)} bytes (expected a settings file under 1 MiB)")
        data = tomllib.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"config: {where} cannot be read ({exc.strerror or exc}; expected a readable TOML "
                          "file)") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config: {where} is not valid TOML ({' '.join(str(exc).split())})") from None
    names = [f.name for f in fields(ServerConfig) if f.name != "config"]
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"{key}: in {where} is a table (expected a value: settings are flat, no [sections])")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: in {where} is not a setting (expected one of `advex serve --help`'s, "
                              f"with underscores{hint})")
    return data


def load(args: Optional[argparse.Namespace] = None, env: Optional[dict] = None) -> ServerConfig:
    """Settings from flags (args), else the environment, else the config file (--config or
    ADVEX_CONFIG), else defaults; raises ConfigError."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config_path = getattr(args, "config", None) if args is not None else None
    if config_path is None and (env.get(env_name("config")) or "").strip():
        config_path = env[env_name("config")].strip()
    in_file = read_config_file(config_path) if config_path else {}
    for f in fields(ServerConfig):
        flag = getattr(args, f.name, None) if args is not None else None
        raw_env = env.get(env_name(f.name))
        if raw_env is not None and not raw_env.strip():
            raw_env = None  # an empty variable counts as unset
        if f.name == "data_roots":
            given = [(v, f"flag {flag_name(f.name)}") for v in (flag or [])]
            if raw_env is not None:
                given.append((raw_env, f"environment {env_name(f.name)}"))
            if f.name in in_file:
                given.append((in_file[f.name], f"config file {config_path!r}"))
            legacy = env.get(LEGACY_DATA_ROOT_ENV)
            if legacy and legacy.strip():
                given.append((legacy, f"environment {LEGACY_DATA_ROOT_ENV}"))
            values[f.name] = _data_roots(given)
        elif flag is not None:
            sources[f.name] = f"flag {flag_name(f.name)}"
            values[f.name] = _convert(f, flag, sources[f.name])
        elif raw_env is not None:
            sources[f.name] = f"environment {env_name(f.name)}"
            values[f.name] = _convert(f, raw_env, sources[f.name])
        elif f.name in in_file:
            sources[f.name] = f"config file {config_path!r}"
            values[f.name] = _convert(f, in_file[f.name], sources[f.name])
    if config_path:
        values["config"] = config_path
    cfg = ServerConfig(**values)
    _check_together(cfg, sources)
    _read_files(cfg, sources)
    return cfg


def _check_together(cfg: ServerConfig, sources: dict[str, str]) -> None:
    """Settings that are fine alone but not together."""
    if cfg.metrics_port and cfg.metrics_port == cfg.port:
        name = "metrics_port" if "metrics_port" in sources or "port" not in sources else "port"
        raise ConfigError(f"{name}: {getattr(cfg, name)} from {sources.get(name, 'the default')} is the gRPC port "
                          "and the metrics port at once (expected two different ports; --metrics-port 0 for none)")


_OPTIONAL = ("token", "token_file", "tls_cert", "tls_key", "tls_client_ca", "endpoint_ca_file", "config")


def _source(sources: dict[str, str], name: str) -> str:
    return sources.get(name, "the default")


def _read(cfg: ServerConfig, name: str, sources: dict[str, str], what: str, marker: bytes) -> bytes:
    path = getattr(cfg, name)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: {path!r} from {_source(sources, name)} cannot be read "
                          f"({exc.strerror or exc}; expected a readable {what})") from None
    if marker not in data:
        raise ConfigError(f"{name}: {path!r} from {_source(sources, name)} is not valid "
                          f"(expected a {what}; no {marker.decode()} in it)")
    return data


def read_token_file(cfg: ServerConfig, sources: Optional[dict[str, str]] = None) -> str:
    """The token in cfg.token_file, surrounding whitespace (a trailing newline) removed."""
    sources = sources or {}
    path = cfg.token_file
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"token_file: {path!r} from {_source(sources, 'token_file')} cannot be read "
                          f"({reason}; expected a readable UTF-8 file holding the token)") from None
    if not text:
        raise ConfigError(f"token_file: {path!r} from {_source(sources, 'token_file')} is empty "
                          "(expected a file holding the token)")
    return text


def tls_credentials(cfg: ServerConfig, sources: Optional[dict[str, str]] = None
                    ) -> Optional[tuple[bytes, bytes, Optional[bytes]]]:
    """(certificate chain, private key, client CAs or None) read from the TLS files, or None
    for plaintext. Raises ConfigError for a half-given pair or a file that cannot be used."""
    sources = sources or {}
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        given, missing = ("tls_cert", "tls_key") if cfg.tls_cert else ("tls_key", "tls_cert")
        raise ConfigError(f"{given}: {getattr(cfg, given)!r} from {_source(sources, given)} is given without "
                          f"{missing} (expected both {flag_name('tls_cert')} and {flag_name('tls_key')}, or neither)")
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise ConfigError(f"tls_client_ca: {cfg.tls_client_ca!r} from {_source(sources, 'tls_client_ca')} is given "
                          f"without a server certificate (expected {flag_name('tls_cert')} and "
                          f"{flag_name('tls_key')} too)")
    if not cfg.tls_cert:
        return None
    chain = _read(cfg, "tls_cert", sources, "PEM certificate chain", b"-----BEGIN CERTIFICATE-----")
    key = _read(cfg, "tls_key", sources, "PEM private key", b"PRIVATE KEY-----")
    client_ca = (_read(cfg, "tls_client_ca", sources, "PEM file of CA certificates", b"-----BEGIN CERTIFICATE-----")
                 if cfg.tls_client_ca else None)
    return chain, key, client_ca


def _read_files(cfg: ServerConfig, sources: dict[str, str]) -> None:
    """Check the files a server reads at start, so that a bad one stops it with one line: the
    token file (its token becomes cfg.token) and the TLS files."""
    if cfg.token_file:
        if cfg.token:
            raise ConfigError(f"token_file: {cfg.token_file!r} from {_source(sources, 'token_file')} is given "
                              f"with token from {_source(sources, 'token')} (expected one of them)")
        cfg.token = read_token_file(cfg, sources)
    tls_credentials(cfg, sources)


def from_kwargs(**kwargs) -> ServerConfig:
    """Settings given in code (InProcessServer), checked like flags. data_roots here is the exact
    list searched (tests pass [] for none)."""
    by_name = {f.name: f for f in fields(ServerConfig)}
    values = {}
    for k, v in kwargs.items():
        if k not in by_name:
            raise TypeError(f"unknown server setting {k!r}")
        values[k] = v if v is None and k in _OPTIONAL else _convert(by_name[k], v, f"keyword argument {k}")
    cfg = ServerConfig(**values)
    sources = {k: f"keyword argument {k}" for k in kwargs}
    _check_together(cfg, sources)
    _read_files(cfg, sources)
    return cfg
