"""``dragon-server demo``: a whole training run on this machine, in minutes.

The demo makes a temporary home with the embedded default corpus (the Python
standard library's source), starts the real ``dragon-server serve`` and N real
``dragon-worker run`` processes on loopback, and follows the run over the same
gRPC API a dashboard would use: the status stream for versions, the stats RPC for
throughput and bytes. At the end it stops everything with SIGTERM (workers upload
their current lease first), prints a summary and a text sample from the final
model, and leaves the home folder for ``dragon-server versions``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import grpc
from dragon.v1 import service_pb2, service_pb2_grpc
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from dragon_server.home import init_home
from dragon_server.settings import RunConfig
from forge import pow
from forge.checkpoint import load_checkpoint, model_from_checkpoint
from forge.sample import generate

logger = logging.getLogger(__name__)

RPC_TIMEOUT_SECONDS = 10.0
SAMPLE_PROMPT = "def "


class DemoError(click.ClickException):
    """The local run could not start or finish."""


@dataclass(frozen=True)
class DemoOptions:
    """What the operator asked of the local run."""

    workers: int
    minutes: float
    max_versions: int
    model: str
    density: float
    corpus_bytes: int
    home: Path | None
    seed: int


@dataclass
class Progress:
    """What the monitor has seen of the run so far."""

    started: float = field(default_factory=time.monotonic)
    losses: dict[int, float] = field(default_factory=dict)
    stats: service_pb2.GetNetworkStatsResponse = field(
        default_factory=service_pb2.GetNetworkStatsResponse
    )

    @property
    def latest(self) -> int:
        return max(self.losses, default=0)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def demo_config(options: DemoOptions) -> RunConfig:
    """Settings that show learning within minutes on two CPU cores."""
    return RunConfig().replace(
        model=options.model,
        seed=options.seed,
        max_corpus_bytes=options.corpus_bytes,
        density=options.density,
        min_updates=options.workers,
        aggregation_interval_seconds=30.0,
        lease_seconds=120.0,
        heartbeat_seconds=5.0,
        pow_difficulty_bits=12,
        drain_grace_seconds=60.0,
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _program(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise DemoError(f"{name} is not installed: run `pip install -e .` first")
    return found


class Monitor:
    """A read-only client of the run: status stream plus stats, over gRPC."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.progress = Progress()
        self._lock = threading.Lock()
        self._metadata: tuple[tuple[str, str], ...] = ()

    def wait_ready(self, timeout: float) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError as exc:
            raise DemoError("the server did not come up; see its log") from exc

    def register(self) -> None:
        """Registers a key of its own: every call but registration needs one."""
        registration = service_pb2_grpc.RegistrationServiceStub(self.channel)
        key = secrets.token_hex(32)
        challenge = registration.GetChallenge(
            service_pb2.GetChallengeRequest(), timeout=RPC_TIMEOUT_SECONDS
        )
        nonce = pow.solve(challenge.challenge, key, challenge.difficulty_bits)
        registration.Register(
            service_pb2.RegisterRequest(
                api_key=key,
                worker_name="demo-monitor",
                challenge=challenge.challenge,
                nonce=nonce,
            ),
            timeout=RPC_TIMEOUT_SECONDS,
        )
        self._metadata = (("authorization", f"Bearer {key}"),)
        latest = service_pb2_grpc.ModelServiceStub(self.channel).GetLatestVersion(
            service_pb2.GetLatestVersionRequest(),
            metadata=self._metadata,
            timeout=RPC_TIMEOUT_SECONDS,
        )
        self.progress.losses[latest.version.version] = latest.version.validation_loss

    def follow(self) -> threading.Thread:
        """Reads the status stream in a thread until the channel closes."""

        def run() -> None:
            stub = service_pb2_grpc.StatusServiceStub(self.channel)
            stream = stub.Watch(
                service_pb2.WatchRequest(replay_count=1000), metadata=self._metadata
            )
            with contextlib.suppress(grpc.RpcError):
                for message in stream:
                    if message.event.WhichOneof("kind") == "version_published":
                        info = message.event.version_published.version
                        with self._lock:
                            self.progress.losses[info.version] = info.validation_loss

        thread = threading.Thread(target=run, name="demo-watch", daemon=True)
        thread.start()
        return thread

    def refresh(self) -> Progress:
        stats = service_pb2_grpc.StatsServiceStub(self.channel).GetNetworkStats(
            service_pb2.GetNetworkStatsRequest(),
            metadata=self._metadata,
            timeout=RPC_TIMEOUT_SECONDS,
        )
        with self._lock:
            self.progress.stats = stats
            return self.progress

    def download_latest(self) -> bytes:
        stub = service_pb2_grpc.ModelServiceStub(self.channel)
        parts: list[bytes] = []
        digest = b""
        for message in stub.DownloadCheckpoint(
            service_pb2.DownloadCheckpointRequest(),
            metadata=self._metadata,
            timeout=120.0,
        ):
            if message.WhichOneof("part") == "chunk":
                parts.append(message.chunk.data)
            elif message.WhichOneof("part") == "digest":
                digest = message.digest.sha256
        data = b"".join(parts)
        if hashlib.sha256(data).digest() != digest:
            raise DemoError("the final checkpoint failed its SHA-256 check")
        return data

    def close(self) -> None:
        self.channel.close()


