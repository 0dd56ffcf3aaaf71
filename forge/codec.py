"""The update codec: top-k sparsification with error feedback, packed for the wire.

A worker's update (the pseudo-gradient ``theta_start - theta_end``) is as large as
the model, so it never travels dense. :func:`encode_update` keeps, per tensor, the
k entries of ``update + residual`` with the largest magnitude, quantizes their
values and carries everything it did not send (the entries left out, the rounding
of the quantizer, the clamp of values beyond the fp16 range) into the next
residual, so that nothing is lost, only delayed. :func:`decode_update` is the
aggregator's side: it checks every byte of an untrusted frame before it returns
anything, and :func:`accumulate` adds a decoded update into fp32 sums.

Frame layout, format version 1
------------------------------
One zstd frame whose header declares its content size. The content is
safetensors bytes (:mod:`forge.safefile`) holding, for each tensor ``NAME`` sent:

- ``indices/NAME``: uint8 ``[w, k]``. The flat indices in increasing order,
  delta-encoded (the first index itself, then the gaps to the previous one) as
  little-endian signed integers of ``w`` bytes (1, 2, 4 or 8: the narrowest that
  holds every delta), split into byte planes: row ``j`` holds byte ``j`` of every
  delta. A delta of 0 is a repeated index; a negative one an unsorted index.
- ``values/NAME``: uint8 ``[b, k]``. The values as fp16, bf16 (``b = 2``) or
  fp32 (``b = 4``), split into byte planes the same way.

and the metadata ``format`` (``dragon-update``), ``format_version`` (``1``),
``value_dtype`` and ``tensors``: JSON mapping each name to its ``shape``, ``k``
and ``index_bytes`` (``w``). Byte planes put the bytes that barely vary (the high
bytes of small gaps; sign and exponent) side by side, which zstd compresses far
better than the interleaved integers.

Densities are taken at float32 precision, the precision of ``Recipe.density`` on
the wire, so that the worker and the aggregator compute the same k from it
(:func:`max_entries`).

Errors
------
Every problem with a frame raises a subclass of :class:`CodecError`, itself a
``ValueError``::

    CodecError
    +-- FrameTooLarge         the compressed frame is over the bound
    |   +-- ContentTooLarge   it declares more content than the bound (a bomb)
    +-- MalformedFrame        not one zstd frame of safetensors bytes in our layout
    +-- UnknownTensor         a name the model does not have
    +-- ShapeMismatch         a shape other than the model's
    +-- TooManyEntries        k over numel or over the density bound
    +-- IndexOutOfRange       an index outside the tensor
    +-- DuplicateIndex        the same index twice (a delta of 0)
    +-- UnsortedIndex         an index below the one before it (a negative delta)
    +-- NonFiniteValue        NaN or infinity in the values
"""

# The exception names are part of the agreed interface, without an Error suffix.
# ruff: noqa: N818

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import torch
import zstandard

from forge import safefile

logger = logging.getLogger(__name__)

ValueDtype = Literal["fp16", "bf16", "fp32"]

FORMAT = "dragon-update"
FORMAT_VERSION = "1"

# Tensors with at least this many entries get the sampled threshold; below it the
# exact selection over all entries costs a few milliseconds at most.
SAMPLED_MIN_NUMEL = 1 << 20

_VALUE_BYTES: dict[str, int] = {"fp16": 2, "bf16": 2, "fp32": 4}
_INDEX_WIDTHS = (1, 2, 4, 8)
_FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_BF16_MAX = float(torch.finfo(torch.bfloat16).max)  # about 3.39e38

# The magnitude of a float32 is its bit pattern without the sign bit: as int32
# these are ordered like |x| for finite values, +inf is above every finite value
# and NaN above +inf, so a selection by magnitude always takes non-finite entries
# first and one check on the selected values finds them.
_MAGNITUDE_MASK = 0x7FFFFFFF
_SCAN_CHUNK = 1 << 20  # entries per pass of the threshold scan: 4 MiB, cache-sized
# Sampled selection aims at this many sample entries above the threshold: the
# estimated count is then off by about 1 / sqrt(2000) = 2.2 %, and a margin of
# five of those lets about 11 % more candidates than k through the scan, which
# costs little; a larger sample would cost more than it saves.
_SAMPLE_HITS = 2_000
_SAMPLE_MIN = 1 << 14
_SAMPLE_MAX = 1 << 20
_SAMPLE_SEED = 0x5EED  # fixed, so that the same update gives the same frame
_THRESHOLD_TRIES = 3


