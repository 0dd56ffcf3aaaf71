"""The one mapping from domain errors to gRPC status codes and session refusals.

Every servicer that catches a ``DragonError`` goes through this module, so that a
malformed update is INVALID_ARGUMENT, a foreign or stale lease FAILED_PRECONDITION,
an oversized update RESOURCE_EXHAUSTED, and so on, everywhere. The training session
never aborts the stream for a refused message: it answers with a ``Rejection`` that
carries the same numeric status code.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
from dragon.v1 import service_pb2, types_pb2

from dragon_server.errors import DragonError, ErrorKind

STATUS_FOR_KIND: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def status_code(kind: ErrorKind) -> grpc.StatusCode:
    """The gRPC status code of a domain error kind."""
    return STATUS_FOR_KIND[kind]


def numeric_code(code: grpc.StatusCode) -> int:
    """The google.rpc.Code number of a status code, as ``Rejection`` carries it."""
    number: int = code.value[0]
    return number


def reject_reason(reason: str) -> types_pb2.RejectReason.ValueType:
    """The proto ``RejectReason`` named by a domain reason such as "UNKNOWN_LEASE"."""
    if not reason:
        return types_pb2.REJECT_REASON_UNSPECIFIED
    return types_pb2.RejectReason.Value(f"REJECT_REASON_{reason}")


def rejection(
    lease_id: str,
    reason: types_pb2.RejectReason.ValueType,
    code: grpc.StatusCode,
    message: str,
) -> service_pb2.SessionResponse:
    """A session response refusing one message."""
    return service_pb2.SessionResponse(
        rejection=service_pb2.Rejection(
            lease_id=lease_id,
            reason=reason,
            message=message,
            status_code=numeric_code(code),
        )
    )


def rejection_for(exc: DragonError, lease_id: str = "") -> service_pb2.SessionResponse:
    """The session's refusal of a message that raised ``exc``."""
    return rejection(
        lease_id, reject_reason(exc.reason), status_code(exc.kind), str(exc)
    )


async def abort(
    context: grpc.aio.ServicerContext[object, object], exc: DragonError
) -> NoReturn:
    """End a call with the status code of ``exc`` and its message."""
    await context.abort(status_code(exc.kind), str(exc))
    raise AssertionError("context.abort returned")  # pragma: no cover
