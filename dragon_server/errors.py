"""The aggregator's domain errors.

Every error the domain raises is a :class:`DragonError`. Each carries an
:class:`ErrorKind` (the status class the RPC layer maps to a gRPC code) and a
``reason``: the name of a ``dragon.v1.RejectReason`` without its prefix, or ""
when the error is not a refusal of a session message.

    DragonError
    ├── Unauthenticated, InvalidKey, ProofOfWorkFailed, ChallengeExpired
    ├── WorkerNotFound, VersionNotFound
    ├── LeaseNotFound, LeaseExpired, NotLeaseHolder, TooStale
    ├── MalformedUpdate, DigestMismatch, UpdateTooLarge, NonFiniteUpdate, NoSamples
    ├── Draining, AggregationRefused
    └── ConfigInvalid, DataError
"""

# The agreed names read as outcomes (LeaseExpired, TooStale), not as "...Error".
# ruff: noqa: N818

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """The status class of a domain error; one gRPC status code each."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    NOT_FOUND = "NOT_FOUND"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"


class DragonError(Exception):
    """Base of every domain error; ``kind`` and ``reason`` say how to report it."""

    kind: ErrorKind = ErrorKind.FAILED_PRECONDITION
    reason: str = ""


class Unauthenticated(DragonError):
    """The API key is missing or not registered."""

    kind = ErrorKind.UNAUTHENTICATED


class InvalidKey(DragonError):
    """The API key is not 64 lowercase hex characters."""

    kind = ErrorKind.INVALID_ARGUMENT


class ProofOfWorkFailed(DragonError):
    """The nonce does not solve the registration challenge."""

    kind = ErrorKind.PERMISSION_DENIED


class ChallengeExpired(DragonError):
    """The registration challenge is unknown, used or past its expiry."""

    kind = ErrorKind.FAILED_PRECONDITION


class WorkerNotFound(DragonError):
    """No registered worker has this id."""

    kind = ErrorKind.NOT_FOUND


class VersionNotFound(DragonError):
    """No published model version has this number."""

    kind = ErrorKind.NOT_FOUND


class LeaseNotFound(DragonError):
    """The lease id is not known."""

    kind = ErrorKind.FAILED_PRECONDITION
    reason = "UNKNOWN_LEASE"


class LeaseExpired(DragonError):
    """The lease passed its deadline (or was released) and went back to the queue."""

    kind = ErrorKind.FAILED_PRECONDITION
    reason = "LEASE_EXPIRED"


class NotLeaseHolder(DragonError):
    """The lease was granted to another worker."""

    kind = ErrorKind.FAILED_PRECONDITION
    reason = "NOT_LEASE_HOLDER"


class TooStale(DragonError):
    """The update starts from a version older than the staleness bound allows."""

    kind = ErrorKind.FAILED_PRECONDITION
    reason = "TOO_STALE"


class MalformedUpdate(DragonError):
    """The update frame or its metadata is malformed."""

    kind = ErrorKind.INVALID_ARGUMENT
    reason = "MALFORMED_UPDATE"


class DigestMismatch(DragonError):
    """The frame's SHA-256 or size differs from what the worker declared."""

    kind = ErrorKind.INVALID_ARGUMENT
    reason = "DIGEST_MISMATCH"


class UpdateTooLarge(DragonError):
    """The frame is larger than the server accepts."""

    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "TOO_LARGE"


class NonFiniteUpdate(DragonError):
    """The update holds NaN or infinite values."""

    kind = ErrorKind.INVALID_ARGUMENT
    reason = "NON_FINITE"


class NoSamples(DragonError):
    """The update claims no training samples."""

    kind = ErrorKind.INVALID_ARGUMENT
    reason = "NO_SAMPLES"


class Draining(DragonError):
    """The server is shutting down and grants no more leases."""

    kind = ErrorKind.UNAVAILABLE
    reason = "DRAINING"


class AggregationRefused(DragonError):
    """The pending updates cannot be combined (e.g. their total weight is zero)."""

    kind = ErrorKind.FAILED_PRECONDITION


class ConfigInvalid(DragonError):
    """The run's config or the server home is invalid; the message names the field."""

    kind = ErrorKind.INVALID_ARGUMENT


class DataError(DragonError):
    """A training data source is missing or malformed; the message names the file."""

    kind = ErrorKind.INVALID_ARGUMENT
