"""The real ``dragon-server`` process, debugged with the real grpcurl binary.

The server must answer grpcurl without any .proto file: reflection serves every
dragon.v1 service, the imported types.proto and the well-known types.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
from dragon.v1 import service_pb2
from rpc_support import ServeProcess, new_key, program

SERVICES = [
    service.full_name for service in service_pb2.DESCRIPTOR.services_by_name.values()
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    home = tmp_path_factory.mktemp("grpcurl") / "home"
    init = [program("dragon-server"), "init", "--home", str(home)]
    init += ["--max-corpus-bytes", "40000", "--seq-len", "32", "--pow-bits", "0"]
    subprocess.run(init, check=True, capture_output=True, timeout=120)
    with ServeProcess(home) as process:
        yield process
        assert process.terminate() == 0


def grpcurl(server: ServeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """grpcurl with ``args`` (options, then the verb and its symbol, if any)."""
    options = [arg for arg in args if arg.startswith("-")]
    verb = [arg for arg in args if not arg.startswith("-")]
    command = [program("grpcurl"), "-plaintext", *options, server.address, *verb]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_list_shows_every_service(server: ServeProcess) -> None:
    listed = grpcurl(server, "list")
    assert listed.returncode == 0, listed.stderr
    names = set(listed.stdout.split())
    assert {*SERVICES, "grpc.health.v1.Health"} <= names
    assert len(SERVICES) == 5


@pytest.mark.parametrize("service", SERVICES)
def test_describe_every_service(server: ServeProcess, service: str) -> None:
    described = grpcurl(server, "describe", service)
    assert described.returncode == 0, described.stderr
    assert f"{service} is a service" in described.stdout
    assert "rpc " in described.stdout


@pytest.mark.parametrize(
    ("symbol", "words"),
    [
        ("dragon.v1.Recipe", "uint32 local_steps = 1;"),
        ("dragon.v1.Lease", ".google.protobuf.Timestamp deadline = 5;"),
        ("dragon.v1.RejectReason", "REJECT_REASON_TOO_LARGE = 6;"),
        ("google.protobuf.Duration", "int64 seconds = 1;"),
        ("dragon.v1.SessionRequest", "UpdateChunk update_chunk = 4;"),
    ],
    ids=["types-message", "types-with-wkt", "types-enum", "wkt", "service-message"],
)
def test_describe_messages_of_imported_files(
    server: ServeProcess, symbol: str, words: str
) -> None:
    described = grpcurl(server, "describe", symbol)
    assert described.returncode == 0, described.stderr
    assert words in described.stdout


def call(
    server: ServeProcess, method: str, body: dict[str, object], *headers: str
) -> subprocess.CompletedProcess[str]:
    command = [program("grpcurl"), "-plaintext", "-max-time", "20"]
    for header in headers:
        command += ["-H", header]
    command += ["-d", json.dumps(body), server.address, method]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_health_check_is_serving(server: ServeProcess) -> None:
    for service in ("", *SERVICES):
        checked = call(server, "grpc.health.v1.Health/Check", {"service": service})
        assert checked.returncode == 0, checked.stderr
        assert json.loads(checked.stdout) == {"status": "SERVING"}


def test_register_then_stats_with_and_without_the_key(server: ServeProcess) -> None:
    challenge = call(server, "dragon.v1.RegistrationService/GetChallenge", {})
    assert challenge.returncode == 0, challenge.stderr
    assert json.loads(challenge.stdout).get("difficulty_bits", 0) == 0

    key = new_key()
    registered = call(
        server,
        "dragon.v1.RegistrationService/Register",
        {"api_key": key, "worker_name": "grpcurl"},
    )
    assert registered.returncode == 0, registered.stderr
    worker_id = json.loads(registered.stdout)["worker_id"]

    stats = call(
        server,
        "dragon.v1.StatsService/GetNetworkStats",
        {},
        f"authorization: Bearer {key}",
    )
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    assert int(figures["worker_count"]) >= 1
    assert figures["latest_version"]["checkpoint_size_bytes"]

    mine = call(
        server,
        "dragon.v1.StatsService/GetWorkerStats",
        {},
        f"authorization: Bearer {key}",
    )
    assert json.loads(mine.stdout)["worker"]["worker_name"] == "grpcurl"
    assert json.loads(mine.stdout)["worker"]["worker_id"] == worker_id

    anonymous = call(server, "dragon.v1.StatsService/GetNetworkStats", {})
    assert anonymous.returncode != 0
    assert "Unauthenticated" in anonymous.stderr
    wrong = call(
        server,
        "dragon.v1.StatsService/GetNetworkStats",
        {},
        f"authorization: Bearer {new_key()}",
    )
    assert wrong.returncode != 0
    assert "Unauthenticated" in wrong.stderr
