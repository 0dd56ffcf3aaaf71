"""The TrainingRun facade: homes, admission, updates, aggregation, crash recovery."""

from __future__ import annotations

import hashlib
import math
import secrets
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard
from conftest import MakeUpdate, RegisterWorker
from dragon.v1 import types_pb2
from google.protobuf import json_format

from dragon_server import run as run_module
from dragon_server.errors import (
    ChallengeExpired,
    ConfigInvalid,
    DataError,
    DigestMismatch,
    DragonError,
    InvalidKey,
    MalformedUpdate,
    NonFiniteUpdate,
    NoSamples,
    ProofOfWorkFailed,
    TooStale,
    Unauthenticated,
    UpdateTooLarge,
    VersionNotFound,
)
from dragon_server.home import init_home
from dragon_server.run import EventRecord, TrainingRun, UpdateMeta
from dragon_server.settings import RunConfig
from forge import pow
from forge.checkpoint import load_checkpoint, model_from_checkpoint
from forge.codec import encode_update
from forge.train import evaluate, train_lease

# --- helpers -----------------------------------------------------------------


def _accepted(
    run: TrainingRun, worker: str, make_update: MakeUpdate, seed: int = 0
) -> str:
    grant = run.grant_lease(worker)
    assert grant is not None
    frame, meta = make_update(run, grant.model_version, seed=seed)
    assert run.submit_update(worker, grant.lease_id, frame, meta).duplicate is False
    return grant.lease_id


def _snapshot(run: TrainingRun) -> dict[str, Any]:
    """Every row that an update or an aggregation may touch, and the files."""
    tables = ("leases", "updates", "versions", "batches")
    rows = {t: run._store.query(f"SELECT * FROM {t} ORDER BY 1") for t in tables}
    files = {
        str(path.relative_to(run.home)): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in ("updates", "checkpoints")
        for path in sorted((run.home / folder).iterdir())
    }
    return {"rows": rows, "files": files}


def _frame_with(run: TrainingRun, tensors: dict[str, torch.Tensor], **kw: Any) -> bytes:
    return encode_update(
        tensors, None, kw.pop("density", run.config.density), **kw
    ).frame


def _meta(frame: bytes, **changes: Any) -> UpdateMeta:
    meta = UpdateMeta(
        base_version=0,
        sample_count=8,
        token_count=256,
        loss_before=5.5,
        loss_after=5.25,
        train_seconds=0.5,
        sha256=hashlib.sha256(frame).digest(),
        size_bytes=len(frame),
    )
    return replace(meta, **changes)


def _recompressed_with_inf(frame: bytes) -> bytes:
    # Flip the first fp16 value of the frame to +inf (0x7c00), keeping it a valid
    # safetensors payload inside a valid zstd frame.
    content = bytearray(zstandard.ZstdDecompressor().decompress(frame))
    header = int.from_bytes(content[:8], "little")
    import json

    infos = json.loads(content[8 : 8 + header])
    name = next(k for k in sorted(infos) if k.startswith("values/"))
    start = 8 + header + infos[name]["data_offsets"][0]
    count = infos[name]["shape"][-1]
    # Byte planes: the low bytes of every value come first, then the high bytes.
    content[start] = 0x00
    content[start + count] = 0x7C
    return zstandard.ZstdCompressor(write_content_size=True).compress(bytes(content))


# --- homes -------------------------------------------------------------------


def test_init_home_builds_a_home_with_version_zero(
    training_run: TrainingRun, server_config: RunConfig
) -> None:
    home = training_run.home
    assert (home / "dragon.toml").is_file()
    assert RunConfig.load(home) == server_config
    assert (home / "data" / "tokens.u16").stat().st_size % (33 * 2) == 0
    record = training_run.latest_version()
    assert record.version == 0
    assert record.checkpoint_path == home / "checkpoints" / "v000000.safetensors"
    assert record.sha256 == hashlib.sha256(record.checkpoint_path.read_bytes()).digest()
    assert record.size_bytes == record.checkpoint_path.stat().st_size
    # An untrained byte model is close to uniform: ln(257) ~ 5.55 nats.
    assert 4.5 < record.validation_loss < 6.5
    assert training_run.version(0) == record
    with pytest.raises(VersionNotFound):
        training_run.version(1)


