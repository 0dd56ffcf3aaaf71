"""The ``dragon-server`` command group."""

from __future__ import annotations

import click

from dragon_server import __version__


@click.group()
@click.version_option(__version__, prog_name="dragon-server")
def main() -> None:
    """Run a DRAGON aggregator: hand out leases, combine updates, publish versions.

    Example: dragon-server init --home ./run && dragon-server serve --home ./run
    """
