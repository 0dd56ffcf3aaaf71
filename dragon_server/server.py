"""The gRPC server: the factory tests call, and the ``serve`` loop of the CLI.

``start_server`` binds every dragon.v1 service plus health and reflection behind
the bearer-key interceptor and returns the bound port, so tests bind port 0.
``serve`` adds what a long-running aggregator needs: a maintenance task that
expires leases and runs aggregations off the event loop, pushes of new versions
to every session, and a drain on SIGTERM/SIGINT that stops granting leases, tells
every worker, lets the aggregation in progress finish within the grace (a crash
past it rolls back, by the store's design) and stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from dragon.v1 import service_pb2, service_pb2_grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dragon_server.auth import AuthInterceptor
from dragon_server.errors import DragonError, ErrorKind
from dragon_server.events import EventHub
from dragon_server.run import TrainingRun, VersionRecord
from dragon_server.servicers import (
    ModelServicer,
    RegistrationServicer,
    StatsServicer,
    StatusServicer,
    TrainingServicer,
    add_model_servicer,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Chunks are 1 MiB; 8 MiB leaves room for a lease's token ids and headers.
MAX_MESSAGE_BYTES = 8 << 20
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Workers ping every 10 s or more to keep idle sessions through NATs; accept
    # that without calls in flight and never answer it with GOAWAY.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    # The server pings idle connections itself to notice vanished workers.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # gRPC lets several processes bind one port by default; a second server on
    # the same address must fail instead of silently sharing the traffic.
    ("grpc.so_reuseport", 0),
]
LOCK_FILE = "serve.lock"
DRAGON_SERVICES = tuple(
    service.full_name for service in service_pb2.DESCRIPTOR.services_by_name.values()
)
MAINTENANCE_SECONDS = 0.5  # how often leases are expired and aggregation checked


class BindError(DragonError):
    """The server could not listen on the address asked for."""

    kind = ErrorKind.UNAVAILABLE


class HomeBusyError(DragonError):
    """Another ``dragon-server serve`` already serves this home."""

    kind = ErrorKind.UNAVAILABLE


@contextlib.contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """Hold an exclusive lock on the home for as long as this process serves it.

    Two servers on one home would both aggregate and publish the same version
    number; the lock goes with the process, so a crash never leaves it behind.
    """
    handle = open(home / LOCK_FILE, "a+b")  # noqa: SIM115 -- held for the block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise HomeBusyError(
                f"another dragon-server serve is already serving {home}"
            ) from None
        yield
    finally:
        handle.close()


@dataclass
class RunningServer:
    """A started server and the parts ``serve`` drives."""

    server: grpc.aio.Server
    port: int
    training: TrainingServicer
    events: EventHub
    health: health_aio.HealthServicer


async def start_dragon_server(run: TrainingRun, listen: str) -> RunningServer:
    """Build, bind and start the server; ``listen`` may name port 0."""
    server = grpc.aio.server(
        interceptors=(AuthInterceptor(run),), options=SERVER_OPTIONS
    )
    events = EventHub(asyncio.get_running_loop())
    run.add_listener(events.publish)
    training = TrainingServicer(run, max_update_bytes=run.max_update_bytes)

    service_pb2_grpc.add_RegistrationServiceServicer_to_server(
        RegistrationServicer(run), server
    )
    add_model_servicer(ModelServicer(run), server)
    service_pb2_grpc.add_TrainingServiceServicer_to_server(training, server)
    service_pb2_grpc.add_StatusServiceServicer_to_server(
        StatusServicer(run, events), server
    )
    service_pb2_grpc.add_StatsServiceServicer_to_server(StatsServicer(run), server)

    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *DRAGON_SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*DRAGON_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise BindError(f"could not listen on {listen}: {exc}") from exc
    if port == 0:
        raise BindError(f"could not listen on {listen} (is the port in use?)")
    await server.start()
    logger.info("listening on %s (port %d)", listen, port)
    return RunningServer(server, port, training, events, health_servicer)


async def start_server(run: TrainingRun, listen: str) -> tuple[grpc.aio.Server, int]:
    """Start the server for ``run`` on ``listen``; returns it and the bound port."""
    running = await start_dragon_server(run, listen)
    return running.server, running.port


def in_daemon_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``fn`` in a daemon thread, so that a stuck call cannot block exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task
            error = exc
            loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
        else:
            loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=target, name="dragon-aggregate", daemon=True).start()
    return future


class Maintenance:
    """The background loop: expire leases, aggregate when due, publish."""

    def __init__(self, run: TrainingRun, training: TrainingServicer) -> None:
        self._run = run
        self._training = training
        self.stopping = asyncio.Event()
        self.aggregation: asyncio.Future[VersionRecord | None] | None = None

    async def loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.step()
            except DragonError as exc:
                logger.warning("maintenance step refused: %s", exc)
            except Exception:
                # A failed round (a full disk, a damaged file) must not end the
                # loop: leases still need expiring, and the next round may work.
                logger.exception("maintenance step failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), MAINTENANCE_SECONDS)

    async def step(self) -> None:
        expired = await asyncio.to_thread(self._run.expire_leases)
        if expired:
            logger.debug("%d lease(s) expired and went back to the queue", expired)
        if self._run.draining or not await asyncio.to_thread(self._run.aggregation_due):
            return
        if self.stopping.is_set():  # the drain began while the check ran
            return

        started = time.monotonic()
        self.aggregation = in_daemon_thread(self._run.aggregate)
        try:
            record = await asyncio.shield(self.aggregation)
        finally:
            if self.aggregation.done():
                self.aggregation = None
        if record is not None:
            logger.info(
                "round of version %d took %.1f s; telling %d session(s)",
                record.version,
                time.monotonic() - started,
                self._training.session_count,
            )
            self._training.publish_version(record)

    async def finish(self, grace_seconds: float) -> bool:
        """Stop the loop; True when no aggregation is left running after the grace."""
        self.stopping.set()
        if self.aggregation is None or self.aggregation.done():
            return True
        logger.info(
            "waiting up to %.0f s for the aggregation in progress", grace_seconds
        )
        done, _ = await asyncio.wait({self.aggregation}, timeout=grace_seconds)
        return bool(done)


async def serve(
    home: Path, listen: str | None = None, overrides: Mapping[str, object] | None = None
) -> None:
    """Serve the run in ``home`` until SIGTERM or SIGINT, then drain and return."""
    with home_lock(home):
        await _serve_locked(home, listen, overrides)


async def _serve_locked(
    home: Path, listen: str | None, overrides: Mapping[str, object] | None
) -> None:
    run = await asyncio.to_thread(TrainingRun.open, home, overrides)
    try:
        running = await start_dragon_server(run, listen or run.config.listen)
    except BaseException:
        run.close()
        raise
    maintenance = Maintenance(run, running.training)
    task = asyncio.create_task(maintenance.loop())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"dragon-server listening on port {running.port}", flush=True)
    await stop.wait()

    grace = run.config.drain_grace_seconds
    logger.info(
        "draining: %d session(s), grace %.0f s", running.training.session_count, grace
    )
    await asyncio.to_thread(run.begin_drain)
    await running.health.enter_graceful_shutdown()
    running.training.drain(grace, "the server is shutting down")
    finished, _ = await asyncio.gather(
        maintenance.finish(grace), running.server.stop(grace)
    )
    await running.training.wait_closed()
    if finished:
        # The loop ends after its current step, none of which is a round now.
        await task
        run.close()
    else:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # The store commits a version in one transaction after its checkpoint is
        # renamed into place: abandoning the thread here loses the round, not data.
        logger.warning("aggregation still running at the end of the grace; abandoned")
    logger.info("stopped")
