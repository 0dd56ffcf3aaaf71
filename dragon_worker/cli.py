"""The ``dragon-worker`` command group: run, status, systemd-unit.

Exit codes of ``run``: 0 for a clean stop (a signal, ``--max-leases`` reached),
2 for a usage or config mistake, 1 for anything unexpected.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

import click

from dragon_worker import __version__
from dragon_worker.config import (
    WorkerConfigError,
    config_as_dict,
    default_state_dir,
    resolve_config,
)
from dragon_worker.state import Progress, StateError, read_progress

logger = logging.getLogger(__name__)

UNIT_NAME = "dragon-worker.service"
DEFAULT_UNIT_PATH = Path("/etc/systemd/system") / UNIT_NAME


@click.group()
@click.version_option(__version__, prog_name="dragon-worker")
def main() -> None:
    """Donate CPU or GPU time to a DRAGON training run.

    Example: dragon-worker run --server dragon.example.org:50051
    """


def _state_dir_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="State folder (key, checkpoints, residual, counters). "
        "Default: $STATE_DIRECTORY, else $XDG_STATE_HOME/dragon-worker.",
    )(function)


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@main.command()
@click.option("--server", default=None, help="The aggregator, HOST:PORT.")
@_state_dir_option
@click.option("--device", default=None, help="auto (default), cpu, cuda or cuda:N.")
@click.option(
    "--gpu-memory-fraction",
    type=float,
    default=None,
    help="Share of the GPU's memory this worker may use, in (0, 1].",
)
@click.option(
    "--max-batch-size",
    type=int,
    default=None,
    help="Largest micro-batch to run; gradient accumulation keeps the batch.",
)
@click.option(
    "--density",
    type=float,
    default=None,
    help="Send at most this share of each tensor (lowers the server's density).",
)
@click.option(
    "--max-leases",
    type=int,
    default=None,
    help="Exit 0 after this many accepted leases; 0 runs until stopped.",
)
@click.option("--name", default=None, help="Display name on the leaderboard.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="TOML settings file. Default: <state-dir>/worker.toml when present.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every heartbeat.")
def run(config_file: Path | None, verbose: bool, **options: Any) -> None:
    """Train leases from a server until stopped.

    Every option may also come from DRAGON_WORKER_<OPTION> (for example
    DRAGON_WORKER_SERVER) or the config file; options win over the environment,
    the environment over the file. The first SIGTERM or Ctrl-C finishes and
    uploads the lease in training, then exits 0; a second one gives the lease
    back and exits 0 at once.

    Example: dragon-worker run --server 127.0.0.1:50051 --max-leases 3
    """
    _configure_logging(verbose)
    try:
        config = resolve_config(options, os.environ, config_file)
    except WorkerConfigError as exc:
        raise click.UsageError(str(exc)) from exc

    # Imported here so that `status` and `systemd-unit` start without torch.
    from dragon_worker.daemon import Worker
    from dragon_worker.resources import DeviceUnavailableError

    try:
        worker = Worker(config)
    except StateError as exc:
        raise click.ClickException(str(exc)) from exc
    logger.debug("config: %s", config_as_dict(config))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if worker.lifecycle.value == "stopping":
            logger.warning("%s again: giving the lease back and leaving now", name)
        else:
            logger.warning("%s: finishing the current lease, then stopping", name)
        worker.request_stop()

    previous = {
        signum: signal.signal(signum, on_signal)
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        code = worker.run()
    except DeviceUnavailableError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if worker.training_in_progress():
        # After a second signal the training thread may be inside a long step;
        # leave without waiting for it (state files are already written).
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def _describe(progress: Progress, now: float) -> list[tuple[str, str]]:
    alive = progress.pid > 0 and _pid_alive(progress.pid)
    state = progress.state if alive or progress.state == "stopped" else "not running"
    rows = [
        ("state", state),
        ("server", progress.server or "-"),
        ("worker id", progress.worker_id or "-"),
        (
            "model version",
            "-" if progress.model_version is None else str(progress.model_version),
        ),
        ("leases accepted", str(progress.leases_done)),
        ("leases rejected", str(progress.leases_rejected)),
        ("tokens trained", f"{progress.tokens:,}"),
        ("uploaded", _human_bytes(progress.bytes_up)),
        ("downloaded", _human_bytes(progress.bytes_down)),
    ]
    if progress.current_lease_id:
        loss = "" if progress.loss is None else f", loss {progress.loss:.4f}"
        rows.append(
            (
                "current lease",
                f"{progress.current_lease_id}: step {progress.steps_done}/"
                f"{progress.steps_total}{loss}",
            )
        )
    if progress.last_error:
        rows.append(("last error", progress.last_error))
    if progress.updated_at:
        rows.append(("updated", f"{now - progress.updated_at:.0f} s ago"))
    return rows


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@main.command()
@_state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw record as JSON.")
def status(state_dir: Path | None, as_json: bool) -> None:
    """Show what the worker is doing and what it has contributed.

    Works while the daemon runs and after it stopped.

    Example: dragon-worker status --json
    """
    env_dir = os.environ.get("DRAGON_WORKER_STATE_DIR")
    root = state_dir or (Path(env_dir) if env_dir else default_state_dir(os.environ))
    try:
        progress = read_progress(root)
    except StateError as exc:
        raise click.ClickException(str(exc)) from exc
    if progress is None:
        raise click.ClickException(
            f"no worker state in {root}; start one with dragon-worker run, or pass "
            "--state-dir"
        )
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(progress), indent=2, sort_keys=True))
        return
    rows = _describe(progress, time.time())
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label:<{width}}  {value}")


def unit_text() -> str:
    """The systemd unit shipped with the package."""
    return resources.files("dragon_worker").joinpath(UNIT_NAME).read_text("utf-8")


@main.command("systemd-unit")
@click.option(
    "--install", is_flag=True, help="Write the unit file instead of printing it."
)
@click.option(
    "--path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_UNIT_PATH,
    show_default=True,
    help="Where --install writes the unit.",
)
def systemd_unit(install: bool, path: Path) -> None:
    """Print (or install) the systemd service that runs the worker.

    ExecStart points at this installation's dragon-worker. The server address
    goes into /etc/dragon-worker.env as DRAGON_WORKER_SERVER=HOST:PORT.

    Example: sudo dragon-worker systemd-unit --install && sudo systemctl
    enable --now dragon-worker
    """
    text = unit_text()
    executable = shutil.which("dragon-worker") or str(
        Path(sys.executable).with_name("dragon-worker")
    )
    text = text.replace("/usr/local/bin/dragon-worker", executable)
    hidden = _hidden_from_the_service(Path(executable))
    if hidden:
        click.echo(
            f"warning: {executable} is under {hidden}, which the service cannot "
            "see (PrivateTmp, ProtectHome, DynamicUser): install DRAGON system-wide, "
            "e.g. in /opt/dragon-worker/venv, before enabling the unit",
            err=True,
        )
    if not install:
        click.echo(text, nl=False)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(
            f"cannot write {path}: {exc} (run as root, or pass --path)"
        ) from exc
    click.echo(
        f"wrote {path}; now: systemctl daemon-reload && systemctl enable --now "
        f"{UNIT_NAME}"
    )


def _hidden_from_the_service(executable: Path) -> str | None:
    """The folder of ``executable`` that the unit's sandbox hides, if any."""
    resolved = executable.resolve()
    for folder in ("/tmp", "/var/tmp", "/home", "/root", "/run/user"):
        if resolved.is_relative_to(folder):
            return folder
    return None
