"""The worker's settings and where each one comes from.

Every setting is resolved from the first source that names it, in this order:
command-line options, environment variables ``DRAGON_WORKER_<NAME>`` (e.g.
``DRAGON_WORKER_MAX_LEASES``), the TOML config file (``--config FILE`` or
``<state-dir>/worker.toml``), then the defaults below.

The state folder itself cannot come from ``<state-dir>/worker.toml`` (that file
lives inside it); it comes from the options, the environment, a ``--config``
file, systemd's ``$STATE_DIRECTORY``, ``$XDG_STATE_HOME/dragon-worker`` or
``~/.local/state/dragon-worker``, in that order.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "DRAGON_WORKER_"
CONFIG_FILE_NAME = "worker.toml"
DEVICE_CHOICES_HELP = "auto, cpu, cuda or cuda:N"


class WorkerConfigError(ValueError):
    """A worker setting is missing, malformed or out of range."""


@dataclass(frozen=True)
class WorkerConfig:
    """What one worker daemon does and with which limits.

    ``None`` (or 0 for counts) means "no limit of the volunteer's own": the
    server's recipe decides.
    """

    server: str
    state_dir: Path
    device: str = "auto"
    gpu_memory_fraction: float | None = None
    max_batch_size: int | None = None
    density: float | None = None
    max_leases: int = 0
    name: str = ""
    # Reconnection backoff: the first wait and the cap, in seconds.
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    # Deadline of each unary call, in seconds.
    rpc_timeout_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not self.server:
            raise WorkerConfigError(
                "no server given: pass --server HOST:PORT or set DRAGON_WORKER_SERVER"
            )
        _check_server(self.server)
        _check_device(self.device)
        fraction = self.gpu_memory_fraction
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise WorkerConfigError("gpu_memory_fraction must be in (0, 1]")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise WorkerConfigError("max_batch_size must be at least 1")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise WorkerConfigError("density must be in (0, 1]")
        if self.max_leases < 0:
            raise WorkerConfigError("max_leases must be 0 (no limit) or more")
        if not 0.0 < self.backoff_initial_seconds <= self.backoff_max_seconds:
            raise WorkerConfigError(
                "backoff_initial_seconds must be positive and at most "
                "backoff_max_seconds"
            )
        if self.rpc_timeout_seconds <= 0:
            raise WorkerConfigError("rpc_timeout_seconds must be positive")


def _check_server(server: str) -> None:
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise WorkerConfigError(
            f"server must be HOST:PORT (e.g. dragon.example.org:50051), not {server!r}"
        )


def _check_device(device: str) -> None:
    if device in ("auto", "cpu", "cuda"):
        return
    prefix, _, index = device.partition(":")
    if prefix != "cuda" or not index.isdigit():
        raise WorkerConfigError(f"device must be {DEVICE_CHOICES_HELP}, not {device!r}")


# The settings that may come from any source, with the type each is parsed to.
_FIELD_TYPES: dict[str, type] = {
    "server": str,
    "state_dir": Path,
    "device": str,
    "gpu_memory_fraction": float,
    "max_batch_size": int,
    "density": float,
    "max_leases": int,
    "name": str,
    "backoff_initial_seconds": float,
    "backoff_max_seconds": float,
    "rpc_timeout_seconds": float,
}


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """The state folder when none is given: systemd's, then the XDG one."""
    systemd_dirs = environ.get("STATE_DIRECTORY", "")
    if systemd_dirs:
        # systemd joins several StateDirectory= entries with colons.
        return Path(systemd_dirs.split(":")[0])
    xdg = environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg else Path(environ.get("HOME", "~")) / ".local" / "state"
    return (base / "dragon-worker").expanduser()


def _parse(name: str, value: object, source: str) -> object:
    target = _FIELD_TYPES[name]
    try:
        if target is Path:
            return Path(str(value)).expanduser()
        if target is int and (
            isinstance(value, bool) or not str(value).lstrip("-").isdigit()
        ):
            raise ValueError(value)
        if target is float and isinstance(value, bool):
            raise ValueError(value)
        return target(value)
    except (TypeError, ValueError):
        kind = {int: "an integer", float: "a number"}.get(target, "a string")
        raise WorkerConfigError(
            f"{source}: {name} must be {kind}, not {value!r}"
        ) from None


def _from_env(environ: Mapping[str, str]) -> dict[str, object]:
    found: dict[str, object] = {}
    for name in _FIELD_TYPES:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            found[name] = _parse(name, raw, ENV_PREFIX + name.upper())
    return found


def read_config_file(path: Path) -> dict[str, object]:
    """The settings in a TOML file; keys may be spelled with ``-`` or ``_``."""
    try:
        with path.open("rb") as handle:
            table: dict[str, Any] = tomllib.load(handle)
    except OSError as exc:
        raise WorkerConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise WorkerConfigError(f"config file {path} is not TOML: {exc}") from exc
    # A [worker] table is accepted as well as top-level keys.
    if isinstance(table.get("worker"), dict):
        table = table["worker"]
    found: dict[str, object] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in _FIELD_TYPES:
            raise WorkerConfigError(f"{path}: unknown setting {key!r}")
        found[name] = _parse(name, value, str(path))
    return found


def resolve_config(
    options: Mapping[str, object],
    environ: Mapping[str, str],
    config_file: Path | None = None,
) -> WorkerConfig:
    """Merge options > environment > config file > defaults into one config.

    ``options`` holds the command-line values, ``None`` where an option was not
    given. ``config_file`` is an explicit ``--config``; without one the file
    ``<state-dir>/worker.toml`` is read when it exists.
    """
    given = {k: v for k, v in options.items() if v is not None and k in _FIELD_TYPES}
    cli = {k: _parse(k, v, f"--{k.replace('_', '-')}") for k, v in given.items()}
    env = _from_env(environ)
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"]).expanduser()

    explicit_file = read_config_file(config_file) if config_file is not None else {}
    state_dir = cli.get("state_dir") or env.get("state_dir")
    state_dir = state_dir or explicit_file.get("state_dir")
    state_dir = state_dir or default_state_dir(environ)
    assert isinstance(state_dir, Path)

    file_values = explicit_file
    if config_file is None and (state_dir / CONFIG_FILE_NAME).is_file():
        file_values = read_config_file(state_dir / CONFIG_FILE_NAME)
        file_values.pop("state_dir", None)

    merged: dict[str, Any] = {"server": ""}
    for source in (file_values, env, cli):
        merged.update(source)
    merged["state_dir"] = state_dir
    return WorkerConfig(**merged)


def config_as_dict(config: WorkerConfig) -> dict[str, object]:
    """The config as plain values, for logs and ``status --json``."""
    values = dataclasses.asdict(config)
    values["state_dir"] = str(config.state_dir)
    return values
