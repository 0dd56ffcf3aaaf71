"""The worker's gRPC client: the one place that talks to the server.

Every ``grpc.RpcError`` is turned into one of the exceptions below here, with the
original kept as ``__cause__``::

    ClientError
    +-- ServerUnavailableError  the server is unreachable or the call broke: retry
    +-- AuthenticationError     the key is not (or no longer) accepted: register
    +-- RequestRefusedError     the server refused the request itself (has .code)
    +-- DownloadError           a checkpoint stream ended wrong (digest, size, order)
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
from dragon.v1 import service_pb2, service_pb2_grpc, types_pb2

from forge import pow as proof_of_work
from forge import safefile

logger = logging.getLogger(__name__)

MIB: Final = 1024 * 1024
MAX_MESSAGE_BYTES: Final = 8 * MIB
# Pings every 30 s; the server lets clients ping every >= 10 s without a GOAWAY.
CHANNEL_OPTIONS: Final[list[tuple[str, int]]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# A whole checkpoint download must finish within this many seconds.
DOWNLOAD_TIMEOUT_SECONDS: Final = 3600.0

# Codes that mean "the call did not get through; the same call may work later".
_TRANSIENT: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class ClientError(Exception):
    """A call to the server failed."""


class ServerUnavailableError(ClientError):
    """The server cannot be reached or the connection broke; retry later."""


class AuthenticationError(ClientError):
    """The server does not accept the worker's key."""


class RequestRefusedError(ClientError):
    """The server refused the request itself; repeating it will not help."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class DownloadError(ClientError):
    """A checkpoint download ended wrong: bad digest, size or chunk order."""


def translate(exc: grpc.RpcError, what: str) -> ClientError:
    """The worker's exception for a failed call; ``what`` names the call."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = f"{what}: {code.name} {exc.details() or ''}".rstrip()
    if code in _TRANSIENT:
        return ServerUnavailableError(message)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(message)
    return RequestRefusedError(message, code)


@dataclass(frozen=True)
class Download:
    """A finished, verified checkpoint download."""

    version: int
    path: Path
    size_bytes: int
    sha256: bytes
    # Bytes that crossed the wire in this call (less than size when resumed).
    received_bytes: int


