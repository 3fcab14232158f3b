"""A client of a model deployed behind an Open Inference Protocol server (KServe v2, MLServer,
Triton): advex treats it as a black box that maps a batch of examples to logits.

REST (http/https) uses the standard library's http.client with JSON bodies; gRPC (grpc/grpcs)
uses the stubs generated from protos/advex/oip/open_inference.proto with raw little-endian
float32 input bytes.

What is counted (`Usage`), exactly:
* `requests`: inference requests sent, one per attempt (retries included). A request whose
  sending failed on a REUSED keep-alive connection (BrokenPipeError / ConnectionResetError /
  ConnectionAbortedError raised while writing it) is resent once at once on a fresh
  connection; that failed write is NOT counted anywhere (not in requests, rows, retries or
  failures) because the server had already closed that connection, so no model can have seen
  it; the resend is the counted request. Before reusing an idle connection the client also
  checks that the server has not closed it (and then reconnects without sending anything). A
  connection that dies AFTER the request was written is ambiguous (the model may have run):
  that attempt counts as a request and a failure, and is retried like any connection error.
* `rows`: the example rows in those requests (retries included).
* `retries`: of those requests, how many were retries (attempt 2, 3, ... of one chunk).
* `failures`: inference requests that failed for any reason (then retried or not).
* `metadata_requests`: server/model metadata requests sent (every attempt); these are not part
  of `requests` and their failures are not part of `failures`.

Deadline: each attempt has one overall deadline of timeout_s. gRPC passes it to the call;
REST covers connecting (TLS included), sending, the status line, the headers and the body with
it: a watchdog timer shuts the attempt's socket down when the deadline passes (an endpoint that
trickles its answer byte by byte cannot stall the client), and the attempt fails as "deadline".

Response size: a REST answer is refused ("protocol") once it exceeds
rows * classes * 48 bytes + a margin (gRPC: the channel's receive limit, at least 4 MiB), where
classes is the target's declared num_classes, else the class count learnt from the model's
metadata or an earlier answer, else 10,000. With num_classes declared, an answer whose output has
another class count is refused before its data are decoded.

Pacing: request starts are spaced 1/max_qps apart by a `Pacer`; several clients of one endpoint
(one per operation) share one Pacer so that together they keep to the rate.

Retry policy: connection errors, timeouts, HTTP 429/502/503/504 and gRPC UNAVAILABLE,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and UNKNOWN (MLServer reports its 503s as UNKNOWN) are
retried `retries` times after waiting backoff_s * 2**k (at most 10 s). Anything else fails at
once: a 4xx or INVALID_ARGUMENT / FAILED_PRECONDITION / UNIMPLEMENTED ("invalid"), 404 /
NOT_FOUND ("not_found"), 500 / INTERNAL ("internal": a deterministic bug would only be
repeated), and malformed answers ("protocol"). Redirects are never followed.

Header values (credentials) are never logged or put in error messages: text that the endpoint
sent (an error body, gRPC details, names from its metadata) is quoted in EndpointError messages
only after every header value of the target has been replaced by "[redacted]" (of "Bearer X" /
"Basic X", X and Basic's decoded user:password: "Bearer [redacted]"), a value cut short by
clipping included. Values shorter than 4 characters are left alone (they would garble messages
and hide nothing).
"""
from __future__ import annotations

import base64
import binascii
import http.client
import json
import math
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

SCHEMES = ("http", "https", "grpc", "grpcs")
DEFAULT_PORTS = {"http": 80, "https": 443}
GRPC_DEFAULT_MESSAGE_BYTES = 4 * 1024 * 1024   # gRPC's default message limit (both sides)
GRPC_MESSAGE_MARGIN = 64 * 1024                 # room for the request's non-tensor fields
MAX_BACKOFF_S = 10.0
MAX_CLASSES_BOUND = 10_000                      # bounds a response before the class count is known
METADATA_BYTES_LIMIT = 1024 * 1024
MESSAGE_CLIP = 300
DECLARED_RESPONSE_MARGIN = 64 * 1024            # room for a REST answer's non-data fields, num_classes known
REDACTED = "[redacted]"
MIN_REDACTED_CHARS = 4                          # shorter header values are not looked for in messages

KINDS = ("unavailable", "deadline", "invalid", "not_found", "protocol", "internal")
_RAW_DTYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT8": "i1", "INT16": "<i2", "INT32": "<i4",
               "INT64": "<i8", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}
_TYPED_FIELDS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT8": "int_contents",
                 "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
                 "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
                 "UINT64": "uint64_contents"}
_RETRY_HTTP = frozenset({429, 502, 503, 504})
_STALE_SEND_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


@dataclass(frozen=True)
class EndpointTarget:
    url: str                  # "http://host:port", "https://host:port" (REST), "grpc://host:port", "grpcs://host:port"
    model_name: str
    model_version: str = ""
    input_name: str = ""      # "" = the single input the model metadata lists
    output_name: str = ""     # "" = the single output of the response
    max_batch_size: int = 64  # rows per request (gRPC requests are also kept under 4 MiB)
    timeout_s: float = 30.0   # per request
    retries: int = 3          # extra attempts after a retriable failure
    backoff_s: float = 0.25   # wait before retry k (k = 0, 1, ...): backoff_s * 2**k, at most 10 s
    max_qps: float = 0.0      # request starts per second at most (0: no limit), per Pacer (see OipClient)
    headers: tuple[tuple[str, str], ...] = ()   # sent on every REST and gRPC call
    ca_file: str = ""         # CA bundle for https/grpcs (else the system's)
    num_classes: int = 0      # the class count the model was registered with (0: unknown); bounds answers


