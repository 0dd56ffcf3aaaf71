"""The worker daemon: lease, train, compress, upload, repeat.

One :class:`Worker` runs in the main thread and owns the training session; the
local training of a lease runs in a second thread so that heartbeats keep going
while it trains. The loop, per connection::

    register (once) -> fetch the latest version -> Session: Hello
      -> LeaseRequest -> LeaseGrant -> train (Heartbeat ...) -> encode
      -> UpdateChunk ... UpdateEnd -> Ack | Rejection -> LeaseRequest ...

A lost connection is retried with exponential backoff and jitter; a restarted
worker resumes with its key, residual and counters from the state folder.

Stopping: the first SIGTERM/SIGINT lets the lease in training finish and be
uploaded, then the worker exits 0; a second one gives the lease back
(``LeaseRelease SHUTDOWN``) and exits 0 at once. A server ``Drain`` is met by
uploading within its grace, or else by giving the lease back; the worker then
reconnects with backoff until the server returns.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Final

import grpc
import numpy as np
import torch
from dragon.v1 import service_pb2, types_pb2
from google.protobuf import duration_pb2

from dragon_worker import __version__
from dragon_worker.backoff import Backoff
from dragon_worker.client import (
    MIB,
    AuthenticationError,
    Download,
    DownloadError,
    RequestRefusedError,
    ServerClient,
    ServerUnavailableError,
    SessionStream,
)
from dragon_worker.config import WorkerConfig
from dragon_worker.resources import describe_hardware, limit_gpu_memory, select_device
from dragon_worker.state import Activity, WorkerState
from forge import codec, safefile
from forge.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from forge.model import HRMSMoE
from forge.train import TrainingStopped, TrainRecipe, TrainResult, train_lease

logger = logging.getLogger(__name__)

UPDATE_CHUNK_BYTES: Final = MIB
# How long to wait for the server's verdict on an uploaded update, in seconds:
# it decodes, validates and fsyncs the frame before it answers.
ACK_TIMEOUT_SECONDS: Final = 120.0
# Granularity of every wait, so signals and server messages are seen promptly.
POLL_SECONDS: Final = 0.1
DEFAULT_HEARTBEAT_SECONDS: Final = 10.0
# Step progress goes to progress.json at most this often (each write fsyncs).
PROGRESS_WRITE_SECONDS: Final = 0.5
DEFAULT_DENSITY: Final = 0.01
_VALUE_DTYPES: Final[dict[int, codec.ValueDtype]] = {
    types_pb2.VALUE_DTYPE_FP16: "fp16",
    types_pb2.VALUE_DTYPE_BF16: "bf16",
    types_pb2.VALUE_DTYPE_FP32: "fp32",
}
_TOKEN_DTYPES: Final[dict[int, np.dtype[Any]]] = {
    types_pb2.TOKEN_ENCODING_UINT16_LE: np.dtype("<u2"),
    types_pb2.TOKEN_ENCODING_UINT32_LE: np.dtype("<u4"),
}


class Lifecycle(enum.Enum):
    """The worker's life: each state only moves to a later one."""

    CREATED = "created"
    RUNNING = "running"
    # First signal: finish and upload the current lease, take no new one.
    STOPPING = "stopping"
    # Second signal: give the current lease back and leave now.
    ABORTING = "aborting"
    STOPPED = "stopped"


class InvalidLeaseError(ValueError):
    """A lease grant cannot be trained: bad batch encoding or sizes."""


class LeaseLostError(Exception):
    """The server no longer holds the lease for this worker (expired, unknown)."""


class TrainingFailedError(Exception):
    """Local training of a lease raised; the lease goes back to the server."""


class ServerDrainingError(Exception):
    """The server asked to drain; reconnect once it is back."""


@dataclass(frozen=True)
class LeaseOutcome:
    """How one lease ended, for logs and tests."""

    lease_id: str
    accepted: bool
    reason: str


@dataclass(frozen=True)
class PendingUpload:
    """A trained lease whose update the server has not answered yet."""

    lease: types_pb2.Lease
    result: TrainResult
    # Encoded once: a repeat must send the same frame the residual was cut from.
    encoded: codec.EncodedUpdate | None = None


