"""Helpers for the gRPC tests: an in-process server, clients and update frames.

The server is the real ``start_dragon_server`` on port 0 with its own event loop in
a thread; clients are plain synchronous grpc stubs, as a worker would hold.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import queue
import re
import secrets
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
import zstandard
from dragon.v1 import service_pb2, service_pb2_grpc, types_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dragon_server.run import TrainingRun
from dragon_server.server import MAX_MESSAGE_BYTES, RunningServer, start_dragon_server
from forge import codec, pow, safefile

T = TypeVar("T")
RPC_TIMEOUT = 30.0
CLIENT_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


class ServerThread:
    """A started server for ``run`` whose event loop runs in a daemon thread."""

    def __init__(self, run: TrainingRun) -> None:
        self.run = run
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running: RunningServer = self.call(start_dragon_server(run, "127.0.0.1:0"))
        self.port = self.running.port
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def stop(self) -> None:
        self.call(self.running.server.stop(None))
        self.call(self.running.training.wait_closed())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def new_key() -> str:
    return secrets.token_hex(32)


def bearer(api_key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {api_key}"),)


class Client:
    """A worker's stubs on one channel."""

    def __init__(self, address: str, options: Sequence[tuple[str, int]] = ()) -> None:
        self.channel = grpc.insecure_channel(
            address, options=[*CLIENT_OPTIONS, *options]
        )
        self.registration = service_pb2_grpc.RegistrationServiceStub(self.channel)
        self.model = service_pb2_grpc.ModelServiceStub(self.channel)
        self.training = service_pb2_grpc.TrainingServiceStub(self.channel)
        self.status = service_pb2_grpc.StatusServiceStub(self.channel)
        self.stats = service_pb2_grpc.StatsServiceStub(self.channel)

    def register(self, api_key: str, name: str = "") -> str:
        """Register ``api_key``, solving the proof of work the server asks."""
        challenge = self.registration.GetChallenge(
            service_pb2.GetChallengeRequest(), timeout=RPC_TIMEOUT
        )
        nonce = pow.solve(challenge.challenge, api_key, challenge.difficulty_bits)
        response = self.registration.Register(
            service_pb2.RegisterRequest(
                api_key=api_key,
                worker_name=name,
                challenge=challenge.challenge,
                nonce=nonce,
            ),
            timeout=RPC_TIMEOUT,
        )
        worker_id: str = response.worker_id
        return worker_id

    def session(self, api_key: str) -> SessionClient:
        return SessionClient(self, api_key)

    def close(self) -> None:
        self.channel.close()


