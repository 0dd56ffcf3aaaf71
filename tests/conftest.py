"""Shared fixtures: a temporary server home with the tiny model, and its run."""

from __future__ import annotations

import hashlib
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from dragon_server.home import init_home
from dragon_server.run import TrainingRun, UpdateMeta
from dragon_server.settings import RunConfig
from forge import pow
from forge.codec import encode_update


@pytest.fixture(scope="session")
def server_config() -> RunConfig:
    """A run config small enough for tests: tiny model, short rows, small batches."""
    return RunConfig(
        model="tiny",
        sequence_length=32,
        sequences_per_batch=4,
        validation_sequences=16,
        max_corpus_bytes=120_000,
        local_steps=2,
        batch_size=4,
        micro_batch_size=4,
        density=0.05,
        min_updates=2,
        pow_difficulty_bits=4,
        lease_seconds=60.0,
        # Some tests drain the whole queue with one worker.
        max_leases_per_worker=0,
    )


@pytest.fixture(scope="session")
def _server_home_template(
    tmp_path_factory: pytest.TempPathFactory, server_config: RunConfig
) -> Path:
    home = tmp_path_factory.mktemp("template") / "home"
    # No sources: the default corpus, the standard library, capped above.
    init_home(home, [], server_config, progress=False)
    return home


@pytest.fixture
def server_home(tmp_path: Path, _server_home_template: Path) -> Path:
    """A fresh copy of an initialised server home (version 0 published)."""
    home = tmp_path / "home"
    shutil.copytree(_server_home_template, home)
    return home


@pytest.fixture
def training_run(server_home: Path) -> Iterator[TrainingRun]:
    """The :class:`TrainingRun` of ``server_home``, closed after the test."""
    run = TrainingRun.open(server_home)
    yield run
    run.close()


RegisterWorker = Callable[[TrainingRun, str], tuple[str, str]]


def _register_worker(run: TrainingRun, name: str) -> tuple[str, str]:
    api_key = secrets.token_hex(32)
    challenge = run.challenge()
    nonce = pow.solve(challenge.challenge, api_key, challenge.difficulty_bits)
    registration = run.register(api_key, name, challenge.challenge, nonce)
    return registration.worker_id, api_key


@pytest.fixture
def register_worker() -> RegisterWorker:
    """Registers a new key with a run, solving its challenge: (worker id, key)."""
    return _register_worker


MakeUpdate = Callable[..., tuple[bytes, UpdateMeta]]


def _make_update(
    run: TrainingRun,
    base_version: int,
    *,
    seed: int = 0,
    scale: float = 1e-3,
    samples: int = 8,
) -> tuple[bytes, UpdateMeta]:
    generator = torch.Generator().manual_seed(seed)
    pseudo_gradient = {
        name: torch.randn(shape, generator=generator) * scale
        for name, shape in run.spec.items()
    }
    encoded = encode_update(pseudo_gradient, None, run.config.density)
    frame = encoded.frame
    meta = UpdateMeta(
        base_version=base_version,
        sample_count=samples,
        token_count=samples * run.config.sequence_length,
        loss_before=5.5,
        loss_after=5.25,
        train_seconds=0.5,
        sha256=hashlib.sha256(frame).digest(),
        size_bytes=len(frame),
    )
    return frame, meta


@pytest.fixture
def make_update() -> MakeUpdate:
    """Makes a real encoded update for a run: ``(run, base_version, seed=...)``.

    The pseudo-gradient is seeded Gaussian noise over the model's tensors, sent
    through :func:`forge.codec.encode_update` at the run's density.
    """
    return _make_update


# --- gRPC layer: an in-process server on port 0 ------------------------------


@pytest.fixture
def rpc_server(server_home: Path, request: pytest.FixtureRequest) -> Iterator[object]:
    """The real gRPC server for ``server_home`` on port 0; yields a ServerThread.

    Parametrize it indirectly with a dict of config overrides to change the run.
    """
    from rpc_support import ServerThread

    run = TrainingRun.open(server_home, getattr(request, "param", None))
    server = ServerThread(run)
    try:
        yield server
    finally:
        server.stop()
        run.close()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run a module's tiny-model tests on one intra-op thread.

    Tiny tensors gain nothing from a second thread, and when other processes
    share the two cores every parallel kernel waits on a descheduled thread:
    measured here, a lease test took 35 s on two threads and 3 s on one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