def test_init_home_reports_what_it_built(
    tmp_path: Path, server_config: RunConfig
) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(17 * 33 - 1))
    (tmp_path / "corpus.txt").write_text(text)

    summary = init_home(
        tmp_path / "home", [tmp_path / "corpus.txt"], server_config, progress=False
    )

    assert (summary.documents, summary.sequences, summary.tokens) == (1, 17, 17 * 33)
    assert (summary.batches, summary.validation_sequences) == (3, 5)
    assert summary.parameters > 100_000
    assert math.isfinite(summary.validation_loss)


def test_init_home_refuses_a_used_folder_and_cleans_up_on_failure(
    tmp_path: Path, server_config: RunConfig
) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(ConfigInvalid, match="not empty"):
        init_home(used, [], server_config, progress=False)
    assert [p.name for p in used.iterdir()] == ["notes.txt"]

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"no": "text"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        init_home(tmp_path / "new", [tmp_path / "bad.jsonl"], server_config)
    assert not (tmp_path / "new").exists()


def test_a_home_without_its_latest_checkpoint_is_refused(server_home: Path) -> None:
    (server_home / "checkpoints" / "v000000.safetensors").unlink()
    with pytest.raises(ConfigInvalid, match="missing or damaged"):
        TrainingRun.open(server_home)


def test_fields_that_shape_the_data_cannot_change_on_open(server_home: Path) -> None:
    with pytest.raises(ConfigInvalid, match="sequence_length is fixed"):
        TrainingRun.open(server_home, {"sequence_length": 16})
    with pytest.raises(ConfigInvalid, match="unknown config field 'colour'"):
        TrainingRun.open(server_home, {"colour": "red"})
    run = TrainingRun.open(server_home, {"min_updates": "7", "optimizer": "nesterov"})
    try:
        assert (run.config.min_updates, run.config.optimizer) == (7, "nesterov")
    finally:
        run.close()


# --- admission ---------------------------------------------------------------


def test_registration_demands_the_proof_of_work(training_run: TrainingRun) -> None:
    key = secrets.token_hex(32)
    challenge = training_run.challenge()
    assert challenge.difficulty_bits == 4
    nonce = pow.solve(challenge.challenge, key, 4)
    wrong = next(
        n
        for n in range(nonce + 1, nonce + 10_000)
        if not pow.check(challenge.challenge, key, n, 4)
    )

    with pytest.raises(ProofOfWorkFailed):
        training_run.register(key, "alice", challenge.challenge, wrong)
    first = training_run.register(key, "alice", challenge.challenge, nonce)
    again = training_run.register(key, "alice", b"", 0)

    assert first.already_registered is False
    assert again == replace(first, already_registered=True)
    assert training_run.authenticate(key) == first.worker_id
    assert training_run.worker_stats(first.worker_id).worker_name == "alice"
    other = secrets.token_hex(32)
    with pytest.raises(ChallengeExpired):  # a challenge is spent once
        training_run.register(other, "bob", challenge.challenge, nonce)


def test_bad_keys_are_refused(training_run: TrainingRun) -> None:
    with pytest.raises(InvalidKey):
        training_run.register("short", "x", b"", 0)
    with pytest.raises(Unauthenticated):
        training_run.authenticate(secrets.token_hex(32))
    with pytest.raises(Unauthenticated):
        training_run.authenticate("")


# --- updates -----------------------------------------------------------------


def test_a_repeated_upload_is_acknowledged_and_counted_once(
    training_run: TrainingRun, register_worker: RegisterWorker, make_update: MakeUpdate
) -> None:
    worker, _ = register_worker(training_run, "alice")
    grant = training_run.grant_lease(worker)
    assert grant is not None
    frame, meta = make_update(training_run, 0)

    first = training_run.submit_update(worker, grant.lease_id, frame, meta)
    before = _snapshot(training_run)
    second = training_run.submit_update(worker, grant.lease_id, frame, meta)

    assert (first.duplicate, second.duplicate) == (False, True)
    assert _snapshot(training_run) == before
    [row] = before["rows"]["updates"]
    assert (row["lease_id"], row["state"], row["size"]) == (
        grant.lease_id,
        "pending",
        len(frame),
    )
    assert (training_run.home / row["path"]).read_bytes() == frame
    stats = training_run.worker_stats(worker)
    assert (stats.accepted_update_count, stats.token_count) == (1, meta.token_count)
    assert training_run.network_stats().uploaded_bytes == len(frame)


