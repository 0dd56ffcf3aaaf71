"""Registration and the bearer-key interceptor over real gRPC."""

from __future__ import annotations

import itertools
from pathlib import Path

import grpc
import pytest
from dragon.v1 import service_pb2
from rpc_support import RPC_TIMEOUT, Client, ServerThread, bearer, new_key

from forge import pow


@pytest.fixture
def client(rpc_server: ServerThread) -> Client:
    return Client(rpc_server.address)


def test_register_solves_the_challenge_and_is_idempotent(
    client: Client, rpc_server: ServerThread
) -> None:
    challenge = client.registration.GetChallenge(
        service_pb2.GetChallengeRequest(), timeout=RPC_TIMEOUT
    )
    assert challenge.difficulty_bits == rpc_server.run.config.pow_difficulty_bits > 0
    assert len(challenge.challenge) >= 8
    assert challenge.expires_at.seconds > 0

    key = new_key()
    worker_id = client.register(key, "alice")
    again = client.registration.Register(
        service_pb2.RegisterRequest(api_key=key, worker_name="alice"),
        timeout=RPC_TIMEOUT,
    )
    assert again.worker_id == worker_id
    assert again.already_registered


def test_wrong_nonce_is_refused(client: Client) -> None:
    key = new_key()
    challenge = client.registration.GetChallenge(
        service_pb2.GetChallengeRequest(), timeout=RPC_TIMEOUT
    )
    bits = challenge.difficulty_bits
    wrong = next(
        n for n in itertools.count() if not pow.check(challenge.challenge, key, n, bits)
    )
    request = service_pb2.RegisterRequest(
        api_key=key, challenge=challenge.challenge, nonce=wrong
    )
    with pytest.raises(grpc.RpcError) as refused:
        client.registration.Register(request, timeout=RPC_TIMEOUT)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # The key was not registered: it cannot authenticate.
    with pytest.raises(grpc.RpcError) as denied:
        client.stats.GetNetworkStats(
            service_pb2.GetNetworkStatsRequest(), metadata=bearer(key), timeout=5
        )
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "api_key",
    ["", "abc", "g" * 64, "A" * 64, "0" * 63, "0" * 65],
    ids=["empty", "short", "not-hex", "upper", "63", "65"],
)
def test_malformed_key_is_invalid_argument(client: Client, api_key: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        client.registration.Register(
            service_pb2.RegisterRequest(api_key=api_key), timeout=RPC_TIMEOUT
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_key_is_stored_only_as_its_hash(
    client: Client, rpc_server: ServerThread, server_home: Path
) -> None:
    key = new_key()
    client.register(key, "bob")
    stored = b"".join(
        path.read_bytes() for path in sorted(server_home.glob("dragon.db*"))
    )
    assert key.encode() not in stored
    assert bytes.fromhex(key) not in stored
    assert pow.key_hash(key) in stored


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer " + "0" * 64),),
        (("authorization", "Basic abc"),),
        (("authorization", "Bearer"),),
    ],
    ids=["missing", "unknown-key", "wrong-scheme", "empty-token"],
)
def test_calls_without_a_registered_key_are_unauthenticated(
    client: Client, metadata: tuple[tuple[str, str], ...]
) -> None:
    calls = [
        lambda: client.stats.GetNetworkStats(
            service_pb2.GetNetworkStatsRequest(), metadata=metadata, timeout=5
        ),
        lambda: client.model.GetLatestVersion(
            service_pb2.GetLatestVersionRequest(), metadata=metadata, timeout=5
        ),
        lambda: list(
            client.model.DownloadCheckpoint(
                service_pb2.DownloadCheckpointRequest(), metadata=metadata, timeout=5
            )
        ),
        lambda: list(
            client.training.Session(
                iter([service_pb2.SessionRequest(hello=service_pb2.Hello())]),
                metadata=metadata,
                timeout=5,
            )
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as denied:
            call()
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "key" in (denied.value.details() or "")


def test_a_registered_key_authenticates(client: Client) -> None:
    key = new_key()
    worker_id = client.register(key, "carol")
    stats = client.stats.GetWorkerStats(
        service_pb2.GetWorkerStatsRequest(), metadata=bearer(key), timeout=5
    )
    assert stats.worker.worker_id == worker_id
    assert stats.worker.worker_name == "carol"


def test_worker_names_keep_printable_characters_only(client: Client) -> None:
    key = new_key()
    client.register(key, "\x1b[31mred\x1b[0m\tname\x07")

    stats = client.stats.GetWorkerStats(
        service_pb2.GetWorkerStatsRequest(), metadata=bearer(key), timeout=5
    )

    assert stats.worker.worker_name == "[31mred[0mname"
