"""Leases: granting, heartbeats, expiry, release and who may submit."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import MakeUpdate, RegisterWorker

from dragon_server.data import TokenData
from dragon_server.errors import (
    Draining,
    LeaseExpired,
    LeaseNotFound,
    NotLeaseHolder,
    WorkerNotFound,
)
from dragon_server.home import init_home
from dragon_server.run import RunState, TrainingRun
from dragon_server.settings import RunConfig


def _rows(run: TrainingRun, table: str) -> list[dict[str, object]]:
    return run._store.query(f"SELECT * FROM {table} ORDER BY 1")


def test_a_grant_carries_the_batch_recipe_and_deadline(
    training_run: TrainingRun, register_worker: RegisterWorker
) -> None:
    worker, _ = register_worker(training_run, "alice")
    config = training_run.config
    before = datetime.now(UTC)

    grant = training_run.grant_lease(worker)

    assert grant is not None
    assert grant.model_version == 0
    assert grant.tokens.dtype == np.uint16
    assert grant.tokens.shape == (4, 33)
    [batch] = training_run._store.query(
        "SELECT * FROM batches WHERE id = ?", (grant.batch_id,)
    )
    assert batch["split"] == "train"
    tokens = TokenData(training_run.home / "data", 32)
    np.testing.assert_array_equal(
        grant.tokens, tokens.batch(batch["first_sequence"], batch["count"])
    )
    assert grant.recipe.local_steps == config.local_steps == 2
    assert grant.recipe.density == config.density
    assert grant.recipe.value_dtype == "fp16"
    lease_span = (grant.deadline - before).total_seconds()
    assert config.lease_seconds - 1 < lease_span < config.lease_seconds + 1
    assert grant.heartbeat_interval_seconds == config.heartbeat_seconds


def test_successive_grants_take_different_batches_in_order(
    training_run: TrainingRun, register_worker: RegisterWorker
) -> None:
    worker, _ = register_worker(training_run, "alice")
    grants = [training_run.grant_lease(worker) for _ in range(3)]

    ids = [g.batch_id for g in grants if g is not None]
    train_ids = [
        row["id"]
        for row in training_run._store.query(
            "SELECT id FROM batches WHERE split = 'train' ORDER BY id LIMIT 3"
        )
    ]
    assert ids == train_ids
    assert len({g.lease_id for g in grants if g is not None}) == 3
    seeds = {g.recipe.seed for g in grants if g is not None}
    assert len(seeds) == 3  # one seed per lease


def test_a_heartbeat_extends_the_deadline_and_records_progress(
    training_run: TrainingRun, register_worker: RegisterWorker
) -> None:
    worker, _ = register_worker(training_run, "alice")
    grant = training_run.grant_lease(worker)
    assert grant is not None

    deadline = training_run.heartbeat(worker, grant.lease_id, 1, 2, 5.25)

    assert deadline >= grant.deadline
    [lease] = _rows(training_run, "leases")
    assert (lease["steps_done"], lease["steps_total"], lease["loss"]) == (1, 2, 5.25)
    assert lease["deadline"] == pytest.approx(deadline.timestamp())


def test_an_expired_lease_returns_its_batch_to_the_queue(
    training_run: TrainingRun, register_worker: RegisterWorker
) -> None:
    worker, _ = register_worker(training_run, "alice")
    first = training_run.grant_lease(worker)
    assert first is not None

    assert training_run.expire_leases(first.deadline - timedelta(seconds=1)) == 0
    assert training_run.expire_leases(first.deadline + timedelta(seconds=1)) == 1
    again = training_run.grant_lease(worker)

    assert again is not None
    assert again.batch_id == first.batch_id
    assert again.lease_id != first.lease_id
    states = {row["id"]: row["state"] for row in _rows(training_run, "leases")}
    assert states == {first.lease_id: "expired", again.lease_id: "granted"}
    with pytest.raises(LeaseExpired):
        training_run.heartbeat(worker, first.lease_id, 1, 2, 5.0)


def test_a_released_lease_is_granted_again_at_once(
    training_run: TrainingRun, register_worker: RegisterWorker
) -> None:
    worker, _ = register_worker(training_run, "alice")
    first = training_run.grant_lease(worker)
    assert first is not None

    training_run.release_lease(worker, first.lease_id, "FAILED")
    training_run.release_lease(worker, first.lease_id, "FAILED")  # no change
    again = training_run.grant_lease(worker)

    assert again is not None
    assert again.batch_id == first.batch_id
    states = [row["state"] for row in _rows(training_run, "leases")]
    assert sorted(states) == ["failed", "granted"]


@pytest.mark.parametrize(
    ("case", "error", "reason"),
    [
        ("unknown", LeaseNotFound, "UNKNOWN_LEASE"),
        ("foreign", NotLeaseHolder, "NOT_LEASE_HOLDER"),
        ("expired", LeaseExpired, "LEASE_EXPIRED"),
        ("released", LeaseExpired, "LEASE_EXPIRED"),
    ],
    ids=["unknown", "foreign", "expired", "released"],
)
def test_submits_for_leases_not_held_are_refused(
    training_run: TrainingRun,
    register_worker: RegisterWorker,
    make_update: MakeUpdate,
    case: str,
    error: type[Exception],
    reason: str,
) -> None:
    alice, _ = register_worker(training_run, "alice")
    bob, _ = register_worker(training_run, "bob")
    grant = training_run.grant_lease(alice)
    assert grant is not None
    frame, meta = make_update(training_run, 0)
    lease_id, submitter = grant.lease_id, alice
    if case == "unknown":
        lease_id = "0" * 32
    elif case == "foreign":
        submitter = bob
    elif case == "expired":
        training_run.expire_leases(grant.deadline + timedelta(seconds=1))
    else:
        training_run.release_lease(alice, grant.lease_id, "SHUTDOWN")

    with pytest.raises(error) as caught:
        training_run.submit_update(submitter, lease_id, frame, meta)

    assert getattr(caught.value, "reason", None) == reason
    assert _rows(training_run, "updates") == []
    assert training_run.network_stats().rejected_update_count == 1
    assert list((training_run.home / "updates").iterdir()) == []


def test_a_lease_completed_after_a_regrant_is_counted_once(
    training_run: TrainingRun,
    register_worker: RegisterWorker,
    make_update: MakeUpdate,
) -> None:
    alice, _ = register_worker(training_run, "alice")
    bob, _ = register_worker(training_run, "bob")
    first = training_run.grant_lease(alice)
    assert first is not None
    training_run.expire_leases(first.deadline + timedelta(seconds=1))
    second = training_run.grant_lease(bob)
    assert second is not None
    assert second.batch_id == first.batch_id
    frame, meta = make_update(training_run, 0)

    assert (
        training_run.submit_update(bob, second.lease_id, frame, meta).duplicate is False
    )
    with pytest.raises(LeaseExpired):
        training_run.submit_update(alice, first.lease_id, frame, meta)

    [update] = _rows(training_run, "updates")
    assert (update["lease_id"], update["worker_id"]) == (second.lease_id, bob)
    trained = training_run._store.scalar(
        "SELECT trained_count FROM batches WHERE id = ?", (first.batch_id,)
    )
    assert trained == 1
    stats = training_run.network_stats()
    assert (stats.accepted_update_count, stats.lease_count) == (1, 2)
    assert training_run.worker_stats(bob).accepted_update_count == 1
    assert training_run.worker_stats(alice).accepted_update_count == 0


def test_draining_stops_grants_but_not_submits(
    training_run: TrainingRun,
    register_worker: RegisterWorker,
    make_update: MakeUpdate,
) -> None:
    worker, _ = register_worker(training_run, "alice")
    grant = training_run.grant_lease(worker)
    assert grant is not None

    assert training_run.state is RunState.SERVING
    training_run.begin_drain()

    assert training_run.draining
    assert training_run.state is RunState.DRAINING
    with pytest.raises(Draining) as caught:
        training_run.grant_lease(worker)
    assert caught.value.reason == "DRAINING"
    frame, meta = make_update(training_run, 0)
    assert (
        training_run.submit_update(worker, grant.lease_id, frame, meta).duplicate
        is False
    )


def test_one_worker_cannot_hoard_the_queue(
    server_home: Path, register_worker: RegisterWorker
) -> None:
    run = TrainingRun.open(server_home, {"max_leases_per_worker": 2})
    try:
        alice, _ = register_worker(run, "alice")
        bob, _ = register_worker(run, "bob")
        first, second = run.grant_lease(alice), run.grant_lease(alice)
        assert first is not None
        assert second is not None

        # At the cap, asking again gives back the oldest lease: a restarted
        # worker is not locked out, and it never holds more than the cap.
        third = run.grant_lease(alice)
        assert third is not None
        held = run._store.query(
            "SELECT id FROM leases WHERE worker_id = ? AND state = 'granted'",
            (alice,),
        )
        assert sorted(row["id"] for row in held) == sorted(
            [second.lease_id, third.lease_id]
        )
        assert run.grant_lease(bob) is not None
        with pytest.raises(LeaseExpired):
            run.heartbeat(alice, first.lease_id, 1, 8, 5.0)
    finally:
        run.close()


def test_an_unknown_worker_gets_no_lease(training_run: TrainingRun) -> None:
    with pytest.raises(WorkerNotFound):
        training_run.grant_lease("w0000000000000000")


@pytest.fixture
def three_batch_run(tmp_path: Path, server_config: RunConfig) -> Iterator[TrainingRun]:
    # 17 rows of 33 ids: 4 blocks of 4 (one held back) and a 1-row tail.
    text = "".join(chr(ord("a") + i % 26) for i in range(17 * 33 - 1))
    (tmp_path / "corpus.txt").write_text(text)
    home = tmp_path / "small-home"
    init_home(home, [tmp_path / "corpus.txt"], server_config, progress=False)
    run = TrainingRun.open(home)
    yield run
    run.close()


def test_batches_are_reused_epoch_after_epoch(
    three_batch_run: TrainingRun,
    register_worker: RegisterWorker,
    make_update: MakeUpdate,
) -> None:
    run = three_batch_run
    worker, _ = register_worker(run, "alice")
    train_ids = [
        row["id"]
        for row in run._store.query("SELECT id FROM batches WHERE split = 'train'")
    ]
    assert len(train_ids) == 3

    grants = [run.grant_lease(worker) for _ in range(3)]
    assert run.grant_lease(worker) is None  # every batch is out
    assert [g.batch_id for g in grants if g is not None] == train_ids

    # Complete the last two; the first one is still out, so the next epoch
    # starts with the second batch.
    for seed, grant in enumerate(grants[1:]):
        assert grant is not None
        frame, meta = make_update(run, 0, seed=seed)
        run.submit_update(worker, grant.lease_id, frame, meta)
    assert run.grant_lease(worker) is not None
    third = run.grant_lease(worker)
    assert third is not None
    assert third.batch_id == train_ids[2]
    assert run.grant_lease(worker) is None
