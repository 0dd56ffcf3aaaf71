"""The main job end to end: the demo's server and two real worker processes."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from forge.checkpoint import load_checkpoint

DEMO_TIMEOUT_SECONDS = 420


def _program(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed"
    return found


@pytest.fixture(scope="module")
def finished_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("e2e") / "home"
    result = subprocess.run(
        [
            _program("dragon-server"),
            "demo",
            "--model",
            "tiny",
            "--workers",
            "2",
            "--versions",
            "3",
            "--minutes",
            "5",
            "--corpus-bytes",
            str(2**20),
            "--home",
            str(home),
        ],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return home, result.stdout


def _rows(home: Path, sql: str) -> list[sqlite3.Row]:
    with sqlite3.connect(f"file:{home / 'dragon.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return list(db.execute(sql))


def test_demo_publishes_versions_with_falling_validation_loss(
    finished_demo: tuple[Path, str],
) -> None:
    home, output = finished_demo
    versions = _rows(home, "SELECT * FROM versions ORDER BY version")

    assert len(versions) >= 4
    assert [v["version"] for v in versions] == list(range(len(versions)))
    assert versions[-1]["validation_loss"] < versions[0]["validation_loss"] - 0.05
    assert "validation loss, version 0" in output
    assert f"Home folder: {home}" in output


def test_every_granted_lease_is_accounted_for_exactly_once(
    finished_demo: tuple[Path, str],
) -> None:
    home, _ = finished_demo
    leases = _rows(home, "SELECT id, state FROM leases")
    updates = _rows(home, "SELECT lease_id, state, applied_version FROM updates")
    versions = _rows(home, "SELECT version, update_count FROM versions")

    # The workers drained: nothing is left granted, and each accepted lease has
    # exactly one update (the lease id is unique in updates).
    assert leases
    assert {lease["state"] for lease in leases} <= {"accepted", "released", "expired"}
    accepted = {lease["id"] for lease in leases if lease["state"] == "accepted"}
    assert sorted(u["lease_id"] for u in updates) == sorted(accepted)

    # Each applied update was applied once, to a version that exists, and the
    # versions count exactly the applied updates.
    applied = [u for u in updates if u["state"] == "applied"]
    published = {v["version"] for v in versions}
    assert all(u["applied_version"] in published for u in applied)
    assert sum(v["update_count"] for v in versions) == len(applied)
    assert all(u["state"] in ("applied", "pending") for u in updates)


def test_uploads_are_over_50_times_smaller_than_dense_fp32(
    finished_demo: tuple[Path, str],
) -> None:
    home, _ = finished_demo
    (totals,) = _rows(
        home, "SELECT SUM(size) AS sent, SUM(dense_bytes) AS dense FROM updates"
    )
    config = (home / "dragon.toml").read_text()

    assert "density = 0.01" in config
    assert totals["sent"] * 50 <= totals["dense"]


def test_each_checkpoint_matches_its_recorded_digest(
    finished_demo: tuple[Path, str],
) -> None:
    import hashlib

    home, _ = finished_demo
    rows = _rows(home, "SELECT version, path, sha256 FROM versions")
    for row in rows:
        data = (home / row["path"]).read_bytes()
        assert hashlib.sha256(data).digest() == row["sha256"]
        assert load_checkpoint(data).version == row["version"]
    on_disk = sorted(p.name for p in (home / "checkpoints").glob("v*.safetensors"))
    assert on_disk == sorted(Path(row["path"]).name for row in rows)