class CodecError(ValueError):
    """An update frame is invalid; the message says what and where."""


class FrameTooLarge(CodecError):
    """The compressed frame is larger than an update of the model can be."""


class ContentTooLarge(FrameTooLarge):
    """The frame declares more content than an update of the model can hold."""


class MalformedFrame(CodecError):
    """The bytes are not one zstd frame of safetensors bytes in the update layout."""


class UnknownTensor(CodecError):
    """The update names a tensor the model does not have."""


class ShapeMismatch(CodecError):
    """The update gives a tensor a shape other than the model's."""


class TooManyEntries(CodecError):
    """A tensor has more entries than its size or the density bound allows."""


class IndexOutOfRange(CodecError):
    """An index points outside its tensor."""


class DuplicateIndex(CodecError):
    """An index appears twice (a delta of 0)."""


class UnsortedIndex(CodecError):
    """An index is smaller than the one before it (a negative delta)."""


class NonFiniteValue(CodecError):
    """A value is NaN or infinite."""


@dataclass(frozen=True, eq=False)
class SparseTensor:
    """The sent entries of one tensor: flat indices and their values."""

    shape: tuple[int, ...]
    indices: torch.Tensor  # int64 [k], strictly increasing flat indices
    values: torch.Tensor  # float32 [k]


@dataclass(frozen=True, eq=False)
class SparseUpdate:
    """A decoded update; tensors it does not name are unchanged."""

    tensors: dict[str, SparseTensor]

    def entry_count(self) -> int:
        return sum(int(t.indices.numel()) for t in self.tensors.values())


@dataclass(frozen=True, eq=False)
class EncodedUpdate:
    """A frame ready to send and the residual to keep for the next update."""

    frame: bytes
    residual: dict[str, torch.Tensor]  # float32, same names and shapes as the update
    entry_count: int
    dense_bytes: int  # fp32 size of the tensors encoded


@dataclass(frozen=True)
class _Entry:
    """One tensor's description in a frame's metadata."""

    shape: tuple[int, ...]
    k: int
    index_bytes: int


# --- sizes and bounds -------------------------------------------------------


def _density32(density: float) -> float:
    """``density`` at float32 precision; ValueError outside (0, 1]."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], not {density}")
    return float(np.float32(density))


def max_entries(numel: int, density: float) -> int:
    """k for a tensor of ``numel`` entries: ``max(1, ceil(density * numel))``.

    The density is rounded to float32 first and the product shrunk by 2**-23, so
    that 0.1 and float32(0.1) = 0.10000000149 both give 100 of 1000 entries (and
    k is at most one less than the ceiling for k beyond about 5 million).
    """
    if numel == 0:
        return 0
    product = _density32(density) * numel * (1.0 - 2.0**-23)
    return min(numel, max(1, math.ceil(product)))


def _index_width(largest_delta: int) -> int:
    """Bytes of the narrowest signed integer that holds ``largest_delta``."""
    for width in _INDEX_WIDTHS:
        if largest_delta < 1 << (8 * width - 1):
            return width
    raise ValueError(f"delta {largest_delta} does not fit 8 bytes")


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def dense_size_bytes(spec: Mapping[str, tuple[int, ...]]) -> int:
    """Bytes of the tensors of ``spec`` as dense fp32."""
    return sum(_numel(shape) for shape in spec.values()) * 4


def spec_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``tensors``: what :func:`decode_update` checks against."""
    return {name: tuple(tensor.shape) for name, tensor in tensors.items()}


