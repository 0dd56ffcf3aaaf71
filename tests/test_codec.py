"""The update codec: top-k with error feedback, and a decoder that trusts nothing.

Malformed frames are built here from the layout in forge.codec's docstring, with
numpy and zstandard directly, so the tests check the documented format rather
than the encoder's own helpers.
"""

from __future__ import annotations

import json
import math
import time
import tracemalloc
from collections.abc import Callable, Mapping
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings

from forge import codec, safefile

SPEC: dict[str, tuple[int, ...]] = {"w": (40, 25), "b": (10,)}


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        name: _randn(*shape, seed=seed + i)
        for i, (name, shape) in enumerate(SPEC.items())
    }


def _compress(content: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True).compress(content)


def _planes(array: np.ndarray[Any, Any]) -> torch.Tensor:
    as_bytes = array.view(np.uint8).reshape(array.size, array.itemsize)
    return torch.from_numpy(np.ascontiguousarray(as_bytes.T))


def _content(
    entries: Mapping[str, tuple[tuple[int, ...], list[int], np.ndarray[Any, Any], int]],
    value_dtype: str = "fp32",
    *,
    edit: Callable[[dict[str, torch.Tensor], dict[str, str]], None] | None = None,
) -> bytes:
    """Safetensors bytes of a frame: name -> (shape, deltas, wire values, width)."""
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, object] = {}
    for name, (shape, deltas, values, width) in entries.items():
        tensors[f"indices/{name}"] = _planes(np.asarray(deltas, dtype=f"<i{width}"))
        tensors[f"values/{name}"] = _planes(values)
        described[name] = {"shape": list(shape), "k": len(deltas), "index_bytes": width}
    metadata = {
        "format": "dragon-update",
        "format_version": "1",
        "value_dtype": value_dtype,
        "tensors": json.dumps(described),
    }
    if edit is not None:
        edit(tensors, metadata)
    return safefile.dumps(tensors, metadata)


def _frame(deltas: list[int], values: list[float] | None = None, **kw: Any) -> bytes:
    """A frame for SPEC's ``w`` with the given index deltas and fp32 values."""
    wire = np.asarray(values if values is not None else [1.0] * len(deltas), "<f4")
    shape = kw.pop("shape", SPEC["w"])
    width = kw.pop("width", 2)
    name = kw.pop("name", "w")
    return _compress(_content({name: (shape, deltas, wire, width)}, **kw))