def parse_url(url: str) -> tuple[str, str, int]:
    """`scheme://host[:port]` -> (scheme, host, port); host without IPv6 brackets.

    Schemes http, https (REST; default ports 80/443) and grpc, grpcs (port required). Refuses
    user info, a path other than "" or "/", a query, a fragment, and anything unparsable."""
    if not isinstance(url, str) or not url:
        raise ValueError("endpoint URL is empty")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise ValueError(f"endpoint URL {url!r} contains whitespace or control characters")
    if "://" not in url:
        raise ValueError(f"endpoint URL {url!r} needs a scheme: one of {', '.join(s + '://' for s in SCHEMES)}")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ValueError(f"endpoint URL {url!r} has scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if "?" in url:
        raise ValueError(f"endpoint URL {url!r} must not have a query")
    if "#" in url:
        raise ValueError(f"endpoint URL {url!r} must not have a fragment")
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    if netloc.startswith("[") and "]" not in netloc:
        raise ValueError(f"endpoint URL {url!r} has an unclosed IPv6 bracket")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as e:
        raise ValueError(f"endpoint URL {url!r} is malformed: {e}") from None
    if "@" in parts.netloc:
        raise ValueError(f"endpoint URL {url!r} must not contain user info (send credentials as headers)")
    if parts.path not in ("", "/"):
        raise ValueError(f"endpoint URL {url!r} must not have a path (got {parts.path!r}); "
                         "give scheme://host[:port] only")
    netloc = parts.netloc
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise ValueError(f"endpoint URL {url!r} has an unclosed IPv6 bracket")
        host, rest = netloc[1:end], netloc[end + 1:]
        if not host or ":" not in host:
            raise ValueError(f"endpoint URL {url!r}: only IPv6 addresses go in brackets")
        if rest and not rest.startswith(":"):
            raise ValueError(f"endpoint URL {url!r} has text after the IPv6 address")
        port_text = rest[1:] if rest else None
    else:
        if netloc.count(":") > 1:
            raise ValueError(f"endpoint URL {url!r}: put an IPv6 address in brackets, e.g. {scheme}://[::1]:8001")
        host, _, port_text = netloc.partition(":")
        if not _:
            port_text = None
        if not host:
            raise ValueError(f"endpoint URL {url!r} has no host")
        if any(c in host for c in "/\\%[]"):
            raise ValueError(f"endpoint URL {url!r} has an invalid host {host!r}")
    if port_text is None:
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"endpoint URL {url!r} needs a port: {scheme}://host:port")
        port = DEFAULT_PORTS[scheme]
    else:
        # ASCII digits only: str.isdigit() and int() also take other scripts' digits ("٠٨٠" -> 80)
        if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"endpoint URL {url!r} has an invalid port {port_text!r} (1..65535)")
        port = int(port_text)
    return scheme, host.lower(), port


class EndpointError(Exception):
    """A call to the endpoint failed. `kind` is one of KINDS; `attempts` counts the requests this
    call sent. str(err) is one line naming the endpoint, what happened and the endpoint's message."""

    def __init__(self, kind: str, message: str, attempts: int = 0) -> None:
        assert kind in KINDS, kind
        super().__init__(message)
        self.kind = kind
        self.attempts = attempts


@dataclass(frozen=True)
class Usage:
    requests: int           # inference requests sent (every attempt, retries included)
    rows: int               # example rows in those requests
    retries: int            # of those requests, how many were retries
    failures: int           # inference requests that failed (any reason)
    metadata_requests: int  # metadata requests sent (every attempt)


class _Failure(Exception):
    """One attempt failed: kind, whether it may be retried, the endpoint's (clipped) message."""

    def __init__(self, kind: str, detail: str, retriable: bool) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.retriable = retriable


def _clip(text: Any, n: int = MESSAGE_CLIP) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[:n - 3] + "..."


def _secrets(headers: tuple[tuple[str, str], ...]) -> list[str]:
    """The strings to redact from endpoint-provided text: every header value, but of
    "Bearer X" / "Basic X" only X (so an echo reads "Bearer [redacted]") and Basic's decoded
    "user:password" and password; whitespace collapsed as _clip does; longest first, none
    shorter than MIN_REDACTED_CHARS."""
    found: set[str] = set()
    for _, value in headers:
        variants = [value]
        parts = value.split()
        if len(parts) == 2 and parts[0].lower() in ("bearer", "basic"):
            variants = [parts[1]]
            if parts[0].lower() == "basic":
                try:
                    plain = base64.b64decode(parts[1], validate=True).decode("utf-8")
                    variants += [plain, plain.partition(":")[2]]
                except (binascii.Error, ValueError):
                    pass
        found.update(" ".join(v.split()) for v in variants)
    return sorted((v for v in found if len(v) >= MIN_REDACTED_CHARS), key=len, reverse=True)


