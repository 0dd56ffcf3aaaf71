"""Checkpoint downloads over real gRPC: chunks, resume, digests, errors."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from dragon.v1 import service_pb2
from rpc_support import RPC_TIMEOUT, Client, ServerThread, bearer, download, new_key

from dragon_server.servicers import CHUNK_BYTES, encoded_chunk


@pytest.fixture
def worker(rpc_server: ServerThread) -> tuple[Client, str]:
    client = Client(rpc_server.address)
    key = new_key()
    client.register(key, "downloader")
    return client, key


def parts(
    responses: list[service_pb2.DownloadCheckpointResponse],
) -> tuple[service_pb2.CheckpointHeader, list[service_pb2.CheckpointChunk], bytes]:
    kinds = [response.WhichOneof("part") for response in responses]
    assert kinds[0] == "header"
    assert kinds[-1] == "digest"
    assert set(kinds[1:-1]) <= {"chunk"}
    chunks = [response.chunk for response in responses[1:-1]]
    return responses[0].header, chunks, responses[-1].digest.sha256


def test_full_download_matches_the_recorded_checkpoint(
    worker: tuple[Client, str], rpc_server: ServerThread
) -> None:
    client, key = worker
    record = rpc_server.run.latest_version()
    header, chunks, sha256 = parts(list(download(client, key)))

    data = b"".join(chunk.data for chunk in chunks)
    assert header.version == record.version
    assert header.total_size_bytes == record.size_bytes == len(data)
    assert not header.is_delta
    assert all(0 < len(chunk.data) <= CHUNK_BYTES for chunk in chunks)
    assert [c.offset_bytes for c in chunks] == [
        sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))
    ]
    assert len(chunks) == -(-record.size_bytes // CHUNK_BYTES)
    assert hashlib.sha256(data).digest() == sha256 == record.sha256
    assert data == record.checkpoint_path.read_bytes()


@pytest.mark.parametrize("offset", [1, 1000, CHUNK_BYTES, CHUNK_BYTES + 17])
def test_resume_from_an_offset_gives_the_same_file(
    worker: tuple[Client, str], rpc_server: ServerThread, offset: int
) -> None:
    client, key = worker
    whole = rpc_server.run.latest_version().checkpoint_path.read_bytes()
    header, chunks, sha256 = parts(list(download(client, key, offset_bytes=offset)))

    assert header.offset_bytes == offset
    assert chunks[0].offset_bytes == offset
    rest = b"".join(chunk.data for chunk in chunks)
    assert hashlib.sha256(whole[:offset] + rest).digest() == sha256
    assert whole[:offset] + rest == whole


def test_offset_at_the_end_sends_no_chunk(
    worker: tuple[Client, str], rpc_server: ServerThread
) -> None:
    client, key = worker
    size = rpc_server.run.latest_version().size_bytes
    header, chunks, _ = parts(list(download(client, key, offset_bytes=size)))
    assert header.total_size_bytes == size
    assert chunks == []


def test_offset_past_the_end_is_out_of_range(
    worker: tuple[Client, str], rpc_server: ServerThread
) -> None:
    client, key = worker
    size = rpc_server.run.latest_version().size_bytes
    with pytest.raises(grpc.RpcError) as refused:
        list(download(client, key, offset_bytes=size + 1))
    assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE


def test_unknown_version_is_not_found(worker: tuple[Client, str]) -> None:
    client, key = worker
    with pytest.raises(grpc.RpcError) as refused:
        list(download(client, key, version=99))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_delta_request_without_a_delta_sends_the_full_file(
    worker: tuple[Client, str], rpc_server: ServerThread
) -> None:
    client, key = worker
    record = rpc_server.run.latest_version()
    header, chunks, sha256 = parts(
        list(download(client, key, version=0, base_version=0))
    )
    assert not header.is_delta
    assert b"".join(chunk.data for chunk in chunks) == (
        record.checkpoint_path.read_bytes()
    )
    assert sha256 == record.sha256


def test_a_checkpoint_changed_on_disk_is_never_streamed(
    worker: tuple[Client, str], rpc_server: ServerThread
) -> None:
    client, key = worker
    path = rpc_server.run.latest_version().checkpoint_path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    responses = download(client, key)
    with pytest.raises(grpc.RpcError) as refused:
        list(responses)
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS


def test_latest_version_describes_the_checkpoint(
    worker: tuple[Client, str], rpc_server: ServerThread
) -> None:
    client, key = worker
    record = rpc_server.run.latest_version()
    info = client.model.GetLatestVersion(
        service_pb2.GetLatestVersionRequest(), metadata=bearer(key), timeout=RPC_TIMEOUT
    ).version
    assert info.version == record.version
    assert info.checkpoint_size_bytes == record.size_bytes
    assert info.checkpoint_sha256 == record.sha256
    assert info.validation_loss == pytest.approx(record.validation_loss)


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0, 0), (0, 5), (127, 1), (1 << 40, CHUNK_BYTES)],
    ids=["empty", "small", "varint-edge", "large-offset"],
)
def test_hand_encoded_chunks_parse_as_protobuf(offset: int, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    parsed = service_pb2.DownloadCheckpointResponse.FromString(
        encoded_chunk(offset, data)
    )
    assert parsed.WhichOneof("part") == "chunk"
    assert parsed.chunk.offset_bytes == offset
    assert parsed.chunk.data == data


def test_a_checkpoint_missing_on_disk_is_data_loss(
    worker: tuple[Client, str], rpc_server: ServerThread
) -> None:
    client, key = worker
    path = rpc_server.run.latest_version().checkpoint_path
    path.rename(path.with_suffix(".moved"))

    with pytest.raises(grpc.RpcError) as refused:
        list(download(client, key))

    assert refused.value.code() == grpc.StatusCode.DATA_LOSS
    assert "missing on the server" in str(refused.value.details())
