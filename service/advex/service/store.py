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
-- audit records (advex.v1.AuditRecord), one per audited target; history is read per target
CREATE TABLE IF NOT EXISTS audits (
    id          TEXT PRIMARY KEY,
    created     REAL NOT NULL,
    model_id    TEXT NOT NULL,
    target_name TEXT NOT NULL,
    audit_name  TEXT NOT NULL,
    passed      INTEGER NOT NULL,
    proto       BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS audits_created_id ON audits (created, id);
CREATE INDEX IF NOT EXISTS audits_model_name_created ON audits (model_id, audit_name, created, id);
CREATE INDEX IF NOT EXISTS audits_target_created ON audits (target_name, created, id);
-- the last measured accuracies of a model on a dataset (what the accuracy gauges show), as JSON,
-- so that the gauges come back after a restart and go with the model
CREATE TABLE IF NOT EXISTS accuracies (
    model_id   TEXT NOT NULL,
    dataset_id TEXT NOT NULL,
    updated    REAL NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (model_id, dataset_id)
);
-- server-made keys (e.g. the one that signs page tokens), made once per data dir
CREATE TABLE IF NOT EXISTS secrets (
    name     TEXT PRIMARY KEY,
    value    BLOB NOT NULL
);
"""

M = TypeVar("M", bound=Message)
RESOURCE_TABLES = ("models", "datasets")
LIST_TABLES = ("operations",) + RESOURCE_TABLES + ("audits",)
# what a list may be filtered by (column = value), per table; "target" matches a model id or a name
FILTERS = {"operations": {"kind": "kind = ?"},
           "audits": {"target": "(model_id = ? OR target_name = ?)", "audit_name": "audit_name = ?"}}
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
                  match: Optional[dict[str, str]] = None) -> tuple[list[Row], bool]:
        """One page of `table` in the order (created, id), or its reverse with newest_first: the
        rows (created, id, proto) after the position `after` (exclusive), at most `limit`, for
        as long as take(len(proto)) agrees; and whether more rows follow. `match` filters (the
        names FILTERS allows for the table; empty values match everything). Sizes are read first (from the (created, id) index and the records'
        headers), so a refused record is never loaded; all of it under one lock, one snapshot."""
        assert table in LIST_TABLES
        op, order = ("<", "DESC") if newest_first else (">", "ASC")
        clauses, args = [], []
        for name, value in (match or {}).items():
            clause = FILTERS.get(table, {}).get(name)
            if clause is None:
                raise ValueError(f"{table} cannot be filtered by {name!r}")
            if value:
                clauses.append(clause)
                args += [value] * clause.count("?")
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

    # -------------------------------------------------------------- audits
    def put_audit(self, record_id: str, created: float, model_id: str, target_name: str, audit_name: str,
                  passed: bool, proto: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT INTO audits (id, created, model_id, target_name, audit_name, passed, proto) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (record_id, created, model_id, target_name, audit_name, int(passed), proto))

    def recent_audits(self, model_id: str, audit_name: str, *, passed_only: bool = False,
                      limit: int = 1) -> list[bytes]:
        """The newest audit records of a model under a name (passing ones only), newest first."""
        where = " AND passed = 1" if passed_only else ""
        with self._lock:
            return [r[0] for r in self._db.execute(
                f"SELECT proto FROM audits WHERE model_id = ? AND audit_name = ?{where} "
                "ORDER BY created DESC, id DESC LIMIT ?", (model_id, audit_name, limit))]

    def latest_audits(self) -> list[bytes]:
        """The newest record of every (model, audit name): what the audit gauges show."""
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT a.proto FROM audits a WHERE a.id = (SELECT b.id FROM audits b WHERE b.model_id = a.model_id "
                "AND b.audit_name = a.audit_name ORDER BY b.created DESC, b.id DESC LIMIT 1)")]

    # -------------------------------------------------------------- accuracies (the gauges' values)
    def put_accuracy(self, model_id: str, dataset_id: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO accuracies (model_id, dataset_id, updated, value) VALUES (?, ?, ?, ?) "
                             "ON CONFLICT(model_id, dataset_id) DO UPDATE SET updated=excluded.updated, "
                             "value=excluded.value", (model_id, dataset_id, time.time(), value))

    def accuracies(self) -> list[tuple[str, str, float, str]]:
        with self._lock:
            return list(self._db.execute("SELECT model_id, dataset_id, updated, value FROM accuracies"))

    def forget_model(self, model_id: str) -> None:
        """A deleted model's gauge values go with it (its audit records stay: they are history)."""
        with self._lock:
            self._db.execute("DELETE FROM accuracies WHERE model_id = ?", (model_id,))

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
