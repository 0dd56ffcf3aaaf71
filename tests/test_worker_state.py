"""The worker's state folder, its config precedence, backoff and status command."""

from __future__ import annotations

import json
import os
import random
import re
import stat
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dragon_worker.backoff import Backoff
from dragon_worker.cli import main
from dragon_worker.config import (
    WorkerConfigError,
    default_state_dir,
    resolve_config,
)
from dragon_worker.state import (
    PROGRESS_FILE,
    RESIDUAL_FILE,
    StateError,
    WorkerState,
    read_progress,
)


def test_api_key_is_private_hex_and_stable(tmp_path: Path) -> None:
    key = WorkerState(tmp_path / "state").api_key()

    path = tmp_path / "state" / "api_key"
    assert len(key) == 64
    assert int(key, 16) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    # A second process start (a new WorkerState) reads the same key back.
    assert WorkerState(tmp_path / "state").api_key() == key
    assert WorkerState(tmp_path / "other").api_key() != key


def test_racing_starts_agree_on_one_key(tmp_path: Path) -> None:
    # Eight daemons starting at once on one folder: O_EXCL lets one create it.
    barrier = threading.Barrier(8)
    keys: list[str] = []

    def start() -> None:
        state = WorkerState(tmp_path)
        barrier.wait()
        keys.append(state.api_key())

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(keys) == 8
    assert len(set(keys)) == 1
    assert (tmp_path / "api_key").read_text().strip() == keys[0]


def test_corrupt_key_is_an_error_not_a_new_key(tmp_path: Path) -> None:
    (tmp_path / "api_key").write_text("not a key\n")
    with pytest.raises(StateError, match="64-character"):
        WorkerState(tmp_path).api_key()
    assert (tmp_path / "api_key").read_text() == "not a key\n"


def test_counters_survive_a_restart(tmp_path: Path) -> None:
    state = WorkerState(tmp_path)
    state.add(leases_done=1, tokens=4096, bytes_up=1000)
    state.add(leases_done=1, tokens=4096, bytes_down=77)
    state.update(state="training", current_lease_id="lease-7", steps_done=3)

    again = WorkerState(tmp_path).progress
    assert (again.leases_done, again.tokens, again.bytes_up) == (2, 8192, 1000)
    assert again.bytes_down == 77
    assert (again.state, again.current_lease_id, again.steps_done) == (
        "training",
        "lease-7",
        3,
    )
    assert again.pid == os.getpid()
    on_disk = json.loads((tmp_path / PROGRESS_FILE).read_text())
    assert on_disk["tokens"] == 8192


def test_progress_is_replaced_whole_and_leaves_no_temp_files(tmp_path: Path) -> None:
    state = WorkerState(tmp_path)
    for step in range(50):
        state.update(steps_done=step)
        # Every read sees a complete record, never a torn one.
        progress = read_progress(tmp_path)
        assert progress is not None
        assert progress.steps_done == step
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoints", PROGRESS_FILE]


def test_unreadable_progress_is_reported(tmp_path: Path) -> None:
    (tmp_path / PROGRESS_FILE).write_text("{truncated")
    with pytest.raises(StateError, match="not JSON"):
        read_progress(tmp_path)
    assert read_progress(tmp_path / "missing") is None


def test_residual_round_trip_keeps_values_and_owner(tmp_path: Path) -> None:
    state = WorkerState(tmp_path)
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "blocks.0.w": torch.randn(4, 6, generator=gen),
        "head.bias": torch.randn(5, generator=gen),
    }
    state.save_residual(tensors, server="127.0.0.1:5000", model_version=12)

    loaded = WorkerState(tmp_path).load_residual()
    assert loaded is not None
    assert loaded.server == "127.0.0.1:5000"
    assert loaded.model_version == 12
    assert loaded.tensors.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded.tensors[name], tensor)


def test_corrupt_residual_is_dropped_not_fatal(tmp_path: Path) -> None:
    (tmp_path / RESIDUAL_FILE).write_bytes(b"\xff" * 40)
    assert WorkerState(tmp_path).load_residual() is None
    assert WorkerState(tmp_path / "none").load_residual() is None


def test_checkpoint_cache_lists_and_prunes(tmp_path: Path) -> None:
    state = WorkerState(tmp_path)
    for version in (1, 3, 10):
        state.checkpoint_path(version).write_bytes(b"x")
    state.part_path(11).write_bytes(b"partial")
    assert state.cached_versions() == [1, 3, 10]

    state.prune_checkpoints({10, 11})
    assert state.cached_versions() == [10]
    assert state.part_path(11).read_bytes() == b"partial"


# -- config precedence ---------------------------------------------------------


def _write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("cli", "env", "file", "expected"),
    [
        pytest.param(8, "4", "max_leases = 2", 8, id="cli-wins"),
        pytest.param(None, "4", "max_leases = 2", 4, id="env-over-file"),
        pytest.param(None, None, "max_leases = 2", 2, id="file-over-default"),
        pytest.param(None, None, "", 0, id="default"),
    ],
)
def test_config_precedence(
    tmp_path: Path, cli: int | None, env: str | None, file: str, expected: int
) -> None:
    state_dir = tmp_path / "state"
    _write_toml(state_dir / "worker.toml", f'server = "file:1"\n{file}\n')
    environ = {"DRAGON_WORKER_STATE_DIR": str(state_dir)}
    if env is not None:
        environ["DRAGON_WORKER_MAX_LEASES"] = env

    config = resolve_config({"max_leases": cli}, environ)

    assert config.max_leases == expected
    assert config.server == "file:1"
    assert config.state_dir == state_dir


