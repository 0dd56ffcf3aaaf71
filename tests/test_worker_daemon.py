"""The worker daemon against the real server over loopback gRPC.

The server runs in this process (``start_server`` on port 0, its event loop in a
thread, a tiny model on a small corpus); the worker is a real ``dragon-worker
run`` process, since its exit codes and signal handling are the subject.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest
import torch
from conftest import MakeUpdate, RegisterWorker

from dragon_server.run import TrainingRun, VersionRecord
from dragon_server.server import start_dragon_server
from dragon_worker.client import ServerClient
from dragon_worker.config import WorkerConfig
from dragon_worker.daemon import Worker
from dragon_worker.state import PROGRESS_FILE, WorkerState, read_progress
from forge import safefile

WORKER_TIMEOUT_SECONDS = 120
# Local steps of a lease long enough to signal the worker in the middle of it.
SLOW_LEASE_STEPS = 60
# The console script installed next to this interpreter, as a volunteer runs it.
WORKER_SCRIPT = Path(sys.executable).with_name("dragon-worker")

# Heartbeats every half second, so a lease's progress shows while it trains.
SERVER_OVERRIDES: dict[str, object] = {"heartbeat_seconds": 0.5}


class InProcessServer:
    """A real DRAGON server on 127.0.0.1:<port>, its event loop in a thread."""

    def __init__(
        self, home: Path, overrides: Mapping[str, object], listen: str = "127.0.0.1:0"
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run = TrainingRun.open(home, dict(overrides))
        started = asyncio.run_coroutine_threadsafe(
            start_dragon_server(self.run, listen), self.loop
        )
        self.running = started.result(timeout=60)
        self.server, self.port = self.running.server, self.running.port
        self.address = f"127.0.0.1:{self.port}"

    def drain(self, grace_seconds: float) -> None:
        """Send every session a Drain notice, as ``serve`` does on SIGTERM."""
        self.loop.call_soon_threadsafe(
            self.running.training.drain, grace_seconds, "test drain"
        )

    def publish(self, record: VersionRecord) -> None:
        """Push a NewVersion to every session, as the maintenance loop does."""
        self.loop.call_soon_threadsafe(self.running.training.publish_version, record)

    def stop(self) -> None:
        """Stop the server and close its run; a second call does nothing."""
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        # Let the sessions record their end before the loop goes away.
        closed = self.running.training.wait_closed()
        asyncio.run_coroutine_threadsafe(closed, self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()
        self.run.close()


def _serve(home: Path, overrides: Mapping[str, object]) -> Iterator[InProcessServer]:
    """Serve a fresh copy of the shared tiny home (conftest's ``server_home``)."""
    server = InProcessServer(home, {**SERVER_OVERRIDES, **overrides})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(server_home: Path) -> Iterator[InProcessServer]:
    yield from _serve(server_home, {})


@pytest.fixture
def slow_server(server_home: Path) -> Iterator[InProcessServer]:
    """Leases long enough (many local steps) to signal a worker mid-training."""
    yield from _serve(server_home, {"local_steps": SLOW_LEASE_STEPS})


def worker_command(address: str, state_dir: Path, *extra: str) -> list[str]:
    return [
        str(WORKER_SCRIPT),
        "run",
        "--server",
        address,
        "--state-dir",
        str(state_dir),
        "--device",
        "cpu",
        *extra,
    ]


def run_worker(
    address: str, state_dir: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        worker_command(address, state_dir, *extra),
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_SECONDS,
        env=_worker_env(),
        check=False,
    )


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAGON_WORKER_")}
    env["PYTHONUNBUFFERED"] = "1"
    # One intra-op thread: on a busy 2-core machine, spinning OpenMP teams of
    # several processes slow each other down many times over.
    env["OMP_NUM_THREADS"] = "1"
    return env


def wait_for_progress(
    state_dir: Path, predicate: object, timeout: float = 60.0
) -> dict[str, object]:
    assert callable(predicate)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        path = state_dir / PROGRESS_FILE
        if path.exists():
            values: dict[str, object] = json.loads(path.read_text())
            if predicate(values):
                return values
        time.sleep(0.05)
    raise AssertionError(f"progress never matched; last: {path.read_text()}")


def test_one_lease_resumes_the_download_trains_and_is_accepted(
    server: InProcessServer, tmp_path: Path
) -> None:
    latest = server.run.latest_version()
    whole = latest.checkpoint_path.read_bytes()
    cut = len(whole) // 3
    state = WorkerState(tmp_path / "worker")
    # A download cut after `cut` bytes, as a killed worker leaves it.
    state.part_path(0).write_bytes(whole[:cut])

    done = run_worker(server.address, state.root, "--max-leases", "1")

    assert done.returncode == 0, done.stderr
    progress = read_progress(state.root)
    assert progress is not None
    assert progress.state == "stopped"
    # Only the rest of the file crossed the wire, and the whole file verifies.
    assert progress.bytes_down == len(whole) - cut
    held = state.checkpoint_path(0).read_bytes()
    assert hashlib.sha256(held).digest() == latest.sha256
    assert held == whole
    assert not state.part_path(0).exists()

    assert progress.leases_done == 1
    # 2 local steps x 4 sequences x 32 tokens.
    assert progress.tokens == 2 * 4 * 32
    assert progress.model_version == 0
    assert progress.bytes_up > 0
    stats = server.run.network_stats()
    assert stats.worker_count == 1
    assert stats.accepted_update_count == 1
    assert stats.uploaded_bytes == progress.bytes_up
    worker = server.run.worker_stats(progress.worker_id)
    assert worker.accepted_update_count == 1
    assert worker.token_count == progress.tokens

    residual = state.load_residual()
    assert residual is not None
    assert residual.server == server.address
    assert residual.model_version == 0
    assert residual.tensors.keys() == server.run.spec.keys()


def test_download_with_a_corrupt_prefix_is_refused_and_discarded(
    server: InProcessServer, tmp_path: Path
) -> None:
    latest = server.run.latest_version()
    whole = latest.checkpoint_path.read_bytes()
    state = WorkerState(tmp_path / "worker")
    state.part_path(0).write_bytes(b"\x00" * 100)
    key = state.api_key()

    with ServerClient(server.address, key) as client:
        client.register("corrupt-prefix")
        from dragon_worker.client import DownloadError

        with pytest.raises(DownloadError, match="digest"):
            client.download_checkpoint(0, state.checkpoint_path(0), state.part_path(0))
        assert not state.part_path(0).exists()
        assert not state.checkpoint_path(0).exists()

        again = client.download_checkpoint(
            0, state.checkpoint_path(0), state.part_path(0)
        )
    assert again.received_bytes == len(whole)
    assert state.checkpoint_path(0).read_bytes() == whole


def test_a_bad_key_is_unauthenticated(server: InProcessServer, tmp_path: Path) -> None:
    from dragon_worker.client import AuthenticationError

    with (
        ServerClient(server.address, "0" * 64) as client,
        pytest.raises(AuthenticationError, match="UNAUTHENTICATED") as caught,
    ):
        client.latest_version()
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_sigterm_during_training_uploads_then_exits_zero(
    slow_server: InProcessServer, tmp_path: Path
) -> None:
    state_dir = tmp_path / "worker"
    # A corrupt cached checkpoint: the published digest exposes it.
    WorkerState(state_dir).checkpoint_path(0).write_bytes(b"\x00" * 64)
    proc = subprocess.Popen(
        worker_command(slow_server.address, state_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_worker_env(),
    )
    try:
        seen = wait_for_progress(
            state_dir,
            lambda p: p["state"] == "training" and int(p["steps_done"]) >= 1,
        )
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=WORKER_TIMEOUT_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 0, stderr
    progress = read_progress(state_dir)
    assert progress is not None
    assert progress.state == "stopped"
    assert progress.leases_done == 1
    assert progress.tokens == SLOW_LEASE_STEPS * 4 * 32
    # The signal came in the middle of the lease, yet every step was trained.
    assert int(str(seen["steps_done"])) < SLOW_LEASE_STEPS
    assert slow_server.run.network_stats().accepted_update_count == 1
    assert progress.bytes_down == slow_server.run.latest_version().size_bytes
    assert "cached checkpoint v0 is corrupt" in stderr


def test_second_signal_gives_the_lease_back_and_exits_at_once(
    slow_server: InProcessServer, tmp_path: Path
) -> None:
    state_dir = tmp_path / "worker"
    proc = subprocess.Popen(
        worker_command(slow_server.address, state_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_worker_env(),
    )
    try:
        wait_for_progress(
            state_dir,
            lambda p: p["state"] == "training" and int(p["steps_done"]) >= 1,
        )
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 0, stderr
    assert took < 10.0
    progress = read_progress(state_dir)
    assert progress is not None
    assert progress.leases_done == 0
    assert "RELEASE_REASON_SHUTDOWN" in stderr
    stats = slow_server.run.network_stats()
    assert stats.accepted_update_count == 0


@pytest.mark.slow
def test_a_version_published_mid_lease_is_fetched_before_the_next_lease(
    slow_server: InProcessServer,
    tmp_path: Path,
    register_worker: RegisterWorker,
    make_update: MakeUpdate,
) -> None:
    state_dir = tmp_path / "worker"
    proc = subprocess.Popen(
        worker_command(slow_server.address, state_dir, "--max-leases", "2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_worker_env(),
    )
    try:
        wait_for_progress(
            state_dir,
            lambda p: p["state"] == "training" and int(p["steps_done"]) >= 1,
        )
        # Another worker's update makes version 1 while this one trains.
        other, _ = register_worker(slow_server.run, "other")
        grant = slow_server.run.grant_lease(other)
        assert grant is not None
        frame, meta = make_update(slow_server.run, 0)
        slow_server.run.submit_update(other, grant.lease_id, frame, meta)
        published = slow_server.run.aggregate()
        assert published is not None
        slow_server.publish(published)
        _, stderr = proc.communicate(timeout=WORKER_TIMEOUT_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 0, stderr
    assert "version 1 published" in stderr
    progress = read_progress(state_dir)
    assert progress is not None
    assert progress.leases_done == 2
    assert progress.model_version == 1
    v0 = slow_server.run.version(0).size_bytes
    assert progress.bytes_down == v0 + published.size_bytes
    assert WorkerState(state_dir).cached_versions() == [1]


def test_update_trained_across_a_server_restart_is_sent_after_reconnecting(
    slow_server: InProcessServer, tmp_path: Path
) -> None:
    state_dir = tmp_path / "worker"
    env = {**_worker_env(), "DRAGON_WORKER_BACKOFF_INITIAL_SECONDS": "0.2"}
    env["DRAGON_WORKER_BACKOFF_MAX_SECONDS"] = "1"
    proc = subprocess.Popen(
        worker_command(slow_server.address, state_dir, "--max-leases", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    home = slow_server.run.home
    try:
        wait_for_progress(
            state_dir,
            lambda p: p["state"] == "training" and int(p["steps_done"]) >= 1,
        )
        # The server goes away mid-lease and comes back on the same address.
        slow_server.stop()
        restarted = InProcessServer(
            home,
            {**SERVER_OVERRIDES, "local_steps": SLOW_LEASE_STEPS},
            slow_server.address,
        )
        try:
            _, stderr = proc.communicate(timeout=WORKER_TIMEOUT_SECONDS)
            stats = restarted.run.network_stats()
        finally:
            restarted.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 0, stderr
    assert "session lost while training" in stderr
    assert "sending the update for lease" in stderr
    # The lease trained before the restart was accepted; no second one was needed.
    assert stats.accepted_update_count == 1
    assert stats.lease_count == 1
    progress = read_progress(state_dir)
    assert progress is not None
    assert progress.leases_done == 1
    assert progress.tokens == SLOW_LEASE_STEPS * 4 * 32


@pytest.mark.slow
def test_drain_with_a_short_grace_gives_the_lease_back_then_reconnects(
    slow_server: InProcessServer, tmp_path: Path
) -> None:
    state_dir = tmp_path / "worker"
    env = {**_worker_env(), "DRAGON_WORKER_BACKOFF_INITIAL_SECONDS": "0.2"}
    proc = subprocess.Popen(
        worker_command(slow_server.address, state_dir, "--max-leases", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for_progress(
            state_dir,
            lambda p: p["state"] == "training" and int(p["steps_done"]) >= 1,
        )
        slow_server.drain(0.1)
        _, stderr = proc.communicate(timeout=WORKER_TIMEOUT_SECONDS)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 0, stderr
    # The first lease went back at the end of the grace; after reconnecting
    # (this server kept granting) a second one was trained and accepted.
    assert "drain grace over" in stderr
    assert "session ended" in stderr
    progress = read_progress(state_dir)
    assert progress is not None
    assert progress.leases_done == 1
    assert slow_server.run.network_stats().accepted_update_count == 1
    assert slow_server.run.network_stats().lease_count == 2


def test_restart_keeps_key_residual_and_counters_and_fetches_a_new_version(
    server: InProcessServer, tmp_path: Path
) -> None:
    state_dir = tmp_path / "worker"
    first = run_worker(server.address, state_dir, "--max-leases", "1")
    assert first.returncode == 0, first.stderr
    key = (state_dir / "api_key").read_text()
    after_first = read_progress(state_dir)
    residual_first = safefile.load_file(state_dir / "residual.safetensors")[0]
    assert after_first is not None
    # The update is combined into version 1 while the worker is away.
    published = server.run.aggregate()
    assert published is not None
    assert published.version == 1

    second = run_worker(server.address, state_dir, "--max-leases", "1")

    assert second.returncode == 0, second.stderr
    assert (state_dir / "api_key").read_text() == key
    after_second = read_progress(state_dir)
    assert after_second is not None
    assert after_second.worker_id == after_first.worker_id
    assert after_second.leases_done == 2
    assert after_second.tokens == 2 * after_first.tokens
    assert after_second.bytes_up > after_first.bytes_up
    # Version 1 was fetched whole and version 0 dropped from the cache.
    assert after_second.model_version == 1
    assert after_second.bytes_down == after_first.bytes_down + published.size_bytes
    assert WorkerState(state_dir).cached_versions() == [1]
    residual = WorkerState(state_dir).load_residual()
    assert residual is not None
    assert residual.model_version == 1
    assert residual.tensors.keys() == residual_first.keys()
    assert any(
        not torch.equal(residual.tensors[name], residual_first[name])
        for name in residual_first
    )
    stats = server.run.network_stats()
    assert stats.worker_count == 1
    assert stats.accepted_update_count == 2


@pytest.mark.slow
def test_worker_waits_for_a_server_that_is_not_up_yet(
    server_home: Path, tmp_path: Path
) -> None:
    with socket.socket() as probe:  # a free port, closed again at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state_dir = tmp_path / "worker"
    env = {**_worker_env(), "DRAGON_WORKER_BACKOFF_INITIAL_SECONDS": "0.2"}
    env["DRAGON_WORKER_BACKOFF_MAX_SECONDS"] = "1"
    proc = subprocess.Popen(
        worker_command(f"127.0.0.1:{port}", state_dir, "--max-leases", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        waiting = wait_for_progress(state_dir, lambda p: p["state"] == "backoff")
        late = InProcessServer(server_home, SERVER_OVERRIDES, f"127.0.0.1:{port}")
        try:
            _, stderr = proc.communicate(timeout=WORKER_TIMEOUT_SECONDS)
        finally:
            late.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 0, stderr
    assert "server unavailable" in str(waiting["last_error"])
    assert "retrying in" in stderr
    progress = read_progress(state_dir)
    assert progress is not None
    assert progress.leases_done == 1
    assert progress.last_error == ""


def test_residual_is_reused_only_for_the_same_server_and_shapes(
    tmp_path: Path,
) -> None:
    config = WorkerConfig(server="h:1", state_dir=tmp_path)
    worker = Worker(config)
    saved = {"a": torch.full((2, 3), 0.5), "b": torch.arange(4.0)}
    update = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}

    assert worker.residual_for(update) is None
    worker.state.save_residual(saved, server="h:1", model_version=3)
    reused = worker.residual_for(update)
    assert reused is not None
    assert torch.equal(reused["a"], saved["a"])
    assert torch.equal(reused["b"], saved["b"])
    assert worker.residual_for({"a": torch.zeros(3, 2), "b": torch.zeros(4)}) is None
    assert worker.residual_for({"a": torch.zeros(2, 3)}) is None
    worker.state.save_residual(saved, server="other:1", model_version=3)
    assert worker.residual_for(update) is None