def _frame_content(frame: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return safefile.loads(zstandard.ZstdDecompressor().decompress(frame))


def _reference_topk(acc: torch.Tensor, k: int) -> torch.Tensor:
    """Magnitudes of the exact top-k of ``acc``, ascending."""
    return torch.topk(acc.reshape(-1).abs(), k).values.sort().values


# --- round trips --------------------------------------------------------------


@pytest.mark.parametrize("value_dtype", ["fp16", "bf16", "fp32"])
def test_decode_returns_the_topk_entries_of_the_update(value_dtype: str) -> None:
    update = _update()
    encoded = codec.encode_update(update, None, 0.1, value_dtype)  # type: ignore[arg-type]
    decoded = codec.decode_update(encoded.frame, SPEC, max_density=0.1)

    assert sorted(decoded.tensors) == ["b", "w"]
    assert decoded.entry_count() == encoded.entry_count == 100 + 1
    for name, sparse in decoded.tensors.items():
        flat = update[name].reshape(-1)
        expected = torch.topk(flat.abs(), codec.max_entries(flat.numel(), 0.1)).indices
        assert sparse.shape == SPEC[name]
        assert sparse.indices.dtype == torch.int64
        assert sparse.values.dtype == torch.float32
        assert torch.equal(sparse.indices, expected.sort().values)
        if value_dtype == "fp32":
            assert torch.equal(sparse.values, flat[sparse.indices])
        else:
            dtype = torch.float16 if value_dtype == "fp16" else torch.bfloat16
            rounded = flat[sparse.indices].to(dtype).float()
            assert torch.equal(sparse.values, rounded)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple),
    density=st.floats(0.001, 1.0),
    value_dtype=st.sampled_from(["fp16", "bf16", "fp32"]),
    scale=st.sampled_from([1e-6, 1.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_within_quantization_error(
    shape: tuple[int, ...], density: float, value_dtype: str, scale: float, seed: int
) -> None:
    acc = _randn(*shape, seed=seed) * scale
    encoded = codec.encode_update({"t": acc}, None, density, value_dtype)  # type: ignore[arg-type]
    sparse = codec.decode_update(encoded.frame, {"t": shape}, max_density=density)
    decoded = sparse.tensors["t"]

    k = codec.max_entries(acc.numel(), density)
    assert decoded.indices.numel() == k
    assert bool((decoded.indices[1:] > decoded.indices[:-1]).all())
    exact = acc.reshape(-1)[decoded.indices]
    assert torch.equal(exact.abs().sort().values, _reference_topk(acc, k))
    # Round to nearest: half an ulp, relative 2**-11 (fp16) or 2**-8 (bf16), plus
    # half the smallest fp16 subnormal, 2**-25, below fp16's normal range.
    relative, absolute = {"fp16": (2**-11, 2**-25), "bf16": (2**-8, 0.0)}.get(
        value_dtype, (0.0, 0.0)
    )
    error = (decoded.values - exact).abs()
    assert bool((error <= exact.abs() * relative + absolute).all())


def test_same_update_gives_the_same_frame() -> None:
    big = {"big": _randn(codec.SAMPLED_MIN_NUMEL + 5), **_update()}
    first = codec.encode_update(big, None, 0.01)
    second = codec.encode_update(big, None, 0.01)
    assert first.frame == second.frame


def test_encoded_update_reports_sizes_and_narrow_deltas() -> None:
    update = {"small": _randn(100), "wide": _randn(70_000), "empty": torch.zeros(0, 4)}
    encoded = codec.encode_update(update, None, 0.02)

    assert encoded.dense_bytes == (100 + 70_000) * 4
    assert encoded.entry_count == 2 + 1400
    _, metadata = _frame_content(encoded.frame)
    described = json.loads(metadata["tensors"])
    # Gaps of a 100-entry tensor fit one byte; those of 70 000 entries two.
    assert described["small"] == {"shape": [100], "k": 2, "index_bytes": 1}
    assert described["wide"]["index_bytes"] == 2
    assert "empty" not in described
    assert encoded.residual["empty"].shape == (0, 4)


def test_zero_entries_are_never_sent() -> None:
    update = {"zeros": torch.zeros(50), "few": torch.zeros(1000)}
    update["few"][[3, 500]] = torch.tensor([2.0, -1.0])
    encoded = codec.encode_update(update, None, 0.5)
    decoded = codec.decode_update(encoded.frame, codec.spec_of(update), max_density=0.5)

    assert list(decoded.tensors) == ["few"]
    assert decoded.tensors["few"].indices.tolist() == [3, 500]
    assert decoded.tensors["few"].values.tolist() == [2.0, -1.0]
    assert torch.equal(encoded.residual["zeros"], torch.zeros(50))


def test_inputs_of_any_float_dtype_and_layout_are_read_as_fp32() -> None:
    base = _randn(30, 20)
    update = {
        "strided": base.t(),  # not contiguous
        "half": base[:5].to(torch.bfloat16),
        "param": base[5:10].clone().requires_grad_(True),
        "plain": base.clone(),
    }
    encoded = codec.encode_update(update, None, 1.0, "fp32")
    decoded = codec.decode_update(encoded.frame, codec.spec_of(update))

    for name, tensor in update.items():
        dense = torch.zeros(tensor.shape)
        codec.accumulate(
            codec.SparseUpdate({name: decoded.tensors[name]}), {name: dense}
        )
        assert torch.equal(dense, tensor.detach().float())
        assert encoded.residual[name].dtype == torch.float32
        assert not bool(encoded.residual[name].any())
    # The inputs are left alone, even where the residual could have reused them.
    assert bool((update["param"] == base[5:10]).all())
    assert torch.equal(update["plain"], base)


def test_an_empty_update_is_a_valid_frame() -> None:
    encoded = codec.encode_update({}, None, 0.1)
    assert encoded.entry_count == 0
    assert encoded.dense_bytes == 0
    decoded = codec.decode_update(bytearray(encoded.frame), SPEC)
    assert decoded.tensors == {}
    assert decoded.entry_count() == 0


def test_decode_accepts_any_buffer() -> None:
    frame = codec.encode_update(_update(), None, 0.1).frame
    for buffer in (frame, bytearray(frame), memoryview(frame)):
        assert _decode(buffer).entry_count() == 101


# --- error feedback -------------------------------------------------------------


@pytest.mark.parametrize("value_dtype", ["fp16", "bf16", "fp32"])
def test_sent_plus_residual_equals_update_plus_old_residual(value_dtype: str) -> None:
    shapes = {"w": (300, 70), "b": (64,)}
    updates = [
        {n: _randn(*s, seed=10 * r + i) for i, (n, s) in enumerate(shapes.items())}
        for r in range(5)
    ]
    residual: dict[str, torch.Tensor] | None = None
    sent_total = {n: torch.zeros(s) for n, s in shapes.items()}
    for update in updates:
        old = residual or {n: torch.zeros(s) for n, s in shapes.items()}
        encoded = codec.encode_update(update, residual, 0.05, value_dtype)  # type: ignore[arg-type]
        sparse = codec.decode_update(encoded.frame, shapes, max_density=0.05)
        sent = {n: torch.zeros(s) for n, s in shapes.items()}
        codec.accumulate(sparse, sent)
        codec.accumulate(sparse, sent_total)
        for name in shapes:
            expected = update[name] + old[name]
            restored = sent[name] + encoded.residual[name]
            # (acc - sent) + sent is acc up to one fp32 rounding.
            assert torch.allclose(restored, expected, rtol=2**-23, atol=0.0)
            untouched = sent[name] == 0
            assert torch.equal(encoded.residual[name][untouched], expected[untouched])
        residual = encoded.residual

    # Over all rounds nothing is lost: what was sent plus what is left is the sum.
    assert residual is not None
    for name in shapes:
        total = torch.stack([u[name] for u in updates]).sum(0)
        assert torch.allclose(sent_total[name] + residual[name], total, atol=1e-5)


def test_residual_eventually_sends_every_entry() -> None:
    # A constant update of one small entry among large ones: error feedback makes
    # the small entry grow in the residual until it is sent.
    update = {"t": torch.tensor([10.0, 9.0, 8.0, 0.5])}
    residual: dict[str, torch.Tensor] | None = None
    sent_at: set[int] = set()
    for _ in range(200):
        encoded = codec.encode_update(update, residual, 0.25, "fp32")
        sparse = codec.decode_update(encoded.frame, {"t": (4,)})
        sent_at.update(sparse.tensors["t"].indices.tolist())
        residual = encoded.residual
    assert sent_at == {0, 1, 2, 3}


def test_fp16_overflow_is_clamped_and_kept_in_the_residual() -> None:
    update = {"t": torch.tensor([1e6, -7e4, 1.0, 0.0])}
    encoded = codec.encode_update(update, None, 0.5, "fp16")
    sparse = codec.decode_update(encoded.frame, {"t": (4,)})

    assert sparse.tensors["t"].indices.tolist() == [0, 1]
    assert sparse.tensors["t"].values.tolist() == [65504.0, -65504.0]
    assert encoded.residual["t"].tolist() == [1e6 - 65504.0, -7e4 + 65504.0, 1.0, 0.0]


def test_bf16_rounding_matches_torch() -> None:
    values = torch.cat([_randn(5000) * 1e3, torch.tensor([3.3e38, -3.4e38, 1e-40])])
    encoded = codec.encode_update({"t": values}, None, 1.0, "bf16")
    sparse = codec.decode_update(encoded.frame, {"t": (values.numel(),)})

    expected = values.clamp(-3.3895313892515355e38, 3.3895313892515355e38)
    expected = expected.to(torch.bfloat16).float()
    assert torch.equal(
        sparse.tensors["t"].values, expected[sparse.tensors["t"].indices]
    )
    assert bool(torch.isfinite(sparse.tensors["t"].values).all())


def test_residual_names_and_shapes_are_checked() -> None:
    update = {"t": torch.ones(4)}
    with pytest.raises(codec.UnknownTensor, match="'other'"):
        codec.encode_update(update, {"other": torch.ones(4)}, 0.5)
    with pytest.raises(codec.ShapeMismatch, match="residual 't'"):
        codec.encode_update(update, {"t": torch.ones(5)}, 0.5)


@pytest.mark.parametrize(
    "numel", [100, codec.SAMPLED_MIN_NUMEL + 1], ids=["exact", "sampled"]
)
@pytest.mark.parametrize(
    "bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"]
)
def test_encode_refuses_non_finite_updates(numel: int, bad: float) -> None:
    update = _randn(numel)
    update[numel // 3] = bad
    with pytest.raises(codec.NonFiniteValue, match="'t'"):
        codec.encode_update({"t": update}, None, 0.01)


@pytest.mark.parametrize(
    ("density", "value_dtype"), [(0.0, "fp16"), (1.5, "fp16"), (0.1, "int8")]
)
def test_encode_refuses_bad_arguments(density: float, value_dtype: str) -> None:
    with pytest.raises(ValueError, match=r"density|value_dtype"):
        codec.encode_update({"t": torch.ones(3)}, None, density, value_dtype)  # type: ignore[arg-type]


# --- selection ------------------------------------------------------------------


def _structured(n: int) -> torch.Tensor:
    # The large entries sit together at the end: a sample that aliased or missed
    # the region would misjudge the threshold.
    ramp = torch.linspace(0.0, 1.0, n) ** 8
    return ramp * (1 + 0.01 * _randn(n, seed=3))


def _tied(n: int) -> torch.Tensor:
    # Few distinct magnitudes: many entries tie at the k-th one.
    return torch.round(_randn(n, seed=4) * 4) / 4


@pytest.mark.parametrize(
    "make",
    [lambda n: _randn(n, seed=2), _structured, _tied],
    ids=["normal", "structured", "ties"],
)
def test_sampled_selection_equals_exact_topk(
    make: Callable[[int], torch.Tensor],
) -> None:
    # The sampled threshold only pre-filters; the final pick is exact over the
    # entries that pass, so the chosen magnitudes equal torch.topk's exactly
    # (zero tolerance; ties may pick other indices of the same magnitude).
    n = codec.SAMPLED_MIN_NUMEL + 12_345
    acc = make(n)
    for density in (0.001, 0.01, 0.3):
        k = codec.max_entries(n, density)
        chosen = torch.from_numpy(codec._select(acc.numpy(), k))
        assert chosen.numel() == k
        assert bool((chosen[1:] > chosen[:-1]).all())
        assert torch.equal(acc[chosen].abs().sort().values, _reference_topk(acc, k))


def test_sampled_selection_recovers_from_a_threshold_set_too_high(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    estimate = codec._sample_threshold
    calls: list[float] = []

    def too_high(bits: np.ndarray[Any, Any], k: int, excess: float) -> int:
        calls.append(excess)
        if len(calls) == 1:  # as if the sample had been unlucky
            return int(np.max(bits & 0x7FFFFFFF))
        return estimate(bits, k, excess)

    monkeypatch.setattr(codec, "_sample_threshold", too_high)
    acc = _randn(codec.SAMPLED_MIN_NUMEL, seed=5)
    k = codec.max_entries(acc.numel(), 0.01)
    chosen = torch.from_numpy(codec._select(acc.numpy(), k))

    assert calls == [5.0, 10.0]
    assert torch.equal(acc[chosen].abs().sort().values, _reference_topk(acc, k))


@pytest.mark.slow
def test_sampled_selection_is_much_faster_than_topk() -> None:
    # The point of sampling: on 32M entries at 1 % it beats torch.topk by far
    # (about 40x on two cores); 4x leaves room for a loaded machine.
    acc = _randn(1 << 25, seed=6)
    k = codec.max_entries(acc.numel(), 0.01)
    start = time.perf_counter()
    chosen = torch.from_numpy(codec._select(acc.numpy(), k))
    sampled = time.perf_counter() - start
    start = time.perf_counter()
    exact = torch.topk(acc.abs(), k, sorted=False).values
    topk = time.perf_counter() - start

    assert torch.equal(acc[chosen].abs().sort().values, exact.sort().values)
    assert sampled * 4 < topk


# --- bounds ---------------------------------------------------------------------


def test_max_entries_and_sizes() -> None:
    assert codec.max_entries(0, 0.5) == 0
    assert codec.max_entries(10, 0.001) == 1
    assert codec.max_entries(1000, 0.01) == 10
    assert codec.max_entries(7, 1.0) == 7
    spec = codec.spec_of({"a": torch.zeros(2, 3), "b": torch.zeros(5)})
    assert spec == {"a": (2, 3), "b": (5,)}
    assert codec.dense_size_bytes(spec) == 44


def test_density_agrees_across_float32_rounding() -> None:
    # Recipe.density is a float32 on the wire: 0.1 arrives as 0.10000000149.
    update = {"t": _randn(1000)}
    wire_density = float(np.float32(0.1))
    encoded = codec.encode_update(update, None, wire_density)
    decoded = codec.decode_update(encoded.frame, {"t": (1000,)}, max_density=0.1)
    assert decoded.entry_count() == codec.max_entries(1000, 0.1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=st.lists(
        st.text(min_size=1, max_size=10), min_size=1, max_size=4, unique=True
    ),
    sizes=st.lists(st.integers(1, 3000), min_size=4, max_size=4),
)
def test_frames_fit_their_bounds_even_for_odd_names(
    names: list[str], sizes: list[int]
) -> None:
    # Incompressible values at full density in fp32 under names that JSON must
    # escape (quotes, control characters, astral planes): the largest frames.
    update = {
        name: _randn(size, seed=size) for name, size in zip(names, sizes, strict=False)
    }
    spec = codec.spec_of(update)
    encoded = codec.encode_update(update, None, 1.0, "fp32", zstd_level=1)
    content = zstandard.ZstdDecompressor().decompress(encoded.frame)

    assert len(encoded.frame) <= codec.max_frame_bytes(spec, 1.0)
    assert len(content) <= codec._max_content_bytes(spec, 1.0)
    header = int.from_bytes(content[:8], "little")
    assert header <= codec._max_header_bytes(spec)
    decoded = codec.decode_update(encoded.frame, spec)
    assert sorted(decoded.tensors) == sorted(names)


# --- malformed frames -------------------------------------------------------------


def _decode(
    frame: bytes | bytearray | memoryview, max_density: float = 1.0
) -> codec.SparseUpdate:
    return codec.decode_update(frame, SPEC, max_density=max_density)


def _edit_metadata(
    **changes: str,
) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def edit(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        metadata.update(changes)

    return edit


def _edit_tensors(
    fn: Callable[[dict[str, torch.Tensor]], None],
) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
    def edit(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        fn(tensors)

    return edit


def test_a_well_formed_handmade_frame_decodes() -> None:
    # The baseline of the cases below: the same builder, with nothing wrong.
    sparse = _decode(_frame([3, 1, 995], [0.5, -2.0, 7.0]))
    assert sparse.tensors["w"].indices.tolist() == [3, 4, 999]
    assert sparse.tensors["w"].values.tolist() == [0.5, -2.0, 7.0]


@pytest.mark.parametrize(
    ("frame", "max_density", "error", "message"),
    [
        (
            lambda: _frame([1], name="nope"),
            1.0,
            codec.UnknownTensor,
            "no tensor 'nope'",
        ),
        (lambda: _frame([1], shape=(25, 40)), 1.0, codec.ShapeMismatch, r"\(25, 40\)"),
        (lambda: _frame([0] + [1] * 1000), 1.0, codec.TooManyEntries, "1001 entries"),
        (lambda: _frame([0] + [1] * 100), 0.1, codec.TooManyEntries, "101 entries"),
        (lambda: _frame([5, 995]), 1.0, codec.IndexOutOfRange, "index 1000"),
        (lambda: _frame([1000]), 1.0, codec.IndexOutOfRange, "past 1000"),
        (lambda: _frame([-1, 3]), 1.0, codec.IndexOutOfRange, "negative"),
        (lambda: _frame([5, 3, 0, 2]), 1.0, codec.DuplicateIndex, "entry 2 repeats"),
        (
            lambda: _frame([5, 3, -2, 9]),
            1.0,
            codec.UnsortedIndex,
            "entry 2 goes back by 2",
        ),
        (lambda: _frame([1, 1], [1.0, math.nan]), 1.0, codec.NonFiniteValue, "entry 1"),
        (lambda: _frame([1, 1], [math.inf, 1.0]), 1.0, codec.NonFiniteValue, "entry 0"),
        (lambda: _frame([1], width=4), 1.0, codec.MalformedFrame, "4-byte deltas"),
    ],
    ids=[
        "unknown-name",
        "wrong-shape",
        "k-over-numel",
        "k-over-density",
        "index-past-end",
        "first-index-past-end",
        "negative-index",
        "repeated-index",
        "non-monotone",
        "nan",
        "inf",
        "too-wide-deltas",
    ],
)
def test_bad_entries_are_rejected(
    frame: Callable[[], bytes],
    max_density: float,
    error: type[codec.CodecError],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        _decode(frame(), max_density)


@pytest.mark.parametrize(
    ("value_dtype", "bits"),
    [("fp16", 0x7C00), ("fp16", 0x7E00), ("bf16", 0x7F80), ("bf16", 0xFFC1)],
    ids=["fp16-inf", "fp16-nan", "bf16-inf", "bf16-nan"],
)
def test_non_finite_half_values_are_rejected(value_dtype: str, bits: int) -> None:
    wire = np.asarray([0x3C00, bits], dtype="<u2")
    content = _content({"w": ((40, 25), [1, 1], wire, 2)}, value_dtype)
    with pytest.raises(codec.NonFiniteValue, match="'w': entry 1"):
        _decode(_compress(content))


def _metadata_case(**changes: str) -> bytes:
    return _frame([1], edit=_edit_metadata(**changes))


def _drop(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def drop(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[key]

    return drop


def _add(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.update({key: torch.zeros(2, 1, dtype=torch.uint8)})


def _retype(key: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.update({key: tensors[key].to(torch.int16)})


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (lambda: _metadata_case(format="other"), "format"),
        (lambda: _metadata_case(format_version="2"), "version '2'"),
        (lambda: _metadata_case(value_dtype="int4"), "value dtype 'int4'"),
        (lambda: _metadata_case(tensors="{not json"), "not JSON"),
        (lambda: _metadata_case(tensors="[]"), "JSON object"),
        (
            lambda: _metadata_case(tensors='{"w": {"shape": [40, 25], "k": 1}}'),
            "exactly shape, k and index_bytes",
        ),
        (
            lambda: _metadata_case(
                tensors='{"w": {"shape": [40, 25], "k": true, "index_bytes": 2}}'
            ),
            "k must be",
        ),
        (
            lambda: _metadata_case(
                tensors='{"w": {"shape": [40, 25], "k": 1, "index_bytes": 3}}'
            ),
            "index_bytes",
        ),
        (
            lambda: _metadata_case(
                tensors='{"w": {"shape": [40, -25], "k": 1, "index_bytes": 2}}'
            ),
            "shape must be",
        ),
        (
            lambda: _frame([1], edit=_edit_tensors(_drop("values/w"))),
            "lacks 'values/w'",
        ),
        (lambda: _frame([1], edit=_edit_tensors(_add("indices/b"))), "'indices/b'"),
        (lambda: _frame([1], edit=_edit_tensors(_retype("values/w"))), "expected U8"),
        (lambda: _frame([1, 1], edit=_edit_tensors(_drop("indices/w"))), "lacks"),
    ],
    ids=[
        "format",
        "version",
        "value-dtype",
        "tensors-not-json",
        "tensors-not-object",
        "entry-keys",
        "k-boolean",
        "index-width",
        "negative-dimension",
        "missing-values",
        "undescribed-tensor",
        "values-not-bytes",
        "missing-indices",
    ],
)
def test_bad_metadata_is_rejected(frame: Callable[[], bytes], message: str) -> None:
    with pytest.raises(codec.MalformedFrame, match=message):
        _decode(frame())


def test_deeply_nested_json_is_rejected() -> None:
    # Nesting past Python's recursion limit makes json raise RecursionError; a
    # long name in the spec raises the header bound so that the nesting fits it.
    spec = {**SPEC, "x" * 2000: (1,)}
    nested = "[" * 5000 + "]" * 5000
    in_metadata = _frame([1], edit=_edit_metadata(tensors=nested))
    with pytest.raises(codec.MalformedFrame, match="not JSON"):
        codec.decode_update(in_metadata, spec)

    header = f'{{"__metadata__":{{"a":{nested}}}}}'.encode()
    in_header = _compress(len(header).to_bytes(8, "little") + header)
    with pytest.raises(codec.MalformedFrame, match="safetensors"):
        codec.decode_update(in_header, spec)


def _header_length(length: int) -> bytes:
    return _compress(length.to_bytes(8, "little") + b"{}" + b" " * 6)


def _concatenated() -> bytes:
    frame = _frame([1])
    return frame + frame


def _truncated() -> bytes:
    frame = _frame([1, 2, 3])
    return frame[: len(frame) - 5]


def _without_content_size() -> bytes:
    compressor = zstandard.ZstdCompressor(write_content_size=False)
    return compressor.compress(_content({"w": ((40, 25), [1], np.ones(1, "<f4"), 2)}))


def _lying_content_size() -> bytes:
    # A real frame whose header claims 4000 bytes fewer than its blocks produce.
    content = np.random.default_rng(0).bytes(6000)
    frame = bytearray(zstandard.ZstdCompressor().compress(content))
    descriptor = frame[4]
    assert descriptor >> 6 == 1  # a 2-byte content size field, stored minus 256
    offset = 5 + (0 if descriptor & 0x20 else 1)
    frame[offset : offset + 2] = (2000 - 256).to_bytes(2, "little")
    return bytes(frame)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (lambda: b"", "does not start with a zstd frame"),
        (lambda: b"\x00garbage bytes of no kind" * 4, "does not start"),
        (lambda: b"\x28\xb5\x2f\xfd" + b"\xff" * 30, "bad zstd frame header|corrupt"),
        (_truncated, "does not decompress"),
        (_without_content_size, "does not declare its content size"),
        (_concatenated, "unused data"),
        (lambda: _frame([1]) + b"\x00", "unused data"),
        (_lying_content_size, "does not decompress"),
        (lambda: _compress(b"\x01"), "safetensors"),
        (lambda: _header_length(2**64 - 1), "header length 18446744073709551615"),
        (lambda: _header_length(5000), "header length 5000"),
        (lambda: _header_length(400), "exceeds the 16 bytes"),
        (lambda: _compress(b"\x08" + b"\x00" * 7 + b"[1,2,3] "), "JSON object"),
    ],
    ids=[
        "empty",
        "garbage",
        "garbage-after-magic",
        "truncated",
        "no-content-size",
        "two-frames",
        "trailing-byte",
        "lying-content-size",
        "content-too-short",
        "header-length-2**64-1",
        "header-length-over-bound",
        "header-length-over-data",
        "header-not-object",
    ],
)
def test_broken_frames_are_rejected(frame: Callable[[], bytes], message: str) -> None:
    with pytest.raises(codec.MalformedFrame, match=message):
        _decode(frame())


def test_safetensors_errors_keep_their_cause() -> None:
    with pytest.raises(codec.MalformedFrame) as caught:
        _decode(_header_length(2**64 - 1))
    assert isinstance(caught.value.__cause__, safefile.SafeFileError)


def test_an_oversized_frame_is_rejected_before_decompression() -> None:
    limit = codec.max_frame_bytes(SPEC, 0.1)
    with pytest.raises(codec.FrameTooLarge, match=f"at most {limit}"):
        _decode(b"\x28\xb5\x2f\xfd" + bytes(limit), 0.1)


def _bomb(size: int, *, declare: bool) -> bytes:
    # Streamed in 1 MiB pieces, so building it never holds ``size`` bytes either.
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=declare)
    stream = compressor.compressobj(size=size if declare else -1)
    piece = bytes(1 << 20)
    parts = [stream.compress(piece) for _ in range(size >> 20)]
    return b"".join([*parts, stream.flush()])


def test_a_decompression_bomb_is_refused_without_allocating_it() -> None:
    bomb = _bomb(256 << 20, declare=True)
    assert len(bomb) < 64 << 10  # small on the wire, 256 MiB inside
    tracemalloc.start()
    try:
        with pytest.raises(codec.ContentTooLarge, match="declares 268435456 bytes"):
            _decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_bomb_without_declared_size_is_refused_without_allocating_it() -> None:
    bomb = _bomb(64 << 20, declare=False)
    tracemalloc.start()
    try:
        with pytest.raises(codec.MalformedFrame, match="content size"):
            _decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_lying_content_size_allocates_only_what_it_declares() -> None:
    frame = _lying_content_size()
    tracemalloc.start()
    try:
        with pytest.raises(codec.MalformedFrame):
            _decode(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10


def _reencoded(frame: bytes, position: int, value: int) -> bytes:
    content = bytearray(zstandard.ZstdDecompressor().decompress(frame))
    content[position % len(content)] = value
    return _compress(bytes(content))


_VALID = codec.encode_update(
    {"w": _randn(40, 25), "b": _randn(10)}, None, 0.05, "bf16"
).frame


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 64),
)
def test_corrupted_content_is_rejected_or_valid(
    edits: list[tuple[int, int]], cut: int
) -> None:
    # Whatever the bytes inside the frame say, decode raises a CodecError or
    # returns an update that keeps every promise; nothing else escapes.
    frame = _VALID
    for position, value in edits:
        frame = _reencoded(frame, position, value)
    if cut:
        content = zstandard.ZstdDecompressor().decompress(frame)
        frame = _compress(content[: max(0, len(content) - cut)])
    try:
        decoded = _decode(frame, 0.05)
    except codec.CodecError:
        return
    for name, sparse in decoded.tensors.items():
        numel = math.prod(SPEC[name])
        assert sparse.shape == SPEC[name]
        assert sparse.indices.numel() <= codec.max_entries(numel, 0.05)
        assert bool((sparse.indices[1:] > sparse.indices[:-1]).all())
        assert bool(((sparse.indices >= 0) & (sparse.indices < numel)).all())
        assert bool(torch.isfinite(sparse.values).all())


# --- accumulate -------------------------------------------------------------------


def test_accumulate_adds_weighted_updates_into_fp32_sums() -> None:
    updates = [_update(seed) for seed in range(3)]
    frames = [codec.encode_update(u, None, 0.2, "fp32").frame for u in updates]
    into = {name: torch.ones(shape) for name, shape in SPEC.items()}
    expected = {name: torch.ones(shape) for name, shape in SPEC.items()}
    for weight, frame in zip((0.5, 1.0, 2.0), frames, strict=True):
        sparse = _decode(frame)
        codec.accumulate(sparse, into, weight)
        for name, part in sparse.tensors.items():
            dense = torch.zeros(part.shape).view(-1)
            dense[part.indices] = part.values
            expected[name] += weight * dense.view(part.shape)
    for name in SPEC:
        assert torch.allclose(into[name], expected[name], rtol=1e-6, atol=1e-6)


def test_accumulate_checks_everything_before_adding() -> None:
    sparse = _decode(codec.encode_update(_update(), None, 0.1).frame)
    only_w = {"w": torch.zeros(SPEC["w"])}
    with pytest.raises(codec.UnknownTensor, match="'b'"):
        codec.accumulate(sparse, only_w)
    assert torch.equal(only_w["w"], torch.zeros(SPEC["w"]))

    wrong = {"w": torch.zeros(SPEC["w"]), "b": torch.zeros(11)}
    with pytest.raises(codec.ShapeMismatch, match="'b'"):
        codec.accumulate(sparse, wrong)
    assert torch.equal(wrong["w"], torch.zeros(SPEC["w"]))

    strided = {"w": torch.zeros(25, 40).t(), "b": torch.zeros(10)}
    with pytest.raises(ValueError, match="contiguous float"):
        codec.accumulate(sparse, strided)
