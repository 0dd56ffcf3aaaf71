"""Checkpoints: a model's trainable state in one safetensors file, config inside.

A checkpoint is :mod:`forge.safefile` bytes whose metadata holds the format tag,
the model config as JSON, the version number and a JSON map of aliases: tensors
that are one tensor (the tied embedding and output head, or any two names given
the same memory) are stored once, under their first name, and restored as the
same tensor object. Any further metadata given by the caller travels under its
own keys. Tensors beyond the model's state (say, the server optimizer's moments)
may ride along under names that start with ``extra.``, in any dtype and shape,
empty ones included.

Loading validates everything before anything is returned: the safetensors
layout, the metadata, and that the model's tensors are exactly those of the
config's model (names, shapes, float32). Every failure is a
:class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from forge import safefile
from forge.config import ConfigError, ModelConfig
from forge.model import HRMSMoE, StateLayout, empty_model, state_layout

logger = logging.getLogger(__name__)

FORMAT = "dragon-checkpoint/1"
FORMAT_KEY = "format"
CONFIG_KEY = "config"
VERSION_KEY = "version"
ALIASES_KEY = "aliases"
RESERVED_KEYS = frozenset({FORMAT_KEY, CONFIG_KEY, VERSION_KEY, ALIASES_KEY})
EXTRA_PREFIX = "extra."


class CheckpointError(ValueError):
    """A checkpoint is malformed or does not match the model its config describes."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    ``tensors`` holds the model's state (tied names as one tensor object) and
    any ``extra.`` tensors; ``metadata`` holds only the caller's extra keys.
    """

    tensors: dict[str, Tensor]
    config: ModelConfig
    version: int
    metadata: dict[str, str]


def checkpoint_bytes(
    tensors: Mapping[str, Tensor],
    config: ModelConfig,
    version: int,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """The checkpoint's bytes: the same inputs always give the same bytes."""
    if version < 0:
        raise CheckpointError(f"version must be non-negative, got {version}")
    layout = state_layout(config)
    check_state(tensors, layout)
    aliases = _aliases(tensors, layout)
    stored = {name: t for name, t in tensors.items() if name not in aliases}

    metadata = {
        FORMAT_KEY: FORMAT,
        CONFIG_KEY: config.to_json(),
        VERSION_KEY: str(version),
        ALIASES_KEY: json.dumps(aliases, sort_keys=True),
    }
    for key, value in (extra or {}).items():
        if key in RESERVED_KEYS:
            raise CheckpointError(f"metadata key {key!r} is reserved")
        metadata[key] = value
    return safefile.dumps(stored, metadata)


def save_checkpoint(
    path: Path | str,
    tensors: Mapping[str, Tensor],
    config: ModelConfig,
    version: int,
    extra: Mapping[str, str] | None = None,
) -> str:
    """Write a checkpoint atomically (temp file, fsync, rename); returns SHA-256 hex."""
    data = checkpoint_bytes(tensors, config, version, extra)
    safefile.write_atomic(Path(path), data)
    logger.debug("wrote checkpoint v%d to %s (%d bytes)", version, path, len(data))
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(source: Path | str | bytes | bytearray | memoryview) -> Checkpoint:
    """Read and validate a checkpoint from a file path or from its bytes."""
    try:
        if isinstance(source, Path | str):
            stored, metadata = safefile.load_file(source)
        else:
            stored, metadata = safefile.loads(source)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {source!r}: {exc}") from exc
    except safefile.SafeFileError as exc:
        raise CheckpointError(f"malformed checkpoint: {exc}") from exc

    config, version, aliases = _parse_metadata(metadata)
    tensors = dict(stored)
    for alias, canonical in aliases.items():
        if alias in stored or canonical not in stored:
            raise CheckpointError(f"alias {alias!r} -> {canonical!r} is inconsistent")
        tensors[alias] = stored[canonical]
    layout = state_layout(config)
    check_state(tensors, layout)
    for group in layout.ties:
        if any(tensors[name] is not tensors[group[0]] for name in group):
            raise CheckpointError(f"tied tensors {list(group)} are stored apart")

    extra = {k: v for k, v in metadata.items() if k not in RESERVED_KEYS}
    return Checkpoint(tensors=tensors, config=config, version=version, metadata=extra)


def model_from_checkpoint(
    checkpoint: Checkpoint, device: str | torch.device = "cpu"
) -> HRMSMoE:
    """The checkpoint's model on ``device``, in training mode."""
    model = empty_model(checkpoint.config, device)
    names = state_layout(checkpoint.config).shapes
    model.load_state_dict({name: checkpoint.tensors[name] for name in names})
    return model


def check_state(tensors: Mapping[str, Tensor], layout: StateLayout) -> None:
    """Raise CheckpointError unless ``tensors`` are exactly the layout's state."""
    missing = sorted(set(layout.shapes) - set(tensors))
    unknown = sorted(
        name
        for name in set(tensors) - set(layout.shapes)
        if not name.startswith(EXTRA_PREFIX)
    )
    if missing:
        raise CheckpointError(f"missing tensors: {missing}")
    if unknown:
        raise CheckpointError(f"tensors the model does not have: {unknown}")
    for name, expected in layout.shapes.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}"
            )
        if tensor.dtype != torch.float32:
            raise CheckpointError(f"tensor {name!r} is {tensor.dtype}, not float32")


def _aliases(tensors: Mapping[str, Tensor], layout: StateLayout) -> dict[str, str]:
    """Alias -> stored name, for every name whose tensor is stored under another.

    Names that share memory are stored once. The config's tied names are too,
    even when they are separate objects (say, after an out-of-place update),
    but only if their values are equal, since the model holds one value.
    """
    aliases: dict[str, str] = {}
    first_of: dict[tuple[int, str, tuple[int, ...], tuple[int, ...]], str] = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.numel() == 0:
            continue
        key = (tensor.data_ptr(), str(tensor.dtype), tensor.shape, tensor.stride())
        if key in first_of:
            aliases[name] = first_of[key]
        else:
            first_of[key] = name

    for group in layout.ties:
        root = aliases.get(group[0], group[0])
        for name in group[1:]:
            other = aliases.get(name, name)
            if other == root:
                continue
            if not torch.equal(tensors[other], tensors[root]):
                raise CheckpointError(f"tied tensors {name!r} and {root!r} differ")
            # Everything stored under ``other`` now points at ``root``.
            for alias, target in list(aliases.items()):
                if target == other:
                    aliases[alias] = root
            aliases[other] = root
    return aliases


def _parse_metadata(
    metadata: Mapping[str, str],
) -> tuple[ModelConfig, int, dict[str, str]]:
    if metadata.get(FORMAT_KEY) != FORMAT:
        raise CheckpointError(
            f"not a {FORMAT} checkpoint: {metadata.get(FORMAT_KEY)!r}"
        )
    try:
        config = ModelConfig.from_json(metadata[CONFIG_KEY])
    except KeyError:
        raise CheckpointError("checkpoint has no model config") from None
    except ConfigError as exc:
        raise CheckpointError(f"bad model config: {exc}") from exc

    text = metadata.get(VERSION_KEY, "")
    if not (text.isascii() and text.isdecimal()):
        raise CheckpointError(f"bad version {text!r}")

    try:
        aliases = json.loads(metadata.get(ALIASES_KEY, "{}"))
    except ValueError as exc:
        raise CheckpointError(f"aliases are not JSON: {exc}") from exc
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise CheckpointError("aliases must map names to names")
    return config, int(text), aliases
