"""The worker's state folder: what lets a restarted worker resume.

Layout (all files private to the worker's user)::

    api_key                   the worker's secret key, 64 hex characters, mode 0600
    progress.json             counters and the current activity, rewritten atomically
    residual.safetensors      the error-feedback residual and the run it belongs to
    checkpoints/vN.safetensors          model versions downloaded and verified
    checkpoints/vN.safetensors.part     a download in progress, resumed by size

Every file is replaced atomically (temp file, fsync, rename, fsync of the folder),
so a crash leaves the old content or the new one, never a torn file.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from forge import safefile

logger = logging.getLogger(__name__)

API_KEY_FILE = "api_key"
PROGRESS_FILE = "progress.json"
RESIDUAL_FILE = "residual.safetensors"
CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^v(\d+)\.safetensors$")
_API_KEY = re.compile(r"^[0-9a-f]{64}$")


class StateError(Exception):
    """The state folder cannot be used: unreadable, or a file in it is corrupt."""


class Activity(enum.Enum):
    """What the worker is doing, as ``dragon-worker status`` shows it."""

    IDLE = "idle"
    CONNECTING = "connecting"
    REGISTERING = "registering"
    DOWNLOADING = "downloading"
    TRAINING = "training"
    UPLOADING = "uploading"
    BACKOFF = "backoff"
    STOPPED = "stopped"


@dataclass(frozen=True)
class Progress:
    """Counters (kept across restarts) and the worker's current activity.

    Byte counts are bytes on the wire; tokens are the tokens of accepted updates.
    """

    state: str = Activity.IDLE.value
    server: str = ""
    worker_id: str = ""
    model_version: int | None = None
    leases_done: int = 0
    leases_rejected: int = 0
    tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    current_lease_id: str = ""
    steps_done: int = 0
    steps_total: int = 0
    loss: float | None = None
    last_error: str = ""
    pid: int = 0
    updated_at: float = 0.0

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> Progress:
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in values.items() if k in known})  # type: ignore[arg-type]
        except TypeError as exc:
            raise StateError(f"bad progress record: {exc}") from exc


@dataclass(frozen=True)
class Residual:
    """The error-feedback residual: update mass computed but not yet sent."""

    tensors: dict[str, torch.Tensor]
    server: str
    # The version of the last update the residual was carried out of.
    model_version: int


def read_progress(root: Path) -> Progress | None:
    """The progress record of a state folder, or None if none was written yet.

    Safe to call while a daemon runs: the file is only ever replaced whole.
    """
    try:
        text = (root / PROGRESS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {root / PROGRESS_FILE}: {exc}") from exc
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateError(f"{root / PROGRESS_FILE} is not JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise StateError(f"{root / PROGRESS_FILE} does not hold an object")
    return Progress.from_dict(values)


class WorkerState:
    """One worker's state folder. Thread-safe; one daemon per folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        # The residual as last saved or loaded: only this process writes the
        # file, so it is read from disk once, not for every lease.
        self._residual: Residual | None = None
        self._residual_read = False
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.checkpoint_dir.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state folder {root}: {exc}") from exc
        self._progress = read_progress(root) or Progress()

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / CHECKPOINT_DIR

    # -- the API key ---------------------------------------------------------

    def api_key(self) -> str:
        """The worker's key, created on first use (256 random bits, mode 0600)."""
        path = self.root / API_KEY_FILE
        try:
            return self._read_key(path)
        except FileNotFoundError:
            pass
        key = secrets.token_hex(32)
        # Written whole under a private temporary name, then linked into place:
        # link() fails if the key exists, so of several daemons starting at once
        # exactly one key wins, and no reader ever sees a half-written file.
        temp = self.root / f".{API_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        # O_EXCL with the mode at creation: the key is never readable by others.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(key + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temp, path)
            except FileExistsError:
                return self._read_key(path)
        finally:
            temp.unlink(missing_ok=True)
        safefile.fsync_dir(self.root)
        logger.info("created a new worker key in %s", path)
        return key

    @staticmethod
    def _read_key(path: Path) -> str:
        key = path.read_text(encoding="ascii").strip()
        if not _API_KEY.match(key):
            raise StateError(f"{path} does not hold a 64-character hex key")
        return key

    # -- progress and counters -----------------------------------------------

    @property
    def progress(self) -> Progress:
        return self._progress

    def update(self, **changes: object) -> Progress:
        """Change fields of the progress record and write it durably."""
        with self._lock:
            changes.setdefault("pid", os.getpid())
            changes["updated_at"] = time.time()
            progress = dataclasses.replace(self._progress, **changes)  # type: ignore[arg-type]
            data = json.dumps(dataclasses.asdict(progress), indent=1, sort_keys=True)
            safefile.write_atomic(self.root / PROGRESS_FILE, data.encode("utf-8"))
            self._progress = progress
            return progress

    def add(self, **increments: int) -> Progress:
        """Add to counters (``leases_done=1, tokens=n``) and write them durably."""
        with self._lock:
            current = dataclasses.asdict(self._progress)
        changes = {name: current[name] + amount for name, amount in increments.items()}
        return self.update(**changes)

    # -- the residual ----------------------------------------------------------

    def save_residual(
        self, tensors: Mapping[str, torch.Tensor], *, server: str, model_version: int
    ) -> None:
        """Persist the residual with the server and version it belongs to."""
        metadata = {"server": server, "model_version": str(model_version)}
        safefile.dump_file(self.root / RESIDUAL_FILE, tensors, metadata)
        self._residual = Residual(dict(tensors), server, model_version)
        self._residual_read = True

    def load_residual(self) -> Residual | None:
        """The saved residual, or None when there is none or it is unreadable."""
        if not self._residual_read:
            self._residual = self._read_residual()
            self._residual_read = True
        return self._residual

    def _read_residual(self) -> Residual | None:
        path = self.root / RESIDUAL_FILE
        if not path.exists():
            return None
        try:
            tensors, metadata = safefile.load_file(path)
            version = int(metadata["model_version"])
            server = metadata["server"]
        except (safefile.SafeFileError, KeyError, ValueError, OSError) as exc:
            # Losing the residual only delays unsent mass; never fatal.
            logger.warning("ignoring unreadable residual %s: %s", path, exc)
            return None
        return Residual(tensors=tensors, server=server, model_version=version)

    # -- cached checkpoints ----------------------------------------------------

    def checkpoint_path(self, version: int) -> Path:
        return self.checkpoint_dir / f"v{version}.safetensors"

    def part_path(self, version: int) -> Path:
        return self.checkpoint_dir / f"v{version}.safetensors.part"

    def cached_versions(self) -> list[int]:
        """Versions with a complete checkpoint file, oldest first."""
        versions = []
        for path in self.checkpoint_dir.iterdir():
            match = _CHECKPOINT_NAME.match(path.name)
            if match:
                versions.append(int(match.group(1)))
        return sorted(versions)

    def prune_checkpoints(self, keep: set[int]) -> None:
        """Delete cached checkpoints and partial downloads not in ``keep``."""
        for path in self.checkpoint_dir.iterdir():
            match = re.match(r"^v(\d+)\.safetensors(\.part)?$", path.name)
            if match and int(match.group(1)) not in keep:
                path.unlink(missing_ok=True)
                logger.debug("pruned %s", path)
