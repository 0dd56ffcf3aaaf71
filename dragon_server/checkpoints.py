"""The checkpoints folder of a server home.

Version N lives in ``checkpoints/v{N:06d}.safetensors`` (written by
:func:`forge.checkpoint.save_checkpoint`, atomically) and the server optimizer's
state after producing it in ``checkpoints/opt-v{N:06d}.safetensors``. A file is
only part of the run once its version row is committed; :func:`recover` removes
what a crash left behind.
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from forge import safefile
from forge.checkpoint import save_checkpoint
from forge.config import ModelConfig

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_VERSION_FILE = re.compile(r"^(?:opt-)?v(\d{6,})\.safetensors$")


@dataclass(frozen=True)
class WrittenCheckpoint:
    """A checkpoint file on disk, not yet published."""

    path: Path
    sha256: bytes
    size_bytes: int
    optimizer_path: Path | None


def checkpoint_path(home: Path, version: int) -> Path:
    return home / CHECKPOINT_DIR / f"v{version:06d}.safetensors"


def optimizer_path(home: Path, version: int) -> Path:
    return home / CHECKPOINT_DIR / f"opt-v{version:06d}.safetensors"


def write_version(
    home: Path,
    version: int,
    tensors: Mapping[str, torch.Tensor],
    config: ModelConfig,
    optimizer_state: Mapping[str, torch.Tensor] | None = None,
) -> WrittenCheckpoint:
    """Write version ``version``'s checkpoint (and optimizer state) durably."""
    path = checkpoint_path(home, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = save_checkpoint(path, tensors, config, version)
    opt_path = None
    if optimizer_state:
        opt_path = optimizer_path(home, version)
        safefile.dump_file(opt_path, optimizer_state, {"version": str(version)})
    return WrittenCheckpoint(
        path=path,
        sha256=bytes.fromhex(digest),
        size_bytes=path.stat().st_size,
        optimizer_path=opt_path,
    )


def load_optimizer_state(path: Path | None) -> dict[str, torch.Tensor]:
    """The optimizer state stored next to a version; empty when there is none."""
    if path is None or not path.exists():
        return {}
    tensors, _ = safefile.load_file(path)
    return tensors


def recover(home: Path, published: Iterable[int]) -> list[Path]:
    """Remove temp files and the files of versions without a row; returns them."""
    keep = set(published)
    removed: list[Path] = []
    folder = home / CHECKPOINT_DIR
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        match = _VERSION_FILE.match(path.name)
        orphan = match is not None and int(match.group(1)) not in keep
        if path.name.endswith(".tmp") or orphan:
            path.unlink()
            removed.append(path)
            logger.warning("recovery removed %s", path)
    return removed


def record_version(
    conn: sqlite3.Connection,
    home: Path,
    version: int,
    written: WrittenCheckpoint,
    *,
    created_at: float,
    validation_loss: float,
    update_count: int,
    token_count: int,
) -> None:
    """Insert a version row (inside the caller's write transaction).

    Paths are stored relative to the home so that a home can be moved. A NaN
    validation loss (no validation data) is stored as NULL.
    """
    optimizer = written.optimizer_path
    conn.execute(
        "INSERT INTO versions (version, created_at, path, sha256, size, "
        "validation_loss, update_count, token_count, optimizer_path) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            version,
            created_at,
            str(written.path.relative_to(home)),
            written.sha256,
            written.size_bytes,
            None if math.isnan(validation_loss) else validation_loss,
            update_count,
            token_count,
            None if optimizer is None else str(optimizer.relative_to(home)),
        ),
    )
