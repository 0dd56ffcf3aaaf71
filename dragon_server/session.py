"""The training session: one bidirectional stream per connected worker.

A session moves through ``SessionState``: it waits for ``Hello``, is open while
the worker asks for leases, sends heartbeats and uploads updates, and is closed
once the stream ends. Requests are handled one at a time in arrival order by a
reader task; every answer and every message pushed by the server (a new version,
a drain notice) goes through one bounded ``asyncio.Queue``, the session's outbox,
which the servicer drains into the stream. A refused message is answered with a
``Rejection`` and the session stays open.

Update frames arrive as ``UpdateChunk`` messages, in order, and are reassembled in
memory per lease up to the run's size limit; ``UpdateEnd`` hands the whole frame to
``TrainingRun.submit_update`` in a thread, whose return is the acknowledgement.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
from dragon.v1 import service_pb2, types_pb2
from google.protobuf import duration_pb2, json_format

from dragon_server import rpc_errors
from dragon_server.errors import DragonError, Draining
from dragon_server.run import LeaseGrant, TrainingRun, UpdateMeta, VersionRecord

logger = logging.getLogger(__name__)

# Messages waiting to be written to one worker; beyond this the reader waits.
OUTBOX_LIMIT = 64
# Uploads one session may have in flight at once (each up to the size limit).
MAX_OPEN_UPLOADS = 2

VALUE_DTYPES: dict[str, types_pb2.ValueDtype.ValueType] = {
    "fp16": types_pb2.VALUE_DTYPE_FP16,
    "bf16": types_pb2.VALUE_DTYPE_BF16,
    "fp32": types_pb2.VALUE_DTYPE_FP32,
}

RELEASE_REASONS: dict[service_pb2.ReleaseReason.ValueType, str] = {
    service_pb2.RELEASE_REASON_UNSPECIFIED: "unspecified",
    service_pb2.RELEASE_REASON_FAILED: "failed",
    service_pb2.RELEASE_REASON_SHUTDOWN: "shutdown",
}


class SessionState(enum.Enum):
    """Where a training session is in its life."""

    AWAITING_HELLO = "awaiting_hello"
    OPEN = "open"
    CLOSED = "closed"


def duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromTimedelta(timedelta(seconds=seconds))
    return message


def version_info(record: VersionRecord) -> types_pb2.VersionInfo:
    """The proto summary of a published version."""
    info = types_pb2.VersionInfo(
        version=record.version,
        checkpoint_size_bytes=record.size_bytes,
        checkpoint_sha256=record.sha256,
        validation_loss=record.validation_loss,
        update_count=record.update_count,
        token_count=record.token_count,
    )
    info.created_at.FromDatetime(record.created_at)
    return info


def lease_message(grant: LeaseGrant) -> types_pb2.Lease:
    """The proto lease of a grant: the batch's token ids as little-endian uint16."""
    sequences, width = grant.tokens.shape  # [S, L + 1]
    batch = types_pb2.Batch(
        batch_id=grant.batch_id,
        sequence_count=sequences,
        sequence_length=width - 1,
        token_encoding=types_pb2.TOKEN_ENCODING_UINT16_LE,
        token_ids=grant.tokens.astype("<u2", copy=False).tobytes(),
    )
    fields = dataclasses.asdict(grant.recipe)
    fields["value_dtype"] = VALUE_DTYPES[fields["value_dtype"]]
    lease = types_pb2.Lease(
        lease_id=grant.lease_id,
        model_version=grant.model_version,
        batch=batch,
        recipe=types_pb2.Recipe(**fields),
        heartbeat_interval=duration(grant.heartbeat_interval_seconds),
    )
    lease.deadline.FromDatetime(grant.deadline)
    return lease


def protocol_rejection(lease_id: str, message: str) -> service_pb2.SessionResponse:
    return rpc_errors.rejection(
        lease_id,
        types_pb2.REJECT_REASON_PROTOCOL,
        grpc.StatusCode.FAILED_PRECONDITION,
        message,
    )


