"""Each lease's result counts once, whatever the network does, over real gRPC."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from dragon.v1 import service_pb2, types_pb2
from rpc_support import (
    RPC_TIMEOUT,
    Client,
    ServerThread,
    SessionClient,
    bearer,
    home_state,
    new_key,
    valid_frame,
)

from forge import codec
from forge.checkpoint import load_checkpoint


def joined(client: Client, name: str) -> tuple[str, SessionClient]:
    key = new_key()
    client.register(key, name)
    session = client.session(key)
    session.hello()
    return key, session


def dense(frame: bytes, spec: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The pseudo-gradient a frame carries, as dense fp32 tensors."""
    tensors = {name: torch.zeros(shape) for name, shape in spec.items()}
    codec.accumulate(codec.decode_update(frame, spec), tensors)
    return tensors


def test_a_repeated_upload_is_acknowledged_as_duplicate_and_counted_once(
    rpc_server: ServerThread, server_home: Path
) -> None:
    client = Client(rpc_server.address)
    key, session = joined(client, "repeater")
    lease = session.lease()
    frame = valid_frame(rpc_server.run, seed=1)

    first = session.upload(lease.lease_id, frame)
    stored = home_state(server_home)
    second = session.upload(lease.lease_id, frame)

    assert (first.ack.duplicate, second.ack.duplicate) == (False, True)
    assert second.ack.lease_id == lease.lease_id
    assert home_state(server_home) == stored
    assert len(stored["updates"]) == 1
    stats = client.stats.GetNetworkStats(
        service_pb2.GetNetworkStatsRequest(), metadata=bearer(key), timeout=RPC_TIMEOUT
    )
    assert stats.accepted_update_count == 1
    assert stats.uploaded_bytes == len(frame)

    record = rpc_server.run.aggregate()
    assert record is not None
    assert record.update_count == 1
    # Even after it was applied, a repeat is acknowledged and applies nothing.
    assert session.upload(lease.lease_id, frame).ack.duplicate
    assert rpc_server.run.aggregate() is None


@pytest.mark.parametrize("rpc_server", [{"lease_seconds": 2.0}], indirect=True)
def test_an_expired_lease_regranted_to_another_worker_counts_once(
    rpc_server: ServerThread, server_home: Path
) -> None:
    run = rpc_server.run
    client = Client(rpc_server.address)
    _, slow = joined(client, "slow")
    _, fast = joined(client, "fast")
    before = load_checkpoint(run.latest_version().checkpoint_path).tensors

    frame_b, frame_c = valid_frame(run, seed=2), valid_frame(run, seed=3)
    frame_late = valid_frame(run, seed=4)

    abandoned = slow.lease()
    time.sleep(2.3)
    assert run.expire_leases() == 1
    regranted = fast.lease()
    assert regranted.batch.batch_id == abandoned.batch.batch_id
    other = fast.lease()
    acks = [
        fast.upload(regranted.lease_id, frame_b, sample_count=4),
        fast.upload(other.lease_id, frame_c, sample_count=2),
    ]
    assert [ack.WhichOneof("kind") for ack in acks] == ["ack", "ack"]
    late = slow.upload(abandoned.lease_id, frame_late, sample_count=8)
    assert late.rejection.reason == types_pb2.REJECT_REASON_LEASE_EXPIRED
    assert len(home_state(server_home)["updates"]) == 2

    record = run.aggregate()
    assert record is not None
    assert record.update_count == 2
    after = load_checkpoint(record.checkpoint_path).tensors

    # FedAvg with learning rate 1: the new weights are the old ones minus the
    # sample-weighted mean of the pseudo-gradients (staleness 0, reputation 1).
    assert run.config.optimizer == "fedavg"
    b, c = dense(frame_b, run.spec), dense(frame_c, run.spec)
    mean = {name: (4 * b[name] + 2 * c[name]) / 6 for name in run.spec}
    tied = {"embed.weight", "head.weight"}
    assert after["embed.weight"].data_ptr() == after["head.weight"].data_ptr()
    tied_mean = (mean["embed.weight"] + mean["head.weight"]) / 2
    for name in run.spec:
        expected = before[name] - (tied_mean if name in tied else mean[name])
        torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6)
    changed = sum(int((after[n] != before[n]).sum()) for n in run.spec)
    assert changed > 0