def _mib(count: int) -> str:
    return f"{count / 2**20:.2f} MiB"


def render(progress: Progress, options: DemoOptions) -> Group:
    """The live view: versions with their loss, then throughput and bytes."""
    versions = Table(title="Model versions", expand=False)
    versions.add_column("version", justify="right")
    versions.add_column("validation loss", justify="right")
    versions.add_column("vs version 0", justify="right")
    first = progress.losses.get(0)
    for version in sorted(progress.losses)[-12:]:
        loss = progress.losses[version]
        change = f"{100 * (loss / first - 1):+.1f}%" if first else ""
        versions.add_row(str(version), f"{loss:.4f}", change)

    stats = progress.stats
    elapsed = max(progress.elapsed(), 1e-9)
    uploaded, dense = stats.uploaded_bytes, stats.dense_equivalent_bytes
    ratio = f"{dense / uploaded:.0f}x smaller" if uploaded else "-"
    figures = Table(show_header=False, box=None)
    figures.add_row("elapsed", f"{elapsed:.0f} s of {options.minutes * 60:.0f} s")
    figures.add_row("workers", f"{stats.active_worker_count} of {options.workers}")
    figures.add_row("updates accepted", str(stats.accepted_update_count))
    figures.add_row("tokens trained", f"{stats.token_count:,}")
    figures.add_row("tokens per second", f"{stats.token_count / elapsed:,.0f}")
    figures.add_row("bytes uploaded", f"{_mib(uploaded)} ({ratio} than dense fp32)")
    figures.add_row("dense fp32 would be", _mib(dense))
    return Group(versions, figures)


