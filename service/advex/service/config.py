"""Server configuration: one source, flags over environment (ADVEX_*) over defaults."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional


def _default_data_roots() -> list[str]:
    return ["/usr/share/datasets"]


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9108          # 0 = no metrics endpoint
    data_dir: str = "advex-data"      # SQLite store + artifact folder
    data_roots: list[str] = field(default_factory=_default_data_roots)  # built-in datasets
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    workers: int = 1                  # concurrent long operations
    max_queue: int = 16               # queued + running operations before RESOURCE_EXHAUSTED
    max_batch: int = 1024             # inline Attack batch
    max_upload_mb: int = 1024
    max_steps: int = 10000
    max_restarts: int = 100
    token: Optional[str] = None       # required bearer token when set
    shutdown_grace_s: float = 10.0
    torch_threads: int = 0            # 0 = torch default

    @property
    def store_path(self) -> Path:
        return Path(self.data_dir) / "advex.sqlite3"

    @property
    def artifacts(self) -> Path:
        return Path(self.data_dir) / "artifacts"


ENV_PREFIX = "ADVEX_"


def _coerce(name: str, raw: str, default):
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, list):
        return [p for p in raw.split(os.pathsep) if p]
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field: --data-dir, --max-batch, ... (environment: ADVEX_DATA_DIR, ...)."""
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        helptext = f"(env {env})"
        if f.name == "data_roots":
            parser.add_argument(flag, action="append", default=None, help=f"folder with built-in datasets; repeatable {helptext}")
        else:
            parser.add_argument(flag, default=None, help=helptext)


def load(args: Optional[argparse.Namespace] = None, env: Optional[dict] = None) -> ServerConfig:
    env = os.environ if env is None else env
    cfg = ServerConfig()
    for f in fields(ServerConfig):
        default = getattr(cfg, f.name)
        raw_env = env.get(ENV_PREFIX + f.name.upper())
        if raw_env is not None and default is not None:
            setattr(cfg, f.name, _coerce(f.name, raw_env, default))
        elif raw_env is not None:
            setattr(cfg, f.name, raw_env)
        flag = getattr(args, f.name, None) if args is not None else None
        if flag is not None:
            setattr(cfg, f.name, flag if isinstance(flag, list) or default is None else _coerce(f.name, flag, default))
    if "ADVEX_DATA_ROOT" in env:  # the tests' setting also feeds the server
        cfg.data_roots = [p for p in env["ADVEX_DATA_ROOT"].split(os.pathsep) if p] + cfg.data_roots
    return cfg


def from_kwargs(**kwargs) -> ServerConfig:
    cfg = ServerConfig()
    for k, v in kwargs.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown server setting {k!r}")
        setattr(cfg, k, v)
    return cfg