def test_claims_beyond_the_recipe_count_for_no_more_than_it(
    training_run: TrainingRun, register_worker: RegisterWorker, make_update: MakeUpdate
) -> None:
    worker, _ = register_worker(training_run, "boaster")
    grant = training_run.grant_lease(worker)
    assert grant is not None
    frame, meta = make_update(training_run, 0, samples=10**6)
    boast = replace(meta, token_count=10**9)
    training_run.submit_update(worker, grant.lease_id, frame, boast)

    record = training_run.aggregate()

    c = training_run.config
    assert c.local_steps * c.batch_size * c.sequence_length == 256
    assert training_run.worker_stats(worker).token_count == 256
    assert record is not None
    assert record.token_count == 256
    # The weight is capped too: at local_steps * batch_size samples.
    weight = training_run._store.scalar("SELECT weight FROM updates")
    assert weight == c.local_steps * c.batch_size == 8


def test_racing_uploads_of_one_lease_are_accepted_once(
    training_run: TrainingRun, register_worker: RegisterWorker, make_update: MakeUpdate
) -> None:
    worker, _ = register_worker(training_run, "alice")
    grant = training_run.grant_lease(worker)
    assert grant is not None
    frame, meta = make_update(training_run, 0)
    results: list[bool] = []
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            result = training_run.submit_update(worker, grant.lease_id, frame, meta)
            results.append(result.duplicate)
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sorted(results) == [False, True, True, True]
    assert training_run._store.scalar("SELECT COUNT(*) FROM updates") == 1
    assert training_run.worker_stats(worker).accepted_update_count == 1
    assert [p.name for p in (training_run.home / "updates").iterdir()] == [
        f"{grant.lease_id}.zst"
    ]


def _case(
    run: TrainingRun, make_update: MakeUpdate, case: str
) -> tuple[bytes, UpdateMeta]:
    frame, meta = make_update(run, 0)
    spec = run.spec
    if case == "digest":
        return frame, replace(meta, sha256=bytes(32))
    if case == "size":
        return frame, replace(meta, size_bytes=len(frame) + 1)
    if case == "no-samples":
        return frame, replace(meta, sample_count=0)
    if case == "future-base":
        return frame, replace(meta, base_version=3)
    if case == "nan-loss":
        return frame, replace(meta, loss_after=math.nan)
    if case == "garbage":
        junk = secrets.token_bytes(2000)
        return junk, _meta(junk)
    if case == "unknown-tensor":
        junk = _frame_with(run, {"not.a.weight": torch.ones(10)})
        return junk, _meta(junk)
    if case == "wrong-shape":
        name = sorted(spec)[0]
        junk = _frame_with(run, {name: torch.ones(3, 3, 3)})
        return junk, _meta(junk)
    if case == "too-dense":
        dense = {name: torch.randn(shape) for name, shape in spec.items()}
        junk = _frame_with(run, dense, density=0.5)
        return junk, _meta(junk)
    if case == "non-finite":
        junk = _recompressed_with_inf(frame)
        return junk, _meta(junk)
    raise AssertionError(case)


MALFORMED = [
    ("digest", DigestMismatch, "DIGEST_MISMATCH"),
    ("size", DigestMismatch, "DIGEST_MISMATCH"),
    ("no-samples", NoSamples, "NO_SAMPLES"),
    ("future-base", MalformedUpdate, "MALFORMED_UPDATE"),
    ("nan-loss", NonFiniteUpdate, "NON_FINITE"),
    ("garbage", MalformedUpdate, "MALFORMED_UPDATE"),
    ("unknown-tensor", MalformedUpdate, "MALFORMED_UPDATE"),
    ("wrong-shape", MalformedUpdate, "MALFORMED_UPDATE"),
    ("too-dense", UpdateTooLarge, "TOO_LARGE"),
    ("non-finite", NonFiniteUpdate, "NON_FINITE"),
]


