"""The status stream and the stats calls over real gRPC."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from dragon.v1 import service_pb2, types_pb2
from rpc_support import (
    RPC_TIMEOUT,
    Client,
    ServerThread,
    SessionClient,
    bearer,
    crafted_frame,
    new_key,
    valid_frame,
)


class Watcher:
    """A Watch stream read into a queue by a thread."""

    def __init__(self, client: Client, key: str, replay_count: int = 0) -> None:
        self.events: queue.Queue[types_pb2.Event] = queue.Queue()
        self.call = client.status.Watch(
            service_pb2.WatchRequest(replay_count=replay_count),
            metadata=bearer(key),
            timeout=120,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.events.put(response.event)
        except grpc.RpcError:
            pass

    def next_of(self, kind: str) -> types_pb2.Event:
        """The next event of ``kind``, skipping others."""
        deadline = time.monotonic() + RPC_TIMEOUT
        while True:
            event = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            if event.WhichOneof("kind") == kind:
                return event

    def cancel(self) -> None:
        self.call.cancel()
        self._thread.join(10)


@pytest.fixture
def client(rpc_server: ServerThread) -> Client:
    return Client(rpc_server.address)


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_watch_streams_live_events_of_a_round(
    rpc_server: ServerThread, client: Client
) -> None:
    key = new_key()
    worker_id = client.register(key, "watched")
    watcher = Watcher(client, key)
    assert wait_until(lambda: rpc_server.running.events.watcher_count == 1)

    session = client.session(key)
    session.hello()
    joined = watcher.next_of("worker_joined").worker_joined
    assert joined.worker_id == worker_id
    assert joined.hardware.device_kind == types_pb2.DEVICE_KIND_CPU

    lease = session.lease()
    frame = valid_frame(rpc_server.run)
    session.upload(lease.lease_id, frame)
    accepted = watcher.next_of("update_accepted").update_accepted
    assert (accepted.worker_id, accepted.lease_id) == (worker_id, lease.lease_id)
    assert accepted.size_bytes == len(frame)
    assert accepted.loss_after == pytest.approx(5.0)

    bad = crafted_frame({"norm.weight": ((64,), [3, 3], [0.1, 0.2])})
    session.upload(lease.lease_id + "x", bad)
    refused = watcher.next_of("update_rejected").update_rejected
    assert refused.reason == types_pb2.REJECT_REASON_UNKNOWN_LEASE

    record = rpc_server.run.aggregate()
    assert record is not None
    published = watcher.next_of("version_published").version_published
    assert published.version.version == record.version == 1
    assert published.version.checkpoint_sha256 == record.sha256
    done = watcher.next_of("aggregation_done").aggregation_done
    assert (done.version, done.update_count) == (1, 1)

    session.close()
    left = watcher.next_of("worker_left").worker_left
    assert left.worker_id == worker_id
    watcher.cancel()


def test_watch_replays_recent_events_first(
    rpc_server: ServerThread, client: Client
) -> None:
    key = new_key()
    client.register(key, "late")
    session = client.session(key)
    session.hello()
    lease = session.lease()
    session.upload(lease.lease_id, valid_frame(rpc_server.run))

    watcher = Watcher(client, key, replay_count=2)
    first = watcher.events.get(timeout=RPC_TIMEOUT)
    second = watcher.events.get(timeout=RPC_TIMEOUT)
    kinds = [first.WhichOneof("kind"), second.WhichOneof("kind")]
    assert kinds == ["worker_joined", "update_accepted"]
    assert first.time.ToDatetime() <= second.time.ToDatetime()
    watcher.cancel()
    session.close()


def test_a_cancelled_watch_frees_its_queue(
    rpc_server: ServerThread, client: Client
) -> None:
    key = new_key()
    client.register(key)
    watchers = [Watcher(client, key) for _ in range(3)]
    assert wait_until(lambda: rpc_server.running.events.watcher_count == 3)
    for watcher in watchers:
        watcher.cancel()
    assert wait_until(lambda: rpc_server.running.events.watcher_count == 0)


def test_stats_count_workers_leases_and_bytes(
    rpc_server: ServerThread, client: Client
) -> None:
    keys = [new_key() for _ in range(3)]
    ids = [client.register(key, f"w{i}") for i, key in enumerate(keys)]
    sessions: list[SessionClient] = []
    uploaded = 0
    for i, key in enumerate(keys[:2]):
        session = client.session(key)
        session.hello()
        sessions.append(session)
        for seed in range(i + 1):
            frame = valid_frame(rpc_server.run, seed=seed)
            lease = session.lease()
            assert session.upload(lease.lease_id, frame).WhichOneof("kind") == "ack"
            uploaded += len(frame)
    sessions[0].upload("no-such-lease", b"junk")

    stats = client.stats.GetNetworkStats(
        service_pb2.GetNetworkStatsRequest(), metadata=bearer(keys[0]), timeout=5
    )
    assert stats.worker_count == 3
    assert stats.active_worker_count == 2
    assert stats.lease_count == 3
    assert stats.accepted_update_count == 3
    assert stats.rejected_update_count == 1
    assert stats.uploaded_bytes == uploaded
    dense_bytes = 4 * sum(math.prod(shape) for shape in rpc_server.run.spec.values())
    assert stats.dense_equivalent_bytes == 3 * dense_bytes
    assert stats.latest_version.version == 0

    mine = client.stats.GetWorkerStats(
        service_pb2.GetWorkerStatsRequest(), metadata=bearer(keys[1]), timeout=5
    ).worker
    assert (mine.worker_id, mine.worker_name) == (ids[1], "w1")
    assert mine.accepted_update_count == 2
    other = client.stats.GetWorkerStats(
        service_pb2.GetWorkerStatsRequest(worker_id=ids[0]),
        metadata=bearer(keys[1]),
        timeout=5,
    ).worker
    assert other.accepted_update_count == 1

    board = client.stats.GetLeaderboard(
        service_pb2.GetLeaderboardRequest(limit=2), metadata=bearer(keys[2]), timeout=5
    ).workers
    assert [row.worker_id for row in board] == [ids[1], ids[0]]
    assert board[0].token_count > board[1].token_count
    for session in sessions:
        session.close()


def test_stats_errors_have_precise_codes(
    rpc_server: ServerThread, client: Client
) -> None:
    key = new_key()
    client.register(key)
    with pytest.raises(grpc.RpcError) as missing:
        client.stats.GetWorkerStats(
            service_pb2.GetWorkerStatsRequest(worker_id="nobody"),
            metadata=bearer(key),
            timeout=5,
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as too_many:
        client.stats.GetLeaderboard(
            service_pb2.GetLeaderboardRequest(limit=1001),
            metadata=bearer(key),
            timeout=5,
        )
    assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
