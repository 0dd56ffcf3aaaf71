"""The training session over real gRPC: hello, leases, heartbeats, uploads.

Every refused upload is checked twice: the Rejection names the reason and the
gRPC status code, and the home (update and version rows, checkpoint and update
files) is byte for byte what it was before.
"""

from __future__ import annotations

import math
import struct
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import zstandard
from dragon.v1 import service_pb2, types_pb2
from rpc_support import (
    Client,
    ServerThread,
    SessionClient,
    compress,
    crafted_frame,
    home_state,
    new_key,
    random_update,
    valid_frame,
)

from dragon_server.home import init_home
from dragon_server.run import TrainingRun
from dragon_server.server import Maintenance
from dragon_server.settings import RunConfig
from forge import safefile

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


@pytest.fixture
def client(rpc_server: ServerThread) -> Client:
    return Client(rpc_server.address)


@pytest.fixture
def session(client: Client) -> SessionClient:
    key = new_key()
    client.register(key, "trainer")
    stream = client.session(key)
    stream.hello()
    return stream


def rejected(
    response: service_pb2.SessionResponse,
    reason: types_pb2.RejectReason.ValueType,
    code: int,
) -> service_pb2.Rejection:
    assert response.WhichOneof("kind") == "rejection", response
    rejection = response.rejection
    assert (rejection.reason, rejection.status_code) == (reason, code), rejection
    assert rejection.message
    return rejection


def test_the_first_message_must_be_hello(client: Client) -> None:
    key = new_key()
    client.register(key)
    stream = client.session(key)
    stream.send(lease_request=service_pb2.LeaseRequest())
    with pytest.raises(grpc.RpcError) as aborted:
        stream.receive()
    assert aborted.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "hello" in (aborted.value.details() or "")


def test_welcome_names_the_worker_and_the_latest_version(
    client: Client, rpc_server: ServerThread
) -> None:
    key = new_key()
    worker_id = client.register(key)
    welcome = client.session(key).hello()
    latest = rpc_server.run.latest_version()
    assert welcome.worker_id == worker_id
    assert welcome.latest_version.version == latest.version
    assert welcome.latest_version.checkpoint_sha256 == latest.sha256


def test_a_second_hello_is_a_protocol_rejection(session: SessionClient) -> None:
    session.send(hello=service_pb2.Hello())
    rejected(session.receive(), types_pb2.REJECT_REASON_PROTOCOL, FAILED_PRECONDITION)


def test_lease_grant_carries_the_batch_and_the_recipe(
    session: SessionClient, rpc_server: ServerThread
) -> None:
    config = rpc_server.run.config
    before = datetime.now(UTC).timestamp()
    lease = session.lease()

    assert len(lease.lease_id) >= 16
    assert lease.model_version == 0
    batch = lease.batch
    assert batch.sequence_count == config.sequences_per_batch
    assert batch.sequence_length == config.sequence_length
    assert batch.token_encoding == types_pb2.TOKEN_ENCODING_UINT16_LE
    tokens = np.frombuffer(batch.token_ids, dtype="<u2")
    assert tokens.size == batch.sequence_count * (batch.sequence_length + 1)
    assert int(tokens.max()) < 257
    assert len(set(tokens.tolist())) > 10  # real text, not padding

    recipe = lease.recipe
    assert recipe.local_steps == config.local_steps
    assert recipe.batch_size == config.batch_size
    assert recipe.micro_batch_size == config.micro_batch_size
    assert recipe.learning_rate == pytest.approx(config.learning_rate)
    assert recipe.density == pytest.approx(config.density)
    assert recipe.value_dtype == types_pb2.VALUE_DTYPE_FP16
    deadline = lease.deadline.ToDatetime(tzinfo=UTC).timestamp()
    assert deadline == pytest.approx(before + config.lease_seconds, abs=5)
    interval = lease.heartbeat_interval.ToTimedelta().total_seconds()
    assert interval == pytest.approx(config.heartbeat_seconds)


def test_two_leases_hold_different_batches(session: SessionClient) -> None:
    first, second = session.lease(), session.lease()
    assert first.lease_id != second.lease_id
    assert first.batch.batch_id != second.batch.batch_id


