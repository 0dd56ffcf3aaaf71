"""The gRPC servicers: thin translations between protobuf and ``TrainingRun``.

Each RPC checks its input, calls the run (in a thread: the run is synchronous and
may touch SQLite or tensors), and maps the result back to protobuf. Domain errors
become status codes in ``rpc_errors``; nothing here speaks SQL or does tensor math.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
from dragon.v1 import service_pb2, service_pb2_grpc
from typing_extensions import override

from dragon_server import rpc_errors
from dragon_server.auth import current_worker_id
from dragon_server.errors import DragonError
from dragon_server.events import EventHub, event_message
from dragon_server.run import TrainingRun, VersionRecord, WorkerStatsRecord
from dragon_server.session import (
    SessionState,
    TrainingSession,
    duration,
    version_info,
)
from forge import safefile

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

API_KEY = re.compile(r"[0-9a-f]{64}")
CHUNK_BYTES = 1 << 20  # 1 MiB: well under the 4 MiB default message size
LEADERBOARD_DEFAULT = 10
LEADERBOARD_MAX = 1000


class RegistrationServicer(service_pb2_grpc.RegistrationServiceServicer):
    """Proof-of-work challenges and key registration; needs no key itself."""

    def __init__(self, run: TrainingRun) -> None:
        self._run = run

    @override
    async def GetChallenge(
        self, request: service_pb2.GetChallengeRequest, context: Context
    ) -> service_pb2.GetChallengeResponse:
        challenge = await asyncio.to_thread(self._run.challenge)
        response = service_pb2.GetChallengeResponse(
            challenge=challenge.challenge, difficulty_bits=challenge.difficulty_bits
        )
        response.expires_at.FromDatetime(challenge.expires_at)
        return response

    @override
    async def Register(
        self, request: service_pb2.RegisterRequest, context: Context
    ) -> service_pb2.RegisterResponse:
        if not API_KEY.fullmatch(request.api_key):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "api_key must be 64 lowercase hex characters (32 random bytes)",
            )
        try:
            registration = await asyncio.to_thread(
                self._run.register,
                request.api_key,
                request.worker_name,
                request.challenge,
                request.nonce,
            )
        except DragonError as exc:
            await rpc_errors.abort(context, exc)
        return service_pb2.RegisterResponse(
            worker_id=registration.worker_id,
            already_registered=registration.already_registered,
        )


@dataclass(frozen=True)
class FileIdentity:
    """What tells two states of a file apart without reading it."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> FileIdentity:
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class CheckpointFiles:
    """Checks each checkpoint file against its recorded SHA-256 once.

    Checkpoints are written once and renamed into place, so a file whose identity
    (inode, size, mtime) is unchanged since it was hashed still has that hash. A
    file that no longer matches its row is never streamed.
    """

    def __init__(self) -> None:
        self._verified: dict[Path, FileIdentity] = {}
        self._lock = threading.Lock()

    def check(self, record: VersionRecord, identity: FileIdentity) -> bool:
        """True when the file with ``identity`` holds the bytes of ``record``."""
        path = record.checkpoint_path
        with self._lock:
            if self._verified.get(path) == identity:
                return True
        digest = safefile.file_sha256(path)
        if digest != record.sha256 or identity.size != record.size_bytes:
            return False
        with self._lock:
            self._verified[path] = identity
        return True


def encoded_chunk(offset: int, data: bytes) -> bytes:
    """A serialized ``DownloadCheckpointResponse`` holding one chunk.

    Built by hand so that a chunk costs one copy of its bytes rather than the
    three of filling a message and serializing it. Field 2 (chunk) is a
    length-delimited CheckpointChunk: field 1 the varint offset, field 2 the data.
    """
    inner = b"\x08" + _varint(offset) + b"\x12" + _varint(len(data))
    return b"".join((b"\x12", _varint(len(inner) + len(data)), inner, data))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def serialize_download(
    message: service_pb2.DownloadCheckpointResponse | bytes,
) -> bytes:
    """The response serializer of DownloadCheckpoint: bytes pass through as built."""
    if isinstance(message, bytes):
        return message
    return message.SerializeToString()


class VersionSource(Protocol):
    """Where ModelService looks versions up: a ``TrainingRun`` in the server."""

    def latest_version(self) -> VersionRecord: ...

    def version(self, v: int) -> VersionRecord: ...


