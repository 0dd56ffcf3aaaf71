"""The SQLite store: schema, migrations, WAL, transactions."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from dragon_server import store as store_module
from dragon_server.store import SCHEMA_VERSION, Store, StoreError

TABLES = {
    "workers",
    "versions",
    "batches",
    "leases",
    "updates",
    "events",
    "challenges",
    "schema_version",
}


def _tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in rows} - {"sqlite_sequence"}
    finally:
        conn.close()


def test_new_file_is_migrated_to_the_current_schema(tmp_path: Path) -> None:
    store = Store(tmp_path / "dragon.db")
    try:
        assert store.schema_version() == SCHEMA_VERSION == 2
        assert _tables(tmp_path / "dragon.db") == TABLES
        indexes = {
            row["name"]
            for row in store.query(
                "SELECT name FROM sqlite_master WHERE type = 'index'"
            )
        }
        assert {"batches_by_queue", "events_by_kind", "leases_by_batch"} <= indexes
    finally:
        store.close()


def test_journal_is_wal_with_a_busy_timeout(tmp_path: Path) -> None:
    store = Store(tmp_path / "dragon.db")
    try:
        assert store.scalar("PRAGMA journal_mode") == "wal"
        assert store.scalar("PRAGMA busy_timeout") == 30_000
        assert store.scalar("PRAGMA foreign_keys") == 1
    finally:
        store.close()


def test_reopening_keeps_rows_and_does_not_migrate_again(tmp_path: Path) -> None:
    store = Store(tmp_path / "dragon.db")
    with store.write() as conn:
        conn.execute("INSERT INTO events (time, kind, payload) VALUES (1.5, 'x', '{}')")
    store.close()

    again = Store(tmp_path / "dragon.db")
    try:
        assert again.schema_version() == 2
        assert again.query("SELECT time, kind FROM events") == [
            {"time": 1.5, "kind": "x"}
        ]
    finally:
        again.close()


def test_a_later_migration_runs_once_on_an_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store(tmp_path / "dragon.db").close()

    def add_column(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE workers ADD COLUMN country TEXT")

    monkeypatch.setattr(
        store_module, "MIGRATIONS", [*store_module.MIGRATIONS, add_column]
    )
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 3)
    store = Store(tmp_path / "dragon.db")
    try:
        assert store.schema_version() == 3
        columns = [row["name"] for row in store.query("PRAGMA table_info(workers)")]
        assert "country" in columns
    finally:
        store.close()
    Store(tmp_path / "dragon.db").close()  # a second ALTER would raise


def test_a_version_one_file_gains_the_indexes_of_version_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 1)
    Store(tmp_path / "dragon.db").close()
    monkeypatch.undo()

    store = Store(tmp_path / "dragon.db")
    try:
        assert store.schema_version() == 2
        names = [r["name"] for r in store.query("PRAGMA index_list(events)")]
        assert "events_by_kind" in names
    finally:
        store.close()


def test_a_file_from_a_newer_server_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "dragon.db")
    with store.write() as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    store.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path / "dragon.db")


def _insert_then_fail(store: Store) -> None:
    with store.write() as conn:
        conn.execute("INSERT INTO events (time, kind, payload) VALUES (1, 'a', '{}')")
        conn.execute("INSERT INTO challenges (challenge, expires_at) VALUES (x'01', 2)")
        raise RuntimeError("boom")


def _insert_good_then_bad_batch(store: Store) -> None:
    with store.write() as conn:
        conn.execute(
            "INSERT INTO batches (id, first_sequence, count, split) "
            "VALUES (0, 0, 4, 'train')"
        )
        conn.execute(
            "INSERT INTO batches (id, first_sequence, count, split) "
            "VALUES (1, 4, 4, 'neither')"
        )


def test_an_error_inside_a_transaction_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "dragon.db")
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _insert_then_fail(store)
        assert store.scalar("SELECT COUNT(*) FROM events") == 0
        assert store.scalar("SELECT COUNT(*) FROM challenges") == 0
        # The connection is usable again after the rollback.
        with store.write() as conn:
            conn.execute(
                "INSERT INTO events (time, kind, payload) VALUES (1, 'b', '{}')"
            )
        assert store.scalar("SELECT COUNT(*) FROM events") == 1
    finally:
        store.close()


def test_a_constraint_failure_rolls_back_the_whole_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "dragon.db")
    try:
        with pytest.raises(sqlite3.IntegrityError):
            _insert_good_then_bad_batch(store)
        assert store.scalar("SELECT COUNT(*) FROM batches") == 0
    finally:
        store.close()


def test_writes_from_many_threads_all_land(tmp_path: Path) -> None:
    store = Store(tmp_path / "dragon.db")
    errors: list[BaseException] = []

    def writer(index: int) -> None:
        try:
            for step in range(25):
                with store.write() as conn:
                    conn.execute(
                        "INSERT INTO events (time, kind, payload) VALUES (?, ?, '{}')",
                        (step, f"t{index}"),
                    )
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        assert store.scalar("SELECT COUNT(*) FROM events") == 100
    finally:
        store.close()


def test_a_second_connection_sees_only_committed_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "dragon.db")
    reader = sqlite3.connect(tmp_path / "dragon.db")
    try:
        with store.write() as conn:
            conn.execute(
                "INSERT INTO events (time, kind, payload) VALUES (1, 'a', '{}')"
            )
            assert reader.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
        assert reader.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1
    finally:
        reader.close()
        store.close()
