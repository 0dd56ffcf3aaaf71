"""The ``dragon-worker`` command group."""

from __future__ import annotations

import click

from dragon_worker import __version__


@click.group()
@click.version_option(__version__, prog_name="dragon-worker")
def main() -> None:
    """Donate CPU or GPU time to a DRAGON training run.

    Example: dragon-worker run --server dragon.example.org:50051
    """
