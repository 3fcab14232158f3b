"""What the client's `advex` command uses of the server, found through the `advex.plugins`
entry point (never imported by the client, so the client install stays free of torch):

- ``serve(argv) -> exit code``: `advex serve …`
- ``InProcessServer``: a server on a background thread (`advex demo --in-process`, notebooks).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Optional

from advex.service import config as config_mod
from advex.service.inprocess import InProcessServer

__all__ = ["serve", "InProcessServer"]


def serve(argv: Optional[list[str]] = None) -> int:
    from advex.service.server import serve as run_server

    parser = argparse.ArgumentParser(prog="advex serve", description="run the advex gRPC server")
    config_mod.add_arguments(parser)
    settings = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_mod.load(settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run_server(cfg))
    return 0
