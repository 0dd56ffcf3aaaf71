"""Safetensors bytes, written deterministically and read with full validation.

Every tensor that touches disk or crosses the wire goes through this module:
checkpoints, optimizer state, the worker's residual and the inside of an update
frame. Our own writer puts the metadata first and the tensors in name order, so
the same tensors always give the same bytes (and the same SHA-256) on both ends.
The reader checks the header length against the buffer before it allocates
anything, so a header that claims 2**64-1 bytes costs nothing.

The layout: 8 bytes little-endian header length N, N bytes of JSON (padded with
spaces to a multiple of 8), then the tensors' raw little-endian bytes.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

MAX_HEADER_BYTES = 16 * 1024 * 1024
METADATA_KEY = "__metadata__"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class SafeFileError(ValueError):
    """Safetensors bytes are malformed; the message says where."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a header; start and end are offsets into the data."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    # A view of the tensor's bytes: the final join is the only copy.
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def dumps(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialize ``tensors`` (each stored on its own, even if they share memory)."""
    header: dict[str, Any] = {}
    if metadata:
        header[METADATA_KEY] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs: list[memoryview] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        if name == METADATA_KEY:
            raise SafeFileError(f"{METADATA_KEY} is reserved and cannot name a tensor")
        if tensor.dtype not in _NAMES:
            raise SafeFileError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        blob = _raw_bytes(tensor)
        header[name] = {
            "dtype": _NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([len(text).to_bytes(8, "little"), text, *blobs])


def _parse_entry(name: str, entry: object, data_bytes: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise SafeFileError(f"tensor {name!r}: entry must hold dtype, shape, offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPES:
        raise SafeFileError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise SafeFileError(f"tensor {name!r}: shape must be non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
        raise SafeFileError(f"tensor {name!r}: data offsets {offsets} out of range")
    itemsize = torch.empty((), dtype=_DTYPES[dtype]).element_size()
    if int(np.prod(shape, dtype=np.int64)) * itemsize != offsets[1] - offsets[0]:
        raise SafeFileError(f"tensor {name!r}: shape {shape} does not fit its bytes")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def read_header(
    data: bytes | bytearray | memoryview | mmap.mmap,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and check a header: (tensors, metadata, offset of the data)."""
    view = memoryview(data)
    if len(view) < 8:
        raise SafeFileError(f"{len(view)} bytes is too short for a header length")
    length = int.from_bytes(view[:8], "little")
    if length > max_header_bytes:
        raise SafeFileError(f"header length {length} exceeds {max_header_bytes} bytes")
    if length > len(view) - 8:
        raise SafeFileError(f"header length {length} exceeds the {len(view)} bytes")
    try:
        header = json.loads(bytes(view[8 : 8 + length]))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SafeFileError(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise SafeFileError("header must be a JSON object")

    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafeFileError("metadata must map strings to strings")
    data_bytes = len(view) - 8 - length
    infos = {name: _parse_entry(name, e, data_bytes) for name, e in header.items()}

    # The tensors must tile the data exactly: no gap, no overlap, nothing after.
    position = 0
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if info.start != position:
            raise SafeFileError(f"tensor {name!r} leaves a gap or overlaps another")
        position = info.end
    if position != data_bytes:
        raise SafeFileError(f"{data_bytes - position} trailing bytes after tensors")
    return infos, metadata, 8 + length


def loads(
    data: bytes | bytearray | memoryview | mmap.mmap,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (owned copies on the CPU) and metadata of safetensors bytes."""
    infos, metadata, base = read_header(data, max_header_bytes=max_header_bytes)
    raw = np.frombuffer(data, dtype=np.uint8)
    tensors: dict[str, torch.Tensor] = {}
    for name, info in infos.items():
        dtype = _DTYPES[info.dtype]
        if info.start == info.end:  # empty: a byte view of nothing has no stride
            tensors[name] = torch.empty(info.shape, dtype=dtype)
            continue
        chunk = torch.from_numpy(raw[base + info.start : base + info.end].copy())
        tensors[name] = chunk.view(dtype).reshape(info.shape)
    return tensors, metadata


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new."""
    path = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path | str) -> bytes:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.digest()


def dump_file(
    path: Path | str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write a safetensors file atomically; returns its SHA-256 in hex."""
    data = dumps(tensors, metadata)
    write_atomic(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def load_file(
    path: Path | str, *, max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, read through a memory map."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise SafeFileError(f"{path} is empty")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            result = loads(mapped, max_header_bytes=max_header_bytes)
        except SafeFileError as exc:
            message = str(exc)
        else:
            mapped.close()
            return result
    # Only now is the failed parse's traceback gone, and with it the last view of
    # the map, so that the map can close.
    mapped.close()
    raise SafeFileError(f"{path}: {message}")