def _max_header_bytes(spec: Mapping[str, tuple[int, ...]]) -> int:
    # JSON escaping turns one UTF-8 byte of a name into at most 6 characters in
    # each safetensors key and 7 inside the metadata's nested JSON string; the
    # fixed parts of the three entries per tensor and every number in them
    # (at most 20 digits) fit in 512 bytes, each dimension of a shape in 24.
    per_tensor = sum(
        512 + 24 * len(shape) + 20 * len(name.encode()) for name, shape in spec.items()
    )
    return 1024 + per_tensor


def _max_content_bytes(spec: Mapping[str, tuple[int, ...]], max_density: float) -> int:
    data = 0
    for shape in spec.values():
        numel = _numel(shape)
        if numel:
            index_bytes = _index_width(numel - 1)
            data += max_entries(numel, max_density) * (index_bytes + 4)
    return 8 + _max_header_bytes(spec) + data


def max_frame_bytes(
    spec: Mapping[str, tuple[int, ...]], max_density: float = 1.0
) -> int:
    """The largest frame a valid update of ``spec`` at ``max_density`` can take."""
    content = _max_content_bytes(spec, max_density)
    # zstd never grows its input by more than 1/256 plus a frame header, a block
    # header per 128 KiB and a checksum: it stores incompressible blocks raw.
    return content + content // 255 + 512


# --- encoding ---------------------------------------------------------------