@pytest.mark.parametrize(
    ("case", "error", "reason"), MALFORMED, ids=[c for c, _, _ in MALFORMED]
)
def test_a_bad_update_is_refused_and_changes_nothing(
    training_run: TrainingRun,
    register_worker: RegisterWorker,
    make_update: MakeUpdate,
    case: str,
    error: type[DragonError],
    reason: str,
) -> None:
    worker, _ = register_worker(training_run, "alice")
    grant = training_run.grant_lease(worker)
    assert grant is not None
    frame, meta = _case(training_run, make_update, case)
    events: list[EventRecord] = []
    training_run.add_listener(events.append)
    before = _snapshot(training_run)

    with pytest.raises(error) as caught:
        training_run.submit_update(worker, grant.lease_id, frame, meta)

    assert caught.value.reason == reason
    assert _snapshot(training_run) == before
    assert [e.kind for e in events] == ["update_rejected"]
    assert events[0].payload["reason"] == f"REJECT_REASON_{reason}"
    # The lease stays the worker's: a good upload is still accepted.
    good, good_meta = make_update(training_run, 0)
    assert training_run.submit_update(worker, grant.lease_id, good, good_meta) == (
        run_module.SubmitResult(duplicate=False)
    )


def test_an_update_over_the_configured_limit_is_too_large(
    server_home: Path, register_worker: RegisterWorker, make_update: MakeUpdate
) -> None:
    run = TrainingRun.open(server_home, {"max_update_bytes": 1000})
    try:
        worker, _ = register_worker(run, "alice")
        grant = run.grant_lease(worker)
        assert grant is not None
        frame, meta = make_update(run, 0)
        assert len(frame) > 1000
        with pytest.raises(UpdateTooLarge, match="limit is 1000"):
            run.submit_update(worker, grant.lease_id, frame, meta)
    finally:
        run.close()


def test_updates_beyond_the_staleness_bound_are_refused(
    server_home: Path, register_worker: RegisterWorker, make_update: MakeUpdate
) -> None:
    run = TrainingRun.open(server_home, {"max_staleness": 0, "min_updates": 1})
    try:
        worker, _ = register_worker(run, "alice")
        stale = run.grant_lease(worker)
        assert stale is not None
        _accepted(run, worker, make_update)
        assert run.aggregate() is not None
        frame, meta = make_update(run, 0)
        with pytest.raises(TooStale) as caught:
            run.submit_update(worker, stale.lease_id, frame, meta)
        assert caught.value.reason == "TOO_STALE"
    finally:
        run.close()


# --- aggregation -------------------------------------------------------------


def test_aggregation_is_due_by_count_or_by_interval(
    training_run: TrainingRun, register_worker: RegisterWorker, make_update: MakeUpdate
) -> None:
    worker, _ = register_worker(training_run, "alice")
    assert training_run.aggregation_due() is False
    _accepted(training_run, worker, make_update)
    first = training_run._store.scalar("SELECT received_at FROM updates")

    assert training_run.aggregation_due() is False  # 1 of min_updates=2
    interval = training_run.config.aggregation_interval_seconds
    later = run_module._utc(first + interval + 1)
    assert training_run.aggregation_due(later) is True
    _accepted(training_run, worker, make_update, seed=1)
    assert training_run.aggregation_due() is True


def test_aggregation_publishes_a_version_with_its_validation_loss(
    training_run: TrainingRun, register_worker: RegisterWorker, make_update: MakeUpdate
) -> None:
    alice, _ = register_worker(training_run, "alice")
    bob, _ = register_worker(training_run, "bob")
    _accepted(training_run, alice, make_update, seed=1)
    _accepted(training_run, bob, make_update, seed=2)
    events: list[EventRecord] = []
    training_run.add_listener(events.append)

    record = training_run.aggregate()

    assert record is not None
    assert (record.version, record.update_count) == (1, 2)
    assert record.token_count == 2 * 8 * 32
    checkpoint = load_checkpoint(record.checkpoint_path)
    assert checkpoint.version == 1
    model = model_from_checkpoint(checkpoint)
    expected = evaluate(model, training_run.validation_tokens())
    assert record.validation_loss == pytest.approx(expected, rel=1e-6)
    assert training_run.latest_version() == record
    states = training_run._store.query(
        "SELECT state, applied_version, weight FROM updates"
    )
    assert states == [{"state": "applied", "applied_version": 1, "weight": 8.0}] * 2
    assert [e.kind for e in events] == ["version_published", "aggregation_done"]
    assert list((training_run.home / "updates").iterdir()) == []  # frames applied
    assert training_run.aggregate() is None  # nothing pending any more


