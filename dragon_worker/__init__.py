"""The DRAGON worker daemon: trains leased batches and uploads compressed updates."""

__version__ = "0.1.0"
