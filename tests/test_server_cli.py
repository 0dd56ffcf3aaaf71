"""The ``dragon-server`` commands: init, versions, stats, and serve's drain."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from dragon.v1 import service_pb2, types_pb2
from rpc_support import (
    Client,
    ServeProcess,
    delayed_serve,
    home_state,
    new_key,
    program,
    valid_frame,
)

from dragon_server.cli import main
from dragon_server.settings import RunConfig

TEXT = "".join(
    f"def function_{i}(value):\n    return value * {i} + {i % 7}\n\n"
    for i in range(600)
)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def init_args(home: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        "init",
        "--home",
        str(home),
        "--data",
        str(corpus),
        "--seq-len",
        "32",
        "--sequences-per-batch",
        "4",
        "--pow-bits",
        "0",
        *extra,
    ]


def test_init_writes_a_home_and_prints_a_summary(tmp_path: Path, corpus: Path) -> None:
    home = tmp_path / "home"
    args = init_args(home, corpus, "--density", "0.02", "--min-updates", "3")
    result = CliRunner().invoke(main, [*args, "--set", "lease_seconds=45"])
    assert result.exit_code == 0, result.output
    assert "documents" in result.output
    assert "tiny" in result.output
    assert f"dragon-server serve --home {home}" in result.output

    config = RunConfig.load(home)
    assert (config.density, config.min_updates, config.sequence_length) == (
        0.02,
        3,
        32,
    )
    assert config.lease_seconds == 45.0
    assert config.pow_difficulty_bits == 0
    assert (home / "dragon.db").is_file()
    assert list((home / "checkpoints").glob("v*.safetensors"))


def test_init_refuses_a_used_home_and_bad_settings(
    tmp_path: Path, corpus: Path
) -> None:
    home = tmp_path / "home"
    assert CliRunner().invoke(main, init_args(home, corpus)).exit_code == 0
    again = CliRunner().invoke(main, init_args(home, corpus))
    assert again.exit_code == 1
    assert "not empty" in again.output

    bad = CliRunner().invoke(
        main, init_args(tmp_path / "other", corpus, "--set", "no_such_field=1")
    )
    assert bad.exit_code == 1
    assert "no_such_field" in bad.output
    malformed = CliRunner().invoke(
        main, init_args(tmp_path / "third", corpus, "--set", "density")
    )
    assert malformed.exit_code == 1
    assert "FIELD=VALUE" in malformed.output


def test_versions_and_stats_read_a_home(server_home: Path) -> None:
    listed = CliRunner().invoke(
        main, ["versions", "--home", str(server_home), "--json"]
    )
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [row["version"] for row in rows] == [0]
    checkpoint = next((server_home / "checkpoints").glob("v000000.*"))
    assert rows[0]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert rows[0]["size_bytes"] == checkpoint.stat().st_size

    table = CliRunner().invoke(main, ["versions", "--home", str(server_home)])
    assert table.exit_code == 0
    assert "model versions" in table.output

    stats = CliRunner().invoke(main, ["stats", "--home", str(server_home), "--json"])
    assert stats.exit_code == 0, stats.output
    figures = json.loads(stats.stdout)
    assert figures["network"]["latest_version"] == 0
    assert figures["network"]["workers"] == 0
    assert figures["leaderboard"] == []


@pytest.mark.parametrize("command", ["versions", "stats", "serve"])
def test_a_missing_home_says_to_run_init(tmp_path: Path, command: str) -> None:
    result = CliRunner().invoke(main, [command, "--home", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert "dragon-server init --home" in result.output


def test_sigterm_drains_sessions_and_exits_zero(server_home: Path) -> None:
    with ServeProcess(server_home, "drain_grace_seconds=6") as server:
        client = Client(server.address)
        key = new_key()
        client.register(key, "drained")
        session = client.session(key)
        session.hello()
        lease = session.lease()

        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        drain = session.expect("drain", timeout=30)
        assert drain.grace.ToTimedelta().total_seconds() == pytest.approx(6.0)
        # No more leases once the drain began; the current one may still be sent.
        session.send(lease_request=service_pb2.LeaseRequest())
        refused = session.receive().rejection
        assert refused.reason == types_pb2.REJECT_REASON_DRAINING
        session.close()
        assert server.wait(30) == 0
        assert time.monotonic() - started < 6.0 + 10
        log = server.log()
    assert "draining" in log
    assert lease.lease_id


@pytest.mark.slow
@pytest.mark.parametrize(
    ("pause", "grace", "published"),
    [(3.0, 20.0, True), (120.0, 2.0, False)],
    ids=["round-finishes-in-grace", "round-abandoned-at-grace"],
)
def test_sigterm_during_a_round_finishes_or_abandons_it(
    server_home: Path, pause: float, grace: float, published: bool
) -> None:
    frame = valid_frame_for(server_home)  # before the server owns the home
    settings = ("min_updates=1", f"drain_grace_seconds={grace}")
    server, marker = delayed_serve(server_home, pause, *settings)
    with server:
        client = Client(server.address)
        key = new_key()
        client.register(key, "last")
        session = client.session(key)
        session.hello()
        lease = session.lease()
        assert session.upload(lease.lease_id, frame).WhichOneof("kind") == "ack"
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)

        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        session.close()
        assert server.wait(grace + 30) == 0
        took = time.monotonic() - started
    assert took < min(pause, grace) + 10

    versions = home_state(server_home)["versions"]
    assert [row[0] for row in versions] == ([0, 1] if published else [0])
    if not published:
        # The abandoned round left a checkpoint without a row; the next open
        # removes it and the update waits, pending, for the next round.
        from dragon_server.run import TrainingRun

        TrainingRun.open(server_home).close()
        state = home_state(server_home)
        assert sorted(state["files"]) == [
            "checkpoints/v000000.safetensors",
            f"updates/{lease.lease_id}.zst",
        ]


def valid_frame_for(home: Path) -> bytes:
    from dragon_server.run import TrainingRun

    run = TrainingRun.open(home)
    try:
        return valid_frame(run)
    finally:
        run.close()


def test_a_second_server_refuses_a_served_home_and_a_used_port(
    server_home: Path, tmp_path: Path
) -> None:
    other_home = tmp_path / "other"
    shutil.copytree(server_home, other_home)
    with ServeProcess(server_home) as server:
        versions_before = home_state(server_home)

        same_home = subprocess.run(
            [program("dragon-server"), "serve", "--home", str(server_home)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        same_port = subprocess.run(
            [
                *(program("dragon-server"), "serve", "--home", str(other_home)),
                *("--listen", server.address),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

        assert same_home.returncode == 1
        assert "another dragon-server serve is already serving" in same_home.stderr
        assert same_port.returncode == 1
        assert f"could not listen on {server.address}" in same_port.stderr
        assert "Traceback" not in same_home.stderr + same_port.stderr
        assert home_state(server_home) == versions_before
        server.wait_healthy()
        assert server.terminate() == 0