def batch_tokens(batch: types_pb2.Batch) -> torch.Tensor:
    """The batch's token ids as int64 ``[S, L + 1]``."""
    dtype = _TOKEN_DTYPES.get(batch.token_encoding)
    if dtype is None:
        raise InvalidLeaseError(f"unknown token encoding {batch.token_encoding}")
    rows, width = batch.sequence_count, batch.sequence_length + 1
    if len(batch.token_ids) != rows * width * dtype.itemsize:
        raise InvalidLeaseError(
            f"batch holds {len(batch.token_ids)} bytes, expected {rows} x {width} "
            f"ids of {dtype.itemsize} bytes"
        )
    ids = np.frombuffer(batch.token_ids, dtype=dtype).reshape(rows, width)
    return torch.from_numpy(ids.astype(np.int64))


def train_recipe(recipe: types_pb2.Recipe, max_batch_size: int | None) -> TrainRecipe:
    """The local-training recipe, with the volunteer's micro-batch cap applied."""
    micro = recipe.micro_batch_size or recipe.batch_size
    if max_batch_size is not None:
        micro = min(micro, max_batch_size)
    return TrainRecipe(
        local_steps=recipe.local_steps,
        batch_size=recipe.batch_size,
        micro_batch_size=max(1, micro),
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        beta1=recipe.beta1,
        beta2=recipe.beta2,
        grad_clip_norm=recipe.grad_clip_norm,
        seed=recipe.seed,
    )


def update_density(recipe: types_pb2.Recipe, cap: float | None) -> float:
    """The density to encode with: the recipe's, lowered by ``--density``."""
    candidates = [d for d in (recipe.density, cap) if d is not None and d > 0]
    return min(candidates) if candidates else DEFAULT_DENSITY


def _seconds(duration: duration_pb2.Duration, default: float) -> float:
    value = duration.seconds + duration.nanos / 1e9
    return value if value > 0 else default


class TrainingJob:
    """``train_lease`` in a thread, with its progress readable from another."""

    def __init__(
        self,
        model: HRMSMoE,
        tokens: torch.Tensor,
        recipe: TrainRecipe,
        device: torch.device,
    ) -> None:
        self.stop = threading.Event()
        self.result: TrainResult | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._progress = (0, recipe.local_steps, math.nan)
        self._thread = threading.Thread(
            target=self._run,
            args=(model, tokens, recipe, device),
            name="lease-training",
            # A second signal leaves without waiting for the step in progress.
            daemon=True,
        )

    def start(self) -> None:
        self._thread.start()

    def _run(
        self,
        model: HRMSMoE,
        tokens: torch.Tensor,
        recipe: TrainRecipe,
        device: torch.device,
    ) -> None:
        try:
            self.result = train_lease(
                model,
                tokens,
                recipe,
                device=device,
                progress=self._on_progress,
                should_stop=self.stop.is_set,
            )
        except BaseException as exc:  # reported to the session thread
            self.error = exc

    def _on_progress(self, steps_done: int, steps_total: int, loss: float) -> None:
        with self._lock:
            self._progress = (steps_done, steps_total, loss)

    @property
    def progress(self) -> tuple[int, int, float]:
        with self._lock:
            return self._progress

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