def _clip_redacted(text: Any, secrets: list[str], n: int = MESSAGE_CLIP) -> str:
    """_clip(text, n), every secret in text (any case) first replaced by REDACTED.

    A secret that an earlier clip (of a fragment, or of the text given) cut short shows only its
    beginning, followed by "..." or by the end of the text: such a beginning, at least
    MIN_REDACTED_CHARS long and starting within the n characters kept, is redacted too."""
    s = " ".join(str(text).split())
    if not secrets:
        return _clip(s, n)
    s = re.sub("|".join(re.escape(x) for x in secrets), REDACTED, s, flags=re.IGNORECASE)
    lowered = [x.lower() for x in secrets]
    firsts = {x[0] for x in lowered}
    longest = len(lowered[0])
    cuts = [m.start() for m in re.finditer(r"\.\.\.", s[:n + longest])] + [len(s)]
    floor = len(s) + 1            # cuts at or after an earlier replacement are stale: skip them
    for end in reversed(cuts):
        if end >= floor or end > n + longest:
            continue
        start = next((j for j in range(max(0, end - longest), min(end - MIN_REDACTED_CHARS, n) + 1)
                      if s[j].lower() in firsts and any(x.startswith(s[j:end].lower()) for x in lowered)), None)
        if start is not None:
            s = s[:start] + REDACTED + s[end:]
            floor = start
    return _clip(s, n)


def _http_failure(status: int, reason: str, body: bytes, location: str | None) -> _Failure:
    """The failure an HTTP status stands for. The endpoint's text is kept whole (up to the 4 KiB
    given): OipClient._message redacts it, then clips it."""
    text = body.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and ("error" in obj or "detail" in obj):
            text = str(obj.get("error", obj.get("detail")))
    except (ValueError, RecursionError):
        pass
    detail = f"HTTP {status} {reason}: {text}" if text.strip() else f"HTTP {status} {reason}"
    if 300 <= status < 400:
        return _Failure("protocol", f"HTTP {status} {reason}: redirect to {_clip(location or '(no Location)')} "
                                    "not followed", False)
    if status in _RETRY_HTTP:
        return _Failure("unavailable", detail, True)
    if status == 404:
        return _Failure("not_found", detail, False)
    if 400 <= status < 500:
        return _Failure("invalid", detail, False)
    if status >= 500:
        return _Failure("internal", detail, False)
    return _Failure("protocol", f"unexpected HTTP {status} {reason}", False)


def _grpc_failure(err) -> _Failure:
    import grpc

    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    name = code.name if code is not None else "UNKNOWN"
    detail = f"gRPC {name}: {details or ''}"   # redacted, then clipped, by OipClient._message
    c = grpc.StatusCode
    if code == c.RESOURCE_EXHAUSTED and "larger than max" in (details or ""):
        if (details or "").startswith("Received"):    # this client refused the endpoint's answer
            return _Failure("protocol", f"response too large: {detail}", False)
        return _Failure("invalid", f"request too large: {detail}", False)   # sent/received by the server
    if code == c.DEADLINE_EXCEEDED:
        return _Failure("deadline", detail, True)
    if code in (c.UNAVAILABLE, c.RESOURCE_EXHAUSTED, c.UNKNOWN):
        return _Failure("unavailable", detail, True)
    if code == c.NOT_FOUND:
        return _Failure("not_found", detail, False)
    if code in (c.INVALID_ARGUMENT, c.FAILED_PRECONDITION, c.UNIMPLEMENTED, c.OUT_OF_RANGE, c.PERMISSION_DENIED,
                c.UNAUTHENTICATED, c.ALREADY_EXISTS):
        return _Failure("invalid", detail, False)
    return _Failure("internal", detail, False)


def _shape_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise _Failure("protocol", f"{what} is not a list of integers: {_clip(value, 80)}", False)
    return [int(d) for d in value]


def _tensor_meta(items: Any, what: str) -> list[dict]:
    if not isinstance(items, list):
        raise _Failure("protocol", f"model metadata {what} is not a list", False)
    out = []
    for t in items:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("datatype"), str):
            raise _Failure("protocol", f"model metadata {what} entry is malformed: {_clip(t, 80)}", False)
        out.append({"name": t["name"], "datatype": t["datatype"],
                    "shape": _shape_list(t.get("shape", []), f"shape of {what[:-1]} {t['name']!r}")})
    return out


def _finite_logits(arr: np.ndarray, rows: int, what: str) -> np.ndarray:
    if arr.ndim != 2 or arr.shape[0] != rows or arr.shape[1] < 1:
        raise _Failure("protocol", f"{what} has shape {list(arr.shape)}; expected [{rows}, k] logits", False)
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise _Failure("protocol", f"{what} holds non-finite values (NaN or inf)", False)
    return out


