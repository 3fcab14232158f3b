"""The embedded SQLite store: operations, models and datasets, each row holding the
resource's protobuf message. The schema lives here and nowhere else."""
from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Type, TypeVar

from google.protobuf.message import Message

SCHEMA = """
CREATE TABLE IF NOT EXISTS operations (
    id       TEXT PRIMARY KEY,
    kind     TEXT NOT NULL,
    state    INTEGER NOT NULL,
    created  REAL NOT NULL,
    updated  REAL NOT NULL,
    proto    BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS operations_created ON operations (created);
CREATE TABLE IF NOT EXISTS models (
    id       TEXT PRIMARY KEY,
    created  REAL NOT NULL,
    path     TEXT NOT NULL,
    proto    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    id       TEXT PRIMARY KEY,
    created  REAL NOT NULL,
    path     TEXT NOT NULL,
    proto    BLOB NOT NULL
);
"""

M = TypeVar("M", bound=Message)
RESOURCE_TABLES = ("models", "datasets")


class Store:
    """Thread-safe (one connection, one lock, WAL journal). Writes commit at once."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -------------------------------------------------------------- operations
    def put_operation(self, op_id: str, kind: str, state: int, created: float, proto: bytes) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO operations (id, kind, state, created, updated, proto) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET state=excluded.state, updated=excluded.updated, proto=excluded.proto",
                (op_id, kind, state, created, time.time(), proto))

    def get_operation(self, op_id: str) -> Optional[bytes]:
        with self._lock:
            row = self._db.execute("SELECT proto FROM operations WHERE id = ?", (op_id,)).fetchone()
        return row[0] if row else None

    def list_operations(self, kind: str = "", limit: int = 100) -> list[bytes]:
        sql = "SELECT proto FROM operations" + (" WHERE kind = ?" if kind else "") + " ORDER BY created DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, ((kind,) if kind else ()) + (limit,)).fetchall()
        return [r[0] for r in rows]

    def unfinished_operations(self, states: tuple[int, ...]) -> list[bytes]:
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(f"SELECT proto FROM operations WHERE state IN ({marks})", states).fetchall()
        return [r[0] for r in rows]

    # -------------------------------------------------------------- models / datasets
    def put_resource(self, table: str, res_id: str, path: str, proto: Message) -> None:
        assert table in RESOURCE_TABLES
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO {table} (id, created, path, proto) VALUES (?, ?, ?, ?)",
                             (res_id, time.time(), path, proto.SerializeToString()))

    def get_resource(self, table: str, res_id: str, cls: Type[M]) -> Optional[tuple[M, str]]:
        assert table in RESOURCE_TABLES
        with self._lock:
            row = self._db.execute(f"SELECT proto, path FROM {table} WHERE id = ?", (res_id,)).fetchone()
        return (cls.FromString(row[0]), row[1]) if row else None

    def list_resources(self, table: str, cls: Type[M]) -> Iterator[M]:
        assert table in RESOURCE_TABLES
        with self._lock:
            rows = self._db.execute(f"SELECT proto FROM {table} ORDER BY created").fetchall()
        return (cls.FromString(r[0]) for r in rows)

    def delete_resource(self, table: str, res_id: str) -> bool:
        assert table in RESOURCE_TABLES
        with self._lock:
            cur = self._db.execute(f"DELETE FROM {table} WHERE id = ?", (res_id,))
        return cur.rowcount > 0