def test_a_real_trained_update_lowers_the_validation_loss(
    server_home: Path, register_worker: RegisterWorker
) -> None:
    # Dense updates and plain averaging: version 1 is exactly the worker's
    # trained model, so the sign of the pseudo-gradient shows in the loss.
    overrides = {"density": 1.0, "local_steps": 4, "learning_rate": 1e-2}
    run = TrainingRun.open(server_home, overrides)
    try:
        worker, _ = register_worker(run, "alice")
        grant = run.grant_lease(worker)
        assert grant is not None
        model = model_from_checkpoint(
            load_checkpoint(run.latest_version().checkpoint_path)
        )
        r = grant.recipe
        recipe = r.train_recipe()
        tokens = torch.from_numpy(grant.tokens.astype("int64"))
        result = train_lease(model, tokens, recipe, device=torch.device("cpu"))
        frame = encode_update(result.pseudo_gradient, None, r.density, "fp32").frame
        meta = _meta(frame, sample_count=result.sample_count)
        run.submit_update(worker, grant.lease_id, frame, meta)

        record = run.aggregate()

        assert record is not None
        before = run.version(0).validation_loss
        assert record.validation_loss < before - 0.5  # 5.30 -> 3.66 measured
        trained = evaluate(model, run.validation_tokens())
        assert record.validation_loss == pytest.approx(trained, abs=1e-4)
    finally:
        run.close()


def test_the_new_weights_are_the_old_minus_the_mean_update(
    training_run: TrainingRun, register_worker: RegisterWorker
) -> None:
    worker, _ = register_worker(training_run, "alice")
    before = load_checkpoint(training_run.latest_version().checkpoint_path).tensors
    name = "final_norm.weight" if "final_norm.weight" in before else sorted(before)[-1]
    shape = training_run.spec[name]
    delta = torch.zeros(shape)
    delta.view(-1)[0] = 0.5  # one entry, exact in fp16
    frame = _frame_with(training_run, {name: delta})
    grant = training_run.grant_lease(worker)
    assert grant is not None
    training_run.submit_update(worker, grant.lease_id, frame, _meta(frame))

    record = training_run.aggregate()

    assert record is not None
    after = load_checkpoint(record.checkpoint_path).tensors
    assert after[name].view(-1)[0].item() == before[name].view(-1)[0].item() - 0.5
    assert torch.equal(after[name].view(-1)[1:], before[name].view(-1)[1:])
    others = [n for n in before if n != name]
    assert all(torch.equal(after[n], before[n]) for n in others)


class SimulatedCrash(BaseException):
    """Stands for the process dying: nothing after it runs."""


def _crash(*args: object, **kwargs: object) -> None:
    raise SimulatedCrash


