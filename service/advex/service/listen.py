"""Whether the server can listen on an address, said in one line (no torch, no grpc: `advex
serve` asks before it imports them, so a second server on a port in use answers at once).

gRPC logs a failed bind on stderr and raises without the cause; this binds the address as a
server would (SO_REUSEADDR, no SO_REUSEPORT) and lets go, to name the cause and the fix."""
from __future__ import annotations

import errno
import socket

from advex.service.config import address


class ListenError(RuntimeError):
    """The server cannot listen on its gRPC or metrics address; str(error) is one line that
    says which address, why, and what to change."""


_REASONS = {
    errno.EADDRINUSE: "the address is in use (is another advex serve running? choose another {flag})",
    errno.EADDRNOTAVAIL: "the address is not one of this machine's (check --host)",
    errno.EACCES: "permission denied (ports below 1024 need privileges; choose another {flag})",
    errno.EAFNOSUPPORT: "this machine does not support that address family (check --host)",
}


def reason(exc: OSError, flag: str) -> str:
    """Why a bind failed, and what to change (flag: the setting that picks the port)."""
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve (check --host)"
    text = _REASONS.get(exc.errno)
    return text.format(flag=flag) if text else (exc.strerror or str(exc))


def check_free(host: str, port: int, flag: str, what: str) -> None:
    """Raise ListenError when host:port cannot be listened on, e.g. another process listens
    there. Port 0 (any free port) always can. what: "listen on", "serve metrics on"."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ListenError(f"cannot {what} {address(host, port)}: {reason(exc, flag)}") from exc
    failures: list[OSError] = []
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(sockaddr)
        except OSError as exc:
            failures.append(exc)
    in_use = [e for e in failures if e.errno == errno.EADDRINUSE]
    if in_use or (failures and len(failures) == len(infos)):  # gRPC binds what it can of the rest
        exc = (in_use or failures)[0]
        raise ListenError(f"cannot {what} {address(host, port)}: {reason(exc, flag)}") from exc


def check_server_addresses(host: str, port: int, metrics_host: str, metrics_port: int) -> None:
    """Both of a server's addresses: gRPC and metrics (metrics_port 0: none)."""
    check_free(host, port, "--port", "listen on")
    if metrics_port:
        check_free(metrics_host, metrics_port, "--metrics-port", "serve metrics on")