def _magnitudes(bits: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
    return np.bitwise_and(bits, np.int32(_MAGNITUDE_MASK))


def _scan(bits: npt.NDArray[np.int32], threshold: int) -> npt.NDArray[np.int64]:
    """Flat indices, ascending, of the entries whose magnitude is >= threshold."""
    found: list[npt.NDArray[np.int64]] = []
    size = min(bits.size, _SCAN_CHUNK)
    magnitude = np.empty(size, dtype=np.int32)
    hit = np.empty(size, dtype=np.bool_)
    # Chunked numpy passes stay in cache and allocate nothing large; they also
    # avoid torch's thread pool, whose start-up costs dominate on busy cores.
    for start in range(0, bits.size, _SCAN_CHUNK):
        part = bits[start : start + _SCAN_CHUNK]
        mag, mask = magnitude[: part.size], hit[: part.size]
        np.bitwise_and(part, np.int32(_MAGNITUDE_MASK), out=mag)
        np.greater_equal(mag, np.int32(threshold), out=mask)
        where = np.flatnonzero(mask)
        if where.size:
            found.append(where + start)
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def _top_of(
    candidates: npt.NDArray[np.int64], magnitude: npt.NDArray[np.int32], k: int
) -> npt.NDArray[np.int64]:
    """The ``k`` candidates of largest magnitude, still in increasing index order.

    Ties at the k-th magnitude go to the lowest indices.
    """
    if candidates.size <= k:
        return candidates
    kth = np.partition(magnitude, candidates.size - k)[candidates.size - k]
    keep = magnitude > kth
    ties = np.flatnonzero(magnitude == kth)
    keep[ties[: k - int(np.count_nonzero(keep))]] = True
    chosen: npt.NDArray[np.int64] = candidates[keep]
    return chosen


def _sample_threshold(bits: npt.NDArray[np.int32], k: int, excess: float) -> int:
    """A magnitude threshold that about ``k`` entries (a few more) reach.

    ``excess`` widens the safety margin, in standard deviations of the estimate.
    """
    n = bits.size
    size = min(n, max(_SAMPLE_MIN, min(_SAMPLE_MAX, _SAMPLE_HITS * n // k)))
    rng = np.random.Generator(np.random.PCG64(_SAMPLE_SEED))
    sample = _magnitudes(bits[rng.integers(0, n, size)])
    expected = k * size / n  # sample entries at or above the true k-th magnitude
    rank = min(size, math.ceil(expected + excess * math.sqrt(expected) + 1))
    return int(np.partition(sample, size - rank)[size - rank])


def _select(flat: npt.NDArray[np.float32], k: int) -> npt.NDArray[np.int64]:
    """Flat indices, ascending, of the ``k`` nonzero entries of largest magnitude.

    Exact: sampling only picks a threshold that lets a superset through (DGC,
    Lin et al. 2018), and the exact top-k of that superset is the top-k of all.
    Zeros are never sent, so a tensor with fewer than k nonzeros sends fewer.
    """
    bits = flat.view(np.int32)
    if flat.size >= SAMPLED_MIN_NUMEL and k < flat.size:
        for attempt in range(_THRESHOLD_TRIES):
            threshold = max(1, _sample_threshold(bits, k, excess=5.0 * 2**attempt))
            candidates = _scan(bits, threshold)
            if candidates.size >= k or threshold == 1:
                return _top_of(candidates, _magnitudes(bits[candidates]), k)
            logger.debug("threshold let %d of %d entries through", candidates.size, k)
    candidates = _scan(bits, 1)
    return _top_of(candidates, _magnitudes(bits[candidates]), k)


def _quantize(
    values: npt.NDArray[np.float32], value_dtype: str
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float32]]:
    """(wire values, the float32 values they stand for), clamped to stay finite."""
    if value_dtype == "fp32":
        return values, values
    if value_dtype == "fp16":
        half = np.clip(values, -_FP16_MAX, _FP16_MAX).astype(np.float16)
        return half, half.astype(np.float32)
    # bf16 is the top half of a float32, rounded to nearest even.
    bits = np.clip(values, -_BF16_MAX, _BF16_MAX).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    top = ((bits + rounding) >> 16).astype(np.uint16)
    return top, (top.astype(np.uint32) << 16).view(np.float32)


def _planes(array: npt.NDArray[Any]) -> torch.Tensor:
    """uint8 [itemsize, n]: row j holds byte j (little-endian) of every item."""
    # Shifts of the unsigned bit patterns: independent of the machine's byte
    # order, and about ten times faster than transposing a [n, itemsize] view.
    width = array.itemsize
    bits = array.reshape(-1).view(f"u{width}")
    planes = np.empty((width, array.size), dtype=np.uint8)
    for j in range(width):
        np.copyto(planes[j], bits >> (8 * j), casting="unsafe")  # keeps the low byte
    return torch.from_numpy(planes)


def _as_flat_float32(
    tensor: torch.Tensor, *, private: bool = False
) -> npt.NDArray[np.float32]:
    """A flat float32 view of ``tensor``; with ``private``, memory of its own."""
    cpu = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    flat = cpu.numpy().reshape(-1)
    # A conversion of dtype, device or layout has already made a private copy.
    if private and cpu.data_ptr() == tensor.data_ptr() and flat.size:
        return flat.copy()
    return flat


def _accumulated(
    update: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None
) -> dict[str, npt.NDArray[np.float32]]:
    """``update + residual`` per tensor, flat float32, in fresh memory."""
    residual = residual or {}
    unknown = sorted(set(residual) - set(update))
    if unknown:
        raise UnknownTensor(
            f"the residual holds {unknown[0]!r}, which the update lacks"
        )
    acc: dict[str, npt.NDArray[np.float32]] = {}
    for name, tensor in update.items():
        if name not in residual:
            acc[name] = _as_flat_float32(tensor, private=True)
            continue
        flat = _as_flat_float32(tensor)
        if tuple(residual[name].shape) != tuple(tensor.shape):
            raise ShapeMismatch(
                f"residual {name!r} has shape {tuple(residual[name].shape)}, "
                f"the update {tuple(tensor.shape)}"
            )
        acc[name] = np.add(flat, _as_flat_float32(residual[name]))
    return acc


def encode_update(
    update: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor] | None,
    density: float,
    value_dtype: ValueDtype = "fp16",
    *,
    zstd_level: int = 3,
) -> EncodedUpdate:
    """Compress ``update + residual`` to a frame, keeping the rest as the residual.

    Per tensor the ``max_entries(numel, density)`` entries of largest magnitude are
    sent (fewer when the tensor has fewer nonzero entries; an all-zero or empty
    tensor is left out of the frame). Sent values plus the new residual equal
    update plus old residual up to fp32 rounding. The inputs are not modified.
    Raises NonFiniteValue if the sum holds NaN or infinity.
    """
    if value_dtype not in get_args(ValueDtype):
        raise ValueError(f"value_dtype must be one of {get_args(ValueDtype)}")
    _density32(density)
    acc = _accumulated(update, residual)

    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, dict[str, Any]] = {}
    for name, flat in acc.items():
        k = max_entries(flat.size, density)
        if k == 0:
            continue
        chosen = _select(flat, k)
        if chosen.size == 0:  # all zeros: nothing worth sending
            continue
        picked = flat[chosen]
        if not np.isfinite(picked).all():
            raise NonFiniteValue(f"update {name!r} holds NaN or infinite values")
        wire, sent = _quantize(picked, value_dtype)
        flat[chosen] = picked - sent  # the residual keeps what was not sent

        deltas = np.diff(chosen, prepend=0)
        width = _index_width(int(deltas.max()))
        tensors[f"indices/{name}"] = _planes(deltas.astype(f"i{width}"))
        tensors[f"values/{name}"] = _planes(wire)
        shape = list(update[name].shape)
        described[name] = {"shape": shape, "k": int(chosen.size), "index_bytes": width}

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "value_dtype": value_dtype,
        "tensors": json.dumps(described, sort_keys=True, separators=(",", ":")),
    }
    content = safefile.dumps(tensors, metadata)
    compressor = zstandard.ZstdCompressor(
        level=zstd_level, write_content_size=True, write_checksum=True
    )
    frame = compressor.compress(content)
    residual_out = {
        name: torch.from_numpy(flat).reshape(update[name].shape)
        for name, flat in acc.items()
    }
    return EncodedUpdate(
        frame=frame,
        residual=residual_out,
        entry_count=sum(entry["k"] for entry in described.values()),
        dense_bytes=sum(flat.size for flat in acc.values()) * 4,
    )


