"""Creating a server home: config, dataset, database and the initial version.

A home holds ``dragon.toml``, ``dragon.db``, ``data/tokens.u16`` and
``checkpoints/v000000.safetensors``. :func:`init_home` builds all of it or, when
anything fails, removes what it wrote.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dragon_server.checkpoints import CHECKPOINT_DIR, record_version, write_version
from dragon_server.data import (
    DATA_DIR,
    TokenData,
    default_sources,
    ingest,
    plan_batches,
    record_batches,
)
from dragon_server.errors import ConfigInvalid
from dragon_server.run import UPDATES_DIR, validation_tokens
from dragon_server.settings import CONFIG_FILE, RunConfig
from dragon_server.store import DB_FILE, Store
from forge.model import build_model, parameter_count
from forge.train import evaluate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitSummary:
    """What :func:`init_home` built."""

    documents: int
    tokens: int
    sequences: int
    batches: int  # train batches
    validation_sequences: int
    parameters: int
    validation_loss: float  # of version 0, nats per token


def init_home(
    home: Path,
    sources: Sequence[Path],
    config: RunConfig,
    *,
    progress: bool = True,
) -> InitSummary:
    """Create a server home from ``sources`` (the stdlib's *.py files if empty).

    Refuses a home that exists and is not empty.
    """
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        raise ConfigInvalid(f"{home} exists and is not empty: pick a new folder")
    created = not home.exists()
    home.mkdir(parents=True, exist_ok=True)
    try:
        return _build(home, sources, config, progress)
    except BaseException:
        _undo(home, created)
        raise


def _build(
    home: Path, sources: Sequence[Path], config: RunConfig, progress: bool
) -> InitSummary:
    python_only = not sources
    documents, rows = ingest(
        list(sources) or default_sources(),
        home / DATA_DIR,
        sequence_length=config.sequence_length,
        max_corpus_bytes=config.max_corpus_bytes,
        python_only=python_only,
        progress=progress,
    )
    batches = plan_batches(
        rows, config.sequences_per_batch, config.validation_fraction, config.seed
    )
    config.save(home)
    (home / UPDATES_DIR).mkdir()
    store = Store.open(home)
    try:
        with store.write() as conn:
            record_batches(conn, batches)
        tokens = TokenData(home / DATA_DIR, config.sequence_length)
        model = build_model(config.model_config, seed=config.seed)
        held = validation_tokens(store, tokens, config)
        loss = evaluate(model, held) if len(held) else float("nan")
        written = write_version(home, 0, model.state_dict(), config.model_config)
        with store.write() as conn:
            record_version(
                conn,
                home,
                0,
                written,
                created_at=time.time(),
                validation_loss=loss,
                update_count=0,
                token_count=0,
            )
    finally:
        store.close()
    summary = InitSummary(
        documents=documents,
        tokens=rows * (config.sequence_length + 1),
        sequences=rows,
        batches=sum(1 for b in batches if b.split == "train"),
        validation_sequences=sum(b.count for b in batches if b.split == "validation"),
        parameters=parameter_count(model),
        validation_loss=loss,
    )
    logger.info("initialised %s: %s", home, summary)
    return summary


def _undo(home: Path, created: bool) -> None:
    if created:
        shutil.rmtree(home, ignore_errors=True)
        return
    for name in (CONFIG_FILE, DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm"):
        (home / name).unlink(missing_ok=True)
    for name in (DATA_DIR, CHECKPOINT_DIR, UPDATES_DIR):
        shutil.rmtree(home / name, ignore_errors=True)
