"""Live events of the run, fanned out from domain threads to Watch streams.

The run calls one listener per server (``EventHub.publish``) from whichever thread
recorded the event; the hub hops onto the event loop with ``call_soon_threadsafe``
and copies the record into the bounded queue of every open subscription. A watcher
that falls more than ``QUEUE_LIMIT`` events behind is told so and dropped rather
than holding memory without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from dragon.v1 import types_pb2
from google.protobuf import json_format

from dragon_server.run import EventRecord

logger = logging.getLogger(__name__)

QUEUE_LIMIT = 1000


def event_message(record: EventRecord) -> types_pb2.Event:
    """The proto ``Event`` of a domain event record."""
    event = json_format.ParseDict({record.kind: record.payload}, types_pb2.Event())
    event.time.FromDatetime(record.time)
    return event


class Subscription:
    """One watcher's queue of events, and whether it fell behind."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[EventRecord] = asyncio.Queue(QUEUE_LIMIT)
        self.overflowed = asyncio.Event()

    def offer(self, record: EventRecord) -> None:
        if self.overflowed.is_set():
            return
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self.overflowed.set()

    async def next(self) -> EventRecord | None:
        """The next event, or None once this watcher has fallen behind."""
        if self.overflowed.is_set():
            return None
        getter = asyncio.ensure_future(self.queue.get())
        overflow = asyncio.ensure_future(self.overflowed.wait())
        try:
            await asyncio.wait({getter, overflow}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            overflow.cancel()
            if not getter.done():
                getter.cancel()
        return getter.result() if getter.done() and not getter.cancelled() else None


class EventHub:
    """Bridges the run's listener callbacks into per-watcher asyncio queues."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._subscriptions: set[Subscription] = set()

    def publish(self, record: EventRecord) -> None:
        """The run's listener: safe to call from any thread."""
        try:
            self._loop.call_soon_threadsafe(self._fan_out, record)
        except RuntimeError:
            # The loop has closed: the server is gone and nobody is watching.
            logger.debug("event %s after the event loop closed", record.kind)

    def _fan_out(self, record: EventRecord) -> None:
        for subscription in self._subscriptions:
            subscription.offer(record)

    @contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """A subscription for the duration of a ``with`` block; freed on exit."""
        subscription = Subscription()
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    @property
    def watcher_count(self) -> int:
        return len(self._subscriptions)