@pytest.mark.parametrize("rpc_server", [{"lease_seconds": 3.0}], indirect=True)
def test_heartbeats_extend_a_lease_and_silence_lets_it_expire(
    session: SessionClient, rpc_server: ServerThread
) -> None:
    frame = valid_frame(rpc_server.run)
    kept, dropped = session.lease(), session.lease()
    for _ in range(5):
        time.sleep(0.8)
        beat = service_pb2.Heartbeat(
            lease_id=kept.lease_id, steps_done=1, steps_total=2, loss=5.0
        )
        session.send(heartbeat=beat)
    assert session.nothing_pending()  # a heartbeat that extends needs no answer

    # 4 s after the grant: only the lease that heard heartbeats is alive.
    assert session.upload(kept.lease_id, frame).WhichOneof("kind") == "ack"
    rejected(
        session.upload(dropped.lease_id, frame),
        types_pb2.REJECT_REASON_LEASE_EXPIRED,
        FAILED_PRECONDITION,
    )
    beat = service_pb2.Heartbeat(lease_id=dropped.lease_id, steps_done=1)
    session.send(heartbeat=beat)
    rejected(
        session.receive(), types_pb2.REJECT_REASON_LEASE_EXPIRED, FAILED_PRECONDITION
    )


def test_heartbeat_for_an_unknown_lease_is_rejected(session: SessionClient) -> None:
    session.send(heartbeat=service_pb2.Heartbeat(lease_id="no-such-lease"))
    rejection = rejected(
        session.receive(), types_pb2.REJECT_REASON_UNKNOWN_LEASE, FAILED_PRECONDITION
    )
    assert rejection.lease_id == "no-such-lease"


def test_a_valid_update_is_acknowledged_and_stored(
    session: SessionClient, rpc_server: ServerThread, server_home: Path
) -> None:
    lease = session.lease()
    frame = valid_frame(rpc_server.run)
    response = session.upload(lease.lease_id, frame, chunk_bytes=40_000)
    assert response.WhichOneof("kind") == "ack"
    assert response.ack.lease_id == lease.lease_id
    assert not response.ack.duplicate
    assert response.ack.received_bytes == len(frame)
    stored = home_state(server_home)
    assert len(stored["updates"]) == 1
    assert (server_home / "updates" / f"{lease.lease_id}.zst").read_bytes() == frame


def norm_entry(
    indices: list[int], values: list[float]
) -> dict[str, tuple[tuple[int, ...], list[int], list[float]]]:
    return {"norm.weight": ((64,), indices, values)}


def bad_frames(frame: bytes) -> dict[str, tuple[bytes, str, int, str]]:
    """Frames the server must refuse, by case: (frame, reason, code, words).

    ``words`` is a piece of the refusal's message, which shows that the frame was
    refused for the fault the case plants and not for another.
    """
    content = zstandard.ZstdDecompressor().decompress(frame)
    tensors, metadata = safefile.loads(content)
    huge_header = struct.pack("<Q", 2**64 - 1) + b"{}" + bytes(64)
    bad = "MALFORMED_UPDATE", INVALID_ARGUMENT
    non_finite = "NON_FINITE", INVALID_ARGUMENT
    return {
        "unknown-name": (
            crafted_frame({"no.such.tensor": ((64,), [1], [0.5])}),
            *bad,
            "no tensor",
        ),
        "wrong-shape": (
            crafted_frame({"norm.weight": ((65,), [1], [0.5])}),
            *bad,
            "shape",
        ),
        "k-too-large": (
            crafted_frame(norm_entry(list(range(64)), [0.1] * 64)),
            *bad,
            "density",
        ),
        "index-out-of-range": (
            crafted_frame(norm_entry([3, 64], [0.1, 0.2])),
            *bad,
            "past",
        ),
        "repeated-index": (
            crafted_frame(norm_entry([3, 3], [0.1, 0.2])),
            *bad,
            "repeats",
        ),
        "unsorted-index": (
            crafted_frame(norm_entry([9, 3], [0.1, 0.2])),
            *bad,
            "goes back",
        ),
        "negative-index": (
            crafted_frame(norm_entry([-1], [0.1]), deltas=False),
            *bad,
            "negative",
        ),
        "nan": (crafted_frame(norm_entry([1, 2], [0.1, math.nan])), *non_finite, "nan"),
        "inf": (crafted_frame(norm_entry([1], [math.inf])), *non_finite, "inf"),
        "truncated": (frame[: len(frame) - 9], *bad, "decompress"),
        "not-zstd": (content[:2000], *bad, "zstd"),
        "no-content-size": (
            compress(content, content_size=False),
            *bad,
            "content size",
        ),
        "concatenated": (frame + frame, *bad, "unused data"),
        "trailing-bytes": (frame + b"\0", *bad, "unused data"),
        "bomb": (
            compress(bytes(64 << 20)),
            "TOO_LARGE",
            RESOURCE_EXHAUSTED,
            "declares",
        ),
        "absurd-header-length": (compress(huge_header), *bad, "header"),
        "wrong-format": (
            compress(safefile.dumps(tensors, {**metadata, "format": "other"})),
            *bad,
            "format",
        ),
    }


BAD_FRAME_CASES = list(bad_frames(compress(safefile.dumps({}, {}))))


