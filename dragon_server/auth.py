"""Bearer-key authentication for every RPC but registration, health and reflection.

The interceptor reads ``authorization: Bearer <key>``, resolves the key to a worker
id through ``TrainingRun.authenticate`` (remembered in memory by the key's SHA-256,
so the database is asked once per key), and publishes the id in a context variable
that the servicers read with ``current_worker_id()``. A missing or unknown key ends
the call with UNAUTHENTICATED before the servicer runs.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from dragon_server.errors import DragonError, ErrorKind
from dragon_server.run import TrainingRun
from forge.pow import key_hash

logger = logging.getLogger(__name__)

# Method prefixes that need no key: a worker registers before it has one, and the
# health and reflection services serve load balancers and grpcurl.
OPEN_PREFIXES = (
    "/dragon.v1.RegistrationService/",
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
)

_worker_id: contextvars.ContextVar[str] = contextvars.ContextVar("dragon_worker_id")


class AnonymousCallError(RuntimeError):
    """A servicer asked for the caller's worker id on a call that carries none."""


def current_worker_id() -> str:
    """The worker id of the authenticated caller of the current RPC."""
    try:
        return _worker_id.get()
    except LookupError:
        raise AnonymousCallError("no authenticated worker on this call") from None


def bearer_key(metadata: Any) -> str | None:
    """The key of an ``authorization: Bearer <key>`` entry, or None."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class KeyCache:
    """Worker ids by key hash, so that each key costs one database lookup."""

    def __init__(self, run: TrainingRun) -> None:
        self._run = run
        self._ids: dict[bytes, str] = {}
        self._lock = threading.Lock()

    async def worker_id(self, api_key: str) -> str:
        """The worker id of a key; raises the run's ``Unauthenticated`` if unknown."""
        digest = key_hash(api_key)
        with self._lock:
            known = self._ids.get(digest)
        if known is not None:
            return known
        worker_id = await asyncio.to_thread(self._run.authenticate, api_key)
        with self._lock:
            self._ids[digest] = worker_id
        return worker_id


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls without a registered key; names the caller for servicers."""

    def __init__(self, run: TrainingRun) -> None:
        self._keys = KeyCache(run)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)

        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        api_key = bearer_key(handler_call_details.invocation_metadata)
        if api_key is None:
            return _denying(handler, "missing 'authorization: Bearer <key>' metadata")
        try:
            worker_id = await self._keys.worker_id(api_key)
        except DragonError as exc:
            if exc.kind is not ErrorKind.UNAUTHENTICATED:
                raise
            logger.info("refused %s: %s", method, exc)
            return _denying(handler, f"unknown worker key: {exc}")

        # The handler runs later in this same task, so it sees this value.
        _worker_id.set(worker_id)
        return handler


def _denying(handler: Any, message: str) -> Any:
    """A handler of the same shape as ``handler`` that ends with UNAUTHENTICATED."""
    code = grpc.StatusCode.UNAUTHENTICATED

    async def unary(
        request: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        await context.abort(code, message)

    async def streaming(
        request: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield None  # pragma: no cover - abort raises

    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **options)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **options)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **options)
    return grpc.unary_unary_rpc_method_handler(unary, **options)
