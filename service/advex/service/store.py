"""The embedded SQLite store: operations, models and datasets, each row holding the
resource's protobuf message. The schema lives here and nowhere else."""
from __future__ import annotations

import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Type, TypeVar

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
CREATE INDEX IF NOT EXISTS operations_created_id ON operations (created, id);
CREATE INDEX IF NOT EXISTS operations_kind_created_id ON operations (kind, created, id);
CREATE TABLE IF NOT EXISTS models (
    id       TEXT PRIMARY KEY,
    created  REAL NOT NULL,
    path     TEXT NOT NULL,
    proto    BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS models_created_id ON models (created, id);
CREATE TABLE IF NOT EXISTS datasets (
    id       TEXT PRIMARY KEY,
    created  REAL NOT NULL,
    path     TEXT NOT NULL,
    proto    BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS datasets_created_id ON datasets (created, id);
-- server-made keys (e.g. the one that signs page tokens), made once per data dir
CREATE TABLE IF NOT EXISTS secrets (
    name     TEXT PRIMARY KEY,
    value    BLOB NOT NULL
);
"""

M = TypeVar("M", bound=Message)
RESOURCE_TABLES = ("models", "datasets")
LIST_TABLES = ("operations",) + RESOURCE_TABLES
Row = tuple[float, str, bytes]  # created, id, proto


class Store:
    """Thread-safe (one connection, one lock, WAL journal). Writes commit at once.

    temp_store=MEMORY: SQLite's temporary files (sorts, statement journals, VACUUM) would go to
    SQLITE_TMPDIR, TMPDIR or /var/tmp, read once per process when the sqlite3 module loads (before
    any server code can point them into the data dir). Kept in memory, none is written at all;
    the lists read through (created, id) indexes, so they need no sort of records."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._secrets: dict[str, bytes] = {}
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA temp_store=MEMORY")
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

    def unfinished_operations(self, states: tuple[int, ...]) -> list[bytes]:
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(f"SELECT proto FROM operations WHERE state IN ({marks})", states).fetchall()
        return [r[0] for r in rows]

    # -------------------------------------------------------------- models / datasets
    def put_resource(self, table: str, res_id: str, path: str, proto: Message) -> None:
        assert table in RESOURCE_TABLES
        with self._lock:
            # an update keeps `created`: it is the record's place in the lists' order (see list_page)
            self._db.execute(f"INSERT INTO {table} (id, created, path, proto) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT(id) DO UPDATE SET path=excluded.path, proto=excluded.proto",
                             (res_id, time.time(), path, proto.SerializeToString()))

    def get_resource(self, table: str, res_id: str, cls: Type[M]) -> Optional[tuple[M, str]]:
        assert table in RESOURCE_TABLES
        with self._lock:
            row = self._db.execute(f"SELECT proto, path FROM {table} WHERE id = ?", (res_id,)).fetchone()
        return (cls.FromString(row[0]), row[1]) if row else None

    def resource_ids(self, table: str) -> set[str]:
        """The ids of every record of `table` (read from its index; no record is loaded)."""
        assert table in RESOURCE_TABLES
        with self._lock:
            return {row[0] for row in self._db.execute(f"SELECT id FROM {table}")}

    def delete_resource(self, table: str, res_id: str) -> bool:
        assert table in RESOURCE_TABLES
        with self._lock:
            cur = self._db.execute(f"DELETE FROM {table} WHERE id = ?", (res_id,))
        return cur.rowcount > 0

    # -------------------------------------------------------------- lists, in pages
    def list_page(self, table: str, take: Callable[[int], bool], limit: int, *,
                  after: Optional[tuple[float, str]] = None, newest_first: bool = False,
                  kind: str = "") -> tuple[list[Row], bool]:
        """One page of `table` in the order (created, id), or its reverse with newest_first: the
        rows (created, id, proto) after the position `after` (exclusive), at most `limit`, for
        as long as take(len(proto)) agrees; and whether more rows follow. `kind` filters
        operations. Sizes are read first (from the (created, id) index and the records'
        headers), so a refused record is never loaded; all of it under one lock, one snapshot."""
        assert table in LIST_TABLES
        if kind and table != "operations":
            raise ValueError("only operations have a kind")
        op, order = ("<", "DESC") if newest_first else (">", "ASC")
        clauses, args = [], []
        if kind:
            clauses.append("kind = ?")
            args.append(kind)
        if after is not None:
            clauses.append(f"(created, id) {op} (?, ?)")
            args += [float(after[0]), str(after[1])]
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT created, id, length(proto) FROM {table}{where} ORDER BY created {order}, id {order} LIMIT ?"
        chosen: list[tuple[float, str]] = []
        protos: dict[str, bytes] = {}
        with self._lock:
            heads = self._db.execute(sql, (*args, max(0, limit) + 1)).fetchall()
            for created, res_id, size in heads[:max(0, limit)]:
                if not take(int(size)):
                    break
                chosen.append((created, res_id))
            for i in range(0, len(chosen), 500):
                ids = [res_id for _, res_id in chosen[i:i + 500]]
                marks = ",".join("?" * len(ids))
                protos.update(self._db.execute(f"SELECT id, proto FROM {table} WHERE id IN ({marks})", ids))
        return [(created, res_id, protos[res_id]) for created, res_id in chosen], len(heads) > len(chosen)

    def secret(self, name: str, size: int = 32) -> bytes:
        """A random key made once for this store (kept in it) and the same ever after."""
        key = self._secrets.get(name)
        if key is None:
            with self._lock:
                self._db.execute("INSERT OR IGNORE INTO secrets (name, value) VALUES (?, ?)",
                                 (name, secrets.token_bytes(size)))
                key = bytes(self._db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()[0])
            self._secrets[name] = key
        return key