class ModelServicer(service_pb2_grpc.ModelServiceServicer):
    """Version summaries and resumable checkpoint downloads."""

    def __init__(self, run: VersionSource) -> None:
        self._run = run
        self._files = CheckpointFiles()

    @override
    async def GetLatestVersion(
        self, request: service_pb2.GetLatestVersionRequest, context: Context
    ) -> service_pb2.GetLatestVersionResponse:
        record = await asyncio.to_thread(self._run.latest_version)
        return service_pb2.GetLatestVersionResponse(version=version_info(record))

    async def _requested(
        self, request: service_pb2.DownloadCheckpointRequest, context: Context
    ) -> VersionRecord:
        """The version a download asks for: the one named, or the latest."""
        try:
            if request.HasField("version"):
                return await asyncio.to_thread(self._run.version, request.version)
            return await asyncio.to_thread(self._run.latest_version)
        except DragonError as exc:
            await rpc_errors.abort(context, exc)

    @override
    async def DownloadCheckpoint(  # type: ignore[override]
        self, request: service_pb2.DownloadCheckpointRequest, context: Context
    ) -> AsyncIterator[service_pb2.DownloadCheckpointResponse | bytes]:
        record = await self._requested(request, context)
        offset = request.offset_bytes
        if offset > record.size_bytes:
            await context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"offset {offset} is past the end of version {record.version}"
                f" ({record.size_bytes} bytes)",
            )

        # TODO: serve deltas from base_version once checkpoints keeps them; until
        # then every download is the whole file, as the contract allows.
        try:
            source = record.checkpoint_path.open("rb", buffering=0)
        except OSError as exc:
            logger.error(
                "checkpoint of version %d is unreadable: %s", record.version, exc
            )
            await context.abort(
                grpc.StatusCode.DATA_LOSS,
                f"the checkpoint of version {record.version} is missing on the server",
            )
        with source:
            identity = FileIdentity.of(os.fstat(source.fileno()))
            if not await asyncio.to_thread(self._files.check, record, identity):
                logger.error("checkpoint of version %d changed on disk", record.version)
                await context.abort(
                    grpc.StatusCode.DATA_LOSS,
                    f"the checkpoint of version {record.version} does not match"
                    " its recorded SHA-256",
                )
            header = service_pb2.CheckpointHeader(
                version=record.version,
                total_size_bytes=record.size_bytes,
                is_delta=False,
                offset_bytes=offset,
            )
            yield service_pb2.DownloadCheckpointResponse(header=header)
            async for chunk in _chunks(source.fileno(), offset, record.size_bytes):
                if context.cancelled():
                    logger.debug("download of version %d cancelled", record.version)
                    return
                yield chunk

        digest = service_pb2.CheckpointDigest(
            sha256=record.sha256,
            size_bytes=record.size_bytes,
            checkpoint_sha256=record.sha256,
        )
        yield service_pb2.DownloadCheckpointResponse(digest=digest)


async def _chunks(fd: int, offset: int, size: int) -> AsyncIterator[bytes]:
    """Serialized chunk messages of the file ``fd`` from ``offset`` to ``size``."""
    while offset < size:
        # A 1 MiB pread from the page cache takes tens of microseconds: cheaper
        # on the loop than a hop to a thread.
        data = os.pread(fd, min(CHUNK_BYTES, size - offset), offset)
        if not data:
            raise OSError(f"checkpoint file ended at byte {offset} of {size}")
        yield encoded_chunk(offset, data)
        offset += len(data)


def add_model_servicer(servicer: ModelServicer, server: grpc.aio.Server) -> None:
    """Register ModelService with the pass-through serializer for chunks."""
    handlers = {
        "GetLatestVersion": grpc.unary_unary_rpc_method_handler(
            servicer.GetLatestVersion,
            request_deserializer=service_pb2.GetLatestVersionRequest.FromString,
            response_serializer=service_pb2.GetLatestVersionResponse.SerializeToString,
        ),
        "DownloadCheckpoint": grpc.unary_stream_rpc_method_handler(
            servicer.DownloadCheckpoint,
            request_deserializer=service_pb2.DownloadCheckpointRequest.FromString,
            response_serializer=serialize_download,
        ),
    }
    generic = grpc.method_handlers_generic_handler("dragon.v1.ModelService", handlers)
    server.add_generic_rpc_handlers((generic,))


