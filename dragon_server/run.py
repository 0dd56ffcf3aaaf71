"""The training run: the facade the RPC layer calls.

A :class:`TrainingRun` owns one server home: the SQLite store, the token file and
the checkpoints. Every method is synchronous and thread-safe; the RPC layer calls
them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from dragon_server.settings import RunConfig
from forge.config import ModelConfig

logger = logging.getLogger(__name__)

ValueDtype = Literal["fp16", "bf16", "fp32"]


@dataclass(frozen=True)
class Challenge:
    """A proof-of-work challenge for registration."""

    challenge: bytes
    difficulty_bits: int
    expires_at: datetime


@dataclass(frozen=True)
class Registration:
    """The result of a registration; registering a key twice is not an error."""

    worker_id: str
    already_registered: bool


@dataclass(frozen=True)
class VersionRecord:
    """A published model version."""

    version: int
    created_at: datetime
    checkpoint_path: Path
    sha256: bytes
    size_bytes: int
    validation_loss: float
    update_count: int
    token_count: int


@dataclass(frozen=True)
class Recipe:
    """How a worker trains one lease; field names as in ``dragon.v1.Recipe``."""

    local_steps: int
    batch_size: int
    micro_batch_size: int
    learning_rate: float
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip_norm: float
    density: float
    value_dtype: ValueDtype
    seed: int


@dataclass(frozen=True)
class LeaseGrant:
    """A batch leased to one worker until ``deadline`` (UTC)."""

    lease_id: str
    batch_id: int
    model_version: int
    tokens: npt.NDArray[np.uint16]  # [S, L + 1]
    recipe: Recipe
    deadline: datetime
    heartbeat_interval_seconds: float


@dataclass(frozen=True)
class UpdateMeta:
    """What the worker declares about its update (``dragon.v1.UpdateEnd``)."""

    base_version: int
    sample_count: int
    token_count: int
    loss_before: float
    loss_after: float
    train_seconds: float
    sha256: bytes
    size_bytes: int


@dataclass(frozen=True)
class SubmitResult:
    """The acknowledgement of an update; ``duplicate`` when it was accepted before."""

    duplicate: bool


@dataclass(frozen=True)
class NetworkStats:
    """The network's figures; field names as in ``GetNetworkStatsResponse``."""

    worker_count: int
    active_worker_count: int
    latest_version: VersionRecord
    lease_count: int
    accepted_update_count: int
    rejected_update_count: int
    token_count: int
    uploaded_bytes: int
    dense_equivalent_bytes: int


@dataclass(frozen=True)
class WorkerStatsRecord:
    """One worker's contribution; field names as in ``dragon.v1.WorkerStats``."""

    worker_id: str
    worker_name: str
    registered_at: datetime
    accepted_update_count: int
    token_count: int
    uploaded_bytes: int
    reputation: float
    last_seen_at: datetime


@dataclass(frozen=True)
class EventRecord:
    """One event of the status stream.

    ``kind`` is a field name of the ``dragon.v1.Event`` oneof and ``payload`` a
    dict that ``json_format.ParseDict`` accepts for that message.
    """

    time: datetime
    kind: str
    payload: dict[str, Any]


EventListener = Callable[[EventRecord], None]


class TrainingRun:
    """One training run in a server home."""

    def __init__(self, home: Path, config: RunConfig) -> None:
        self.home = home
        self.config = config
        self.model_config: ModelConfig = config.model_config

    @classmethod
    def open(
        cls, home: Path, overrides: Mapping[str, object] | None = None
    ) -> TrainingRun:
        """Open an initialised home, recovering from a crash if there was one."""
        config = RunConfig.load(home).replace(**dict(overrides or {}))
        return cls(home, config)

    def close(self) -> None:
        """Close the store; the run must not be used afterwards."""
        raise NotImplementedError

    # Admission.

    def challenge(self) -> Challenge:
        """A fresh registration challenge."""
        raise NotImplementedError

    def register(
        self, api_key: str, worker_name: str, challenge: bytes, nonce: int
    ) -> Registration:
        """Register a worker's key after checking its proof of work."""
        raise NotImplementedError

    def authenticate(self, api_key: str) -> str:
        """The id of the worker holding ``api_key``; raises ``Unauthenticated``."""
        raise NotImplementedError

    # Versions.

    def latest_version(self) -> VersionRecord:
        """The newest published version."""
        raise NotImplementedError

    def version(self, v: int) -> VersionRecord:
        """A published version; raises ``VersionNotFound``."""
        raise NotImplementedError

    # Sessions and leases.

    def open_session(self, worker_id: str, hardware: Mapping[str, object]) -> None:
        """Record that a worker opened a training session."""
        raise NotImplementedError

    def close_session(self, worker_id: str, reason: str) -> None:
        """Record that a worker's training session ended."""
        raise NotImplementedError

    def grant_lease(self, worker_id: str) -> LeaseGrant | None:
        """Lease a free batch, or None when none is free; raises ``Draining``."""
        raise NotImplementedError

    def heartbeat(
        self,
        worker_id: str,
        lease_id: str,
        steps_done: int,
        steps_total: int,
        loss: float,
    ) -> datetime:
        """Extend a lease; returns its new deadline."""
        raise NotImplementedError

    def release_lease(self, worker_id: str, lease_id: str, reason: str) -> None:
        """Give a lease back so that its batch returns to the queue at once."""
        raise NotImplementedError

    def submit_update(
        self, worker_id: str, lease_id: str, frame: bytes, meta: UpdateMeta
    ) -> SubmitResult:
        """Validate and durably store an update; the return is the acknowledgement."""
        raise NotImplementedError

    def expire_leases(self, now: datetime | None = None) -> int:
        """Return leases past their deadline to the queue; how many expired."""
        raise NotImplementedError

    # Aggregation.

    def aggregation_due(self, now: datetime | None = None) -> bool:
        """True when enough updates wait, or the interval passed with at least one."""
        raise NotImplementedError

    def aggregate(self) -> VersionRecord | None:
        """Combine the pending updates into a new version; None when none wait."""
        raise NotImplementedError

    # Draining.

    def begin_drain(self) -> None:
        """Stop granting leases; updates for leases already granted are accepted."""
        raise NotImplementedError

    @property
    def draining(self) -> bool:
        """True once :meth:`begin_drain` was called."""
        raise NotImplementedError

    # Stats and events.

    def network_stats(self) -> NetworkStats:
        """The network's figures."""
        raise NotImplementedError

    def worker_stats(self, worker_id: str) -> WorkerStatsRecord:
        """One worker's contribution; raises ``WorkerNotFound``."""
        raise NotImplementedError

    def leaderboard(self, limit: int) -> list[WorkerStatsRecord]:
        """Workers ranked by tokens trained, best first."""
        raise NotImplementedError

    def recent_events(self, limit: int) -> list[EventRecord]:
        """The last ``limit`` events, oldest first."""
        raise NotImplementedError

    def add_listener(self, fn: EventListener) -> None:
        """Call ``fn`` with every event after it is committed."""
        raise NotImplementedError
