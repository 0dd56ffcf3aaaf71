"""The DRAGON aggregator: leases, update ingestion, aggregation, model versions."""

__version__ = "0.1.0"
