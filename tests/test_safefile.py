"""Safetensors bytes: deterministic, compatible, and strict about malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from forge import safefile


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(3, 4, generator=generator),
        "ids": torch.arange(5, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "half": torch.randn(2, generator=generator).to(torch.bfloat16),
        "scalar": torch.tensor(3.0),
        "bytes": torch.tensor([1, 2, 255], dtype=torch.uint8),
    }


def _header(header: dict[str, object], payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + payload


def test_round_trip_keeps_values_dtypes_and_shapes(
    tensors: dict[str, torch.Tensor],
) -> None:
    loaded, metadata = safefile.loads(safefile.dumps(tensors, {"version": "3"}))

    assert metadata == {"version": "3"}
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert loaded[name].shape == tensor.shape
        assert torch.equal(loaded[name], tensor)


def test_same_tensors_give_the_same_bytes(tensors: dict[str, torch.Tensor]) -> None:
    reordered = dict(reversed(list(tensors.items())))
    meta = {"b": "2", "a": "1"}

    assert safefile.dumps(tensors, meta) == safefile.dumps(reordered, dict(meta))


def test_bytes_are_readable_by_the_safetensors_library_and_back(
    tensors: dict[str, torch.Tensor],
) -> None:
    ours = safetensors.torch.load(safefile.dumps(tensors))
    theirs, _ = safefile.loads(safetensors.torch.save(tensors))

    for name, tensor in tensors.items():
        assert torch.equal(ours[name], tensor)
        assert torch.equal(theirs[name], tensor)


def test_dump_file_is_atomic_and_returns_the_digest(
    tmp_path: Path, tensors: dict[str, torch.Tensor]
) -> None:
    import hashlib

    path = tmp_path / "state.safetensors"
    digest = safefile.dump_file(path, tensors)

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]
    loaded, _ = safefile.load_file(path)
    assert torch.equal(loaded["weight"], tensors["weight"])


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state.safetensors"
    safefile.dump_file(path, {"x": torch.ones(2)})
    before = path.read_bytes()

    with pytest.raises(safefile.SafeFileError):
        safefile.dump_file(path, {"x": torch.ones(2, dtype=torch.complex64)})

    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", "too short", id="empty"),
        pytest.param(b"\xff" * 8 + b"{}", "exceeds 16777216", id="length-2^64-1"),
        pytest.param((100).to_bytes(8, "little") + b"{}", "exceeds the", id="past-end"),
        pytest.param((2).to_bytes(8, "little") + b"[]", "JSON object", id="not-object"),
        pytest.param((2).to_bytes(8, "little") + b"{x", "not JSON", id="not-json"),
        pytest.param(
            (200_000).to_bytes(8, "little") + b"[" * 100_000 + b"]" * 100_000,
            "not JSON",
            id="deeply-nested",
        ),
        pytest.param(
            _header({"t": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}),
            "unknown dtype",
            id="bad-dtype",
        ),
        pytest.param(
            _header(
                {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"x" * 4
            ),
            "does not fit",
            id="shape-vs-bytes",
        ),
        pytest.param(
            _header(
                {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"x" * 4
            ),
            "out of range",
            id="offsets-past-data",
        ),
        pytest.param(
            _header(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                b"x" * 8,
            ),
            "gap or overlaps",
            id="overlap",
        ),
        pytest.param(
            _header(
                {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"x" * 5
            ),
            "trailing",
            id="trailing-bytes",
        ),
        pytest.param(
            _header({"__metadata__": {"k": 1}}), "strings to strings", id="bad-metadata"
        ),
        pytest.param(
            _header({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}),
            "non-negative",
            id="negative-shape",
        ),
    ],
)
def test_malformed_bytes_are_rejected_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(safefile.SafeFileError, match=message):
        safefile.loads(data)


def test_absurd_header_length_is_rejected_before_reading_it() -> None:
    # A header claiming just under the cap, in a buffer of 16 bytes: the check
    # against the buffer's size must come before any read or allocation.
    data = (safefile.MAX_HEADER_BYTES - 1).to_bytes(8, "little") + b"{}      "

    with pytest.raises(safefile.SafeFileError, match="exceeds the 16 bytes"):
        safefile.read_header(data)


def test_malformed_file_is_a_safefile_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\xff" * 8 + b"{}")

    with pytest.raises(safefile.SafeFileError, match="exceeds 16777216"):
        safefile.load_file(path)
