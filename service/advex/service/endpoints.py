"""Models served by inference endpoints (Open Inference Protocol, model format ENDPOINT).

A client names an endpoint by url, model and version; everything else is the server's: it only
connects to hosts on its allow-list (setting endpoint_hosts), reads credentials by name from its
own environment or files (endpoint_credentials) when it queries, and checks what the endpoint
says about itself (metadata) against what the client declared before anything is recorded. The
record keeps the endpoint's identity (url, model, version, metadata) and its digest; never a
secret. Queries go through oip.OipClient: batched, timed out, retried with backoff, rate-limited
and counted."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from advex.engine.blackbox import BlackBoxNet, layout_shape
from advex.service import oip
from advex.service.config import CREDENTIAL, ENDPOINT_HOST, ServerConfig, bare_host
from advex.service.errors import ServiceError, invalid, precondition
from advex.service.text import quote
from advex.v1 import resources_pb2 as res
from advex.v1 import results_pb2 as results

DEFAULT_BATCH = 64
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 600.0
DEFAULT_RETRIES = 3
MAX_RETRIES = 10
DEFAULT_BACKOFF_S = 0.25
MAX_BACKOFF_S = 60.0
MIN_QPS = 0.01      # a positive max_qps below this would stall an operation for hours between requests
MAX_QPS = 100_000.0
# registration queries the endpoint inside a unary call: its requests get at most this long and one retry
REGISTER_TIMEOUT_S = 30.0
REGISTER_RETRIES = 1
MAX_URL = 512
MAX_METADATA_JSON = 64 << 10
# OIP model names and versions become a URL path segment or a gRPC field: plain words only
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
TENSOR_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\-]{0,127}")

# what an endpoint failure is, as the status of the call or operation that met it
ERROR_CODES = {"unavailable": grpc.StatusCode.UNAVAILABLE, "internal": grpc.StatusCode.UNAVAILABLE,
               "deadline": grpc.StatusCode.DEADLINE_EXCEEDED, "invalid": grpc.StatusCode.FAILED_PRECONDITION,
               "not_found": grpc.StatusCode.FAILED_PRECONDITION, "protocol": grpc.StatusCode.FAILED_PRECONDITION}


def check_spec(spec: res.ModelSpec, cfg: ServerConfig, field: str = "spec") -> tuple[str, str, int]:
    """The endpoint part of an ENDPOINT model's spec, every value bounded; the url's (scheme, host,
    port), which must be on the allow-list. The rest of the spec (shape, classes, normalization,
    layout) is checked by registry.validate_model_spec."""
    if not spec.HasField("endpoint"):
        raise invalid(f"{field}.endpoint", "required for format ENDPOINT (url, model_name, ...)")
    ep, where = spec.endpoint, f"{field}.endpoint"
    if len(ep.url) > MAX_URL:
        raise invalid(f"{where}.url", f"at most {MAX_URL} characters, got {len(ep.url)}")
    try:
        scheme, host, port = oip.parse_url(ep.url)
    except ValueError as exc:
        raise invalid(f"{where}.url", str(exc)) from None
    if not host_allowed(host, port, cfg.endpoint_hosts):
        allowed = ", ".join(cfg.endpoint_hosts) if cfg.endpoint_hosts else "none: the server has no endpoint_hosts"
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                           f"{where}.url: host {quote(host)} port {port} is not on the server's allow-list "
                           f"(endpoint_hosts: {allowed})")
    if not NAME_PATTERN.fullmatch(ep.model_name):
        raise invalid(f"{where}.model_name", "required: a letter or digit, then up to 127 letters, digits, '_', '.', "
                                             f"'-'; got {quote(ep.model_name)}")
    if ep.model_version and not NAME_PATTERN.fullmatch(ep.model_version):
        raise invalid(f"{where}.model_version", f"letters, digits, '_', '.', '-' (at most 128), got "
                                                f"{quote(ep.model_version)}")
    for name in ("input_name", "output_name"):
        value = getattr(ep, name)
        if value and not TENSOR_PATTERN.fullmatch(value):
            raise invalid(f"{where}.{name}", f"a tensor name of at most 128 letters, digits, '_', '.', ':', '/', "
                                             f"'-', got {quote(value)}")
    _bounded(ep.max_batch_size, 0, cfg.endpoint_max_batch, f"{where}.max_batch_size",
             f"0 = {DEFAULT_BATCH}; the server's endpoint_max_batch is {cfg.endpoint_max_batch}")
    _bounded(ep.timeout_seconds, 0, MAX_TIMEOUT_S, f"{where}.timeout_seconds", f"0 = {DEFAULT_TIMEOUT_S:g}")
    if ep.HasField("retries"):
        _bounded(ep.retries, 0, MAX_RETRIES, f"{where}.retries", f"unset = {DEFAULT_RETRIES}")
    _bounded(ep.backoff_seconds, 0, MAX_BACKOFF_S, f"{where}.backoff_seconds", f"0 = {DEFAULT_BACKOFF_S:g}")
    _bounded(ep.max_qps, 0, MAX_QPS, f"{where}.max_qps", "0 = no limit")
    if 0 < ep.max_qps < MIN_QPS:
        raise invalid(f"{where}.max_qps", f"0 (no limit) or at least {MIN_QPS:g} requests a second, got {ep.max_qps!r}")
    if ep.credential:
        sources = credential_sources(cfg)
        if ep.credential not in sources:
            known = ", ".join(sorted(sources)) or "none"
            raise invalid(f"{where}.credential", f"{quote(ep.credential)} is not one of the server's "
                                                 f"endpoint_credentials (known names: {known})")
        bound = sources[ep.credential].bound
        if bound and not host_allowed(host, port, [bound]):
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"{where}.credential: {quote(ep.credential)} is bound to {bound}; it is never sent to "
                               f"host {quote(host)} port {port}")
    return scheme, host, port


def _bounded(value: float, lo: float, hi: float, field: str, note: str) -> None:
    if not (np.isfinite(value) and lo <= value <= hi):
        raise invalid(field, f"must be in [{lo:g}, {hi:g}] ({note}), got {value!r}")


def host_allowed(host: str, port: int, allowed: list[str]) -> bool:
    """host:port is on the allow-list: an entry names the host as the url writes it (case
    ignored; IPv6 in brackets), alone (any port) or with this port. No wildcard, no resolution:
    a name is allowed, not the addresses it may come to resolve to."""
    host = bare_host(host).lower()
    for entry in allowed:
        match = ENDPOINT_HOST.match(entry)
        if match and bare_host(match.group(1)).lower() == host and (
                not match.group(2) or int(match.group(2)[1:]) == port):
            return True
    return False


@dataclass(frozen=True)
class CredentialSource:
    kind: str    # "env" or "file"
    where: str   # the variable or the path
    bound: str   # "host[:port]" it may be sent to, "" = any allowed endpoint


def credential_sources(cfg: ServerConfig) -> dict[str, CredentialSource]:
    """name -> where the secret is, from the endpoint_credentials setting."""
    out = {}
    for item in cfg.endpoint_credentials:
        match = CREDENTIAL.match(item)
        if match:
            name, host, port, kind, where = match.groups()
            out[name] = CredentialSource(kind, where, (host or "") + (port or ""))
    return out


def read_credential(name: str, cfg: ServerConfig) -> str:
    """The secret of credential `name`, read now (so a rotated secret is used at once). An
    error names the credential and its source, never the secret."""
    source = credential_sources(cfg)[name]
    kind, where = source.kind, source.where
    if kind == "env":
        secret = os.environ.get(where, "").strip()
        if not secret:
            raise precondition(f"endpoint credential {name!r}: the server's environment variable {where} is unset "
                               "or empty")
    else:
        try:
            secret = Path(where).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise precondition(f"endpoint credential {name!r}: the server cannot read its file "
                               f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
        if not secret:
            raise precondition(f"endpoint credential {name!r}: its file is empty")
    if any(c in secret for c in "\r\n\0"):
        raise precondition(f"endpoint credential {name!r}: the secret holds a line break or NUL")
    return secret


def target(spec: res.ModelSpec, cfg: ServerConfig) -> oip.EndpointTarget:
    """How to query the endpoint of a (checked) spec, with its credential read now. The allow-list
    is checked again: a record made under an older, wider setting is not queried."""
    ep = spec.endpoint
    check_spec(spec, cfg)
    headers = (("authorization", f"Bearer {read_credential(ep.credential, cfg)}"),) if ep.credential else ()
    return oip.EndpointTarget(
        url=ep.url, model_name=ep.model_name, model_version=ep.model_version, input_name=ep.input_name,
        output_name=ep.output_name, max_batch_size=ep.max_batch_size or DEFAULT_BATCH,
        timeout_s=ep.timeout_seconds or DEFAULT_TIMEOUT_S,
        retries=ep.retries if ep.HasField("retries") else DEFAULT_RETRIES,
        backoff_s=ep.backoff_seconds or DEFAULT_BACKOFF_S, max_qps=ep.max_qps, headers=headers,
        ca_file=cfg.endpoint_ca_file or "")


def registration_target(spec: res.ModelSpec, cfg: ServerConfig) -> oip.EndpointTarget:
    """target() for the checks of RegisterEndpoint, a unary call: shorter waits, one retry at
    most, no pacing (four requests in all)."""
    t = target(spec, cfg)
    return dataclasses.replace(t, timeout_s=min(t.timeout_s, REGISTER_TIMEOUT_S),
                               retries=min(t.retries, REGISTER_RETRIES), max_qps=0.0)


def endpoint_error(exc: "oip.EndpointError", model_id: str = "") -> ServiceError:
    """An endpoint's failure as a precise status: UNAVAILABLE when it is down or failing,
    DEADLINE_EXCEEDED when it is too slow, FAILED_PRECONDITION when it refuses the requests or
    answers something else than the protocol (the registration no longer fits it)."""
    which = f"model {model_id!r}: " if model_id else ""
    return ServiceError(ERROR_CODES.get(exc.kind, grpc.StatusCode.UNAVAILABLE), f"{which}endpoint {exc}")


def model_id(spec: res.ModelSpec) -> str:
    """The id of an endpoint's model: the same for the same url, model and version (so that one
    deployed model keeps one history), whatever else the spec says."""
    scheme, host, port = oip.parse_url(spec.endpoint.url)
    key = "\n".join((scheme, bare_host(host).lower(), str(port), spec.endpoint.model_name,
                     spec.endpoint.model_version))
    return "m-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _identity(spec: res.ModelSpec, server: dict, meta: dict) -> tuple[str, str]:
    """The endpoint's identity as canonical JSON (url, model, version, tensors, what the server
    and the model say of themselves) and its sha256."""
    ep = spec.endpoint
    identity = {"url": ep.url, "model_name": ep.model_name, "model_version": ep.model_version,
                "input_name": ep.input_name, "output_name": ep.output_name, "server": server, "model": meta}
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    if len(text) > MAX_METADATA_JSON:
        raise precondition(f"the endpoint's metadata is {len(text)} bytes of JSON; at most {MAX_METADATA_JSON} are kept")
    return text, hashlib.sha256(text.encode()).hexdigest()


def _flat_input(meta: dict, input_name: str) -> bool:
    """The endpoint takes its input flattened ([-1, C*H*W]; check_metadata accepts that)."""
    return any(t.get("name") == input_name and len(t.get("shape", ())) == 2 for t in meta.get("inputs", ()))


def describe(spec: res.ModelSpec, cfg: ServerConfig, field: str = "spec") -> tuple[res.ModelSpec, str, str]:
    """Ask the endpoint what it serves and check it against the declaration: the spec with the
    input and output names resolved, the identity (see _identity) and its sha256. One inference
    request (a batch of one) checks that the answer is [1, num_classes] finite logits."""
    client = oip.OipClient(registration_target(spec, cfg))
    try:
        server, meta = client.server_metadata(), client.metadata()
        try:
            input_name, output_name = oip.check_metadata(
                meta, tuple(spec.input_shape), spec.layout or "NCHW", int(spec.num_classes),
                spec.endpoint.input_name, spec.endpoint.output_name)
        except ValueError as exc:
            raise invalid(f"{field}.endpoint", f"the endpoint's metadata does not fit the spec: {exc}") from None
        resolved = res.ModelSpec()
        resolved.CopyFrom(spec)
        resolved.endpoint.input_name, resolved.endpoint.output_name = input_name, output_name
        probe = oip.OipClient(registration_target(resolved, cfg))
        try:
            shape = layout_shape(tuple(spec.input_shape), spec.layout or "NCHW")
            x = np.zeros([1, int(np.prod(shape))] if _flat_input(meta, input_name) else [1, *shape], np.float32)
            out = probe.infer(x)
        finally:
            probe.close()
        if out.shape != (1, spec.num_classes):
            raise invalid(f"{field}.num_classes", f"{spec.num_classes} declared, but the endpoint answered logits "
                                                  f"of shape {list(out.shape)} for one example")
    except oip.EndpointError as exc:
        raise endpoint_error(exc) from None
    finally:
        client.close()
    text, sha = _identity(resolved, server, meta)
    return resolved, text, sha


def current_identity(record: res.Model, cfg: ServerConfig) -> tuple[str, str]:
    """What the endpoint says of itself now (an audit records it: the model behind a url may have
    changed since it was registered), as (identity JSON, sha256); metadata requests only."""
    client = oip.OipClient(registration_target(record.spec, cfg))
    try:
        return _identity(record.spec, client.server_metadata(), client.metadata())
    except oip.EndpointError as exc:
        raise endpoint_error(exc, record.id) from None
    finally:
        client.close()


_PACERS: dict[tuple[str, float], "oip.Pacer"] = {}
_PACERS_LOCK = threading.Lock()


def pacer(model_id: str, max_qps: float) -> "oip.Pacer":
    """One request pacer per endpoint model in this process: operations querying the same
    endpoint at once share its max_qps."""
    with _PACERS_LOCK:
        key = (model_id, float(max_qps))
        if key not in _PACERS:
            _PACERS[key] = oip.Pacer(max_qps)
        return _PACERS[key]


class EndpointQueries:
    """The predict function of one operation's BlackBoxNet: the endpoint's client (pacing shared
    with every other operation on the endpoint), its failures as precise statuses, answers of the
    registered class count only, and what it sent (usage)."""

    def __init__(self, record: res.Model, cfg: ServerConfig) -> None:
        self.model_id = record.id
        self.num_classes = int(record.spec.num_classes)
        t = dataclasses.replace(target(record.spec, cfg), num_classes=self.num_classes)
        self.client = oip.OipClient(t, pacer=pacer(record.id, t.max_qps))
        try:
            meta = json.loads(record.endpoint_metadata_json or "{}").get("model", {})
        except ValueError:
            meta = {}
        self.flat = _flat_input(meta, record.spec.endpoint.input_name)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        try:
            out = self.client.infer(x.reshape(len(x), -1) if self.flat else x)
        except oip.EndpointError as exc:
            raise endpoint_error(exc, self.model_id) from None
        if out.shape != (len(x), self.num_classes):
            raise precondition(f"model {self.model_id!r}: endpoint answered logits of shape {list(out.shape)} for "
                               f"{len(x)} examples; it was registered with {self.num_classes} classes (register it "
                               "again if the deployed model changed)")
        return out

    def usage(self) -> results.EndpointUsage:
        u = self.client.usage()
        return results.EndpointUsage(model_id=self.model_id, requests=u.requests, rows=u.rows, retries=u.retries,
                                     failures=u.failures)


def build_net(record: res.Model, cfg: ServerConfig) -> BlackBoxNet:
    """A fresh module querying the endpoint (a client per operation, so that its counts are the
    operation's own); net.predict.usage() tells what it sent."""
    return BlackBoxNet(EndpointQueries(record, cfg), record.spec.layout or "NCHW", record.spec.value_range or "0-1")


def usage_of(wrapper) -> "results.EndpointUsage | None":
    predict = getattr(getattr(wrapper, "net", None), "predict", None)
    return predict.usage() if isinstance(predict, EndpointQueries) else None
