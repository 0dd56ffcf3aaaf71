"""Checkpoint download rate: our gRPC stream against a plain one and a raw socket.

Each server runs in its own process (as the aggregator would), the client in this
one; all three send the same file over loopback and the client only counts bytes:

    python bench/bench_download.py --size-mib 512

``raw tcp`` is ``socket.sendfile`` into ``recv_into``: the ceiling. ``plain grpc``
is the obvious servicer: read 1 MiB, fill a message, let protobuf serialize it.
``dragon`` is ``ModelServicer.DownloadCheckpoint`` with the server's options.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import grpc
from dragon.v1 import service_pb2, service_pb2_grpc

from dragon_server.run import VersionRecord
from dragon_server.server import MAX_MESSAGE_BYTES, SERVER_OPTIONS
from dragon_server.servicers import CHUNK_BYTES, ModelServicer, add_model_servicer
from forge import safefile

CLIENT_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


class FileVersions:
    """One version whose checkpoint is the benchmark file."""

    def __init__(self, path: Path, sha256: bytes) -> None:
        self._record = VersionRecord(
            version=1,
            created_at=datetime.now(UTC),
            checkpoint_path=path,
            sha256=sha256,
            size_bytes=path.stat().st_size,
            validation_loss=0.0,
            update_count=0,
            token_count=0,
        )

    def latest_version(self) -> VersionRecord:
        return self._record

    def version(self, v: int) -> VersionRecord:
        return self._record


def serve_raw(path: Path, ports: Queue[int]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ports.put(listener.getsockname()[1])
        while True:
            connection, _ = listener.accept()
            with connection, path.open("rb") as source, contextlib.suppress(OSError):
                connection.sendfile(source)


async def plain_download(
    request: service_pb2.DownloadCheckpointRequest, context: Any, path: Path
) -> AsyncIterator[service_pb2.DownloadCheckpointResponse]:
    with path.open("rb") as source:
        offset = 0
        while data := source.read(CHUNK_BYTES):
            chunk = service_pb2.CheckpointChunk(offset_bytes=offset, data=data)
            yield service_pb2.DownloadCheckpointResponse(chunk=chunk)
            offset += len(data)


async def run_grpc(path: Path, ports: Queue[int], ours: bool) -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    if ours:
        sha256 = safefile.file_sha256(path)
        add_model_servicer(ModelServicer(FileVersions(path, sha256)), server)
    else:

        async def handler(request: Any, context: Any) -> AsyncIterator[Any]:
            async for response in plain_download(request, context, path):
                yield response

        method = grpc.unary_stream_rpc_method_handler(
            handler,
            request_deserializer=service_pb2.DownloadCheckpointRequest.FromString,
            response_serializer=service_pb2.DownloadCheckpointResponse.SerializeToString,
        )
        generic = grpc.method_handlers_generic_handler(
            "dragon.v1.ModelService", {"DownloadCheckpoint": method}
        )
        server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ports.put(port)
    await server.wait_for_termination()


def serve_plain(path: Path, ports: Queue[int]) -> None:
    asyncio.run(run_grpc(path, ports, ours=False))


def serve_ours(path: Path, ports: Queue[int]) -> None:
    asyncio.run(run_grpc(path, ports, ours=True))


def receive_raw(port: int, size: int) -> int:
    buffer = memoryview(bytearray(CHUNK_BYTES))
    received = 0
    with socket.create_connection(("127.0.0.1", port)) as connection:
        while received < size:
            count = connection.recv_into(buffer)
            if not count:
                break
            received += count
    return received


def receive_grpc(port: int, size: int) -> int:
    received = 0
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS) as channel:
        stub = service_pb2_grpc.ModelServiceStub(channel)
        request = service_pb2.DownloadCheckpointRequest()
        for response in stub.DownloadCheckpoint(request, timeout=600):
            if response.WhichOneof("part") == "chunk":
                received += len(response.chunk.data)
    return received


def measure(
    serve: Callable[[Path, Queue[int]], None],
    receive: Callable[[int, int], int],
    path: Path,
    repeat: int,
) -> float:
    """Best rate over ``repeat`` downloads, in bytes per second."""
    context = multiprocessing.get_context("spawn")
    ports: Queue[int] = context.Queue()
    process = context.Process(target=serve, args=(path, ports), daemon=True)
    process.start()
    try:
        port = ports.get(timeout=60)
        size = path.stat().st_size
        receive(port, size)  # warm the code paths and the page cache
        best = 0.0
        for _ in range(repeat):
            started = time.perf_counter()
            received = receive(port, size)
            seconds = time.perf_counter() - started
            if received != size:
                raise RuntimeError(f"received {received} of {size} bytes")
            best = max(best, size / seconds)
        return best
    finally:
        process.kill()
        process.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checkpoint.safetensors"
        with path.open("wb") as sink:
            for _ in range(args.size_mib):
                sink.write(os.urandom(1 << 20))
        print(f"file: {args.size_mib} MiB, best of {args.repeat}, loopback")
        raw = measure(serve_raw, receive_raw, path, args.repeat)
        plain = measure(serve_plain, receive_grpc, path, args.repeat)
        ours = measure(serve_ours, receive_grpc, path, args.repeat)
    print(f"raw tcp socket      {raw / 1e9:6.2f} GB/s")
    print(f"plain grpc stream   {plain / 1e9:6.2f} GB/s  ({plain / raw:.2f} of raw)")
    print(f"dragon stream       {ours / 1e9:6.2f} GB/s  ({ours / raw:.2f} of raw)")
    print(f"dragon / plain      {ours / plain:6.2f}x")


if __name__ == "__main__":
    main()