class TrainingServicer(service_pb2_grpc.TrainingServiceServicer):
    """Training sessions; keeps the open ones to push versions and drain notices."""

    def __init__(
        self,
        run: TrainingRun,
        *,
        max_update_bytes: int,
        retry_after_seconds: float = 5.0,
    ) -> None:
        self._run = run
        self._max_update_bytes = max_update_bytes
        self._retry_after = retry_after_seconds
        self._sessions: set[TrainingSession] = set()
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def wait_closed(self) -> None:
        """Wait until every ended session has recorded its end."""
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def broadcast(self, response: service_pb2.SessionResponse) -> None:
        """Push one message to every open session."""
        for session in list(self._sessions):
            session.push(response)

    def publish_version(self, record: VersionRecord) -> None:
        """Tell every open session about a new version."""
        message = service_pb2.NewVersion(version=version_info(record))
        self.broadcast(service_pb2.SessionResponse(new_version=message))

    def drain(self, grace_seconds: float, reason: str) -> None:
        """Ask every open session to finish or release its lease within the grace."""
        drain = service_pb2.Drain(grace=duration(grace_seconds), reason=reason)
        self.broadcast(service_pb2.SessionResponse(drain=drain))

    @override
    async def Session(
        self,
        request_iterator: AsyncIterator[service_pb2.SessionRequest],
        context: Context,
    ) -> AsyncIterator[service_pb2.SessionResponse]:
        session = TrainingSession(
            self._run,
            current_worker_id(),
            max_update_bytes=self._max_update_bytes,
            retry_after_seconds=self._retry_after,
        )
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("kind") != "hello":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the first message of a session must be hello",
            )
        reason = "stream ended"
        try:
            yield await session.open(first.hello)
            self._sessions.add(session)
            reader = asyncio.create_task(session.consume(request_iterator))
            try:
                while (response := await session.outbox.get()) is not None:
                    yield response
                await reader  # re-raises what ended the reader, if anything
            finally:
                reader.cancel()
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        finally:
            self._sessions.discard(session)
            if session.state is not SessionState.CLOSED:
                # A task, so that a cancelled stream still records its end;
                # ``wait_closed`` lets the server wait for it before it stops.
                closing = asyncio.create_task(session.close(reason))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
                await asyncio.shield(closing)


class StatusServicer(service_pb2_grpc.StatusServiceServicer):
    """The live event stream."""

    def __init__(self, run: TrainingRun, events: EventHub) -> None:
        self._run = run
        self._events = events

    @override
    async def Watch(
        self, request: service_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[service_pb2.WatchResponse]:
        # Subscribe before reading the replay so that no event falls in between
        # (one may then arrive twice, never not at all).
        with self._events.subscribe() as subscription:
            if request.replay_count:
                recent = await asyncio.to_thread(
                    self._run.recent_events, request.replay_count
                )
                for record in recent:
                    yield service_pb2.WatchResponse(event=event_message(record))
            while (live := await subscription.next()) is not None:
                yield service_pb2.WatchResponse(event=event_message(live))
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "this watcher fell too far behind the events; reconnect",
        )


def worker_stats(record: WorkerStatsRecord) -> service_pb2.WorkerStats:
    message = service_pb2.WorkerStats(
        worker_id=record.worker_id,
        worker_name=record.worker_name,
        accepted_update_count=record.accepted_update_count,
        token_count=record.token_count,
        uploaded_bytes=record.uploaded_bytes,
        reputation=record.reputation,
    )
    message.registered_at.FromDatetime(record.registered_at)
    message.last_seen_at.FromDatetime(record.last_seen_at)
    return message


class StatsServicer(service_pb2_grpc.StatsServiceServicer):
    """Network figures, one worker's contribution and the leaderboard."""

    def __init__(self, run: TrainingRun) -> None:
        self._run = run

    @override
    async def GetNetworkStats(
        self, request: service_pb2.GetNetworkStatsRequest, context: Context
    ) -> service_pb2.GetNetworkStatsResponse:
        stats = await asyncio.to_thread(self._run.network_stats)
        return service_pb2.GetNetworkStatsResponse(
            worker_count=stats.worker_count,
            active_worker_count=stats.active_worker_count,
            latest_version=version_info(stats.latest_version),
            lease_count=stats.lease_count,
            accepted_update_count=stats.accepted_update_count,
            rejected_update_count=stats.rejected_update_count,
            token_count=stats.token_count,
            uploaded_bytes=stats.uploaded_bytes,
            dense_equivalent_bytes=stats.dense_equivalent_bytes,
        )

    @override
    async def GetWorkerStats(
        self, request: service_pb2.GetWorkerStatsRequest, context: Context
    ) -> service_pb2.GetWorkerStatsResponse:
        worker_id = request.worker_id or current_worker_id()
        try:
            record = await asyncio.to_thread(self._run.worker_stats, worker_id)
        except DragonError as exc:
            await rpc_errors.abort(context, exc)
        return service_pb2.GetWorkerStatsResponse(worker=worker_stats(record))

    @override
    async def GetLeaderboard(
        self, request: service_pb2.GetLeaderboardRequest, context: Context
    ) -> service_pb2.GetLeaderboardResponse:
        if request.limit > LEADERBOARD_MAX:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"limit must be at most {LEADERBOARD_MAX}",
            )
        limit = request.limit or LEADERBOARD_DEFAULT
        records = await asyncio.to_thread(self._run.leaderboard, limit)
        return service_pb2.GetLeaderboardResponse(
            workers=[worker_stats(record) for record in records]
        )
