"""Fifty simultaneous uploads while an aggregation runs and another process reads.

The real server process takes 50 uploads at once over gRPC, in the middle of an
aggregation held open between its checkpoint and its commit, while a second
process reads the same database through the run's read path in a tight loop.
Nobody may see "database is locked": every upload is acknowledged, every read
succeeds. And one event loop holds a thousand open sessions at once.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from dragon.v1 import service_pb2, service_pb2_grpc
from rpc_support import (
    Client,
    ServerThread,
    SessionClient,
    bearer,
    delayed_serve,
    home_state,
    new_key,
    valid_frame,
)

UPLOADS = 50

READER = """
import json, sys
from pathlib import Path
from dragon_server.run import TrainingRun
from dragon_server.settings import RunConfig
from dragon_server.store import Store

home, stop = Path(sys.argv[1]), Path(sys.argv[2])
run = TrainingRun(home, RunConfig.load(home), Store.open(home))
reads, errors = 0, []
print("ready", flush=True)
while not stop.exists():
    try:
        run.network_stats()
        run.leaderboard(10)
        run.recent_events(20)
        run.latest_version()
        reads += 1
    except Exception as exc:
        errors.append(repr(exc))
print(json.dumps({"reads": reads, "errors": errors}), flush=True)
"""


@pytest.mark.slow
def test_fifty_uploads_during_an_aggregation_with_a_reader_process(
    server_home: Path,
) -> None:
    from dragon_server.run import TrainingRun

    run = TrainingRun.open(server_home)
    frame = valid_frame(run, seed=5)
    run.close()

    stop = server_home.parent / "stop-reading"
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(server_home), str(stop)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server, marker = delayed_serve(
        server_home, 8.0, "min_updates=2", "aggregation_interval_seconds=600"
    )
    with server:
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "ready"
        client = Client(server.address)
        sessions: list[SessionClient] = []
        leases: list[str] = []
        for i in range(UPLOADS + 2):
            key = new_key()
            client.register(key, f"w{i}")
            session = client.session(key)
            session.hello()
            sessions.append(session)
            leases.append(session.lease().lease_id)

        # Two updates start an aggregation; wait until it holds its checkpoint.
        for session, lease_id in zip(sessions[:2], leases[:2], strict=True):
            assert session.upload(lease_id, frame).WhichOneof("kind") == "ack"
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.02)

        started = time.time()
        barrier = threading.Barrier(UPLOADS)
        answers: dict[int, service_pb2.SessionResponse] = {}

        def upload(i: int) -> None:
            barrier.wait()
            answers[i] = sessions[i].upload(leases[i], frame)

        threads = [
            threading.Thread(target=upload, args=(i,)) for i in range(2, UPLOADS + 2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        finished = time.time()

        kinds = [answer.WhichOneof("kind") for answer in answers.values()]
        assert len(answers) == UPLOADS
        assert kinds == ["ack"] * UPLOADS, list(answers.values())[:3]
        assert not any(answer.ack.duplicate for answer in answers.values())

        state = home_state(server_home)
        assert len(state["updates"]) == UPLOADS + 2
        stop.write_text("")
        out, err = reader.communicate(timeout=60)
        for session in sessions:
            session.close()
        assert server.terminate() == 0
        log = server.log()

    result = json.loads(out.strip().splitlines()[-1])
    assert result["errors"] == [], result["errors"][:3]
    assert result["reads"] > 10
    assert "database is locked" not in log
    assert "database is locked" not in err
    # The uploads overlapped the aggregation: version 1 committed after they began.
    versions = {row[0]: row[1] for row in home_state(server_home)["versions"]}
    assert started < versions[1]
    took, committed = finished - started, versions[1] - started
    print(f"uploads took {took:.2f} s; version 1 committed after {committed:.2f} s")


@pytest.mark.slow
def test_a_thousand_sessions_stay_open_at_once(rpc_server: ServerThread) -> None:
    sessions = 1000
    client = Client(rpc_server.address)
    keys = [new_key() for _ in range(sessions)]
    for key in keys:
        client.register(key)

    async def hold_all() -> tuple[int, int]:
        channels = [grpc.aio.insecure_channel(rpc_server.address) for _ in range(4)]
        stubs = [service_pb2_grpc.TrainingServiceStub(ch) for ch in channels]
        release = asyncio.Event()
        welcomed: list[str] = []

        async def hold(
            stub: service_pb2_grpc.TrainingServiceAsyncStub, key: str
        ) -> None:
            async def requests() -> AsyncIterator[service_pb2.SessionRequest]:
                yield service_pb2.SessionRequest(hello=service_pb2.Hello())
                await release.wait()

            call = stub.Session(requests(), metadata=bearer(key), timeout=300)
            first = await call.read()
            welcomed.append(first.welcome.worker_id)
            await release.wait()
            call.cancel()

        tasks = [
            asyncio.create_task(hold(stubs[i % len(stubs)], key))
            for i, key in enumerate(keys)
        ]
        deadline = time.monotonic() + 240
        while len(welcomed) < sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        open_now = rpc_server.running.training.session_count
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
        return len(set(welcomed)), open_now

    welcomed, open_now = asyncio.run(hold_all())
    assert welcomed == sessions
    assert open_now == sessions
    deadline = time.monotonic() + 30
    while rpc_server.running.training.session_count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert rpc_server.running.training.session_count == 0
