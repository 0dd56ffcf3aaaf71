"""The training run: the facade the RPC layer calls.

A :class:`TrainingRun` owns one server home: the SQLite store, the token file and
the checkpoints. Every method is synchronous and thread-safe; the RPC layer calls
them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import logging
import math
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from dragon_server.aggregation import (
    RobustRule,
    WeightedUpdate,
    apply_round,
    combine,
    make_optimizer,
    update_weight,
)
from dragon_server.checkpoints import (
    WrittenCheckpoint,
    load_optimizer_state,
    record_version,
    write_version,
)
from dragon_server.checkpoints import recover as checkpoints_recover
from dragon_server.data import DATA_DIR, BatchRange, TokenData
from dragon_server.errors import (
    AggregationRefused,
    ChallengeExpired,
    ConfigInvalid,
    DigestMismatch,
    DragonError,
    Draining,
    InvalidKey,
    LeaseExpired,
    LeaseNotFound,
    MalformedUpdate,
    NonFiniteUpdate,
    NoSamples,
    NotLeaseHolder,
    ProofOfWorkFailed,
    TooStale,
    Unauthenticated,
    UpdateTooLarge,
    VersionNotFound,
    WorkerNotFound,
)
from dragon_server.settings import RunConfig
from dragon_server.store import Row, Store
from forge import codec, pow, safefile
from forge.checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint
from forge.codec import SparseUpdate, decode_update, max_frame_bytes
from forge.config import ModelConfig
from forge.model import state_layout
from forge.train import TrainRecipe, evaluate

logger = logging.getLogger(__name__)

UPDATES_DIR = "updates"
# Decoding allows a little more density than the recipe asks: k is rounded up
# per tensor, and the density crosses the wire as a float32.
DENSITY_SLACK = 1.5
# Fields that shape the dataset or the model: changing them needs a new home.
FIXED_AT_INIT = (
    "model",
    "seed",
    "sequence_length",
    "sequences_per_batch",
    "validation_fraction",
    "max_corpus_bytes",
)
MAX_NAME_CHARS = 64
_KEY = re.compile(r"[0-9a-f]{64}")

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

    def train_recipe(self) -> TrainRecipe:
        """The part of the recipe that local training reads."""
        return TrainRecipe(
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            micro_batch_size=self.micro_batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            beta1=self.beta1,
            beta2=self.beta2,
            grad_clip_norm=self.grad_clip_norm,
            seed=self.seed,
        )


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


class RunState(enum.Enum):
    """Where a :class:`TrainingRun` is in its life."""

    SERVING = "serving"  # granting leases and accepting updates
    DRAINING = "draining"  # accepting updates for granted leases, granting none
    CLOSED = "closed"  # the store is closed


class TrainingRun:
    """One training run in a server home."""

    def __init__(self, home: Path, config: RunConfig, store: Store) -> None:
        self.home = home
        self.config = config
        self.model_config: ModelConfig = config.model_config
        self._store = store
        self._tokens = TokenData(home / DATA_DIR, config.sequence_length)
        self._listeners: list[EventListener] = []
        self.state = RunState.SERVING
        self._aggregating = threading.Lock()
        self._rule = RobustRule.from_config(config)
        self._keys: dict[bytes, str] = {}  # key hash -> worker id, once verified

        latest = self.latest_version()
        path = latest.checkpoint_path
        if not path.is_file() or path.stat().st_size != latest.size_bytes:
            raise ConfigInvalid(f"{path} is missing or damaged: the home is broken")
        # Names and shapes of the model's state: what an update may hold.
        self.spec: dict[str, tuple[int, ...]] = dict(
            state_layout(self.model_config).shapes
        )
        self.max_density = min(1.0, config.density * DENSITY_SLACK)
        self.max_update_bytes = config.max_update_bytes or max_frame_bytes(
            self.spec, self.max_density
        )

    @classmethod
    def open(
        cls, home: Path, overrides: Mapping[str, object] | None = None
    ) -> TrainingRun:
        """Open an initialised home, recovering from a crash if there was one.

        Recovery removes temp files, checkpoint files of versions without a row
        and update frames without a row; pending updates stay pending.
        """
        stored = RunConfig.load(home)
        config = stored.replace(**dict(overrides or {}))
        for name in FIXED_AT_INIT:
            if getattr(config, name) != getattr(stored, name):
                raise ConfigInvalid(f"{name} is fixed when the home is initialised")
        store = Store.open(home)
        try:
            _recover(home, store)
            with store.write() as conn:
                # Sessions do not survive a restart.
                conn.execute("UPDATE workers SET session_open = 0")
            return cls(home, config, store)
        except BaseException:
            store.close()
            raise

    def close(self) -> None:
        """Close the store; the run must not be used afterwards."""
        self.state = RunState.CLOSED
        self._store.close()

    # Admission.

    def challenge(self) -> Challenge:
        """A fresh registration challenge."""
        now = time.time()
        challenge = secrets.token_bytes(16)
        expires = now + self.config.challenge_seconds
        with self._store.write() as conn:
            conn.execute("DELETE FROM challenges WHERE expires_at < ?", (now,))
            conn.execute(
                "INSERT INTO challenges (challenge, expires_at) VALUES (?, ?)",
                (challenge, expires),
            )
        return Challenge(challenge, self.config.pow_difficulty_bits, _utc(expires))

    def register(
        self, api_key: str, worker_name: str, challenge: bytes, nonce: int
    ) -> Registration:
        """Register a worker's key after checking its proof of work.

        Registering a key again is idempotent and asks no new work.
        """
        if not _KEY.fullmatch(api_key):
            raise InvalidKey("the API key must be 64 lowercase hex characters")
        digest = pow.key_hash(api_key)
        worker_id = _worker_id(digest)
        # Names end up on operators' terminals: keep printable characters only.
        printable = "".join(ch for ch in worker_name if ch.isprintable())
        name = printable.strip()[:MAX_NAME_CHARS] or worker_id
        now = time.time()
        with self._store.write() as conn:
            if conn.execute(
                "SELECT 1 FROM workers WHERE id = ?", (worker_id,)
            ).fetchone():
                return Registration(worker_id, already_registered=True)
            self._spend_challenge(conn, api_key, challenge, nonce, now)
            conn.execute(
                "INSERT INTO workers (id, key_hash, name, registered_at, last_seen_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (worker_id, digest, name, now, now),
            )
        logger.info("worker %s registered as %r", worker_id, name)
        return Registration(worker_id, already_registered=False)

    def _spend_challenge(
        self,
        conn: sqlite3.Connection,
        api_key: str,
        challenge: bytes,
        nonce: int,
        now: float,
    ) -> None:
        bits = self.config.pow_difficulty_bits
        if bits == 0:
            return
        row = conn.execute(
            "SELECT expires_at, used FROM challenges WHERE challenge = ?", (challenge,)
        ).fetchone()
        if row is None or row[1] or row[0] < now:
            raise ChallengeExpired("the challenge is unknown, used or expired")
        if not pow.check(challenge, api_key, nonce, bits):
            raise ProofOfWorkFailed(
                f"the nonce does not solve the {bits}-bit challenge"
            )
        conn.execute("UPDATE challenges SET used = 1 WHERE challenge = ?", (challenge,))

    def authenticate(self, api_key: str) -> str:
        """The id of the worker holding ``api_key``; raises ``Unauthenticated``."""
        if not _KEY.fullmatch(api_key):
            raise Unauthenticated("missing or malformed API key")
        digest = pow.key_hash(api_key)
        known = self._keys.get(digest)
        if known is not None:
            return known
        row = self._store.one("SELECT id FROM workers WHERE key_hash = ?", (digest,))
        if row is None:
            raise Unauthenticated("this API key is not registered")
        self._keys[digest] = row["id"]
        return str(row["id"])

    # Versions.

    def latest_version(self) -> VersionRecord:
        """The newest published version."""
        row = self._store.one("SELECT * FROM versions ORDER BY version DESC LIMIT 1")
        if row is None:
            raise VersionNotFound("no version is published: the home is incomplete")
        return self._version_record(row)

    def version(self, v: int) -> VersionRecord:
        """A published version; raises ``VersionNotFound``."""
        row = self._store.one("SELECT * FROM versions WHERE version = ?", (v,))
        if row is None:
            raise VersionNotFound(f"version {v} is not published")
        return self._version_record(row)

    def _version_record(self, row: Row) -> VersionRecord:
        loss = row["validation_loss"]
        return VersionRecord(
            version=row["version"],
            created_at=_utc(row["created_at"]),
            checkpoint_path=self.home / row["path"],
            sha256=bytes(row["sha256"]),
            size_bytes=row["size"],
            validation_loss=math.nan if loss is None else float(loss),
            update_count=row["update_count"],
            token_count=row["token_count"],
        )

    # Sessions and leases.

    def open_session(self, worker_id: str, hardware: Mapping[str, object]) -> None:
        """Record that a worker opened a training session.

        ``hardware`` holds ``dragon.v1.Hardware`` fields by their proto names.
        """
        events: list[EventRecord] = []
        with self._store.write() as conn:
            cursor = conn.execute(
                "UPDATE workers SET session_open = session_open + 1, hardware = ?, "
                "last_seen_at = ? WHERE id = ?",
                (json.dumps(dict(hardware), default=str), time.time(), worker_id),
            )
            if cursor.rowcount == 0:
                raise WorkerNotFound(f"no worker {worker_id}")
            payload = {"worker_id": worker_id, "hardware": dict(hardware)}
            events.append(_event(conn, "worker_joined", payload))
        self._notify(events)
        logger.info("worker %s connected", worker_id)

    def close_session(self, worker_id: str, reason: str) -> None:
        """Record that a worker's training session ended."""
        events: list[EventRecord] = []
        with self._store.write() as conn:
            cursor = conn.execute(
                "UPDATE workers SET session_open = MAX(session_open - 1, 0), "
                "last_seen_at = ? WHERE id = ?",
                (time.time(), worker_id),
            )
            if cursor.rowcount == 0:
                raise WorkerNotFound(f"no worker {worker_id}")
            payload = {"worker_id": worker_id, "reason": reason}
            events.append(_event(conn, "worker_left", payload))
        self._notify(events)
        logger.info("worker %s disconnected: %s", worker_id, reason)

    def grant_lease(self, worker_id: str) -> LeaseGrant | None:
        """Lease a free batch, or None when none is free; raises ``Draining``.

        A worker that asks while it holds ``max_leases_per_worker`` leases has
        abandoned the oldest one (a daemon trains one lease at a time and uploads
        it before asking again; a killed daemon forgets its lease): that one goes
        back to the queue, so a restarted worker is never locked out and no
        worker holds more than the cap.

        Train batches go round-robin: the free batch trained the fewest times
        first, so every batch is trained once before any is trained again.
        """
        if self.state is not RunState.SERVING:
            raise Draining("the server is draining and grants no more leases")
        now = time.time()
        self.expire_leases(_utc(now))
        lease_id = secrets.token_hex(16)
        deadline = now + self.config.lease_seconds
        with self._store.write() as conn:
            if not conn.execute(
                "SELECT 1 FROM workers WHERE id = ?", (worker_id,)
            ).fetchone():
                raise WorkerNotFound(f"no worker {worker_id}")
            self._reclaim_over_cap(conn, worker_id, now)
            batch = conn.execute(
                "SELECT id, first_sequence, count FROM batches AS b "
                "WHERE split = 'train' AND NOT EXISTS (SELECT 1 FROM leases AS l "
                "WHERE l.batch_id = b.id AND l.state = 'granted') "
                "ORDER BY trained_count, id LIMIT 1"
            ).fetchone()
            if batch is None:
                return None
            version = conn.execute("SELECT MAX(version) FROM versions").fetchone()[0]
            conn.execute(
                "INSERT INTO leases (id, batch_id, worker_id, model_version, "
                "granted_at, deadline, state) VALUES (?, ?, ?, ?, ?, ?, 'granted')",
                (lease_id, batch[0], worker_id, version, now, deadline),
            )
            conn.execute(
                "UPDATE workers SET last_seen_at = ? WHERE id = ?", (now, worker_id)
            )
        logger.info(
            "lease %s: batch %d at version %d to worker %s",
            lease_id,
            batch[0],
            version,
            worker_id,
        )
        return LeaseGrant(
            lease_id=lease_id,
            batch_id=batch[0],
            model_version=version,
            tokens=self._tokens.batch(batch[1], batch[2]),
            recipe=self._recipe(lease_id),
            deadline=_utc(deadline),
            heartbeat_interval_seconds=self.config.heartbeat_seconds,
        )

    def _reclaim_over_cap(
        self, conn: sqlite3.Connection, worker_id: str, now: float
    ) -> None:
        # One worker must not hoard the queue: below the cap it keeps what it
        # holds; at the cap its oldest leases expire so that the new one fits.
        cap = self.config.max_leases_per_worker
        if cap == 0:
            return
        oldest = conn.execute(
            "SELECT id FROM leases WHERE worker_id = ? AND state = 'granted' "
            "ORDER BY granted_at DESC, rowid DESC LIMIT -1 OFFSET ?",
            (worker_id, cap - 1),
        ).fetchall()
        for (lease_id,) in oldest:
            conn.execute(
                "UPDATE leases SET state = 'expired', ended_at = ? WHERE id = ?",
                (now, lease_id),
            )
            logger.info(
                "lease %s of worker %s went back to the queue: the worker asked "
                "for another at its cap of %d",
                lease_id,
                worker_id,
                cap,
            )

    def _recipe(self, lease_id: str) -> Recipe:
        c = self.config
        # A seed per lease, derived from the run's seed: reproducible, yet two
        # leases of one batch do not share their randomness.
        digest = hashlib.sha256(f"{c.seed}:{lease_id}".encode()).digest()
        return Recipe(
            local_steps=c.local_steps,
            batch_size=c.batch_size,
            micro_batch_size=c.micro_batch_size,
            learning_rate=c.learning_rate,
            weight_decay=c.weight_decay,
            beta1=c.beta1,
            beta2=c.beta2,
            grad_clip_norm=c.grad_clip_norm,
            density=c.density,
            value_dtype=c.value_dtype,
            seed=int.from_bytes(digest[:8], "little") >> 1,
        )

    def _held_lease(
        self, conn: sqlite3.Connection, worker_id: str, lease_id: str
    ) -> tuple[str, float]:
        """(state, deadline) of a lease the worker holds."""
        row = conn.execute(
            "SELECT state, deadline, worker_id FROM leases WHERE id = ?",
            (lease_id,),
        ).fetchone()
        if row is None:
            raise LeaseNotFound(f"lease {lease_id!r} is not known")
        if row[2] != worker_id:
            raise NotLeaseHolder(f"lease {lease_id} belongs to another worker")
        return str(row[0]), float(row[1])

    def heartbeat(
        self,
        worker_id: str,
        lease_id: str,
        steps_done: int,
        steps_total: int,
        loss: float,
    ) -> datetime:
        """Extend a lease; returns its new deadline."""
        now = time.time()
        deadline = now + self.config.lease_seconds
        with self._store.write() as conn:
            state, old_deadline = self._held_lease(conn, worker_id, lease_id)
            if state != "granted" or old_deadline < now:
                raise LeaseExpired(f"lease {lease_id} is {_lease_word(state)}")
            conn.execute(
                "UPDATE leases SET deadline = ?, steps_done = ?, steps_total = ?, "
                "loss = ? WHERE id = ?",
                (
                    deadline,
                    steps_done,
                    steps_total,
                    loss if math.isfinite(loss) else None,
                    lease_id,
                ),
            )
            conn.execute(
                "UPDATE workers SET last_seen_at = ? WHERE id = ?", (now, worker_id)
            )
        logger.debug("lease %s: step %d/%d", lease_id, steps_done, steps_total)
        return _utc(deadline)

    def release_lease(self, worker_id: str, lease_id: str, reason: str) -> None:
        """Give a lease back so that its batch returns to the queue at once.

        ``reason`` starts with a ``ReleaseReason`` name ("failed", "shutdown"),
        maybe followed by words; a lease released as failed is recorded so.
        Releasing a lease that already ended changes nothing.
        """
        state_after = "failed" if reason.upper().startswith("FAIL") else "released"
        with self._store.write() as conn:
            state, _ = self._held_lease(conn, worker_id, lease_id)
            if state != "granted":
                return
            conn.execute(
                "UPDATE leases SET state = ?, ended_at = ? WHERE id = ?",
                (state_after, time.time(), lease_id),
            )
        logger.info("lease %s %s by its worker: %s", lease_id, state_after, reason)

    def expire_leases(self, now: datetime | None = None) -> int:
        """Return leases past their deadline to the queue; how many expired."""
        moment = (now or datetime.now(UTC)).timestamp()
        with self._store.write() as conn:
            cursor = conn.execute(
                "UPDATE leases SET state = 'expired', ended_at = ? "
                "WHERE state = 'granted' AND deadline < ?",
                (moment, moment),
            )
        if cursor.rowcount:
            logger.info("%d leases expired", cursor.rowcount)
        return int(cursor.rowcount)

    # Updates.

    def submit_update(
        self, worker_id: str, lease_id: str, frame: bytes, meta: UpdateMeta
    ) -> SubmitResult:
        """Validate and durably store an update; the return is the acknowledgement.

        Checks, in order: the lease exists, is the worker's and has not expired;
        a repeat of an accepted update is acknowledged as a duplicate; then the
        size, digest, staleness, sample count and the frame itself. An accepted
        frame is fsync'd under ``updates/`` and its row committed before return.
        """
        try:
            return self._submit(worker_id, lease_id, frame, meta)
        except DragonError as exc:
            self._record_rejection(worker_id, lease_id, exc)
            raise

    def _submit(
        self, worker_id: str, lease_id: str, frame: bytes, meta: UpdateMeta
    ) -> SubmitResult:
        with self._store.read() as conn:
            state, deadline = self._held_lease(conn, worker_id, lease_id)
        if state == "accepted":
            return SubmitResult(duplicate=True)
        if state != "granted" or deadline < time.time():
            raise LeaseExpired(f"lease {lease_id} is {_lease_word(state)}")
        self._check_meta(frame, meta)
        update = self._decode(frame)
        dense_bytes = sum(4 * math.prod(t.shape) for t in update.tensors.values())
        return self._accept(worker_id, lease_id, frame, meta, dense_bytes)

    def _check_meta(self, frame: bytes, meta: UpdateMeta) -> None:
        if len(frame) > self.max_update_bytes:
            raise UpdateTooLarge(
                f"the update is {len(frame)} bytes; "
                f"the limit is {self.max_update_bytes}"
            )
        if meta.size_bytes != len(frame):
            raise DigestMismatch(
                f"{len(frame)} bytes arrived but {meta.size_bytes} were declared"
            )
        if hashlib.sha256(frame).digest() != meta.sha256:
            raise DigestMismatch(
                "the SHA-256 of the frame differs from the declared one"
            )
        latest = self._store.scalar("SELECT MAX(version) FROM versions")
        if meta.base_version > latest:
            raise MalformedUpdate(f"base version {meta.base_version} is not published")
        if latest - meta.base_version > self.config.max_staleness:
            raise TooStale(
                f"the update starts from version {meta.base_version}; the latest is "
                f"{latest} and at most {self.config.max_staleness} behind is accepted"
            )
        if meta.sample_count == 0:
            raise NoSamples("the update claims no training samples")
        if not (math.isfinite(meta.loss_before) and math.isfinite(meta.loss_after)):
            raise NonFiniteUpdate("the declared training losses are not finite")
        if meta.train_seconds < 0 or meta.token_count < 0 or meta.sample_count < 0:
            raise MalformedUpdate("counts and durations must not be negative")

    def _decode(self, frame: bytes) -> SparseUpdate:
        try:
            return codec.decode_update(frame, self.spec, max_density=self.max_density)
        except codec.NonFiniteValue as exc:
            raise NonFiniteUpdate(f"the update holds non-finite values: {exc}") from exc
        except codec.FrameTooLarge as exc:
            raise UpdateTooLarge(str(exc)) from exc
        except codec.CodecError as exc:
            raise MalformedUpdate(f"the update frame is malformed: {exc}") from exc

    def _accept(
        self,
        worker_id: str,
        lease_id: str,
        frame: bytes,
        meta: UpdateMeta,
        dense_bytes: int,
    ) -> SubmitResult:
        path = self.home / UPDATES_DIR / f"{lease_id}.zst"
        now = time.time()
        events: list[EventRecord] = []
        written = False
        try:
            with self._store.write() as conn:
                # Checked again under the write lock: a concurrent upload for the
                # same lease may have been accepted since the first look.
                state, deadline = self._held_lease(conn, worker_id, lease_id)
                if state == "accepted":
                    return SubmitResult(duplicate=True)
                if state != "granted" or deadline < now:
                    raise LeaseExpired(f"lease {lease_id} is {_lease_word(state)}")
                path.parent.mkdir(exist_ok=True)
                safefile.write_atomic(path, frame)
                written = True
                self._record_accepted(
                    conn, worker_id, lease_id, path, meta, dense_bytes
                )
                payload = {
                    "worker_id": worker_id,
                    "lease_id": lease_id,
                    "size_bytes": len(frame),
                    "loss_before": meta.loss_before,
                    "loss_after": meta.loss_after,
                }
                events.append(_event(conn, "update_accepted", payload))
        except BaseException:
            if written:
                path.unlink(missing_ok=True)
            raise
        self._notify(events)
        logger.info(
            "update for lease %s accepted from worker %s (%d bytes, loss %.4f -> %.4f)",
            lease_id,
            worker_id,
            len(frame),
            meta.loss_before,
            meta.loss_after,
        )
        return SubmitResult(duplicate=False)

    def _record_accepted(
        self,
        conn: sqlite3.Connection,
        worker_id: str,
        lease_id: str,
        path: Path,
        meta: UpdateMeta,
        dense_bytes: int,
    ) -> None:
        now = time.time()
        # Tokens count towards the leaderboard: no more than the recipe trains.
        c = self.config
        tokens = min(meta.token_count, c.local_steps * c.batch_size * c.sequence_length)
        conn.execute(
            "INSERT INTO updates (lease_id, worker_id, base_version, path, size, "
            "sha256, samples, tokens, loss_before, loss_after, train_seconds, "
            "dense_bytes, received_at, state) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending')",
            (
                lease_id,
                worker_id,
                meta.base_version,
                str(path.relative_to(self.home)),
                meta.size_bytes,
                meta.sha256,
                meta.sample_count,
                tokens,
                meta.loss_before,
                meta.loss_after,
                meta.train_seconds,
                dense_bytes,
                now,
            ),
        )
        conn.execute(
            "UPDATE leases SET state = 'accepted', ended_at = ? WHERE id = ?",
            (now, lease_id),
        )
        conn.execute(
            "UPDATE batches SET trained_count = trained_count + 1 "
            "WHERE id = (SELECT batch_id FROM leases WHERE id = ?)",
            (lease_id,),
        )
        conn.execute(
            "UPDATE workers SET accepted_updates = accepted_updates + 1, "
            "token_count = token_count + ?, uploaded_bytes = uploaded_bytes + ?, "
            "last_seen_at = ? WHERE id = ?",
            (tokens, meta.size_bytes, now, worker_id),
        )

    def _record_rejection(
        self, worker_id: str, lease_id: str, exc: DragonError
    ) -> None:
        events: list[EventRecord] = []
        reason = (
            f"REJECT_REASON_{exc.reason}" if exc.reason else "REJECT_REASON_PROTOCOL"
        )
        with self._store.write() as conn:
            conn.execute(
                "UPDATE workers SET rejected_updates = rejected_updates + 1 "
                "WHERE id = ?",
                (worker_id,),
            )
            payload = {
                "worker_id": worker_id,
                "lease_id": lease_id,
                "reason": reason,
                "message": str(exc),
            }
            events.append(_event(conn, "update_rejected", payload))
        self._notify(events)
        logger.info(
            "update for lease %s from %s rejected: %s", lease_id, worker_id, exc
        )

    # Aggregation.

    def aggregation_due(self, now: datetime | None = None) -> bool:
        """True when enough updates wait, or the interval passed with at least one.

        The interval counts from the oldest pending update, so an update waits at
        most ``aggregation_interval_seconds`` for company.
        """
        row = self._store.one(
            "SELECT COUNT(*) AS n, MIN(received_at) AS first FROM updates "
            "WHERE state = 'pending'"
        )
        if row is None or row["n"] == 0:
            return False
        if row["n"] >= self.config.min_updates:
            return True
        moment = (now or datetime.now(UTC)).timestamp()
        return bool(moment - row["first"] >= self.config.aggregation_interval_seconds)

    def aggregate(self) -> VersionRecord | None:
        """Combine the pending updates into a new version; None when none wait.

        The checkpoint is written (temp, fsync, rename) before one transaction
        inserts the version row and marks the updates applied, so a crash leaves
        the old version or the new one. Heavy: call it off the event loop.
        """
        with self._aggregating:
            started = time.monotonic()
            pending = self._store.query(
                "SELECT u.*, w.reputation FROM updates AS u "
                "JOIN workers AS w ON w.id = u.worker_id "
                "WHERE u.state = 'pending' ORDER BY u.id"
            )
            if not pending:
                return None
            latest = self.latest_version()
            used: list[tuple[Row, float]] = []
            unusable: list[int] = []
            updates = self._round(pending, latest.version, used, unusable)
            try:
                combined = combine(updates, self.spec, self._rule)
            except AggregationRefused as exc:
                logger.warning("aggregation refused, updates discarded: %s", exc)
                self._discard([row["id"] for row in pending])
                return None
            tensors, optimizer = self._step(latest, combined)
            loss = self._validation_loss(tensors, latest.version + 1)
            written = write_version(
                self.home, latest.version + 1, tensors, self.model_config, optimizer
            )
            record = self._publish(written, loss, used, unusable, started)
        logger.info(
            "version %d published from %d updates, validation loss %.4f",
            record.version,
            record.update_count,
            record.validation_loss,
        )
        return record

    def _round(
        self,
        pending: list[Row],
        latest: int,
        used: list[tuple[Row, float]],
        unusable: list[int],
    ) -> Iterator[WeightedUpdate]:
        """Decode and weigh the pending frames one at a time.

        Appends each update's row and weight to ``used``, and the ids of frames
        that no longer decode to ``unusable``.
        """
        samples_cap = self.config.local_steps * self.config.batch_size
        for row in pending:
            try:
                frame = (self.home / row["path"]).read_bytes()
                update = decode_update(frame, self.spec, max_density=self.max_density)
            except (OSError, codec.CodecError) as exc:
                # Frames were validated on arrival; one that fails now was damaged
                # on disk and is set aside rather than blocking every round.
                logger.error("update %d is unreadable, discarded: %s", row["id"], exc)
                unusable.append(row["id"])
                continue
            # A worker cannot claim more samples than its recipe trains.
            samples = min(row["samples"], samples_cap)
            weight = update_weight(
                samples, latest - row["base_version"], row["reputation"]
            )
            used.append((row, weight))
            yield WeightedUpdate(update, weight)

    def _step(
        self, latest: VersionRecord, combined: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The next weights and optimizer state from the latest version's."""
        tensors = load_checkpoint(latest.checkpoint_path).tensors
        optimizer = make_optimizer(self.config)
        row = self._store.one(
            "SELECT optimizer_path FROM versions WHERE version = ?", (latest.version,)
        )
        if row is not None and row["optimizer_path"]:
            optimizer.load_state_dict(
                load_optimizer_state(self.home / row["optimizer_path"])
            )
        apply_round(tensors, combined, optimizer)
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            raise AggregationRefused("the server step produced non-finite weights")
        return tensors, optimizer.state_dict()

    def _validation_loss(self, tensors: Mapping[str, Tensor], version: int) -> float:
        tokens = self.validation_tokens()
        if len(tokens) == 0:
            return math.nan
        checkpoint = Checkpoint(
            tensors=dict(tensors),
            config=self.model_config,
            version=version,
            metadata={},
        )
        model = model_from_checkpoint(checkpoint)
        return float(evaluate(model, tokens))

    def validation_tokens(self) -> Tensor:
        """The evaluated validation rows (at most ``validation_sequences``)."""
        return validation_tokens(self._store, self._tokens, self.config)

    def _publish(
        self,
        written: WrittenCheckpoint,
        loss: float,
        used: list[tuple[Row, float]],
        unusable: list[int],
        started: float,
    ) -> VersionRecord:
        """One transaction: the version row, updates applied, events."""
        version = int(written.path.stem[1:])
        events: list[EventRecord] = []
        tokens = sum(int(row["tokens"]) for row, _ in used)
        try:
            with self._store.write() as conn:
                record_version(
                    conn,
                    self.home,
                    version,
                    written,
                    created_at=time.time(),
                    validation_loss=loss,
                    update_count=len(used),
                    token_count=tokens,
                )
                conn.executemany(
                    "UPDATE updates SET state = 'applied', applied_version = ?, "
                    "weight = ? WHERE id = ? AND state = 'pending'",
                    [(version, weight, row["id"]) for row, weight in used],
                )
                conn.executemany(
                    "UPDATE updates SET state = 'discarded' WHERE id = ?",
                    [(update_id,) for update_id in unusable],
                )
                record = self._version_record(
                    _row(conn, "SELECT * FROM versions WHERE version = ?", (version,))
                )
                info = version_payload(record)
                events.append(_event(conn, "version_published", {"version": info}))
                done = {
                    "version": version,
                    "update_count": len(used),
                    "duration_ms": int((time.monotonic() - started) * 1000),
                }
                events.append(_event(conn, "aggregation_done", done))
        except Exception:
            # The files of a version without a row are not part of the run.
            written.path.unlink(missing_ok=True)
            if written.optimizer_path is not None:
                written.optimizer_path.unlink(missing_ok=True)
            raise
        self._notify(events)
        # An applied update lives on in the checkpoint; its frame is not needed.
        for row, _ in used:
            (self.home / row["path"]).unlink(missing_ok=True)
        return record

    def _discard(self, update_ids: list[int]) -> None:
        with self._store.write() as conn:
            conn.executemany(
                "UPDATE updates SET state = 'discarded' WHERE id = ?",
                [(update_id,) for update_id in update_ids],
            )

    # Draining.

    def begin_drain(self) -> None:
        """Stop granting leases; updates for leases already granted are accepted."""
        if self.state is RunState.SERVING:
            self.state = RunState.DRAINING
        logger.info("draining: no more leases are granted")

    @property
    def draining(self) -> bool:
        """True once :meth:`begin_drain` was called."""
        return self.state is RunState.DRAINING

    # Stats and events.

    def network_stats(self) -> NetworkStats:
        """The network's figures."""
        row = self._store.one(
            "SELECT "
            "(SELECT COUNT(*) FROM workers) AS worker_count, "
            "(SELECT COUNT(*) FROM workers WHERE session_open > 0) AS active, "
            "(SELECT COUNT(*) FROM leases) AS lease_count, "
            "(SELECT COUNT(*) FROM events WHERE kind = 'update_rejected') AS rejected, "
            "COUNT(*) AS accepted, COALESCE(SUM(tokens), 0) AS tokens, "
            "COALESCE(SUM(size), 0) AS uploaded, "
            "COALESCE(SUM(dense_bytes), 0) AS dense FROM updates"
        )
        assert row is not None  # an aggregate query always yields one row
        return NetworkStats(
            worker_count=row["worker_count"],
            active_worker_count=row["active"],
            latest_version=self.latest_version(),
            lease_count=row["lease_count"],
            accepted_update_count=row["accepted"],
            rejected_update_count=row["rejected"],
            token_count=row["tokens"],
            uploaded_bytes=row["uploaded"],
            dense_equivalent_bytes=row["dense"],
        )

    def worker_stats(self, worker_id: str) -> WorkerStatsRecord:
        """One worker's contribution; raises ``WorkerNotFound``."""
        row = self._store.one("SELECT * FROM workers WHERE id = ?", (worker_id,))
        if row is None:
            raise WorkerNotFound(f"no worker {worker_id}")
        return _worker_record(row)

    def leaderboard(self, limit: int) -> list[WorkerStatsRecord]:
        """Workers ranked by tokens trained, best first."""
        rows = self._store.query(
            "SELECT * FROM workers ORDER BY token_count DESC, accepted_updates DESC, "
            "registered_at LIMIT ?",
            (max(0, limit),),
        )
        return [_worker_record(row) for row in rows]

    def recent_events(self, limit: int) -> list[EventRecord]:
        """The last ``limit`` events, oldest first."""
        rows = self._store.query(
            "SELECT * FROM (SELECT * FROM events ORDER BY id DESC LIMIT ?) ORDER BY id",
            (max(0, limit),),
        )
        return [
            EventRecord(_utc(row["time"]), row["kind"], json.loads(row["payload"]))
            for row in rows
        ]

    def add_listener(self, fn: EventListener) -> None:
        """Call ``fn`` with every event after it is committed."""
        self._listeners.append(fn)

    def _notify(self, events: list[EventRecord]) -> None:
        for event in events:
            for listener in list(self._listeners):
                try:
                    listener(event)
                except Exception:
                    logger.exception("event listener failed on %s", event.kind)


def validation_tokens(store: Store, tokens: TokenData, config: RunConfig) -> Tensor:
    """At most ``config.validation_sequences`` validation rows: [N, L + 1] int64."""
    rows = store.query(
        "SELECT * FROM batches WHERE split = 'validation' ORDER BY first_sequence"
    )
    ranges = [
        BatchRange(row["id"], row["first_sequence"], row["count"], row["split"])
        for row in rows
    ]
    return tokens.sequences(ranges, config.validation_sequences)


def version_payload(record: VersionRecord) -> dict[str, Any]:
    """A version as a ``dragon.v1.VersionInfo`` dict for ``json_format.ParseDict``."""
    loss = record.validation_loss
    return {
        "version": record.version,
        "created_at": _timestamp(record.created_at),
        "checkpoint_size_bytes": record.size_bytes,
        "checkpoint_sha256": base64.b64encode(record.sha256).decode("ascii"),
        "validation_loss": loss if math.isfinite(loss) else "NaN",
        "update_count": record.update_count,
        "token_count": record.token_count,
    }


def _recover(home: Path, store: Store) -> None:
    """Undo what a crash left behind: files that no committed row names."""
    published = [row["version"] for row in store.query("SELECT version FROM versions")]
    checkpoints_recover(home, published)
    folder = home / UPDATES_DIR
    if not folder.is_dir():
        return
    known = {row["path"] for row in store.query("SELECT path FROM updates")}
    for path in sorted(folder.iterdir()):
        if str(path.relative_to(home)) not in known:
            path.unlink()
            logger.warning("recovery removed %s", path)


def _event(conn: sqlite3.Connection, kind: str, payload: dict[str, Any]) -> EventRecord:
    now = time.time()
    conn.execute(
        "INSERT INTO events (time, kind, payload) VALUES (?, ?, ?)",
        (now, kind, json.dumps(payload, sort_keys=True)),
    )
    return EventRecord(_utc(now), kind, payload)


def _row(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> Row:
    cursor = conn.execute(sql, params)
    names = [column[0] for column in cursor.description]
    values = cursor.fetchone()
    return dict(zip(names, values, strict=True))


def _worker_record(row: Row) -> WorkerStatsRecord:
    return WorkerStatsRecord(
        worker_id=row["id"],
        worker_name=row["name"],
        registered_at=_utc(row["registered_at"]),
        accepted_update_count=row["accepted_updates"],
        token_count=row["token_count"],
        uploaded_bytes=row["uploaded_bytes"],
        reputation=row["reputation"],
        last_seen_at=_utc(row["last_seen_at"]),
    )


def _worker_id(key_digest: bytes) -> str:
    # Derived from the key's hash but not equal to it, so the id can be shown
    # on the leaderboard without revealing what authentication compares.
    return "w" + hashlib.sha256(b"dragon worker id:" + key_digest).hexdigest()[:16]


def _lease_word(state: str) -> str:
    return {"granted": "past its deadline", "accepted": "already completed"}.get(
        state, state
    )


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