def test_config_every_source_for_a_different_field(tmp_path: Path) -> None:
    config_file = _write_toml(
        tmp_path / "w.toml",
        '[worker]\nserver = "file:1"\ndevice = "cuda:1"\nmax-batch-size = 4\n'
        f'density = 0.5\nstate-dir = "{tmp_path / "from-file"}"\n',
    )
    environ = {"DRAGON_WORKER_DEVICE": "cpu", "DRAGON_WORKER_DENSITY": "0.25"}

    config = resolve_config(
        {"density": 0.125, "name": None}, environ, config_file=config_file
    )

    assert config.server == "file:1"
    assert config.device == "cpu"
    assert config.max_batch_size == 4
    assert config.density == 0.125
    assert config.name == ""
    assert config.state_dir == tmp_path / "from-file"


@pytest.mark.parametrize(
    ("options", "environ", "message"),
    [
        pytest.param({}, {}, "no server given", id="no-server"),
        pytest.param({"device": "tpu"}, {}, "device must be", id="device"),
        pytest.param({"density": 1.5}, {}, "density", id="density"),
        pytest.param({}, {"DRAGON_WORKER_MAX_LEASES": "many"}, "max_leases", id="env"),
        pytest.param({"gpu_memory_fraction": 0.0}, {}, "gpu_memory", id="fraction"),
        pytest.param(
            {},
            {"DRAGON_WORKER_MAX_BATCH_SIZE": "-1"},
            "max_batch_size must be at least 1",
            id="negative-env",
        ),
        pytest.param(
            {},
            {"DRAGON_WORKER_MAX_LEASES": "2.5"},
            "max_leases must be an integer, not '2.5'",
            id="not-an-integer",
        ),
        pytest.param(
            {"server": "notahostport"}, {}, "server must be HOST:PORT", id="no-port"
        ),
        pytest.param(
            {"server": "host:99999"}, {}, "server must be HOST:PORT", id="bad-port"
        ),
    ],
)
def test_config_mistakes_name_the_setting(
    tmp_path: Path, options: dict[str, object], environ: dict[str, str], message: str
) -> None:
    environ = {"DRAGON_WORKER_STATE_DIR": str(tmp_path), **environ}
    if options or len(environ) > 1:
        options = {"server": "h:1", **options}
    with pytest.raises(WorkerConfigError, match=message):
        resolve_config(options, environ)


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    _write_toml(tmp_path / "worker.toml", "servr = 'typo:1'\n")
    with pytest.raises(WorkerConfigError, match="unknown setting 'servr'"):
        resolve_config({"server": "h:1", "state_dir": tmp_path}, {})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param(
            {"STATE_DIRECTORY": "/var/lib/dw:/x"}, "/var/lib/dw", id="systemd"
        ),
        pytest.param({"XDG_STATE_HOME": "/xdg"}, "/xdg/dragon-worker", id="xdg"),
        pytest.param(
            {"HOME": "/home/v"}, "/home/v/.local/state/dragon-worker", id="home"
        ),
    ],
)
def test_default_state_dir(environ: dict[str, str], expected: str) -> None:
    assert default_state_dir(environ) == Path(expected)


# -- backoff -------------------------------------------------------------------


def test_backoff_grows_to_the_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(initial_seconds=1.0, max_seconds=60.0, rng=random.Random(7))
    bounds = []
    delays = []
    for _ in range(12):
        bounds.append(backoff.bound())
        delays.append(backoff.next_delay())
    assert bounds[:7] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]
    assert bounds[-1] == 60.0
    assert all(0.1 <= d <= b for d, b in zip(delays, bounds, strict=True))
    # Jitter: the waits are not simply the bounds.
    assert len({round(d, 6) for d in delays}) == len(delays)
    backoff.reset()
    assert backoff.bound() == 1.0


def test_backoff_survives_many_failures() -> None:
    backoff = Backoff(initial_seconds=0.5, max_seconds=30.0, rng=random.Random(1))
    for _ in range(5000):
        assert backoff.next_delay() <= 30.0


# -- status --------------------------------------------------------------------


def test_status_reads_a_stopped_worker(tmp_path: Path) -> None:
    state = WorkerState(tmp_path)
    state.add(leases_done=3, tokens=12_288, bytes_up=5 * 1024 * 1024)
    state.update(state="stopped", server="h:1", model_version=4, worker_id="w-1")

    result = CliRunner().invoke(main, ["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = dict(
        re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.splitlines()
    )
    assert lines["state"].strip() == "stopped"
    assert lines["model version"].strip() == "4"
    assert lines["leases accepted"].strip() == "3"
    assert lines["tokens trained"].strip() == "12,288"
    assert lines["uploaded"].strip() == "5.0 MiB"

    raw = CliRunner().invoke(main, ["status", "--state-dir", str(tmp_path), "--json"])
    assert raw.exit_code == 0
    assert json.loads(raw.stdout)["leases_done"] == 3


def test_status_shows_the_current_lease_of_a_live_worker(tmp_path: Path) -> None:
    state = WorkerState(tmp_path)
    state.update(state="training", current_lease_id="L9", steps_done=2, steps_total=5)
    result = CliRunner().invoke(main, ["status", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0
    # This test process wrote the record, so its pid is alive.
    assert "training" in result.output
    assert "L9: step 2/5" in result.output


def test_status_without_state_says_what_to_do(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["status", "--state-dir", str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "no worker state" in result.output


# -- the run command's own checks -------------------------------------------------


def test_run_without_a_server_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no server given" in result.output


def test_run_on_a_missing_gpu_says_so(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the message is for machines without")
    args = ["run", "--server", "127.0.0.1:1", "--state-dir", str(tmp_path)]
    result = CliRunner().invoke(main, [*args, "--device", "cuda:0"])
    assert result.exit_code == 1
    assert "CUDA is not available" in result.output
