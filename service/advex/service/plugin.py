"""What the client's `advex` command uses of the server, found through the `advex.plugins`
entry point (never imported by the client, so the client install stays free of torch):

- ``serve(argv) -> exit code``: `advex serve …`
- ``InProcessServer``: a server on a background thread (`advex demo --in-process`, notebooks).

`advex serve --help` and configuration errors answer before torch is imported.
"""
from __future__ import annotations

import asyncio
import sys
from typing import Optional

from advex.service import config as config_mod
from advex.service.listen import ListenError, check_server_addresses

__all__ = ["serve", "InProcessServer"]

PROG = "advex serve"


def serve(argv: Optional[list[str]] = None) -> int:
    """Run the server until SIGTERM / SIGINT. Exit codes: 0 after a clean stop; 2 for a bad
    setting or an address that cannot be listened on (one line on stderr, no traceback)."""
    parser = config_mod.make_parser(PROG)
    settings = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_mod.load(settings)
    except config_mod.ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        check_server_addresses(config_mod.bare_host(cfg.host), cfg.port, cfg.metrics_bind_host, cfg.metrics_port)  # before torch loads: answers at once
        from advex.service import logs
        from advex.service.server import serve as run_server

        logs.setup(cfg.log_level, cfg.log_format)
        asyncio.run(run_server(cfg))
    except ListenError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


def __getattr__(name: str):
    if name == "InProcessServer":  # imported on use: it brings torch
        from advex.service.inprocess import InProcessServer

        return InProcessServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
