"""A server on a background thread with its own event loop: for tests, notebooks and
`advex demo --in-process`. ``with InProcessServer(data_dir=...) as srv: Client(srv.target)``."""
from __future__ import annotations

import asyncio
import threading
from typing import Optional

from advex.service import config as config_mod
from advex.service.server import RunningServer, start


class InProcessServer:
    def __init__(self, cfg: Optional[config_mod.ServerConfig] = None, **settings) -> None:
        self.cfg = cfg or config_mod.from_kwargs(**{"port": 0, "metrics_port": 0, **settings})
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="advex-server", daemon=True)
        self.running: Optional[RunningServer] = None

    @property
    def target(self) -> str:
        return config_mod.address(self.cfg.host, self.running.port)

    def start(self) -> "InProcessServer":
        self._thread.start()
        try:
            self.running = asyncio.run_coroutine_threadsafe(start(self.cfg), self._loop).result(timeout=60)
        except BaseException:  # e.g. ListenError: leave no thread or loop behind
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            raise
        return self

    def stop(self, grace: float = 5.0) -> None:
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.stop(grace), self._loop).result(timeout=grace + 30)
            self.running = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> "InProcessServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
