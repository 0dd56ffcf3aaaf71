"""The ``dragon-server`` command group.

Logging is configured here and only here: the library modules log through their
module loggers and leave handlers to the program that runs them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dragon_server import __version__
from dragon_server.errors import DragonError
from dragon_server.run import TrainingRun, VersionRecord
from dragon_server.settings import CONFIG_FILE, RunConfig
from dragon_server.store import Store

F = TypeVar("F", bound=Callable[..., Any])

# Option name -> RunConfig field, for the overrides ``init`` takes directly.
INIT_OVERRIDES: dict[str, str] = {
    "density": "density",
    "min_updates": "min_updates",
    "seq_len": "sequence_length",
    "sequences_per_batch": "sequences_per_batch",
    "local_steps": "local_steps",
    "lease_seconds": "lease_seconds",
    "aggregation_interval": "aggregation_interval_seconds",
    "pow_bits": "pow_difficulty_bits",
    "optimizer": "optimizer",
    "max_corpus_bytes": "max_corpus_bytes",
}


def home_option(fn: F) -> F:
    """The ``--home DIR`` option every command shares."""
    decorator = click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        required=True,
        envvar="DRAGON_SERVER_HOME",
        help="The server home folder (config, database, data, checkpoints).",
    )
    return decorator(fn)


def json_option(fn: F) -> F:
    decorator = click.option(
        "--json", "as_json", is_flag=True, help="Print JSON instead of a table."
    )
    return decorator(fn)


def parse_settings(pairs: tuple[str, ...]) -> dict[str, object]:
    """``--set field=value`` pairs as config overrides."""
    overrides: dict[str, object] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise click.ClickException(f"--set wants FIELD=VALUE, got {pair!r}")
        overrides[name.strip().replace("-", "_")] = value.strip()
    return overrides


@contextmanager
def opened_run(home: Path) -> Iterator[TrainingRun]:
    """The run in ``home``, with a clear message when there is none."""
    if not (home / CONFIG_FILE).is_file():
        raise click.ClickException(
            f"{home} is not a server home: run `dragon-server init --home {home}` first"
        )
    try:
        # Not TrainingRun.open: its crash recovery deletes files that no row
        # names yet, which is exactly what a running server is in the middle of
        # writing. Reading needs no recovery.
        run = TrainingRun(home, RunConfig.load(home), Store.open(home))
    except DragonError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        yield run
    finally:
        run.close()


@click.group()
@click.version_option(__version__, prog_name="dragon-server")
def main() -> None:
    """Run a DRAGON aggregator: hand out leases, combine updates, publish versions.

    Example: dragon-server init --home ./run && dragon-server serve --home ./run
    """


@main.command()
@home_option
@click.option(
    "--data",
    "sources",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="Text files, folders or JSON Lines to train on (repeatable); default:"
    " the Python standard library's source.",
)
@click.option(
    "--model",
    type=click.Choice(["tiny", "small", "125m"]),
    default="tiny",
    show_default=True,
    help="Named model size.",
)
@click.option("--max-corpus-bytes", type=int, help="Cap on the text bytes ingested.")
@click.option("--density", type=float, help="Share of each tensor sent per update.")
@click.option("--min-updates", type=int, help="Updates that trigger an aggregation.")
@click.option("--seq-len", type=int, help="Tokens per training sequence.")
@click.option("--sequences-per-batch", type=int, help="Sequences per lease.")
@click.option("--local-steps", type=int, help="Local AdamW steps per lease.")
@click.option("--lease-seconds", type=float, help="Lease lifetime without heartbeat.")
@click.option(
    "--aggregation-interval", type=float, help="Seconds before a partial round."
)
@click.option("--pow-bits", type=int, help="Proof-of-work difficulty of registration.")
@click.option(
    "--optimizer",
    type=click.Choice(["fedavg", "fedadam", "nesterov"]),
    help="Server optimizer.",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Any other dragon.toml field (repeatable).",
)
def init(
    home: Path,
    sources: tuple[Path, ...],
    model: str,
    settings: tuple[str, ...],
    **options: Any,
) -> None:
    """Create a server home: config, tokenized data, and model version 0.

    Example: dragon-server init --home ./run --data ./corpus --model small
    """
    from dragon_server.home import init_home

    overrides: dict[str, object] = {"model": model, **parse_settings(settings)}
    for option, field in INIT_OVERRIDES.items():
        if options.get(option) is not None:
            overrides[field] = options[option]
    try:
        config = RunConfig().replace(**overrides)
        summary = init_home(home, list(sources), config, progress=True)
    except DragonError as exc:
        raise click.ClickException(str(exc)) from exc

    table = Table(title=f"DRAGON home {home}")
    table.add_column("item")
    table.add_column("value", justify="right")
    for name in ("documents", "tokens", "sequences", "batches"):
        table.add_row(name, f"{getattr(summary, name):,}")
    table.add_row("validation sequences", f"{summary.validation_sequences:,}")
    table.add_row("model", f"{model} ({summary.parameters:,} parameters)")
    Console().print(table)
    click.echo(f"next: dragon-server serve --home {home}")


@main.command()
@home_option
@click.option("--listen", metavar="HOST:PORT", help="Address to serve on.")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Override a dragon.toml field for this run (repeatable).",
)
def serve(
    home: Path, listen: str | None, log_level: str, settings: tuple[str, ...]
) -> None:
    """Serve the run until SIGTERM or SIGINT, then drain and exit 0.

    Example: dragon-server serve --home ./run --listen 0.0.0.0:50051
    """
    from dragon_server.server import serve as serve_run

    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not (home / CONFIG_FILE).is_file():
        raise click.ClickException(
            f"{home} is not a server home: run `dragon-server init --home {home}` first"
        )
    try:
        asyncio.run(serve_run(home, listen, parse_settings(settings)))
    except DragonError as exc:
        raise click.ClickException(str(exc)) from exc


def version_row(record: VersionRecord) -> dict[str, object]:
    return {
        "version": record.version,
        "created_at": record.created_at.isoformat(),
        "validation_loss": record.validation_loss,
        "update_count": record.update_count,
        "token_count": record.token_count,
        "size_bytes": record.size_bytes,
        "sha256": record.sha256.hex(),
    }


@main.command()
@home_option
@json_option
def versions(home: Path, as_json: bool) -> None:
    """List the published model versions, newest first.

    Example: dragon-server versions --home ./run --json
    """
    with opened_run(home) as run:
        latest = run.latest_version()
        rows = [version_row(run.version(v)) for v in range(latest.version, -1, -1)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="model versions")
    for column in ("version", "created", "val loss", "updates", "tokens", "sha256"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["version"]),
            str(row["created_at"])[:19],
            f"{row['validation_loss']:.4f}",
            str(row["update_count"]),
            f"{row['token_count']:,}",
            str(row["sha256"])[:16],
        )
    Console().print(table)


@main.command()
@home_option
@json_option
@click.option(
    "--top", type=int, default=10, show_default=True, help="Leaderboard rows."
)
def stats(home: Path, as_json: bool, top: int) -> None:
    """Show the network's figures and the leaderboard.

    Example: dragon-server stats --home ./run
    """
    with opened_run(home) as run:
        network = run.network_stats()
        board = run.leaderboard(top)
    figures: dict[str, object] = {
        "workers": network.worker_count,
        "active_workers": network.active_worker_count,
        "latest_version": network.latest_version.version,
        "validation_loss": network.latest_version.validation_loss,
        "leases": network.lease_count,
        "accepted_updates": network.accepted_update_count,
        "rejected_updates": network.rejected_update_count,
        "tokens": network.token_count,
        "uploaded_bytes": network.uploaded_bytes,
        "dense_equivalent_bytes": network.dense_equivalent_bytes,
    }
    leaders = [
        {
            "worker_id": worker.worker_id,
            "worker_name": worker.worker_name,
            "accepted_updates": worker.accepted_update_count,
            "tokens": worker.token_count,
            "uploaded_bytes": worker.uploaded_bytes,
            "reputation": worker.reputation,
        }
        for worker in board
    ]
    if as_json:
        click.echo(json.dumps({"network": figures, "leaderboard": leaders}, indent=2))
        return
    console = Console()
    table = Table(title="network")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in figures.items():
        table.add_row(name, f"{value:,}" if isinstance(value, int) else f"{value:.4f}")
    console.print(table)
    board_table = Table(title="leaderboard")
    for column in ("worker", "name", "updates", "tokens", "reputation"):
        board_table.add_column(column)
    for row in leaders:
        board_table.add_row(
            str(row["worker_id"])[:12],
            escape(str(row["worker_name"])),
            str(row["accepted_updates"]),
            f"{row['tokens']:,}",
            f"{row['reputation']:.2f}",
        )
    console.print(board_table)


from dragon_server.demo import demo  # noqa: E402 (the group must exist first)

main.add_command(demo)