def check_metadata(meta: dict, input_shape: tuple[int, ...], layout: str, num_classes: int,
                   input_name: str, output_name: str) -> tuple[str, str]:
    """Check normalized model metadata (OipClient.metadata()) against what advex will send and
    expects back; returns the resolved (input_name, output_name) ("" = the single one).

    input_shape is one example's shape as [C, H, W] (or any shape); layout "NCHW" sends it as
    is, "NHWC" sends [H, W, C] (3-D shapes only). The input must be FP32 (what the client sends)
    and its shape (batch dimension excluded, -1 = any size) must match, or be exactly
    [-1, prod(shape)] (flattened: see input_is_flat). The output must be [batch, k] with
    k == num_classes (or -1)."""
    name = meta.get("name", "?")
    layout = layout.upper()
    shape = [int(d) for d in input_shape]
    if layout == "NCHW":
        expected = shape
    elif layout == "NHWC":
        if len(shape) != 3:
            raise ValueError(f"layout NHWC needs a [C, H, W] input shape, got {shape}")
        expected = [shape[1], shape[2], shape[0]]
    else:
        raise ValueError(f"layout must be NCHW or NHWC, got {layout!r}")

    def pick(kind: str, tensors: list[dict], wanted: str) -> dict:
        names = [t["name"] for t in tensors]
        if wanted:
            for t in tensors:
                if t["name"] == wanted:
                    return t
            raise ValueError(f"model {name!r} has no {kind} named {wanted!r} (its {kind}s: {names})")
        if len(tensors) != 1:
            raise ValueError(f"model {name!r} has {len(tensors)} {kind}s {names}; name the {kind} to use")
        return tensors[0]

    inp = pick("input", list(meta.get("inputs", [])), input_name)
    out = pick("output", list(meta.get("outputs", [])), output_name)
    if inp["datatype"] != "FP32":   # a strict server refuses FP32 data for an FP16/BF16/FP64 input
        raise ValueError(f"input {inp['name']!r} is {inp['datatype']}; advex sends FP32 (model {name!r})")
    declared = list(inp["shape"])
    flat = [math.prod(shape)]
    body = declared[1:]
    fits = (len(declared) >= 1 and len(body) == len(expected)
            and all(d == -1 or d == e for d, e in zip(body, expected)))
    if not fits and body != flat:
        raise ValueError(f"input {inp['name']!r} of model {name!r} has shape {declared}; expected "
                         f"[-1, {', '.join(map(str, expected))}] ({layout}) or [-1, {flat[0]}] (flattened)")
    oshape = list(out["shape"])
    if len(oshape) != 2 or oshape[-1] not in (-1, num_classes):
        raise ValueError(f"output {out['name']!r} of model {name!r} has shape {oshape}; "
                         f"expected [-1, {num_classes}] ({num_classes} classes)")
    return inp["name"], out["name"]


def input_is_flat(meta: dict, input_name: str) -> bool:
    """Whether the model's input named input_name ("" = its single input) takes flattened
    examples: its declared shape has exactly 2 dimensions, [batch, D]. For a model that
    check_metadata accepted, the caller then sends x.reshape(n, -1)."""
    inputs = list(meta.get("inputs", []))
    if input_name:
        found = [t for t in inputs if t["name"] == input_name]
    else:
        found = inputs if len(inputs) == 1 else []
    if not found:
        raise ValueError(f"model {meta.get('name', '?')!r} has no input named {input_name!r}" if input_name else
                         f"model {meta.get('name', '?')!r} has {len(inputs)} inputs; name the input to use")
    return len(found[0]["shape"]) == 2