# --- decoding ---------------------------------------------------------------

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _decompress(frame: bytes | bytearray | memoryview, bound: int) -> bytes:
    """The content of exactly one zstd frame that declares at most ``bound`` bytes."""
    if bytes(frame[:4]) != _ZSTD_MAGIC:
        raise MalformedFrame("the update does not start with a zstd frame")
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise MalformedFrame(f"bad zstd frame header: {exc}") from exc
    if params.content_size in (zstandard.CONTENTSIZE_UNKNOWN, 0):
        raise MalformedFrame("the zstd frame does not declare its content size")
    if params.content_size == zstandard.CONTENTSIZE_ERROR:
        raise MalformedFrame("the zstd frame header is corrupt")
    if params.content_size > bound:
        raise ContentTooLarge(
            f"the frame declares {params.content_size} bytes of content; "
            f"an update of this model holds at most {bound}"
        )
    if params.dict_id:
        raise MalformedFrame(f"the zstd frame needs dictionary {params.dict_id}")
    try:
        # With the size declared, zstd allocates exactly that and refuses to
        # write past it; extra data (a second frame, trailing bytes) is an error.
        content = zstandard.ZstdDecompressor().decompress(frame, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise MalformedFrame(f"the zstd frame does not decompress: {exc}") from exc
    if len(content) != params.content_size:
        raise MalformedFrame(
            f"the frame holds {len(content)} bytes, not the {params.content_size} "
            "it declares"
        )
    return content


def _is_int(value: object) -> bool:
    return type(value) is int


def _parse_entry(name: str, raw: object) -> _Entry:
    if not isinstance(raw, dict) or set(raw) != {"shape", "k", "index_bytes"}:
        raise MalformedFrame(f"tensor {name!r}: needs exactly shape, k and index_bytes")
    shape, k, width = raw["shape"], raw["k"], raw["index_bytes"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise MalformedFrame(f"tensor {name!r}: shape must be non-negative integers")
    if not _is_int(k) or k < 0:
        raise MalformedFrame(f"tensor {name!r}: k must be a non-negative integer")
    if width not in _INDEX_WIDTHS or not _is_int(width):
        raise MalformedFrame(f"tensor {name!r}: index_bytes must be 1, 2, 4 or 8")
    return _Entry(tuple(shape), k, width)


def _parse_metadata(metadata: Mapping[str, str]) -> tuple[str, dict[str, _Entry]]:
    """(value dtype, entries by name) from a frame's metadata."""
    if metadata.get("format") != FORMAT:
        raise MalformedFrame(f"the frame's format is not {FORMAT!r}")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise MalformedFrame(
            f"format version {metadata.get('format_version')!r} is not supported"
        )
    value_dtype = metadata.get("value_dtype", "")
    if value_dtype not in _VALUE_BYTES:
        raise MalformedFrame(f"unknown value dtype {value_dtype!r}")
    try:
        described = json.loads(metadata.get("tensors", ""))
    except (ValueError, RecursionError) as exc:
        raise MalformedFrame(f"the tensor list is not JSON: {exc}") from exc
    if not isinstance(described, dict):
        raise MalformedFrame("the tensor list must be a JSON object")
    return value_dtype, {
        name: _parse_entry(name, raw) for name, raw in described.items()
    }


def _check_entry(
    name: str, entry: _Entry, spec: Mapping[str, tuple[int, ...]], max_density: float
) -> None:
    if name not in spec:
        raise UnknownTensor(f"the model has no tensor {name!r}")
    if entry.shape != tuple(spec[name]):
        raise ShapeMismatch(
            f"tensor {name!r} has shape {entry.shape} in the update, "
            f"{tuple(spec[name])} in the model"
        )
    numel = _numel(entry.shape)
    if entry.k > numel:
        raise TooManyEntries(f"tensor {name!r}: {entry.k} entries for {numel} elements")
    limit = max_entries(numel, max_density)
    if entry.k > limit:
        raise TooManyEntries(
            f"tensor {name!r}: {entry.k} entries, over the {limit} that density "
            f"{max_density} allows"
        )
    if numel and entry.index_bytes > _index_width(numel - 1):
        raise MalformedFrame(
            f"tensor {name!r}: {entry.index_bytes}-byte deltas for {numel} elements"
        )


def _check_layout(
    infos: Mapping[str, safefile.TensorInfo],
    entries: Mapping[str, _Entry],
    value_bytes: int,
) -> None:
    expected = {f"{kind}/{name}" for name in entries for kind in ("indices", "values")}
    extra = sorted(set(infos) - expected)
    if extra:
        raise MalformedFrame(f"the frame holds {extra[0]!r}, which its metadata lacks")
    missing = sorted(expected - set(infos))
    if missing:
        raise MalformedFrame(f"the frame lacks {missing[0]!r}")
    for name, entry in entries.items():
        for kind, rows in (("indices", entry.index_bytes), ("values", value_bytes)):
            info = infos[f"{kind}/{name}"]
            if info.dtype != "U8" or info.shape != (rows, entry.k):
                raise MalformedFrame(
                    f"{kind}/{name} is {info.dtype} {list(info.shape)}, "
                    f"expected U8 [{rows}, {entry.k}]"
                )


def _joined(planes: npt.NDArray[np.uint8], dtype: str) -> npt.NDArray[Any]:
    """Items of ``dtype`` from their little-endian byte planes [itemsize, k]."""
    unsigned = np.dtype(f"u{planes.shape[0]}")
    bits = planes[0].astype(unsigned)
    for j in range(1, planes.shape[0]):
        bits |= planes[j].astype(unsigned) << unsigned.type(8 * j)
    items: npt.NDArray[Any] = bits.view(dtype)
    return items


def _decode_indices(
    name: str, planes: npt.NDArray[np.uint8], numel: int
) -> npt.NDArray[np.int64]:
    deltas = _joined(planes, f"i{planes.shape[0]}").astype(np.int64)
    if deltas.size == 0:
        return deltas
    if deltas[0] < 0:
        raise IndexOutOfRange(f"tensor {name!r}: first index {deltas[0]} is negative")
    bad = np.flatnonzero(deltas[1:] <= 0)
    if bad.size:
        position = int(bad[0]) + 1
        if deltas[position] == 0:
            raise DuplicateIndex(f"tensor {name!r}: entry {position} repeats an index")
        raise UnsortedIndex(
            f"tensor {name!r}: entry {position} goes back by {-deltas[position]}"
        )
    if deltas.max() >= numel:
        raise IndexOutOfRange(f"tensor {name!r}: a delta reaches past {numel} elements")
    indices = np.cumsum(deltas)
    # Deltas are positive and below numel, so the sums rise until they pass numel;
    # a wrap past 2**63 (only for huge tensors) would show as a negative one.
    if indices[-1] >= numel or indices.min() < 0:
        raise IndexOutOfRange(
            f"tensor {name!r}: index {indices[-1]} is past its {numel} elements"
        )
    return indices


def _decode_values(
    name: str, planes: npt.NDArray[np.uint8], value_dtype: str
) -> npt.NDArray[np.float32]:
    if value_dtype == "fp16":
        values = _joined(planes, "f2").astype(np.float32)
    elif value_dtype == "bf16":
        top = _joined(planes, "u2").astype(np.uint32)
        values = (top << 16).view(np.float32)
    else:
        values = _joined(planes, "f4")  # fresh memory already
    finite = np.isfinite(values)
    if not finite.all():
        position = int(np.flatnonzero(~finite)[0])
        raise NonFiniteValue(f"tensor {name!r}: entry {position} is {values[position]}")
    return values


def decode_update(
    frame: bytes | bytearray | memoryview,
    spec: Mapping[str, tuple[int, ...]],
    *,
    max_density: float = 1.0,
) -> SparseUpdate:
    """Check and unpack a frame made by :func:`encode_update` for a model ``spec``.

    Nothing is returned unless every check passed: the frame's size, one zstd
    frame with a declared content size within the bound (decompression never
    allocates more), the safetensors header, the names, shapes, k against numel
    and ``max_density``, indices in range and strictly increasing, finite values.
    Tensors of ``spec`` that the frame omits are simply absent from the result.
    """
    limit = max_frame_bytes(spec, max_density)
    if len(frame) > limit:
        raise FrameTooLarge(f"the frame has {len(frame)} bytes; at most {limit} fit")
    content = _decompress(frame, _max_content_bytes(spec, max_density))
    try:
        infos, metadata, base = safefile.read_header(
            content, max_header_bytes=_max_header_bytes(spec)
        )
    except (safefile.SafeFileError, RecursionError) as exc:
        raise MalformedFrame(f"the frame's safetensors bytes are bad: {exc}") from exc
    value_dtype, entries = _parse_metadata(metadata)
    for name, entry in entries.items():
        _check_entry(name, entry, spec, max_density)
    _check_layout(infos, entries, _VALUE_BYTES[value_dtype])

    raw = np.frombuffer(content, dtype=np.uint8)

    def planes_of(key: str) -> npt.NDArray[np.uint8]:
        info = infos[key]
        return raw[base + info.start : base + info.end].reshape(info.shape)

    tensors: dict[str, SparseTensor] = {}
    for name, entry in entries.items():
        indices = _decode_indices(
            name, planes_of(f"indices/{name}"), _numel(entry.shape)
        )
        values = _decode_values(name, planes_of(f"values/{name}"), value_dtype)
        tensors[name] = SparseTensor(
            entry.shape, torch.from_numpy(indices), torch.from_numpy(values)
        )
    return SparseUpdate(tensors)


def accumulate(
    update: SparseUpdate, into: MutableMapping[str, torch.Tensor], weight: float = 1.0
) -> None:
    """Add ``weight`` times ``update`` into the dense tensors ``into``, in place.

    Every name and shape is checked before anything is added.
    """
    for name, sparse in update.tensors.items():
        if name not in into:
            raise UnknownTensor(f"nothing to accumulate {name!r} into")
        target = into[name]
        if tuple(target.shape) != sparse.shape:
            raise ShapeMismatch(
                f"{name!r} is {tuple(target.shape)}, the update {sparse.shape}"
            )
        if not target.is_contiguous() or not target.is_floating_point():
            raise ValueError(f"accumulator {name!r} must be a contiguous float tensor")
    for name, sparse in update.tensors.items():
        target = into[name]
        values = sparse.values.to(device=target.device, dtype=target.dtype)
        indices = sparse.indices.to(target.device)
        target.view(-1).index_add_(0, indices, values, alpha=weight)