class SessionClient:
    """One training session stream, driven one message at a time."""

    def __init__(self, client: Client, api_key: str) -> None:
        self._requests: queue.Queue[service_pb2.SessionRequest | None] = queue.Queue()
        self._responses: queue.Queue[service_pb2.SessionResponse | Exception] = (
            queue.Queue()
        )
        self.call = client.training.Session(
            iter(self._requests.get, None), metadata=bearer(api_key), timeout=120
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self._responses.put(response)
        except grpc.RpcError as exc:
            self._responses.put(exc)

    def send(self, **kind: Any) -> None:
        self._requests.put(service_pb2.SessionRequest(**kind))

    def receive(self, timeout: float = RPC_TIMEOUT) -> service_pb2.SessionResponse:
        item = self._responses.get(timeout=timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def expect(self, kind: str, timeout: float = RPC_TIMEOUT) -> Any:
        response = self.receive(timeout)
        assert response.WhichOneof("kind") == kind, response
        return getattr(response, kind)

    def nothing_pending(self, wait: float = 0.3) -> bool:
        try:
            item = self._responses.get(timeout=wait)
        except queue.Empty:
            return True
        self._responses.put(item)
        return False

    def hello(self) -> service_pb2.Welcome:
        hardware = types_pb2.Hardware(
            device_kind=types_pb2.DEVICE_KIND_CPU, device_name="test", cpu_cores=2
        )
        self.send(hello=service_pb2.Hello(hardware=hardware, worker_version="test"))
        welcome: service_pb2.Welcome = self.expect("welcome")
        return welcome

    def lease(self) -> types_pb2.Lease:
        self.send(lease_request=service_pb2.LeaseRequest())
        lease: types_pb2.Lease = self.expect("lease_grant")
        return lease

    def upload(
        self,
        lease_id: str,
        frame: bytes,
        *,
        base_version: int = 0,
        sample_count: int = 4,
        sha256: bytes | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> service_pb2.SessionResponse:
        """Send ``frame`` in chunks, then its end; the server's answer."""
        for offset in range(0, len(frame), chunk_bytes):
            chunk = service_pb2.UpdateChunk(
                lease_id=lease_id,
                offset_bytes=offset,
                data=frame[offset : offset + chunk_bytes],
            )
            self.send(update_chunk=chunk)
        end = service_pb2.UpdateEnd(
            lease_id=lease_id,
            size_bytes=len(frame),
            sha256=hashlib.sha256(frame).digest() if sha256 is None else sha256,
            base_version=base_version,
            sample_count=sample_count,
            token_count=sample_count * 33,
            loss_before=5.5,
            loss_after=5.0,
        )
        self.send(update_end=end)
        return self.receive()

    def close(self) -> None:
        self._requests.put(None)
        self._reader.join(10)


def random_update(
    spec: Mapping[str, tuple[int, ...]], seed: int, scale: float = 1e-3
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=generator) * scale
        for name, shape in spec.items()
    }


def valid_frame(run: TrainingRun, seed: int = 0) -> bytes:
    """A frame the run accepts: a random update at the run's density."""
    update = random_update(run.spec, seed)
    encoded = codec.encode_update(update, None, run.config.density, "fp16")
    return encoded.frame


def crafted_frame(
    entries: Mapping[str, tuple[tuple[int, ...], list[int], list[float]]],
    *,
    deltas: bool = True,
) -> bytes:
    """A frame in the codec's layout built from raw indices and values.

    ``entries`` maps a tensor name to (shape, flat indices, values); the indices
    are delta-encoded as given, without any check, so that tests can send what an
    honest encoder never would (repeats, out-of-range or unsorted indices).
    """
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict[str, Any]] = {}
    for name, (shape, indices, values) in entries.items():
        flat = np.asarray(indices, dtype=np.int64)
        gaps = np.diff(flat, prepend=0) if deltas else flat
        # The widest deltas the codec allows for this tensor, as the encoder would.
        numel = math.prod(shape)
        width = next(w for w in (1, 2, 4, 8) if numel - 1 < 1 << (8 * w - 1))
        planes = gaps.astype(f"<i{width}").view(np.uint8).reshape(len(flat), width).T
        tensors[f"indices/{name}"] = torch.from_numpy(planes.copy())
        halves = np.asarray(values, dtype="<f2").view(np.uint8).reshape(len(flat), 2)
        tensors[f"values/{name}"] = torch.from_numpy(halves.T.copy())
        described[name] = {"shape": list(shape), "k": len(flat), "index_bytes": width}
    metadata = {
        "format": "dragon-update",
        "format_version": "1",
        "value_dtype": "fp16",
        "tensors": json.dumps(described, sort_keys=True, separators=(",", ":")),
    }
    return compress(safefile.dumps(tensors, metadata))


def compress(content: bytes, *, content_size: bool = True) -> bytes:
    compressor = zstandard.ZstdCompressor(level=3, write_content_size=content_size)
    return compressor.compress(content)


def home_state(home: Path) -> dict[str, Any]:
    """What an update may change: update and version rows, and the files."""
    with sqlite3.connect(f"file:{home / 'dragon.db'}?mode=ro", uri=True) as conn:
        updates = conn.execute("SELECT * FROM updates ORDER BY id").fetchall()
        versions = conn.execute("SELECT * FROM versions ORDER BY version").fetchall()
    files = {
        str(path.relative_to(home)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in ("checkpoints", "updates")
        for path in sorted((home / folder).glob("*"))
        if path.is_file()
    }
    return {"updates": updates, "versions": versions, "files": files}


def download(
    client: Client, api_key: str, **request: Any
) -> Iterator[service_pb2.DownloadCheckpointResponse]:
    return client.model.DownloadCheckpoint(  # type: ignore[no-any-return]
        service_pb2.DownloadCheckpointRequest(**request),
        metadata=bearer(api_key),
        timeout=RPC_TIMEOUT,
    )


def program(name: str) -> str:
    """The console script ``name`` installed next to this interpreter."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is not installed in {path.parent}"
    return str(path)


# Runs the real ``dragon-server`` CLI with a pause of
# DRAGON_TEST_AGGREGATION_DELAY_SECONDS after an aggregation has written its
# checkpoint and before it commits the version: the window a crash must survive.
# It touches DRAGON_TEST_AGGREGATION_MARKER when the pause begins.
DELAYED_AGGREGATION = """
import os, sys, time
from pathlib import Path
import dragon_server.run as run_module
from dragon_server.cli import main

written = run_module.write_version
delay = float(os.environ["DRAGON_TEST_AGGREGATION_DELAY_SECONDS"])
marker = Path(os.environ["DRAGON_TEST_AGGREGATION_MARKER"])

def write_then_pause(*args, **kwargs):
    result = written(*args, **kwargs)
    marker.write_text(str(result.path))
    time.sleep(delay)
    return result

run_module.write_version = write_then_pause
sys.exit(main())
"""


def delayed_serve(
    home: Path, delay: float, *settings: str
) -> tuple[ServeProcess, Path]:
    """A serve process whose aggregations pause between checkpoint and commit."""
    marker = home.parent / "aggregation-paused"
    env = {
        "DRAGON_TEST_AGGREGATION_DELAY_SECONDS": str(delay),
        "DRAGON_TEST_AGGREGATION_MARKER": str(marker),
    }
    launcher = [sys.executable, "-c", DELAYED_AGGREGATION]
    return ServeProcess(home, *settings, env=env, launcher=launcher), marker


class ServeProcess:
    """A real ``dragon-server serve`` process on a free port, its log in a file."""

    def __init__(
        self,
        home: Path,
        *settings: str,
        env: Mapping[str, str] | None = None,
        log_level: str = "INFO",
        launcher: Sequence[str] = (),
    ) -> None:
        self.home = home
        self.log_path = home.parent / f"serve-{time.monotonic_ns()}.log"
        entry = list(launcher) or [program("dragon-server")]
        args = [*entry, "serve", "--home", str(home)]
        args += ["--listen", "127.0.0.1:0", "--log-level", log_level]
        for setting in settings:
            args += ["--set", setting]
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **(env or {})},
        )
        self.port = self._read_port()
        self.address = f"127.0.0.1:{self.port}"
        self.wait_healthy()

    def _read_port(self) -> int:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        line = self.process.stdout.readline().decode() if ready else ""
        match = re.search(r"listening on port (\d+)", line)
        assert match, f"no port announced: {line!r}\n{self.log()}"
        return int(match.group(1))

    def wait_healthy(self, seconds: float = 30.0) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(), timeout=seconds)
        assert response.status == health_pb2.HealthCheckResponse.SERVING

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        self.process.kill()
        self.wait(30)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._log.close()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.kill()