@dataclasses.dataclass
class Upload:
    """The part of one lease's update frame received so far."""

    frame: bytearray = dataclasses.field(default_factory=bytearray)
    refused: bool = False  # over the size limit: later chunks are dropped unread


class TrainingSession:
    """The server's side of one worker's session stream."""

    def __init__(
        self,
        run: TrainingRun,
        worker_id: str,
        *,
        max_update_bytes: int,
        retry_after_seconds: float,
    ) -> None:
        self.run = run
        self.worker_id = worker_id
        self.state = SessionState.AWAITING_HELLO
        self.outbox: asyncio.Queue[service_pb2.SessionResponse | None] = asyncio.Queue(
            OUTBOX_LIMIT
        )
        self._max_update_bytes = max_update_bytes
        self._retry_after = retry_after_seconds
        self._uploads: dict[str, Upload] = {}

    async def open(self, hello: service_pb2.Hello) -> service_pb2.SessionResponse:
        """Record the session and answer hello with the latest version."""
        hardware = json_format.MessageToDict(
            hello.hardware, preserving_proto_field_name=True
        )
        await asyncio.to_thread(self.run.open_session, self.worker_id, hardware)
        latest = await asyncio.to_thread(self.run.latest_version)
        self.state = SessionState.OPEN
        logger.debug("worker %s hardware: %s", self.worker_id, hardware)
        welcome = service_pb2.Welcome(
            worker_id=self.worker_id, latest_version=version_info(latest)
        )
        return service_pb2.SessionResponse(welcome=welcome)

    async def close(self, reason: str) -> None:
        """Forget partial uploads and record the end of the session."""
        if self.state is SessionState.CLOSED:
            return
        was_open = self.state is SessionState.OPEN
        self.state = SessionState.CLOSED
        self._uploads.clear()
        if was_open:
            await asyncio.to_thread(self.run.close_session, self.worker_id, reason)
            logger.debug("session of worker %s closed: %s", self.worker_id, reason)

    def push(self, response: service_pb2.SessionResponse) -> None:
        """Queue a server-initiated message (a new version, a drain notice)."""
        if self.state is not SessionState.OPEN:
            return
        try:
            self.outbox.put_nowait(response)
        except asyncio.QueueFull:
            logger.warning(
                "worker %s reads too slowly; %s not sent",
                self.worker_id,
                response.WhichOneof("kind"),
            )

    async def consume(
        self, requests: AsyncIterator[service_pb2.SessionRequest]
    ) -> None:
        """Handle every request of the stream in order; the outbox ends with None."""
        try:
            async for request in requests:
                response = await self.handle(request)
                if response is not None:
                    await self.outbox.put(response)
        finally:
            await self.outbox.put(None)

    async def handle(
        self, request: service_pb2.SessionRequest
    ) -> service_pb2.SessionResponse | None:
        """The answer to one request, or None when it needs none (a heartbeat)."""
        kind = request.WhichOneof("kind")
        try:
            if kind == "lease_request":
                return await self._grant()
            if kind == "heartbeat":
                await self._heartbeat(request.heartbeat)
                return None
            if kind == "update_chunk":
                return self._receive_chunk(request.update_chunk)
            if kind == "update_end":
                return await self._submit(request.update_end)
            if kind == "lease_release":
                return await self._release(request.lease_release)
        except DragonError as exc:
            lease_id = _lease_id_of(request)
            logger.info("refused %s from %s: %s", kind, self.worker_id, exc)
            return rpc_errors.rejection_for(exc, lease_id)
        if kind == "hello":
            return protocol_rejection("", "hello was already received")
        return protocol_rejection("", "empty session message")

    async def _grant(self) -> service_pb2.SessionResponse:
        try:
            grant = await asyncio.to_thread(self.run.grant_lease, self.worker_id)
        except Draining as exc:
            return rpc_errors.rejection_for(exc)
        if grant is None:
            no_lease = service_pb2.NoLease(
                retry_after=duration(self._retry_after),
                reason="every batch is leased; ask again later",
            )
            return service_pb2.SessionResponse(no_lease=no_lease)
        # The run logs the grant at INFO; this line adds the session's view.
        logger.debug(
            "lease %s (batch %d, version %d) sent to %s",
            grant.lease_id,
            grant.batch_id,
            grant.model_version,
            self.worker_id,
        )
        return service_pb2.SessionResponse(lease_grant=lease_message(grant))

    async def _heartbeat(self, beat: service_pb2.Heartbeat) -> None:
        deadline = await asyncio.to_thread(
            self.run.heartbeat,
            self.worker_id,
            beat.lease_id,
            beat.steps_done,
            beat.steps_total,
            beat.loss,
        )
        logger.debug(
            "lease %s at step %d/%d, loss %.4f, deadline %s",
            beat.lease_id,
            beat.steps_done,
            beat.steps_total,
            beat.loss,
            deadline.isoformat(),
        )

    def _receive_chunk(
        self, chunk: service_pb2.UpdateChunk
    ) -> service_pb2.SessionResponse | None:
        upload = self._uploads.get(chunk.lease_id)
        if upload is None:
            if len(self._uploads) >= MAX_OPEN_UPLOADS:
                return protocol_rejection(
                    chunk.lease_id,
                    f"at most {MAX_OPEN_UPLOADS} uploads may be in flight at once",
                )
            upload = self._uploads[chunk.lease_id] = Upload()
        if upload.refused:
            return None
        if chunk.offset_bytes != len(upload.frame):
            del self._uploads[chunk.lease_id]
            return protocol_rejection(
                chunk.lease_id,
                f"chunk at offset {chunk.offset_bytes}, expected {len(upload.frame)}",
            )

        size = len(upload.frame) + len(chunk.data)
        if size > self._max_update_bytes:
            # Keep only the mark, so the rest of this frame is dropped unbuffered.
            upload.frame = bytearray()
            upload.refused = True
            return rpc_errors.rejection(
                chunk.lease_id,
                types_pb2.REJECT_REASON_TOO_LARGE,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"update exceeds {self._max_update_bytes} bytes",
            )
        upload.frame += chunk.data
        return None

    async def _submit(
        self, end: service_pb2.UpdateEnd
    ) -> service_pb2.SessionResponse | None:
        upload = self._uploads.pop(end.lease_id, None) or Upload()
        if upload.refused:
            return None  # its TOO_LARGE rejection was already sent
        meta = UpdateMeta(
            base_version=end.base_version,
            sample_count=end.sample_count,
            token_count=end.token_count,
            loss_before=end.loss_before,
            loss_after=end.loss_after,
            train_seconds=end.train_duration.ToTimedelta().total_seconds(),
            sha256=end.sha256,
            size_bytes=end.size_bytes,
        )
        frame = bytes(upload.frame)
        result = await asyncio.to_thread(
            self.run.submit_update, self.worker_id, end.lease_id, frame, meta
        )
        logger.debug(
            "update for lease %s from %s acknowledged%s (%d bytes)",
            end.lease_id,
            self.worker_id,
            " as a duplicate" if result.duplicate else "",
            len(frame),
        )
        ack = service_pb2.Ack(
            lease_id=end.lease_id, duplicate=result.duplicate, received_bytes=len(frame)
        )
        return service_pb2.SessionResponse(ack=ack)

    async def _release(
        self, release: service_pb2.LeaseRelease
    ) -> service_pb2.SessionResponse:
        reason = RELEASE_REASONS.get(release.reason, "unspecified")
        if release.message:
            reason = f"{reason}: {release.message}"
        await asyncio.to_thread(
            self.run.release_lease, self.worker_id, release.lease_id, reason
        )
        self._uploads.pop(release.lease_id, None)
        logger.debug(
            "lease %s released by %s (%s)", release.lease_id, self.worker_id, reason
        )
        return service_pb2.SessionResponse(
            ack=service_pb2.Ack(lease_id=release.lease_id)
        )


def _lease_id_of(request: service_pb2.SessionRequest) -> str:
    kind = request.WhichOneof("kind")
    if kind in ("heartbeat", "update_chunk", "update_end", "lease_release"):
        lease_id: str = getattr(request, kind).lease_id
        return lease_id
    return ""