@pytest.mark.parametrize("case", BAD_FRAME_CASES)
def test_a_bad_frame_is_refused_and_changes_nothing(
    session: SessionClient, rpc_server: ServerThread, server_home: Path, case: str
) -> None:
    lease = session.lease()
    frame, reason, code, words = bad_frames(valid_frame(rpc_server.run))[case]
    before = home_state(server_home)

    response = session.upload(lease.lease_id, frame)

    rejection = rejected(
        response, types_pb2.RejectReason.Value(f"REJECT_REASON_{reason}"), code
    )
    assert rejection.lease_id == lease.lease_id
    assert words in rejection.message
    assert home_state(server_home) == before
    # The session and the lease survive a refused upload: a good frame goes in.
    ok = session.upload(lease.lease_id, valid_frame(rpc_server.run))
    assert ok.WhichOneof("kind") == "ack"


def test_declared_digest_or_size_mismatch_is_refused(
    session: SessionClient, rpc_server: ServerThread, server_home: Path
) -> None:
    lease = session.lease()
    frame = valid_frame(rpc_server.run)
    before = home_state(server_home)
    rejected(
        session.upload(lease.lease_id, frame, sha256=bytes(32)),
        types_pb2.REJECT_REASON_DIGEST_MISMATCH,
        INVALID_ARGUMENT,
    )
    session.send(
        update_chunk=service_pb2.UpdateChunk(lease_id=lease.lease_id, data=frame)
    )
    end = service_pb2.UpdateEnd(lease_id=lease.lease_id, size_bytes=len(frame) + 1)
    session.send(update_end=end)
    rejected(
        session.receive(), types_pb2.REJECT_REASON_DIGEST_MISMATCH, INVALID_ARGUMENT
    )
    assert home_state(server_home) == before


def test_zero_samples_is_refused_and_the_model_is_unchanged(
    session: SessionClient, rpc_server: ServerThread, server_home: Path
) -> None:
    lease = session.lease()
    before = home_state(server_home)
    response = session.upload(
        lease.lease_id, valid_frame(rpc_server.run), sample_count=0
    )
    rejected(response, types_pb2.REJECT_REASON_NO_SAMPLES, INVALID_ARGUMENT)
    assert home_state(server_home) == before
    assert rpc_server.run.aggregate() is None  # nothing waits to be applied
    assert home_state(server_home) == before


def test_unknown_and_foreign_leases_are_failed_precondition(
    client: Client, session: SessionClient, rpc_server: ServerThread, server_home: Path
) -> None:
    lease = session.lease()
    frame = valid_frame(rpc_server.run)
    other_key = new_key()
    client.register(other_key, "mallory")
    other = client.session(other_key)
    other.hello()
    before = home_state(server_home)

    rejected(
        other.upload(lease.lease_id, frame),
        types_pb2.REJECT_REASON_NOT_LEASE_HOLDER,
        FAILED_PRECONDITION,
    )
    rejected(
        other.upload("f" * 32, frame),
        types_pb2.REJECT_REASON_UNKNOWN_LEASE,
        FAILED_PRECONDITION,
    )
    assert home_state(server_home) == before


def test_an_update_from_a_version_ahead_is_refused(
    session: SessionClient, rpc_server: ServerThread, server_home: Path
) -> None:
    lease = session.lease()
    before = home_state(server_home)
    response = session.upload(
        lease.lease_id, valid_frame(rpc_server.run), base_version=7
    )
    rejected(response, types_pb2.REJECT_REASON_MALFORMED_UPDATE, INVALID_ARGUMENT)
    assert home_state(server_home) == before


def test_a_frame_over_the_limit_is_refused_before_it_is_buffered(
    session: SessionClient, rpc_server: ServerThread, server_home: Path
) -> None:
    lease = session.lease()
    limit = rpc_server.run.max_update_bytes
    chunk = bytes(1 << 20)
    before = home_state(server_home)
    sent = 0
    while sent <= limit:
        piece = service_pb2.UpdateChunk(
            lease_id=lease.lease_id, offset_bytes=sent, data=chunk
        )
        session.send(update_chunk=piece)
        sent += len(chunk)
    # Refused as soon as the chunk that crosses the limit arrives, before the end.
    rejection = rejected(
        session.receive(), types_pb2.REJECT_REASON_TOO_LARGE, RESOURCE_EXHAUSTED
    )
    assert str(limit) in rejection.message

    # The rest of that frame is dropped unread and draws no second refusal.
    for _ in range(3):
        piece = service_pb2.UpdateChunk(
            lease_id=lease.lease_id, offset_bytes=sent, data=chunk
        )
        session.send(update_chunk=piece)
        sent += len(chunk)
    session.send(
        update_end=service_pb2.UpdateEnd(lease_id=lease.lease_id, size_bytes=sent)
    )
    assert session.nothing_pending()
    assert home_state(server_home) == before
    ok = session.upload(lease.lease_id, valid_frame(rpc_server.run))
    assert ok.WhichOneof("kind") == "ack"


