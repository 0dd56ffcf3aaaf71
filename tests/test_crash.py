"""A server killed in the middle of an aggregation loses nothing and applies
nothing twice.

The real ``dragon-server serve`` process takes real uploads over gRPC, starts an
aggregation, writes the new checkpoint and is SIGKILLed before it commits the
version (the window is held open by a pause, see ``rpc_support.DELAYED_
AGGREGATION``). After a restart the run must show the old version only, keep
every acknowledged update pending, and then apply each of them exactly once.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from dragon.v1 import service_pb2
from rpc_support import (
    RPC_TIMEOUT,
    Client,
    ServeProcess,
    bearer,
    delayed_serve,
    new_key,
    random_update,
)

from forge import codec
from forge.checkpoint import load_checkpoint

UPDATES = 4


def rows(home: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{home / 'dragon.db'}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


def assert_versions_match_files(home: Path) -> list[int]:
    """Every version row names a file with its SHA-256; no other checkpoint."""
    versions = rows(home, "SELECT version, path, sha256, size FROM versions")
    named = set()
    for version, path, sha256, size in versions:
        data = (home / str(path)).read_bytes()
        assert hashlib.sha256(data).digest() == sha256, version
        assert len(data) == size
        named.add(Path(str(path)).name)
    on_disk = {p.name for p in (home / "checkpoints").glob("v*.safetensors")}
    assert on_disk == named
    return sorted(int(str(v[0])) for v in versions)


def upload_all(
    address: str, spec: dict[str, tuple[int, ...]], density: float
) -> dict[str, tuple[bytes, int]]:
    """Upload UPDATES valid frames from two workers; lease id -> (frame, samples)."""
    client = Client(address)
    sent: dict[str, tuple[bytes, int]] = {}
    for worker in range(2):
        key = new_key()
        client.register(key, f"crash-{worker}")
        session = client.session(key)
        session.hello()
        for i in range(UPDATES // 2):
            lease = session.lease()
            update = random_update(spec, seed=10 * worker + i)
            frame = codec.encode_update(update, None, density).frame
            samples = 1 + worker + i
            response = session.upload(lease.lease_id, frame, sample_count=samples)
            assert response.WhichOneof("kind") == "ack", response
            sent[lease.lease_id] = (frame, samples)
        session.close()
    client.close()
    return sent


def wait_for_version(address: str, version: int, seconds: float = 120) -> None:
    client = Client(address)
    key = new_key()
    client.register(key)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        latest = client.model.GetLatestVersion(
            service_pb2.GetLatestVersionRequest(),
            metadata=bearer(key),
            timeout=RPC_TIMEOUT,
        ).version.version
        if latest >= version:
            client.close()
            return
        time.sleep(0.2)
    raise AssertionError(f"version {version} was not published in {seconds} s")


@pytest.mark.slow
def test_sigkill_between_checkpoint_and_commit_loses_and_doubles_nothing(
    server_home: Path,
) -> None:
    from dragon_server.run import TrainingRun

    run = TrainingRun.open(server_home)
    spec, density = run.spec, run.config.density
    v0 = load_checkpoint(run.latest_version().checkpoint_path).tensors
    run.close()
    settings = (f"min_updates={UPDATES}", "aggregation_interval_seconds=600")

    server, marker = delayed_serve(server_home, 60.0, *settings)
    with server:
        sent = upload_all(server.address, spec, density)
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline, server.log()
            assert server.process.poll() is None, server.log()
            time.sleep(0.05)
        # The checkpoint of version 1 is on disk; its row is not committed.
        assert Path(marker.read_text()).exists()
        server.kill()

    assert rows(server_home, "SELECT MAX(version) FROM versions") == [(0,)]
    pending = rows(server_home, "SELECT lease_id, state FROM updates")
    assert sorted(pending) == sorted((lease, "pending") for lease in sent)

    # Opening the run recovers: the orphan checkpoint goes, the updates stay.
    assert Path(marker.read_text()).exists()
    TrainingRun.open(server_home).close()
    assert not Path(marker.read_text()).exists()
    assert assert_versions_match_files(server_home) == [0]

    with ServeProcess(server_home, *settings) as restarted:
        wait_for_version(restarted.address, 1)
        assert restarted.terminate() == 0

    assert assert_versions_match_files(server_home) == [0, 1]
    applied = rows(server_home, "SELECT lease_id, state, applied_version FROM updates")
    assert sorted(applied) == sorted((lease, "applied", 1) for lease in sent)
    assert rows(server_home, "SELECT update_count FROM versions WHERE version = 1") == [
        (UPDATES,)
    ]

    # Exactly once, by value: v1 = v0 - the sample-weighted mean of the updates.
    v1 = load_checkpoint(server_home / "checkpoints" / "v000001.safetensors").tensors
    total = sum(samples for _, samples in sent.values())
    mean = {name: torch.zeros(shape) for name, shape in spec.items()}
    for frame, samples in sent.values():
        codec.accumulate(codec.decode_update(frame, spec), mean, samples / total)
    tied = (mean["embed.weight"] + mean["head.weight"]) / 2
    for name in spec:
        step = tied if name in ("embed.weight", "head.weight") else mean[name]
        torch.testing.assert_close(v1[name], v0[name] - step, rtol=0, atol=1e-6)
