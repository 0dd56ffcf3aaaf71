"""The SQLite store of a server home: ``dragon.db``.

One :class:`Store` owns the connection. Writers go through :meth:`Store.write`,
which holds a lock and a ``BEGIN IMMEDIATE`` transaction, so the RPC layer's
threads never interleave and a failure rolls everything back. The schema evolves
through :data:`MIGRATIONS`; ``schema_version`` records how far a file has come.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

logger = logging.getLogger(__name__)

DB_FILE = "dragon.db"
BUSY_TIMEOUT_MS = 30_000

Row = dict[str, Any]

_SCHEMA_V1 = """
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    key_hash BLOB NOT NULL UNIQUE,
    name TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_seen_at REAL NOT NULL,
    reputation REAL NOT NULL DEFAULT 1.0,
    accepted_updates INTEGER NOT NULL DEFAULT 0,
    rejected_updates INTEGER NOT NULL DEFAULT 0,
    token_count INTEGER NOT NULL DEFAULT 0,
    uploaded_bytes INTEGER NOT NULL DEFAULT 0,
    session_open INTEGER NOT NULL DEFAULT 0,
    hardware TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE versions (
    version INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    path TEXT NOT NULL,
    sha256 BLOB NOT NULL,
    size INTEGER NOT NULL,
    validation_loss REAL,
    update_count INTEGER NOT NULL,
    token_count INTEGER NOT NULL,
    optimizer_path TEXT
);
CREATE TABLE batches (
    id INTEGER PRIMARY KEY,
    first_sequence INTEGER NOT NULL,
    count INTEGER NOT NULL,
    split TEXT NOT NULL CHECK (split IN ('train', 'validation')),
    trained_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE leases (
    id TEXT PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES batches(id),
    worker_id TEXT NOT NULL REFERENCES workers(id),
    model_version INTEGER NOT NULL,
    granted_at REAL NOT NULL,
    deadline REAL NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('granted', 'accepted', 'expired', 'released', 'failed')),
    steps_done INTEGER NOT NULL DEFAULT 0,
    steps_total INTEGER NOT NULL DEFAULT 0,
    loss REAL,
    ended_at REAL
);
CREATE INDEX leases_by_batch ON leases (batch_id, state);
CREATE INDEX leases_by_state ON leases (state, deadline);
CREATE TABLE updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    lease_id TEXT NOT NULL UNIQUE REFERENCES leases(id),
    worker_id TEXT NOT NULL REFERENCES workers(id),
    base_version INTEGER NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 BLOB NOT NULL,
    samples INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    loss_before REAL NOT NULL,
    loss_after REAL NOT NULL,
    train_seconds REAL NOT NULL,
    dense_bytes INTEGER NOT NULL,
    weight REAL,
    received_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'applied', 'discarded')),
    applied_version INTEGER
);
CREATE INDEX updates_by_state ON updates (state, id);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE challenges (
    challenge BLOB PRIMARY KEY,
    expires_at REAL NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
"""


def _migrate_v1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1.split(";"):
        if statement.strip():
            conn.execute(statement)


def _migrate_v2(conn: sqlite3.Connection) -> None:
    # The lease queue picks the least-trained free batch; stats count events by
    # kind. Both scanned whole tables without these.
    conn.execute(
        "CREATE INDEX IF NOT EXISTS batches_by_queue "
        "ON batches (split, trained_count, id)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS events_by_kind ON events (kind)")


# Migration i (0-based) brings a file from schema version i to i + 1. Append
# new ones; never edit a released one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_v1, _migrate_v2]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The database file is from a newer schema or otherwise unusable."""


class Store:
    """The one owner of a home's SQLite connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below),
        # never opened implicitly by the sqlite3 module.
        conn = sqlite3.connect(
            str(path),
            check_same_thread=False,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        self.db = sqlite_utils.Database(conn)
        self._conn = conn
        self._lock = threading.RLock()
        self._depth = 0
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{path}: could not enable WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
        self.migrate()

    @classmethod
    def open(cls, home: Path) -> Store:
        """The store of a server home."""
        return cls(home / DB_FILE)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    def schema_version(self) -> int:
        """The schema version of the file; 0 for a new file."""
        with self._lock:
            exists = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' "
                "AND name = 'schema_version'"
            ).fetchone()
            if not exists:
                return 0
            row = self._conn.execute("SELECT version FROM schema_version").fetchone()
            return int(row[0]) if row else 0

    def migrate(self) -> None:
        """Bring the file to :data:`SCHEMA_VERSION`, one transaction per step."""
        with self._lock:
            current = self.schema_version()
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {current}; this server knows "
                    f"{SCHEMA_VERSION}: upgrade dragon-server"
                )
            for target in range(current + 1, SCHEMA_VERSION + 1):
                with self.write() as conn:
                    MIGRATIONS[target - 1](conn)
                    conn.execute(
                        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)"
                    )
                    conn.execute("DELETE FROM schema_version")
                    conn.execute(
                        "INSERT INTO schema_version (version) VALUES (?)", (target,)
                    )
                logger.info("database %s migrated to schema %d", self.path, target)

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: ``BEGIN IMMEDIATE``, then COMMIT or ROLLBACK.

        Nested use joins the outer transaction.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._depth = 0
                self._conn.execute("ROLLBACK")
                raise
            self._depth = 0
            try:
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, for reads outside a transaction."""
        with self._lock:
            yield self._conn

    def query(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        """Rows of a read query, as dicts."""
        with self._lock:
            return list(self.db.query(sql, params))

    def one(self, sql: str, params: Sequence[object] = ()) -> Row | None:
        """The first row of a read query, or None."""
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Sequence[object] = ()) -> Any:
        """The first column of the first row of a read query."""
        with self._lock:
            row = self._conn.execute(sql, params).fetchone()
        if row is None:
            raise StoreError(f"no row for {sql!r}")
        return row[0]