class _Watchdog:
    """One REST attempt's overall deadline. The attempt's sockets are registered with watch() (new
    ones through create_connection, which http.client calls to connect); when the deadline passes,
    a timer thread shuts them down, so that a blocked connect, TLS handshake, send or read returns
    at once, and `expired` becomes true. cancel() stops the timer and returns whether the deadline
    had passed; after it the timer can no longer fire."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []   # duplicates: shutting one down ends the connection
        self._expired = False
        self._done = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def expired(self) -> bool:
        return self._expired

    def watch(self, sock: socket.socket) -> None:
        """Shuts sock (plain or TLS) down when the deadline passes (at once if it has passed)."""
        try:   # a duplicate of the descriptor stays valid (and harmless) even once sock is closed
            dup = socket.fromfd(sock.fileno(), sock.family, sock.type, sock.proto)
        except (OSError, ValueError):
            return
        with self._lock:
            if not self._done and not self._expired:
                self._socks.append(dup)
                return
            if self._expired:
                _shutdown(dup)
        dup.close()

    def create_connection(self, address, timeout=None, source_address=None, *args, **kwargs) -> socket.socket:
        """socket.create_connection, the connect given the time left at most; the socket is watched."""
        left = max(self.deadline - time.monotonic(), 1e-3)
        if timeout is None or not isinstance(timeout, (int, float)) or timeout > left:
            timeout = left
        sock = socket.create_connection(address, timeout, source_address, *args, **kwargs)
        self.watch(sock)
        return sock

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._expired = True
            for s in self._socks:
                _shutdown(s)

    def cancel(self) -> bool:
        self._timer.cancel()
        with self._lock:
            self._done = True
            socks, self._socks = self._socks, []
        for s in socks:
            s.close()
        return self._expired


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Pacer:
    """Spaces request starts at least 1/max_qps seconds apart (max_qps 0: no limit), whichever
    thread or client starts them: the clients of one endpoint model share one Pacer so that
    together they keep to its rate. Thread-safe."""

    def __init__(self, max_qps: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not (max_qps >= 0 and math.isfinite(max_qps)):
            raise ValueError(f"max_qps must be a finite number >= 0, got {max_qps}")
        self.max_qps = float(max_qps)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_start: float | None = None

    def wait(self) -> None:
        """Returns when the next request may start: takes the next free start time (now, or
        1/max_qps after the previous start) and sleeps until then."""
        if self.max_qps <= 0:
            return
        interval = 1.0 / self.max_qps
        with self._lock:
            now = self._clock()
            start = now if self._next_start is None else max(now, self._next_start)
            self._next_start = start + interval
        if start > now:
            self._sleep(start - now)


class OipClient:
    """One endpoint's client (thread-safe). `infer` splits a batch into requests of at most
    max_batch_size rows, keeps their order, retries each request, and returns float32 logits.

    `pacer` paces its request starts (metadata requests included); None gives the client its
    own Pacer(target.max_qps). Pass one Pacer to all the clients of one endpoint model to limit
    their rate together (target.max_qps is then not used)."""

    def __init__(self, target: EndpointTarget, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, pacer: Pacer | None = None) -> None:
        self.target = target
        self.scheme, self.host, self.port = parse_url(target.url)
        if not target.model_name:
            raise ValueError("model_name is empty")
        if target.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {target.max_batch_size}")
        if not target.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {target.timeout_s}")
        if target.retries < 0 or target.backoff_s < 0 or target.max_qps < 0 or target.num_classes < 0:
            raise ValueError("retries, backoff_s, max_qps and num_classes must be >= 0")
        for k, v in target.headers:
            if not k or any(c in k for c in " :\r\n\t") or "\r" in v or "\n" in v:
                raise ValueError(f"invalid header name or value for header {k!r}")
        self._grpc = self.scheme in ("grpc", "grpcs")
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()       # counters, pool, channel, cached names
        self._pacer = pacer if pacer is not None else Pacer(target.max_qps, clock=clock, sleep=sleep)
        self._secrets = _secrets(target.headers)
        self._counts = {"requests": 0, "rows": 0, "retries": 0, "failures": 0, "metadata_requests": 0}
        self._pool: list[http.client.HTTPConnection] = []
        self._channel = None
        self._stub = None
        self._input_name = target.input_name
        self._classes = target.num_classes
        self._closed = False
        self._where = f"{target.url} model {target.model_name!r}" + (
            f" version {target.model_version!r}" if target.model_version else "")

    # ------------------------------------------------------------ public
    def server_metadata(self) -> dict:
        """{"name", "version", "extensions"} of the server (GET /v2 or ServerMetadata)."""
        def once():
            if self._grpc:
                pb = _pb()
                r = self._grpc_call("ServerMetadata", pb.ServerMetadataRequest())
                return {"name": r.name, "version": r.version, "extensions": list(r.extensions)}
            obj = self._rest_json("GET", "/v2", None, METADATA_BYTES_LIMIT)
            if not isinstance(obj, dict) or not isinstance(obj.get("name", ""), str):
                raise _Failure("protocol", "server metadata is not a JSON object with a name", False)
            ext = obj.get("extensions", [])
            if not isinstance(ext, list) or not all(isinstance(e, str) for e in ext):
                raise _Failure("protocol", "server metadata extensions is not a list of strings", False)
            return {"name": obj.get("name", ""), "version": str(obj.get("version", "")), "extensions": ext}

        return self._retrying(once, "server metadata", rows=0)[0]

    def metadata(self) -> dict:
        """The model's metadata: {"name", "versions", "platform", "inputs", "outputs"}, each tensor
        {"name", "datatype", "shape"} with -1 for a dynamic dimension (same over REST and gRPC)."""
        def once():
            t = self.target
            if self._grpc:
                pb = _pb()
                req = pb.ModelMetadataRequest(name=t.model_name, version=t.model_version)
                r = self._grpc_call("ModelMetadata", req)
                obj = {"name": r.name, "versions": list(r.versions), "platform": r.platform,
                       "inputs": [{"name": i.name, "datatype": i.datatype, "shape": list(i.shape)} for i in r.inputs],
                       "outputs": [{"name": o.name, "datatype": o.datatype, "shape": list(o.shape)} for o in r.outputs]}
            else:
                obj = self._rest_json("GET", self._model_path(""), None, METADATA_BYTES_LIMIT)
                if not isinstance(obj, dict):
                    raise _Failure("protocol", "model metadata is not a JSON object", False)
            versions = obj.get("versions") or []
            if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
                raise _Failure("protocol", "model metadata versions is not a list of strings", False)
            return {"name": str(obj.get("name", "")), "versions": list(versions),
                    "platform": str(obj.get("platform", "")),
                    "inputs": _tensor_meta(obj.get("inputs", []), "inputs"),
                    "outputs": _tensor_meta(obj.get("outputs", []), "outputs")}

        meta = self._retrying(once, "model metadata", rows=0)[0]
        outs = meta["outputs"]
        if len(outs) == 1 and len(outs[0]["shape"]) == 2 and outs[0]["shape"][1] > 0:
            with self._lock:
                self._classes = self._classes or outs[0]["shape"][1]
        return meta

    def infer(self, x: np.ndarray) -> np.ndarray:
        """float32 logits (n, k) of examples x (n, *example_shape), sent as float32.

        Splits x into requests of at most max_batch_size rows (gRPC: also under 4 MiB) and keeps
        their order. n == 0 sends nothing and returns shape (0, k), k as far as known (else 0)."""
        x = np.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"x must have shape (n, *example_shape), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0]
        if n == 0:
            return np.zeros((0, self._classes), np.float32)
        input_name = self._resolve_input()
        step = self._rows_per_request(x[0].nbytes)
        chunks = [(i, min(i + step, n)) for i in range(0, n, step)]
        out: list[np.ndarray] = []
        sent = 0
        for c, (a, b) in enumerate(chunks):
            where = f"request {c + 1} of {len(chunks)} (rows {a}..{b - 1})" if len(chunks) > 1 else ""
            try:
                logits, tries = self._retrying(lambda: self._infer_once(x[a:b], input_name), "inference",
                                               rows=b - a, where=where)
            except EndpointError as e:
                e.attempts += sent
                raise
            sent += tries
            if out and logits.shape[1] != out[0].shape[1]:
                raise EndpointError("protocol", f"{self._where}: inference {where} returned {logits.shape[1]} "
                                                f"classes, earlier requests {out[0].shape[1]}", sent)
            out.append(logits)
        with self._lock:
            self._classes = out[0].shape[1]
        return out[0] if len(out) == 1 else np.concatenate(out)

    def usage(self) -> Usage:
        with self._lock:
            return Usage(**self._counts)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, []
            channel, self._channel, self._stub = self._channel, None, None
        for conn in pool:
            conn.close()
        if channel is not None:
            channel.close()

    def __enter__(self) -> OipClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ retries, pacing, counting
    def _count(self, **inc: int) -> None:
        with self._lock:
            for k, v in inc.items():
                self._counts[k] += v

    def _retrying(self, once: Callable[[], Any], what: str, *, rows: int, where: str = ""):
        """(result of once(), attempts), retrying retriable failures; EndpointError otherwise."""
        t = self.target
        infer = what == "inference"
        deadlines = 0
        last: _Failure | None = None
        for k in range(t.retries + 1):
            if self._closed:
                raise EndpointError("unavailable", f"{self._where}: the client is closed", k)
            if k > 0:
                self._sleep(min(t.backoff_s * 2 ** (k - 1), MAX_BACKOFF_S))
            self._pacer.wait()
            if infer:
                self._count(requests=1, rows=rows, retries=int(k > 0))
            else:
                self._count(metadata_requests=1)
            try:
                return once(), k + 1
            except _Failure as f:
                if infer:
                    self._count(failures=1)
                last = f
                deadlines += f.kind == "deadline"
                if not f.retriable:
                    raise EndpointError(f.kind, self._message(what, where, f.kind, k + 1, f.detail), k + 1) from None
        attempts = t.retries + 1
        kind = "deadline" if deadlines == attempts else "unavailable"
        raise EndpointError(kind, self._message(what, where, kind, attempts, last.detail), attempts)

    def _message(self, what: str, where: str, kind: str, attempts: int, detail: str) -> str:
        """The one line of an EndpointError; detail (the endpoint's text) is redacted, then clipped."""
        happened = {"unavailable": "endpoint unavailable", "deadline": f"timed out ({self.target.timeout_s:g} s)",
                    "invalid": "request refused", "not_found": "model or version not found",
                    "protocol": "malformed response", "internal": "endpoint internal error"}[kind]
        at = f" {where}" if where else ""
        return (f"{self._where}: {what}{at} failed: {happened} after {attempts} "
                f"attempt{'s' if attempts != 1 else ''}: {_clip_redacted(detail, self._secrets)}")

    def _resolve_input(self) -> str:
        if self._input_name:
            return self._input_name
        inputs = self.metadata()["inputs"]
        if len(inputs) != 1:
            names = _clip_redacted([i["name"] for i in inputs], self._secrets)
            raise EndpointError("invalid", f"{self._where}: the model lists {len(inputs)} inputs {names}; "
                                           "set input_name", 0)
        with self._lock:
            self._input_name = inputs[0]["name"]
        return self._input_name

    def _rows_per_request(self, row_bytes: int) -> int:
        rows = self.target.max_batch_size
        if self._grpc:
            rows = min(rows, max(1, (GRPC_DEFAULT_MESSAGE_BYTES - GRPC_MESSAGE_MARGIN) // max(row_bytes, 1)))
        return rows

    def _response_classes_bound(self) -> int:
        return self._classes or MAX_CLASSES_BOUND

    def _rest_response_limit(self, rows: int) -> int:
        """The bytes a REST inference answer of `rows` rows may take (48 per JSON number)."""
        if self.target.num_classes > 0:
            return rows * self.target.num_classes * 48 + DECLARED_RESPONSE_MARGIN
        return rows * self._response_classes_bound() * 48 + 1024 * 1024

    def _check_classes(self, name: str, shape: list[int]) -> None:
        """Refuses an output [n, k] whose k is not the declared num_classes (before decoding it)."""
        declared = self.target.num_classes
        if declared > 0 and shape[1] != declared:
            raise _Failure("protocol", f"output {name!r} answered {shape[1]} classes, the model was registered "
                                       f"with {declared}", False)

    # ------------------------------------------------------------ one inference request
    def _infer_once(self, x: np.ndarray, input_name: str) -> np.ndarray:
        t = self.target
        n = x.shape[0]
        if self._grpc:
            pb = _pb()
            req = pb.ModelInferRequest(model_name=t.model_name, model_version=t.model_version)
            req.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
            if t.output_name:
                req.outputs.add(name=t.output_name)
            req.raw_input_contents.append(x.astype("<f4", copy=False).tobytes())
            r = self._grpc_call("ModelInfer", req)
            return self._decode_grpc_output(r, n)
        body = {"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}]}
        if t.output_name:
            body["outputs"] = [{"name": t.output_name}]
        limit = self._rest_response_limit(n)
        obj = self._rest_json("POST", self._model_path("/infer"), json.dumps(body).encode(), limit)
        return self._decode_rest_output(obj, n)

    def _pick_output(self, outputs: list, names: list[str]) -> int:
        want = self.target.output_name
        if want:
            if want not in names:
                raise _Failure("protocol", f"response has no output {want!r} (outputs: {names})", False)
            return names.index(want)
        if len(outputs) != 1:
            raise _Failure("protocol", f"response has {len(outputs)} outputs {names}; set output_name", False)
        return 0

    def _decode_rest_output(self, obj: Any, n: int) -> np.ndarray:
        if not isinstance(obj, dict) or not isinstance(obj.get("outputs"), list):
            raise _Failure("protocol", "inference response is not a JSON object with an outputs list", False)
        outputs = obj["outputs"]
        if not all(isinstance(o, dict) for o in outputs):
            raise _Failure("protocol", "inference response outputs are not objects", False)
        i = self._pick_output(outputs, [str(o.get("name")) for o in outputs])
        o = outputs[i]
        dt = o.get("datatype")
        if dt not in _RAW_DTYPES:
            raise _Failure("protocol", f"output {o.get('name')!r} has datatype {_clip(dt, 40)}; "
                                       "expected a numeric type", False)
        shape = _shape_list(o.get("shape"), f"shape of output {o.get('name')!r}")
        if len(shape) != 2 or shape[0] != n or shape[1] < 1:
            raise _Failure("protocol", f"output {o.get('name')!r} has shape {shape}; expected [{n}, k] logits", False)
        self._check_classes(str(o.get("name")), shape)
        flat: list = []
        stack = [o.get("data")]
        while stack:                      # flatten nested lists, refusing anything but numbers
            v = stack.pop()
            if isinstance(v, list):
                stack.extend(reversed(v))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                flat.append(v)
            else:
                raise _Failure("protocol", f"output {o.get('name')!r} data holds a non-number: {_clip(repr(v), 40)}",
                               False)
        if len(flat) != shape[0] * shape[1]:
            raise _Failure("protocol", f"output {o.get('name')!r} has {len(flat)} values for shape {shape}", False)
        arr = np.asarray(flat, dtype=np.float64).reshape(shape)
        return _finite_logits(arr, n, f"output {o.get('name')!r}")

    def _decode_grpc_output(self, r, n: int) -> np.ndarray:
        outputs = list(r.outputs)
        i = self._pick_output(outputs, [o.name for o in outputs])
        o = outputs[i]
        if o.datatype not in _RAW_DTYPES:
            raise _Failure("protocol", f"output {o.name!r} has datatype {_clip(o.datatype, 40)}; "
                                       "expected a numeric type", False)
        shape = list(o.shape)
        if len(shape) != 2 or shape[0] != n or shape[1] < 1:
            raise _Failure("protocol", f"output {o.name!r} has shape {shape}; expected [{n}, k] logits", False)
        self._check_classes(o.name, shape)
        size = shape[0] * shape[1]
        if len(r.raw_output_contents):
            if len(r.raw_output_contents) != len(outputs):
                raise _Failure("protocol", f"response has {len(r.raw_output_contents)} raw outputs for "
                                           f"{len(outputs)} outputs", False)
            raw = r.raw_output_contents[i]
            dtype = np.dtype(_RAW_DTYPES[o.datatype])
            if len(raw) != size * dtype.itemsize:
                raise _Failure("protocol", f"output {o.name!r} has {len(raw)} raw bytes for shape {shape} "
                                           f"{o.datatype}", False)
            arr = np.frombuffer(raw, dtype=dtype)
        else:
            field = _TYPED_FIELDS.get(o.datatype)
            if field is None:
                raise _Failure("protocol", f"output {o.name!r} of datatype {o.datatype} has no raw contents", False)
            values = getattr(o.contents, field)
            if len(values) != size:
                raise _Failure("protocol", f"output {o.name!r} has {len(values)} values for shape {shape}", False)
            arr = np.asarray(values, dtype=np.float64)
        return _finite_logits(arr.reshape(shape), n, f"output {o.name!r}")

    # ------------------------------------------------------------ REST transport
    def _model_path(self, suffix: str) -> str:
        t = self.target
        path = "/v2/models/" + urllib.parse.quote(t.model_name, safe="")
        if t.model_version:
            path += "/versions/" + urllib.parse.quote(t.model_version, safe="")
        return path + suffix

    def _new_conn(self) -> http.client.HTTPConnection:
        t = self.target
        if self.scheme == "https":
            ctx = ssl.create_default_context(cafile=t.ca_file or None)
            return http.client.HTTPSConnection(self.host, self.port, timeout=t.timeout_s, context=ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=t.timeout_s)

    def _take_conn(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle pooled connection (reused=True) the server has not closed, or a new one."""
        while True:
            with self._lock:
                conn = self._pool.pop() if self._pool else None
            if conn is None:
                return self._new_conn(), False
            if conn.sock is None:
                return conn, False
            try:   # an idle keep-alive socket is readable only if the server closed it (or misbehaves)
                readable = select.select([conn.sock], [], [], 0)[0]
            except (OSError, ValueError):
                readable = True
            if not readable:
                return conn, True
            conn.close()

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed:
                self._pool.append(conn)
                return
        conn.close()

    def _rest_json(self, method: str, path: str, body: bytes | None, limit: int) -> Any:
        t = self.target
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        headers.update(dict(t.headers))
        # One deadline for the whole attempt: the watchdog shuts the socket down when it passes
        # (per-operation socket timeouts alone let an endpoint trickle its answer for ever).
        dog = _Watchdog(t.timeout_s)
        conn, reused = self._take_conn()
        conn._create_connection = dog.create_connection   # (re)connects of this attempt are watched
        ok = False
        try:
            if conn.sock is not None:
                conn.sock.settimeout(t.timeout_s)
                dog.watch(conn.sock)
            try:
                conn.request(method, path, body=body, headers=headers)
            except _STALE_SEND_ERRORS:
                if not reused or dog.expired:
                    raise
                conn.close()    # the server closed the idle connection: resend once, uncounted (see module doc)
                conn.request(method, path, body=body, headers=headers)
            sock = conn.sock
            resp = conn.getresponse()
            data = self._read_bounded(resp, sock, dog.deadline, limit)
            if dog.cancel():    # the socket was shut down while reading: the answer may be cut short
                raise TimeoutError("the deadline passed")
            if resp.status != 200:
                raise _http_failure(resp.status, resp.reason, data[:4096], resp.getheader("Location"))
            ok = True
        except _Failure:
            raise
        except (OSError, http.client.HTTPException) as e:   # TimeoutError and ssl.SSLError included
            if dog.cancel() or isinstance(e, TimeoutError):
                why = "the deadline passed" if dog.expired else (_clip(e) or "timed out")
                raise _Failure("deadline", f"no complete answer within {t.timeout_s:g} s ({why})", True) from None
            if isinstance(e, ssl.SSLError):
                raise _Failure("unavailable", f"TLS error: {_clip(e)}", True) from None
            raise _Failure("unavailable", f"connection failed: {type(e).__name__}: {_clip(e)}", True) from None
        finally:
            dog.cancel()
            if ok:
                self._give_back(conn)
            else:
                conn.close()
        ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: hostile nesting
            raise _Failure("protocol", f"response is not JSON (Content-Type {ctype or 'none'!r}): "
                                       f"{_clip(data[:200].decode('utf-8', 'replace'), 120)}", False) from None

    @staticmethod
    def _read_bounded(resp: http.client.HTTPResponse, sock, deadline: float, limit: int) -> bytes:
        length = resp.getheader("Content-Length")
        if length is not None and re.fullmatch(r"[0-9]+", length.strip()) and int(length) > limit:
            raise _Failure("protocol", f"response of {int(length)} bytes exceeds the limit of {limit} bytes", False)
        parts: list[bytes] = []
        total = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("response not complete in time")
            if sock is not None:
                try:
                    sock.settimeout(remaining)
                except OSError:
                    pass
            chunk = resp.read1(min(1 << 16, limit + 1 - total))
            if not chunk:
                resp.read()   # marks the response complete, so the connection can be reused
                return b"".join(parts)
            parts.append(chunk)
            total += len(chunk)
            if total > limit:
                raise _Failure("protocol", f"response exceeds the limit of {limit} bytes", False)

    # ------------------------------------------------------------ gRPC transport
    def _grpc_stub(self):
        with self._lock:
            if self._stub is not None:
                return self._stub
            if self._closed:
                raise _Failure("unavailable", "the client is closed", False)
            import grpc

            from advex.oip import open_inference_pb2_grpc as pbg

            t = self.target
            host = f"[{self.host}]" if ":" in self.host else self.host
            row_bound = self._rows_per_request(1)
            send = GRPC_DEFAULT_MESSAGE_BYTES
            classes = t.num_classes or MAX_CLASSES_BOUND
            recv = max(GRPC_DEFAULT_MESSAGE_BYTES, row_bound * classes * 8 + 1024 * 1024)
            options = [("grpc.max_send_message_length", send), ("grpc.max_receive_message_length", recv),
                       ("grpc.enable_http_proxy", 0)]
            if self.scheme == "grpcs":
                roots = None
                if t.ca_file:
                    with open(t.ca_file, "rb") as f:
                        roots = f.read()
                self._channel = grpc.secure_channel(f"{host}:{self.port}", grpc.ssl_channel_credentials(roots),
                                                    options=options)
            else:
                self._channel = grpc.insecure_channel(f"{host}:{self.port}", options=options)
            self._stub = pbg.GRPCInferenceServiceStub(self._channel)
            return self._stub

    def _grpc_call(self, rpc: str, request):
        import grpc

        stub = self._grpc_stub()
        metadata = tuple((k.lower(), v) for k, v in self.target.headers)
        try:
            return getattr(stub, rpc)(request, timeout=self.target.timeout_s, metadata=metadata or None)
        except grpc.RpcError as e:
            raise _grpc_failure(e) from None


def _pb():
    from advex.oip import open_inference_pb2

    return open_inference_pb2