@contextlib.contextmanager
def _processes(
    home: Path, options: DemoOptions, address: str
) -> Iterator[tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]]]]:
    logs = home / "logs"
    logs.mkdir(exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // (options.workers + 1))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    opened: list[subprocess.Popen[bytes]] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(logs / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        opened.append(process)
        return process

    try:
        server = start(
            "server",
            [
                _program("dragon-server"),
                "serve",
                "--home",
                str(home),
                "--listen",
                address,
            ],
        )
        workers = [
            start(
                f"worker-{index}",
                [
                    _program("dragon-worker"),
                    "run",
                    "--server",
                    address,
                    "--state-dir",
                    str(home / "workers" / f"worker-{index}"),
                    "--name",
                    f"demo-worker-{index}",
                    "--device",
                    "cpu",
                ],
            )
            for index in range(options.workers)
        ]
        yield server, workers
    finally:
        for process in opened:
            if process.poll() is None:
                process.kill()
                process.wait()


def _stop(processes: list[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append(process.wait())
    return codes


def _summary(progress: Progress, options: DemoOptions) -> Table:
    first, last = progress.losses[0], progress.losses[progress.latest]
    stats = progress.stats
    table = Table(title="DRAGON local run")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("workers", str(options.workers))
    table.add_row("model", options.model)
    table.add_row("versions published", str(progress.latest))
    table.add_row("validation loss, version 0", f"{first:.4f}")
    table.add_row(f"validation loss, version {progress.latest}", f"{last:.4f}")
    table.add_row("reduction", f"{100 * (1 - last / first):.1f}%")
    table.add_row("updates accepted", str(stats.accepted_update_count))
    table.add_row("tokens trained", f"{stats.token_count:,}")
    table.add_row("wall time", f"{progress.elapsed():.0f} s")
    table.add_row("bytes uploaded", _mib(stats.uploaded_bytes))
    table.add_row("dense fp32 equivalent", _mib(stats.dense_equivalent_bytes))
    if stats.uploaded_bytes:
        ratio = stats.dense_equivalent_bytes / stats.uploaded_bytes
        table.add_row("compression", f"{ratio:.0f}x")
    return table


def run_demo(options: DemoOptions, console: Console) -> Progress:
    """Runs the whole local training run; returns what the monitor saw."""
    home = options.home or Path(tempfile.mkdtemp(prefix="dragon-demo-"))
    console.print(f"[bold]Home folder:[/bold] {home}")
    summary = init_home(home, [], demo_config(options), progress=True)
    console.print(
        f"Corpus: {summary.documents:,} documents, {summary.tokens:,} tokens, "
        f"{summary.batches:,} batches; model: {summary.parameters:,} parameters"
    )

    address = f"127.0.0.1:{_free_port()}"
    with _processes(home, options, address) as (server, workers):
        monitor = Monitor(address)
        try:
            monitor.wait_ready(timeout=60.0)
            monitor.register()
            monitor.follow()
            with Live(console=console, refresh_per_second=2) as live:
                while True:
                    progress = monitor.refresh()
                    live.update(render(progress, options))
                    if progress.elapsed() >= options.minutes * 60:
                        break
                    if options.max_versions and progress.latest >= options.max_versions:
                        break
                    if server.poll() is not None:
                        raise DemoError(f"the server exited; see {home}/logs")
                    time.sleep(1.0)
                console.print("Stopping the workers (each uploads its lease first)...")
                codes = _stop(workers, timeout=180.0)
                progress = monitor.refresh()
                live.update(render(progress, options))
            console.print()
            checkpoint = load_checkpoint(monitor.download_latest())
        finally:
            monitor.close()
        server_code = _stop([server], timeout=90.0)[0]

    console.print(_summary(progress, options))
    model = model_from_checkpoint(checkpoint)
    text = generate(model, SAMPLE_PROMPT, 240, seed=options.seed)
    console.print(f"[bold]Sample from version {checkpoint.version}:[/bold]")
    console.print(SAMPLE_PROMPT + text, markup=False, highlight=False)
    console.print(f"\nHome folder: {home}")
    console.print(f"Inspect it with: dragon-server versions --home {home}")
    if any(codes) or server_code:
        raise DemoError(
            f"exit codes: workers {codes}, server {server_code}; see {home}/logs"
        )
    return progress


@click.command()
@click.option("--workers", default=2, show_default=True, help="Worker processes.")
@click.option(
    "--minutes", default=3.0, show_default=True, help="How long to train, in minutes."
)
@click.option(
    "--versions",
    "max_versions",
    default=0,
    show_default=True,
    help="Stop after this many versions; 0 means only the time bound.",
)
@click.option(
    "--model",
    default="small",
    show_default=True,
    type=click.Choice(["tiny", "small", "125m"]),
)
@click.option("--density", default=0.01, show_default=True, help="Update density.")
@click.option(
    "--corpus-bytes",
    default=8 * 2**20,
    show_default=True,
    help="Bytes of the standard library's source to ingest.",
)
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    help="Home folder to create (default: a new temporary folder).",
)
@click.option("--seed", default=0, show_default=True)
def demo(
    workers: int,
    minutes: float,
    max_versions: int,
    model: str,
    density: float,
    corpus_bytes: int,
    home: Path | None,
    seed: int,
) -> None:
    """Train the model on this machine: a server and worker processes on loopback.

    Example: dragon-server demo --workers 2 --minutes 3
    """
    if workers < 1:
        raise click.BadParameter(
            "at least one worker is needed", param_hint="--workers"
        )
    if minutes <= 0:
        raise click.BadParameter("must be positive", param_hint="--minutes")
    if home is not None and home.exists() and any(home.iterdir()):
        raise click.BadParameter(f"{home} is not empty", param_hint="--home")
    options = DemoOptions(
        workers, minutes, max_versions, model, density, corpus_bytes, home, seed
    )
    run_demo(options, Console())