class ServerClient:
    """A channel to one server and the worker's key; unary calls and downloads."""

    def __init__(
        self, target: str, api_key: str, timeout_seconds: float = 30.0
    ) -> None:
        self.target = target
        self.timeout_seconds = timeout_seconds
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._api_key = api_key
        self._registration = service_pb2_grpc.RegistrationServiceStub(self._channel)
        self._models = service_pb2_grpc.ModelServiceStub(self._channel)
        self._training = service_pb2_grpc.TrainingServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def register(self, worker_name: str) -> service_pb2.RegisterResponse:
        """Register the key, solving the proof-of-work; repeat calls are harmless."""
        try:
            challenge = self._registration.GetChallenge(
                service_pb2.GetChallengeRequest(), timeout=self.timeout_seconds
            )
        except grpc.RpcError as exc:
            raise translate(exc, "GetChallenge") from exc
        nonce = proof_of_work.solve(
            challenge.challenge, self._api_key, challenge.difficulty_bits
        )
        request = service_pb2.RegisterRequest(
            api_key=self._api_key,
            worker_name=worker_name,
            challenge=challenge.challenge,
            nonce=nonce,
        )
        try:
            return self._registration.Register(request, timeout=self.timeout_seconds)
        except grpc.RpcError as exc:
            raise translate(exc, "Register") from exc

    def latest_version(self) -> types_pb2.VersionInfo:
        try:
            response = self._models.GetLatestVersion(
                service_pb2.GetLatestVersionRequest(),
                timeout=self.timeout_seconds,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise translate(exc, "GetLatestVersion") from exc
        return response.version

    def download_checkpoint(
        self,
        version: int,
        final_path: Path,
        part_path: Path,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Download:
        """Fetch a checkpoint into ``final_path``, resuming ``part_path``.

        The request's offset is the size of the ``.part`` file; the server's
        header says where its chunks really start (0 when it cannot resume).
        The whole file's SHA-256 must match the closing digest before the file is
        renamed into place. ``on_bytes(n)`` is called for each chunk received.
        """
        offset = part_path.stat().st_size if part_path.exists() else 0
        request = service_pb2.DownloadCheckpointRequest(
            version=version, offset_bytes=offset
        )
        try:
            stream = self._models.DownloadCheckpoint(
                request, timeout=DOWNLOAD_TIMEOUT_SECONDS, metadata=self._metadata
            )
            received, digest = self._receive_checkpoint(stream, part_path, on_bytes)
        except grpc.RpcError as exc:
            raise translate(exc, f"DownloadCheckpoint v{version}") from exc

        size = part_path.stat().st_size
        actual = safefile.file_sha256(part_path)
        if size != digest.size_bytes or actual != digest.sha256:
            # A corrupt prefix would poison every resume: start over next time.
            part_path.unlink(missing_ok=True)
            raise DownloadError(
                f"checkpoint v{version}: got {size} bytes with SHA-256 "
                f"{actual.hex()[:16]}, the server's digest says {digest.size_bytes} "
                f"bytes and {digest.sha256.hex()[:16]}"
            )
        os.replace(part_path, final_path)
        safefile.fsync_dir(final_path.parent)
        logger.info(
            "downloaded checkpoint v%d (%d bytes, %d over the wire)",
            version,
            size,
            received,
        )
        return Download(version, final_path, size, actual, received)

    @staticmethod
    def _receive_checkpoint(
        stream: Iterable[service_pb2.DownloadCheckpointResponse],
        part_path: Path,
        on_bytes: Callable[[int], None] | None,
    ) -> tuple[int, service_pb2.CheckpointDigest]:
        received = 0
        header: service_pb2.CheckpointHeader | None = None
        with part_path.open("ab") as handle:
            for message in stream:
                part = message.WhichOneof("part")
                if part == "header":
                    header = message.header
                    if header.is_delta:
                        raise DownloadError("got a delta, but asked for no delta")
                    # The server may not resume where asked: keep only its prefix.
                    if header.offset_bytes > handle.tell():
                        raise DownloadError("server resumes past the local file")
                    handle.truncate(header.offset_bytes)
                    handle.seek(header.offset_bytes)
                elif part == "chunk":
                    if header is None:
                        raise DownloadError("chunk before the header")
                    if message.chunk.offset_bytes != handle.tell():
                        raise DownloadError(
                            f"chunk at offset {message.chunk.offset_bytes}, "
                            f"expected {handle.tell()}"
                        )
                    handle.write(message.chunk.data)
                    received += len(message.chunk.data)
                    if on_bytes is not None:
                        on_bytes(len(message.chunk.data))
                elif part == "digest":
                    handle.flush()
                    os.fsync(handle.fileno())
                    return received, message.digest
        raise DownloadError("stream ended without a digest")

    def open_session(self) -> SessionStream:
        return SessionStream(self._training, self._metadata)


class _EndOfStream:
    """Marks the end of a queue of messages."""


_END: Final = _EndOfStream()


class SessionStream:
    """The bidirectional training session, usable from one thread at a time.

    Outgoing messages go through a queue that the gRPC request iterator drains;
    a reader thread moves incoming messages (or the error that ended the call)
    into a second queue, so :meth:`receive` can wait with a timeout while the
    caller keeps sending heartbeats.
    """

    def __init__(
        self,
        stub: service_pb2_grpc.TrainingServiceStub,
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        self._outgoing: queue.Queue[service_pb2.SessionRequest | _EndOfStream] = (
            queue.Queue()
        )
        self._incoming: queue.Queue[
            service_pb2.SessionResponse | ClientError | _EndOfStream
        ] = queue.Queue()
        self._closed = False
        # No deadline: a session lives as long as the worker; keepalive pings
        # notice a dead connection.
        self._call = stub.Session(self._requests(), metadata=metadata)
        self._reader = threading.Thread(
            target=self._read, name="session-reader", daemon=True
        )
        self._reader.start()

    def _requests(self) -> Iterator[service_pb2.SessionRequest]:
        while True:
            message = self._outgoing.get()
            if isinstance(message, _EndOfStream):
                return
            yield message

    def _read(self) -> None:
        try:
            for response in self._call:
                self._incoming.put(response)
        except grpc.RpcError as exc:
            error = translate(exc, "Session")
            error.__cause__ = exc
            self._incoming.put(error)
        self._incoming.put(_END)

    def send(self, message: service_pb2.SessionRequest) -> None:
        if self._closed:
            raise ServerUnavailableError("Session: already closed")
        self._outgoing.put(message)

    def receive(self, timeout: float) -> service_pb2.SessionResponse | None:
        """The next server message, or None after ``timeout`` seconds.

        Raises :class:`ClientError` when the stream ended, by error or not.
        """
        try:
            item = self._incoming.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        if isinstance(item, ClientError):
            raise item
        if isinstance(item, _EndOfStream):
            self._incoming.put(item)  # every later receive sees the end too
            raise ServerUnavailableError("Session: the server ended the stream")
        return item

    def close(self) -> None:
        """Half-close the stream, then cancel the call if it is still open."""
        if self._closed:
            return
        self._closed = True
        self._outgoing.put(_END)
        self._reader.join(timeout=2.0)
        if self._reader.is_alive():
            self._call.cancel()  # type: ignore[no-untyped-call]
            self._reader.join(timeout=2.0)