def test_a_chunk_out_of_order_is_a_protocol_rejection(
    session: SessionClient, rpc_server: ServerThread
) -> None:
    lease = session.lease()
    frame = valid_frame(rpc_server.run)
    session.send(
        update_chunk=service_pb2.UpdateChunk(lease_id=lease.lease_id, data=frame[:100])
    )
    late = service_pb2.UpdateChunk(
        lease_id=lease.lease_id, offset_bytes=500, data=frame[500:]
    )
    session.send(update_chunk=late)
    rejected(session.receive(), types_pb2.REJECT_REASON_PROTOCOL, FAILED_PRECONDITION)
    assert session.upload(lease.lease_id, frame).WhichOneof("kind") == "ack"


def test_a_released_lease_is_acknowledged_and_its_batch_returns(
    session: SessionClient,
) -> None:
    lease = session.lease()
    release = service_pb2.LeaseRelease(
        lease_id=lease.lease_id,
        reason=service_pb2.RELEASE_REASON_FAILED,
        message="out of memory",
    )
    session.send(lease_release=release)
    assert session.expect("ack").lease_id == lease.lease_id
    assert session.lease().batch.batch_id == lease.batch.batch_id


def test_no_free_batch_gives_no_lease_with_a_retry_time(
    tmp_path: Path, server_config: RunConfig
) -> None:
    # A home of a few batches, so that leasing every one of them is quick.
    home = tmp_path / "small-home"
    small = server_config.replace(max_corpus_bytes=4000, lease_seconds=3600.0)
    init_home(home, [], small, progress=False)
    run = TrainingRun.open(home)
    server = ServerThread(run)
    try:
        client = Client(server.address)
        hoarder, key = new_key(), new_key()
        hoarder_id = client.register(hoarder, "hoarder")
        client.register(key, "latecomer")
        held = 0
        while run.grant_lease(hoarder_id) is not None:
            held += 1
        assert 0 < held < 100

        session = client.session(key)
        session.hello()
        session.send(lease_request=service_pb2.LeaseRequest())
        no_lease = session.expect("no_lease")
        assert no_lease.retry_after.ToTimedelta().total_seconds() > 0
        assert no_lease.reason
        session.close()
    finally:
        server.stop()
        run.close()


def test_draining_refuses_leases_and_pushes_a_drain_notice(
    session: SessionClient, rpc_server: ServerThread
) -> None:
    rpc_server.run.begin_drain()
    session.send(lease_request=service_pb2.LeaseRequest())
    rejected(session.receive(), types_pb2.REJECT_REASON_DRAINING, UNAVAILABLE)

    rpc_server.loop.call_soon_threadsafe(rpc_server.running.training.drain, 12.5, "bye")
    drain = session.expect("drain")
    assert drain.grace.ToTimedelta().total_seconds() == pytest.approx(12.5)
    assert drain.reason == "bye"


@pytest.mark.parametrize("rpc_server", [{"min_updates": 1}], indirect=True)
def test_maintenance_aggregates_and_pushes_the_new_version(
    session: SessionClient, rpc_server: ServerThread, server_home: Path
) -> None:
    lease = session.lease()
    maintenance = Maintenance(rpc_server.run, rpc_server.running.training)

    async def start() -> None:
        rpc_server.loop.create_task(maintenance.loop())

    rpc_server.call(start())
    try:
        ack = session.upload(lease.lease_id, valid_frame(rpc_server.run))
        assert ack.WhichOneof("kind") == "ack"
        pushed = session.expect("new_version", timeout=60).version
    finally:
        rpc_server.loop.call_soon_threadsafe(maintenance.stopping.set)
    latest = rpc_server.run.latest_version()
    assert pushed.version == latest.version == 1
    assert pushed.checkpoint_sha256 == latest.sha256
    assert pushed.update_count == 1


def test_random_update_helper_covers_the_spec(rpc_server: ServerThread) -> None:
    update = random_update(rpc_server.run.spec, seed=3)
    assert set(update) == set(rpc_server.run.spec)
    assert all(isinstance(tensor, torch.Tensor) for tensor in update.values())


def test_frequent_keepalive_pings_do_not_end_an_idle_session(
    rpc_server: ServerThread,
) -> None:
    # Pings every second, more often than any worker would: with the server's
    # defaults (two strikes below a 5 minute interval) this earns a GOAWAY.
    options = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    client = Client(rpc_server.address, options=options)
    key = new_key()
    client.register(key, "pinger")
    session = client.session(key)
    session.hello()
    time.sleep(6)
    assert session.lease().lease_id
    session.close()