class Worker:
    """One worker daemon bound to one server and one state folder."""

    def __init__(self, config: WorkerConfig, state: WorkerState | None = None) -> None:
        self.config = config
        self.state = state if state is not None else WorkerState(config.state_dir)
        self.lifecycle = Lifecycle.CREATED
        self.accepted_this_run = 0
        self.outcomes: list[LeaseOutcome] = []
        self._device = torch.device("cpu")
        self._hardware = types_pb2.Hardware()
        self._wake = threading.Event()
        self._worker_id = ""
        self._held_version: int | None = None
        self._latest_version: int | None = None
        self._drain_deadline: float | None = None
        self._job: TrainingJob | None = None
        # Lives in memory only: after a restart the lease expires on the server
        # and the residual on disk is still the one before this update.
        self._pending: PendingUpload | None = None

    # -- lifecycle -------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: finish the current lease and stop. Second: leave now.

        Safe to call from a signal handler.
        """
        if self.lifecycle in (Lifecycle.CREATED, Lifecycle.RUNNING):
            self.lifecycle = Lifecycle.STOPPING
        elif self.lifecycle == Lifecycle.STOPPING:
            self.lifecycle = Lifecycle.ABORTING
        self._wake.set()

    def training_in_progress(self) -> bool:
        """True while a training thread still runs (after an abort, say)."""
        return self._job is not None and self._job.alive()

    def _done(self) -> bool:
        if self.lifecycle in (Lifecycle.STOPPING, Lifecycle.ABORTING):
            return True
        limit = self.config.max_leases
        return limit > 0 and self.accepted_this_run >= limit

    def _set_activity(self, activity: Activity, **changes: object) -> None:
        self.state.update(state=activity.value, **changes)

    def _sleep(self, seconds: float) -> None:
        """Wait, but wake at once on a stop request."""
        end = time.monotonic() + seconds
        while not self._done() and (left := end - time.monotonic()) > 0:
            self._wake.wait(min(left, POLL_SECONDS * 2))

    def run(self) -> int:
        """Work until stopped or ``max_leases`` are accepted; the exit code."""
        self.lifecycle = Lifecycle.RUNNING
        self._device = select_device(self.config.device)
        limit_gpu_memory(self._device, self.config.gpu_memory_fraction)
        self._hardware = describe_hardware(self._device)
        cached = self.state.cached_versions()
        self._held_version = cached[-1] if cached else None
        self._worker_id = self.state.progress.worker_id
        if self.state.progress.server != self.config.server:
            self._worker_id = ""
        api_key = self.state.api_key()
        backoff = Backoff(
            self.config.backoff_initial_seconds, self.config.backoff_max_seconds
        )
        logger.info(
            "worker starting: server %s, device %s, state in %s",
            self.config.server,
            self._device,
            self.state.root,
        )
        try:
            while not self._done():
                error = self._connect_once(api_key, backoff)
                if self._done():
                    break
                delay = backoff.next_delay()
                logger.warning("%s; retrying in %.1f s", error, delay)
                self._set_activity(Activity.BACKOFF, last_error=error)
                self._sleep(delay)
        finally:
            self._set_activity(
                Activity.STOPPED, current_lease_id="", steps_done=0, steps_total=0
            )
            aborted = self.lifecycle == Lifecycle.ABORTING
            self.lifecycle = Lifecycle.STOPPED
        logger.info(
            "worker stopped%s after %d accepted leases this run",
            " at once" if aborted else "",
            self.accepted_this_run,
        )
        return 0

    def _connect_once(self, api_key: str, backoff: Backoff) -> str:
        """One connection's worth of work; the error that ended it, in words."""
        self._set_activity(Activity.CONNECTING)
        self._drain_deadline = None
        try:
            with ServerClient(
                self.config.server, api_key, self.config.rpc_timeout_seconds
            ) as client:
                self._work(client, backoff)
            return "connection closed"
        except AuthenticationError as exc:
            # The server forgot the key (a new run, say): register it again.
            self._worker_id = ""
            return f"key not accepted ({exc})"
        except ServerUnavailableError as exc:
            return f"server unavailable ({exc})"
        except ServerDrainingError as exc:
            return f"session ended ({exc})"
        except (RequestRefusedError, DownloadError) as exc:
            logger.error("%s", exc)
            return str(exc)

    # -- one connection --------------------------------------------------------

    def _register(self, client: ServerClient) -> None:
        self._set_activity(Activity.REGISTERING)
        name = self.config.name
        registration = client.register(name)
        self._worker_id = registration.worker_id
        self.state.update(worker_id=self._worker_id, server=self.config.server)
        logger.info(
            "registered as worker %s%s",
            self._worker_id,
            " (already known)" if registration.already_registered else "",
        )

    def _work(self, client: ServerClient, backoff: Backoff) -> None:
        if not self._worker_id:
            self._register(client)
        latest = client.latest_version()
        self._latest_version = latest.version
        self._ensure_version(client, latest.version, latest.checkpoint_sha256)

        session = client.open_session()
        try:
            self._hello(session)
            backoff.reset()
            if self._pending is not None:
                pending = self._pending
                logger.info(
                    "sending the update for lease %s again", pending.lease.lease_id
                )
                self.outcomes.append(
                    self._finish_lease(session, pending.lease, pending.result)
                )
            while not self._done():
                if self._drain_deadline is not None:
                    raise ServerDrainingError("the server is draining")
                latest_known = self._latest_version
                if latest_known is not None and latest_known != self._held_version:
                    self._ensure_version(client, latest_known, None)
                self._next_lease(client, session)
        finally:
            session.close()

    def _hello(self, session: SessionStream) -> None:
        limits = types_pb2.WorkerLimits(
            max_micro_batch_size=self.config.max_batch_size or 0,
            max_leases=self.config.max_leases,
            gpu_memory_fraction=self.config.gpu_memory_fraction or 0.0,
        )
        hello = service_pb2.Hello(
            hardware=self._hardware, limits=limits, worker_version=__version__
        )
        if self._held_version is not None:
            hello.held_version = self._held_version
        session.send(service_pb2.SessionRequest(hello=hello))
        welcome = self._wait_for(session, ("welcome",), self.config.rpc_timeout_seconds)
        if welcome.WhichOneof("kind") == "rejection":
            raise RequestRefusedError(
                f"hello refused: {welcome.rejection.message}",
                _status_code(welcome.rejection.status_code),
            )
        self._latest_version = welcome.welcome.latest_version.version
        logger.info(
            "session open as %s; latest version %d",
            welcome.welcome.worker_id,
            self._latest_version,
        )

    def _receive(
        self, session: SessionStream, timeout: float
    ) -> service_pb2.SessionResponse | None:
        """The next message that needs an answer; version notices and drains are
        handled here."""
        message = session.receive(timeout)
        if message is None:
            return None
        kind = message.WhichOneof("kind")
        if kind == "new_version":
            version = message.new_version.version.version
            logger.info("version %d published", version)
            self._latest_version = max(self._latest_version or 0, version)
            return None
        if kind == "drain":
            grace = _seconds(message.drain.grace, 0.0)
            logger.info(
                "server drains (%s); %.0f s left to upload", message.drain.reason, grace
            )
            self._drain_deadline = time.monotonic() + grace
            return None
        return message

    def _wait_for(
        self, session: SessionStream, kinds: tuple[str, ...], timeout: float
    ) -> service_pb2.SessionResponse:
        """The next message of one of ``kinds``; Rejections are returned too."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            message = self._receive(session, min(left, POLL_SECONDS * 2))
            if message is None:
                continue
            kind = message.WhichOneof("kind")
            if kind in kinds or kind == "rejection":
                return message
            logger.debug("ignoring a %s message while waiting for %s", kind, kinds)
        raise ServerUnavailableError(f"no {'/'.join(kinds)} within {timeout:.0f} s")

    def _next_lease(self, client: ServerClient, session: SessionStream) -> None:
        self._set_activity(Activity.IDLE, current_lease_id="")
        session.send(
            service_pb2.SessionRequest(lease_request=service_pb2.LeaseRequest())
        )
        end = time.monotonic() + self.config.rpc_timeout_seconds
        while True:
            reply = self._wait_for(
                session, ("lease_grant", "no_lease"), end - time.monotonic()
            )
            kind = reply.WhichOneof("kind")
            if kind != "rejection" or not reply.rejection.lease_id:
                break
            # A late answer about an earlier lease (a heartbeat, say), not ours.
            logger.debug("late rejection for lease %s", reply.rejection.lease_id)
        if kind == "lease_grant" and self._done():
            # A stop request came while the grant was on its way.
            self._release(
                session,
                reply.lease_grant.lease_id,
                service_pb2.RELEASE_REASON_SHUTDOWN,
                "worker stopping",
            )
        elif kind == "no_lease":
            wait = _seconds(reply.no_lease.retry_after, 1.0)
            logger.info(
                "no lease free (%s); asking again in %.1f s",
                reply.no_lease.reason,
                wait,
            )
            self._sleep(wait)
        elif kind == "rejection":
            rejection = reply.rejection
            if rejection.reason == types_pb2.REJECT_REASON_DRAINING:
                raise ServerDrainingError("the server is draining")
            raise RequestRefusedError(
                f"lease request refused: {rejection.message}",
                _status_code(rejection.status_code),
            )
        else:
            outcome = self._work_lease(client, session, reply.lease_grant)
            self.outcomes.append(outcome)

    # -- model versions --------------------------------------------------------

    def _ensure_version(
        self, client: ServerClient, version: int, sha256: bytes | None
    ) -> None:
        """Hold ``version``'s checkpoint in the state folder, downloading it.

        ``sha256`` is the published digest when known; a cached file that does
        not match it is dropped and fetched again.
        """
        path = self.state.checkpoint_path(version)
        if path.exists() and sha256 and safefile.file_sha256(path) != sha256:
            logger.warning(
                "cached checkpoint v%d is corrupt; fetching it again", version
            )
            path.unlink()
        if not path.exists():
            download = self._download(client, version)
            if sha256 and download.sha256 != sha256:
                path.unlink()
                raise DownloadError(f"v{version} does not match its published digest")
        self._held_version = version
        self.state.update(model_version=version)
        keep = {version}
        if self._latest_version is not None:
            keep.add(self._latest_version)
        self.state.prune_checkpoints(keep)

    def _download(self, client: ServerClient, version: int) -> Download:
        self._set_activity(Activity.DOWNLOADING)
        path = self.state.checkpoint_path(version)
        part = self.state.part_path(version)
        received = 0

        def count(n: int) -> None:
            nonlocal received
            received += n

        try:
            try:
                return client.download_checkpoint(version, path, part, count)
            except RequestRefusedError:
                if not part.exists():
                    raise
                # The partial file may be longer than the checkpoint now served.
                logger.warning(
                    "server refused the resume of v%d; starting over", version
                )
                part.unlink()
                return client.download_checkpoint(version, path, part, count)
        finally:
            self.state.add(bytes_down=received)

    # -- one lease -------------------------------------------------------------

    def _work_lease(
        self, client: ServerClient, session: SessionStream, lease: types_pb2.Lease
    ) -> LeaseOutcome:
        lease_id = lease.lease_id
        recipe = train_recipe(lease.recipe, self.config.max_batch_size)
        logger.info(
            "lease %s: batch %d, version %d, %d steps",
            lease_id,
            lease.batch.batch_id,
            lease.model_version,
            recipe.local_steps,
        )
        try:
            tokens = batch_tokens(lease.batch)
        except InvalidLeaseError as exc:
            return self._release(
                session, lease_id, service_pb2.RELEASE_REASON_FAILED, str(exc)
            )
        self._ensure_version(client, lease.model_version, None)

        path = self.state.checkpoint_path(lease.model_version)
        try:
            model = model_from_checkpoint(load_checkpoint(path), self._device)
        except CheckpointError as exc:
            # Drop the file so that the next lease fetches it again.
            path.unlink(missing_ok=True)
            self._held_version = None
            return self._release(
                session,
                lease_id,
                service_pb2.RELEASE_REASON_FAILED,
                f"checkpoint v{lease.model_version} unusable: {exc}",
            )
        self._set_activity(
            Activity.TRAINING,
            current_lease_id=lease_id,
            steps_done=0,
            steps_total=recipe.local_steps,
            loss=None,
        )
        try:
            result = self._train(session, lease, model, tokens, recipe)
        except LeaseLostError as exc:
            logger.warning("lease %s lost while training: %s", lease_id, exc)
            self.state.update(last_error=str(exc))
            return LeaseOutcome(lease_id, False, str(exc))
        except TrainingFailedError as exc:
            logger.error("training lease %s failed: %s", lease_id, exc, exc_info=exc)
            return self._release(
                session, lease_id, service_pb2.RELEASE_REASON_FAILED, str(exc)
            )
        if result is None:
            why = "drain grace over" if self._drain_expired() else "worker stopping"
            return self._release(
                session, lease_id, service_pb2.RELEASE_REASON_SHUTDOWN, why
            )
        return self._finish_lease(session, lease, result)

    def _finish_lease(
        self, session: SessionStream, lease: types_pb2.Lease, result: TrainResult
    ) -> LeaseOutcome:
        """Upload a trained lease, or give it back when it must not be sent."""
        # A non-finite pseudo-gradient never gets here: train_lease raises
        # NonFiniteResult for it, and that lease is released as failed.
        lease_id = lease.lease_id
        if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
            return self._release(
                session,
                lease_id,
                service_pb2.RELEASE_REASON_SHUTDOWN,
                "drain grace over",
            )
        # Kept until the server's verdict: a connection lost before it makes
        # the next connection send the same update again (the server counts a
        # repeat once).
        pending = self._pending
        if (
            pending is None
            or pending.lease.lease_id != lease_id
            or pending.encoded is None
        ):
            pending = PendingUpload(lease, result, self._encode(lease, result))
        self._pending = pending
        assert pending.encoded is not None
        outcome = self._upload(session, lease, result, pending.encoded)
        self._pending = None
        return outcome

    def _encode(
        self, lease: types_pb2.Lease, result: TrainResult
    ) -> codec.EncodedUpdate:
        density = update_density(lease.recipe, self.config.density)
        value_dtype = _VALUE_DTYPES.get(lease.recipe.value_dtype, "fp16")
        return codec.encode_update(
            result.pseudo_gradient,
            self.residual_for(result.pseudo_gradient),
            density,
            value_dtype,
        )

    def _train(
        self,
        session: SessionStream,
        lease: types_pb2.Lease,
        model: HRMSMoE,
        tokens: torch.Tensor,
        recipe: TrainRecipe,
    ) -> TrainResult | None:
        """Train in a thread while heartbeats go out; None when stopped early."""
        job = TrainingJob(model, tokens, recipe, self._device)
        self._job = job
        interval = _seconds(lease.heartbeat_interval, DEFAULT_HEARTBEAT_SECONDS)
        next_heartbeat = time.monotonic() + interval
        last_written, written_at = job.progress, 0.0
        lost: ServerUnavailableError | None = None
        job.start()
        while job.alive():
            if self.lifecycle == Lifecycle.ABORTING or self._drain_expired():
                job.stop.set()
                if self.lifecycle == Lifecycle.ABORTING:
                    return None  # leave at once; the thread dies with the process
            if lost is not None:
                job.join(POLL_SECONDS)
            else:
                try:
                    message = self._receive(session, POLL_SECONDS)
                except ServerUnavailableError as exc:
                    logger.warning(
                        "session lost while training lease %s (%s); finishing it "
                        "to upload after reconnecting",
                        lease.lease_id,
                        exc,
                    )
                    lost = exc
                    message = None
                if message is not None:
                    self._on_message_while_training(message, lease.lease_id, job)
            progress = job.progress
            if lost is None and time.monotonic() >= next_heartbeat:
                self._heartbeat(session, lease.lease_id, progress)
                next_heartbeat = time.monotonic() + interval
            now = time.monotonic()
            if progress != last_written and now - written_at >= PROGRESS_WRITE_SECONDS:
                done, total, loss = progress
                self.state.update(steps_done=done, steps_total=total, loss=loss)
                last_written, written_at = progress, now
        job.join()
        self._job = None

        if isinstance(job.error, TrainingStopped):
            return None
        if job.error is not None:
            raise TrainingFailedError(
                f"{type(job.error).__name__}: {job.error}"
            ) from job.error
        assert job.result is not None
        if lost is not None:
            self._pending = PendingUpload(lease, job.result)
            raise lost
        return job.result

    def _drain_expired(self) -> bool:
        return (
            self._drain_deadline is not None and time.monotonic() > self._drain_deadline
        )

    def _on_message_while_training(
        self, message: service_pb2.SessionResponse, lease_id: str, job: TrainingJob
    ) -> None:
        kind = message.WhichOneof("kind")
        if kind == "rejection" and message.rejection.lease_id in ("", lease_id):
            # A refused heartbeat: the lease expired or went to someone else.
            job.stop.set()
            job.join()
            self._job = None
            reason = types_pb2.RejectReason.Name(message.rejection.reason)
            raise LeaseLostError(f"{reason}: {message.rejection.message}")
        logger.debug("ignoring a %s message while training", kind)

    def _heartbeat(
        self, session: SessionStream, lease_id: str, progress: tuple[int, int, float]
    ) -> None:
        done, total, loss = progress
        heartbeat = service_pb2.Heartbeat(
            lease_id=lease_id,
            steps_done=done,
            steps_total=total,
            loss=0.0 if math.isnan(loss) else loss,
        )
        session.send(service_pb2.SessionRequest(heartbeat=heartbeat))
        logger.debug(
            "heartbeat %s: %d/%d steps, loss %.4f", lease_id, done, total, loss
        )

    def _release(
        self,
        session: SessionStream,
        lease_id: str,
        reason: service_pb2.ReleaseReason.ValueType,
        message: str,
    ) -> LeaseOutcome:
        release = service_pb2.LeaseRelease(
            lease_id=lease_id,
            reason=reason,
            message=message,
        )
        session.send(service_pb2.SessionRequest(lease_release=release))
        logger.info(
            "gave lease %s back (%s): %s",
            lease_id,
            service_pb2.ReleaseReason.Name(reason),
            message,
        )
        if self.lifecycle != Lifecycle.ABORTING:
            # The server answers a release with an Ack; wait briefly so the
            # release is on the wire before the session closes.
            with contextlib.suppress(ServerUnavailableError):
                self._wait_for(session, ("ack",), 5.0)
        self.state.update(current_lease_id="", last_error=message)
        return LeaseOutcome(lease_id, False, message)

    def residual_for(
        self, update: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor] | None:
        """The saved residual when it fits this update's tensors and server."""
        residual = self.state.load_residual()
        if residual is None or residual.server != self.config.server:
            return None
        fits = residual.tensors.keys() == update.keys() and all(
            residual.tensors[name].shape == update[name].shape for name in update
        )
        if not fits:
            logger.warning("dropping a residual for another model shape")
            return None
        return residual.tensors

    def _upload(
        self,
        session: SessionStream,
        lease: types_pb2.Lease,
        result: TrainResult,
        encoded: codec.EncodedUpdate,
    ) -> LeaseOutcome:
        lease_id = lease.lease_id
        self._set_activity(Activity.UPLOADING, current_lease_id=lease_id)
        frame = encoded.frame
        for offset in range(0, len(frame), UPDATE_CHUNK_BYTES):
            chunk = service_pb2.UpdateChunk(
                lease_id=lease_id,
                offset_bytes=offset,
                data=frame[offset : offset + UPDATE_CHUNK_BYTES],
            )
            session.send(service_pb2.SessionRequest(update_chunk=chunk))
        end = service_pb2.UpdateEnd(
            lease_id=lease_id,
            size_bytes=len(frame),
            sha256=hashlib.sha256(frame).digest(),
            base_version=lease.model_version,
            sample_count=result.sample_count,
            token_count=result.token_count,
            loss_before=result.loss_before,
            loss_after=result.loss_after,
        )
        end.train_duration.FromNanoseconds(int(result.seconds * 1e9))
        session.send(service_pb2.SessionRequest(update_end=end))
        self.state.add(bytes_up=len(frame))
        logger.info(
            "uploaded lease %s: %d bytes (%.0fx smaller than dense), loss %.4f -> %.4f",
            lease_id,
            len(frame),
            encoded.dense_bytes / max(1, len(frame)),
            result.loss_before,
            result.loss_after,
        )
        return self._await_verdict(session, lease, result, encoded)

    def _await_verdict(
        self,
        session: SessionStream,
        lease: types_pb2.Lease,
        result: TrainResult,
        encoded: codec.EncodedUpdate,
    ) -> LeaseOutcome:
        lease_id = lease.lease_id
        end = time.monotonic() + ACK_TIMEOUT_SECONDS
        while True:
            reply = self._wait_for(session, ("ack",), end - time.monotonic())
            kind = reply.WhichOneof("kind")
            named = reply.ack.lease_id if kind == "ack" else reply.rejection.lease_id
            if named in ("", lease_id):
                break
            logger.debug("ignoring a %s for lease %s", kind, named)

        if kind == "ack":
            # Only now is the unsent mass of this update safe to drop from disk:
            # a crash before this line keeps the previous residual.
            self.state.save_residual(
                encoded.residual,
                server=self.config.server,
                model_version=lease.model_version,
            )
            self.state.add(leases_done=1, tokens=result.token_count)
            self.state.update(current_lease_id="", last_error="")
            self.accepted_this_run += 1
            logger.info(
                "lease %s accepted%s",
                lease_id,
                " (duplicate)" if reply.ack.duplicate else "",
            )
            return LeaseOutcome(
                lease_id, True, "duplicate" if reply.ack.duplicate else ""
            )
        reason = types_pb2.RejectReason.Name(reply.rejection.reason)
        message = (
            f"update for lease {lease_id} rejected: {reason} {reply.rejection.message}"
        )
        logger.warning("%s", message)
        self.state.add(leases_rejected=1)
        self.state.update(current_lease_id="", last_error=message)
        return LeaseOutcome(lease_id, False, reason)


def _status_code(number: int) -> grpc.StatusCode:
    """The gRPC status code with google.rpc.Code number ``number``."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
