"""The run's config: one frozen dataclass, stored as ``dragon.toml`` in the home.

Defaults suit the tiny model in tests and the small model on a CPU. Overrides (from
the command line or tests) go through :meth:`RunConfig.replace`, which validates
every field and names the one at fault.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from dragon_server.errors import ConfigInvalid
from forge.config import ConfigError, ModelConfig, named_config

CONFIG_FILE = "dragon.toml"

ServerOptimizerName = Literal["fedavg", "fedadam", "nesterov"]
ValueDtypeName = Literal["fp16", "bf16", "fp32"]

OPTIMIZERS: tuple[str, ...] = ("fedavg", "fedadam", "nesterov")
VALUE_DTYPES: tuple[str, ...] = ("fp16", "bf16", "fp32")
AGGREGATION_RULES: tuple[str, ...] = (
    "mean",
    "trimmed_mean",
    "median",
    "krum",
    "multi_krum",
)

# The learning rate each server optimizer uses when server_learning_rate is 0:
# plain averaging applies the mean update as is; DiLoCo's outer Nesterov step uses
# 0.7; Adam normalises each coordinate, so its rate is a step size per round.
DEFAULT_SERVER_LR: dict[str, float] = {"fedavg": 1.0, "fedadam": 1e-2, "nesterov": 0.7}


@dataclass(frozen=True)
class RunConfig:
    """Everything that shapes a training run, from the data to aggregation."""

    # Model and data.
    model: str = "tiny"
    seed: int = 0
    sequence_length: int = 128  # tokens L per sequence; a row holds L + 1 ids
    sequences_per_batch: int = 16  # S sequences per lease
    validation_fraction: float = 0.05  # share of batches held back
    validation_sequences: int = 64  # at most this many are evaluated per version
    max_corpus_bytes: int = 0  # cap on the text bytes ingested; 0 = no cap

    # Local training recipe sent with each lease.
    local_steps: int = 8
    batch_size: int = 8
    micro_batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip_norm: float = 1.0
    density: float = 0.01
    value_dtype: ValueDtypeName = "fp16"

    # Leases.
    lease_seconds: float = 600.0
    heartbeat_seconds: float = 30.0
    max_leases_per_worker: int = 4  # granted leases one worker may hold; 0 = any

    # Aggregation.
    min_updates: int = 4
    aggregation_interval_seconds: float = 60.0
    max_staleness: int = 4
    optimizer: ServerOptimizerName = "fedavg"
    server_learning_rate: float = 0.0  # 0 = the optimizer's default
    server_momentum: float = 0.9  # nesterov
    server_beta1: float = 0.9  # fedadam
    server_beta2: float = 0.99  # fedadam
    server_tau: float = 1e-3  # fedadam
    # Robust combination (see dragon_server.aggregation.RobustRule).
    aggregation_rule: str = "mean"  # mean, trimmed_mean, median, krum, multi_krum
    clip_update_norm: float = 0.0  # L2 bound per update; 0 = off
    reject_norm_sigma: float = 0.0  # drop updates whose norm is an outlier; 0 = off
    trim_fraction: float = 0.1  # trimmed_mean: share cut at each end
    byzantine_workers: int = 0  # krum: the f faulty updates tolerated
    multi_krum_selected: int = 0  # multi_krum: updates averaged; 0 = n - f

    # Admission and limits.
    pow_difficulty_bits: int = 16
    challenge_seconds: float = 300.0
    max_update_bytes: int = 0  # 0 = derived from the model's tensor shapes

    # Serving.
    listen: str = "127.0.0.1:50051"
    drain_grace_seconds: float = 30.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_type(field.name, field.type, getattr(self, field.name))
        self._check_ranges()

    def _check_ranges(self) -> None:
        at_least_one = (
            "sequence_length",
            "sequences_per_batch",
            "local_steps",
            "batch_size",
            "micro_batch_size",
            "min_updates",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ConfigInvalid(f"{name} must be at least 1")
        not_negative = (
            "seed",
            "validation_sequences",
            "max_corpus_bytes",
            "weight_decay",
            "grad_clip_norm",
            "max_staleness",
            "server_learning_rate",
            "pow_difficulty_bits",
            "max_update_bytes",
            "drain_grace_seconds",
            "clip_update_norm",
            "reject_norm_sigma",
            "byzantine_workers",
            "multi_krum_selected",
            "max_leases_per_worker",
        )
        for name in not_negative:
            if getattr(self, name) < 0:
                raise ConfigInvalid(f"{name} must not be negative")
        positive = (
            "learning_rate",
            "lease_seconds",
            "heartbeat_seconds",
            "aggregation_interval_seconds",
            "challenge_seconds",
            "server_tau",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigInvalid(f"{name} must be positive")
        unit = ("beta1", "beta2", "server_momentum", "server_beta1", "server_beta2")
        for name in unit:
            if not 0 <= getattr(self, name) < 1:
                raise ConfigInvalid(f"{name} must be in [0, 1)")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigInvalid("validation_fraction must be in [0, 1)")
        if not 0 < self.density <= 1:
            raise ConfigInvalid("density must be in (0, 1]")
        if self.aggregation_rule not in AGGREGATION_RULES:
            raise ConfigInvalid(
                f"aggregation_rule must be one of {', '.join(AGGREGATION_RULES)}"
            )
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigInvalid("trim_fraction must be in [0, 0.5)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigInvalid(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.value_dtype not in VALUE_DTYPES:
            raise ConfigInvalid(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}")
        if self.micro_batch_size > self.batch_size:
            raise ConfigInvalid("micro_batch_size must not exceed batch_size")
        if self.pow_difficulty_bits > 64:
            raise ConfigInvalid("pow_difficulty_bits must be at most 64")
        if self.sequence_length > self.model_config.max_seq_len:
            raise ConfigInvalid(
                f"sequence_length {self.sequence_length} exceeds the {self.model!r} "
                f"model's max_seq_len {self.model_config.max_seq_len}"
            )

    @property
    def model_config(self) -> ModelConfig:
        """The config of the named model size."""
        try:
            return named_config(self.model)
        except ConfigError as exc:
            raise ConfigInvalid(f"model: {exc}") from exc

    @property
    def effective_server_learning_rate(self) -> float:
        """``server_learning_rate``, or the optimizer's default when it is 0."""
        if self.server_learning_rate > 0:
            return self.server_learning_rate
        return DEFAULT_SERVER_LR[self.optimizer]

    def replace(self, **overrides: object) -> RunConfig:
        """A copy with ``overrides`` applied; strings are parsed to the field's type."""
        names = {field.name: field for field in dataclasses.fields(self)}
        values: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in names:
                raise ConfigInvalid(f"unknown config field {name!r}")
            values[name] = _coerce(name, names[name].type, value)
        return dataclasses.replace(self, **values)

    def to_toml(self) -> str:
        """The config as TOML text: one ``key = value`` line per field."""
        lines = ["# DRAGON training run; edit with care, then restart the server."]
        for field in dataclasses.fields(self):
            lines.append(f"{field.name} = {_toml_value(getattr(self, field.name))}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str) -> RunConfig:
        """Parse TOML text; unknown or ill-typed fields raise :class:`ConfigInvalid`."""
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigInvalid(f"{CONFIG_FILE}: {exc}") from exc
        return cls().replace(**table)

    @classmethod
    def load(cls, home: Path) -> RunConfig:
        """Read ``dragon.toml`` from a server home."""
        path = home / CONFIG_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigInvalid(f"{path} not found: run `dragon-server init`") from None
        return cls.from_toml(text)

    def save(self, home: Path) -> None:
        """Write ``dragon.toml`` into a server home."""
        (home / CONFIG_FILE).write_text(self.to_toml(), encoding="utf-8")


def _base_type(annotation: object) -> type:
    # Annotations are strings under `from __future__ import annotations`.
    text = str(annotation)
    if text.startswith(("ServerOptimizerName", "ValueDtypeName")) or text == "str":
        return str
    return {"int": int, "float": float, "bool": bool}[text]


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_type(name: str, annotation: object, value: object) -> None:
    expected = _base_type(annotation)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if type(value) is not expected:
        raise ConfigInvalid(f"{name} must be {_WORDS[expected]}, not {value!r}")
    if expected is float and not math.isfinite(cast(float, value)):
        raise ConfigInvalid(f"{name} must be finite")


def _coerce(name: str, annotation: object, value: object) -> object:
    expected = _base_type(annotation)
    if not isinstance(value, str) or expected is str:
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    try:
        if expected is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return expected(value)
    except ValueError:
        raise ConfigInvalid(
            f"{name} must be {_WORDS[expected]}, not {value!r}"
        ) from None


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for any text
    return repr(value)