def test_a_crash_before_the_commit_recovers_to_the_old_version(
    server_home: Path,
    register_worker: RegisterWorker,
    make_update: MakeUpdate,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = TrainingRun.open(server_home)
    worker, _ = register_worker(run, "alice")
    _accepted(run, worker, make_update, seed=1)
    _accepted(run, worker, make_update, seed=2)
    monkeypatch.setattr(TrainingRun, "_publish", _crash)

    with pytest.raises(SimulatedCrash):
        run.aggregate()
    run.close()
    monkeypatch.undo()
    orphan = server_home / "checkpoints" / "v000001.safetensors"
    assert orphan.exists()  # written, but its version row never committed

    again = TrainingRun.open(server_home)
    try:
        assert not orphan.exists()
        assert again.latest_version().version == 0
        pending = again._store.scalar(
            "SELECT COUNT(*) FROM updates WHERE state = 'pending'"
        )
        assert pending == 2
        record = again.aggregate()
        assert record is not None
        assert (record.version, record.update_count) == (1, 2)
        assert again.aggregate() is None
    finally:
        again.close()


def test_a_failure_inside_the_transaction_leaves_no_trace(
    training_run: TrainingRun,
    register_worker: RegisterWorker,
    make_update: MakeUpdate,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker, _ = register_worker(training_run, "alice")
    _accepted(training_run, worker, make_update, seed=1)
    _accepted(training_run, worker, make_update, seed=2)
    before = _snapshot(training_run)
    real_event = run_module._event

    def failing_event(conn: sqlite3.Connection, kind: str, payload: Any) -> Any:
        if kind == "aggregation_done":  # after the version row and the updates
            raise OSError("disk full")
        return real_event(conn, kind, payload)

    monkeypatch.setattr(run_module, "_event", failing_event)
    with pytest.raises(OSError, match="disk full"):
        training_run.aggregate()

    assert _snapshot(training_run) == before
    monkeypatch.setattr(run_module, "_event", real_event)
    record = training_run.aggregate()
    assert record is not None
    assert record.update_count == 2


def test_a_crash_while_storing_an_update_loses_nothing_half_way(
    server_home: Path,
    register_worker: RegisterWorker,
    make_update: MakeUpdate,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = TrainingRun.open(server_home)
    worker, _ = register_worker(run, "alice")
    grant = run.grant_lease(worker)
    assert grant is not None
    frame, meta = make_update(run, 0)
    monkeypatch.setattr(TrainingRun, "_record_accepted", _crash)
    with pytest.raises(SimulatedCrash):
        run.submit_update(worker, grant.lease_id, frame, meta)
    run.close()
    monkeypatch.undo()

    again = TrainingRun.open(server_home)
    try:
        assert list((server_home / "updates").iterdir()) == []
        assert again._store.scalar("SELECT COUNT(*) FROM updates") == 0
        # The lease is still granted: the worker's retry is accepted.
        result = again.submit_update(worker, grant.lease_id, frame, meta)
        assert result.duplicate is False
    finally:
        again.close()


@pytest.mark.parametrize("optimizer", ["fedadam", "nesterov"])
def test_stateful_optimizers_carry_their_state_across_versions(
    server_home: Path,
    register_worker: RegisterWorker,
    make_update: MakeUpdate,
    optimizer: str,
) -> None:
    run = TrainingRun.open(server_home, {"optimizer": optimizer, "min_updates": 1})
    try:
        worker, _ = register_worker(run, "alice")
        for version in (1, 2):
            _accepted(run, worker, make_update, seed=version)
            record = run.aggregate()
            assert record is not None
            assert record.version == version
        state = server_home / "checkpoints" / "opt-v000002.safetensors"
        assert state.exists()
        assert math.isfinite(run.latest_version().validation_loss)
    finally:
        run.close()


def test_a_robust_rule_from_the_config_combines_the_round(
    server_home: Path, register_worker: RegisterWorker, make_update: MakeUpdate
) -> None:
    overrides = {"aggregation_rule": "multi_krum", "byzantine_workers": 0}
    run = TrainingRun.open(server_home, overrides)
    try:
        worker, _ = register_worker(run, "alice")
        for seed in range(3):
            _accepted(run, worker, make_update, seed=seed)
        record = run.aggregate()
        assert record is not None
        assert (record.version, record.update_count) == (1, 3)
        assert math.isfinite(record.validation_loss)
    finally:
        run.close()


def test_a_round_of_zero_weight_is_discarded_not_applied(
    training_run: TrainingRun, register_worker: RegisterWorker, make_update: MakeUpdate
) -> None:
    worker, _ = register_worker(training_run, "alice")
    _accepted(training_run, worker, make_update)
    with training_run._store.write() as conn:
        conn.execute("UPDATE workers SET reputation = 0")

    assert training_run.aggregate() is None

    assert training_run.latest_version().version == 0
    assert training_run._store.scalar("SELECT state FROM updates") == "discarded"


# --- events and stats --------------------------------------------------------


def test_events_parse_as_protobuf_and_a_failing_listener_is_contained(
    training_run: TrainingRun,
    register_worker: RegisterWorker,
    make_update: MakeUpdate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(event: EventRecord) -> None:
        raise RuntimeError("listener bug")

    training_run.add_listener(broken)
    worker, _ = register_worker(training_run, "alice")
    training_run.open_session(
        worker, {"device_kind": "DEVICE_KIND_CPU", "cpu_cores": 2}
    )
    _accepted(training_run, worker, make_update, seed=1)
    _accepted(training_run, worker, make_update, seed=2)
    grant = training_run.grant_lease(worker)
    assert grant is not None
    frame, meta = make_update(training_run, 0)
    with pytest.raises(DigestMismatch):
        training_run.submit_update(
            worker, grant.lease_id, frame, replace(meta, sha256=b"")
        )
    training_run.aggregate()
    training_run.close_session(worker, "bye")

    events = training_run.recent_events(100)
    kinds = [e.kind for e in events]
    assert kinds == [
        "worker_joined",
        "update_accepted",
        "update_accepted",
        "update_rejected",
        "version_published",
        "aggregation_done",
        "worker_left",
    ]
    for event in events:
        message = json_format.ParseDict({event.kind: event.payload}, types_pb2.Event())
        assert message.WhichOneof("kind") == event.kind
    assert "listener bug" in caplog.text
    assert training_run.recent_events(2)[-1].kind == "worker_left"


def test_stats_and_the_leaderboard_come_from_the_database(
    training_run: TrainingRun, register_worker: RegisterWorker, make_update: MakeUpdate
) -> None:
    alice, _ = register_worker(training_run, "alice")
    bob, _ = register_worker(training_run, "bob")
    training_run.open_session(bob, {})
    for seed in range(2):
        _accepted(training_run, bob, make_update, seed=seed)
    _accepted(training_run, alice, make_update, seed=5)

    stats = training_run.network_stats()
    board = training_run.leaderboard(10)

    assert (stats.worker_count, stats.active_worker_count) == (2, 1)
    assert (stats.lease_count, stats.accepted_update_count) == (3, 3)
    assert stats.token_count == 3 * 8 * 32
    dense = 4 * sum(math.prod(s) for s in training_run.spec.values())
    assert stats.dense_equivalent_bytes == 3 * dense
    assert stats.uploaded_bytes < stats.dense_equivalent_bytes / 5
    assert [w.worker_name for w in board] == ["bob", "alice"]
    assert [w.accepted_update_count for w in board] == [2, 1]
    assert training_run.leaderboard(1)[0].worker_id == bob


# --- the run's config --------------------------------------------------------


def test_the_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = RunConfig(model="small", density=0.002, listen="0.0.0.0:7000")
    config.save(tmp_path)

    text = (tmp_path / "dragon.toml").read_text()
    assert 'model = "small"\n' in text
    assert "density = 0.002\n" in text
    assert RunConfig.load(tmp_path) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"density": 0}, "density must be in"),
        ({"density": "lots"}, "density must be a number"),
        ({"optimizer": "sgd"}, "optimizer must be one of"),
        ({"min_updates": 0}, "min_updates must be at least 1"),
        ({"micro_batch_size": 16}, "micro_batch_size must not exceed batch_size"),
        ({"sequence_length": 4096}, "exceeds the 'tiny' model's max_seq_len"),
        ({"model": "huge"}, "unknown model size"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"lease_seconds": -1.0}, "lease_seconds must be positive"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_bad_config_values_name_their_field(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigInvalid, match=message):
        RunConfig().replace(**overrides)


def test_a_hand_edited_config_with_a_typo_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dragon.toml").write_text('model = "tiny"\ndensty = 0.1\n')
    with pytest.raises(ConfigInvalid, match="unknown config field 'densty'"):
        RunConfig.load(tmp_path)
    (tmp_path / "dragon.toml").write_text("model = \n")
    with pytest.raises(ConfigInvalid, match=r"dragon\.toml"):
        RunConfig.load(tmp_path)
    with pytest.raises(ConfigInvalid, match="dragon-server init"):
        RunConfig.load(tmp_path / "nowhere")
