"""Checkpoints: bit-exact round trips, ties, strict validation, atomic writes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from forge import safefile
from forge.checkpoint import (
    CheckpointError,
    checkpoint_bytes,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from forge.config import named_config
from forge.model import HRMSMoE, build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = named_config("tiny")


@pytest.fixture(scope="module")
def model() -> HRMSMoE:
    return build_model(TINY, seed=11)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def test_file_round_trip_is_bit_exact(model: HRMSMoE, tmp_path: Path) -> None:
    path = tmp_path / "v3.safetensors"
    state = model.state_dict()

    digest = save_checkpoint(path, state, TINY, 3, {"run": "test"})
    loaded = load_checkpoint(path)

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.version == 3
    assert loaded.config == TINY
    assert loaded.metadata == {"run": "test"}
    assert set(loaded.tensors) == set(state)
    for name, tensor in state.items():
        assert torch.equal(bits(loaded.tensors[name]), bits(tensor)), name


def test_bytes_are_deterministic_and_load_from_memory(model: HRMSMoE) -> None:
    first = checkpoint_bytes(model.state_dict(), TINY, 1)
    second = checkpoint_bytes(dict(model.state_dict()), TINY, 1)

    assert first == second
    loaded = load_checkpoint(memoryview(first))
    assert loaded.version == 1
    assert torch.equal(loaded.tensors["norm.weight"], model.norm.weight.detach())


def test_tied_tensors_are_stored_once_and_restored_shared(model: HRMSMoE) -> None:
    data = checkpoint_bytes(model.state_dict(), TINY, 0)
    infos, metadata, _ = safefile.read_header(data)
    loaded = load_checkpoint(data)

    assert "embed.weight" in infos
    assert "head.weight" not in infos
    assert json.loads(metadata["aliases"]) == {"head.weight": "embed.weight"}
    assert loaded.tensors["head.weight"] is loaded.tensors["embed.weight"]

    rebuilt = model_from_checkpoint(loaded)
    assert rebuilt.head.weight is rebuilt.embed.weight
    assert torch.equal(rebuilt.head.weight, model.embed.weight)


def test_equal_tied_copies_are_accepted_and_differing_ones_refused(
    model: HRMSMoE,
) -> None:
    state = {name: t.clone() for name, t in model.state_dict().items()}
    loaded = load_checkpoint(checkpoint_bytes(state, TINY, 0))
    assert loaded.tensors["head.weight"] is loaded.tensors["embed.weight"]

    state["head.weight"][0, 0] += 1.0
    with pytest.raises(CheckpointError, match="differ"):
        checkpoint_bytes(state, TINY, 0)


def test_extra_tensors_round_trip_including_empty(model: HRMSMoE) -> None:
    state = dict(model.state_dict())
    state["extra.empty"] = torch.empty(0, 5)
    state["extra.step"] = torch.tensor([7], dtype=torch.int64)
    state["extra.moment.norm.weight"] = torch.full((TINY.d_model,), -0.0)

    loaded = load_checkpoint(checkpoint_bytes(state, TINY, 2))

    assert loaded.tensors["extra.empty"].shape == (0, 5)
    assert loaded.tensors["extra.step"].tolist() == [7]
    assert torch.equal(
        bits(loaded.tensors["extra.moment.norm.weight"]),
        bits(state["extra.moment.norm.weight"]),
    )
    rebuilt = model_from_checkpoint(loaded)
    assert torch.equal(rebuilt.norm.weight, model.norm.weight.detach())


def test_untied_config_round_trips() -> None:
    config = dataclasses.replace(TINY, tie_embeddings=False)
    model = build_model(config, seed=4)
    loaded = load_checkpoint(checkpoint_bytes(model.state_dict(), config, 5))

    assert loaded.config == config
    assert loaded.tensors["head.weight"] is not loaded.tensors["embed.weight"]
    rebuilt = model_from_checkpoint(loaded)
    assert torch.equal(rebuilt.head.weight, model.head.weight.detach())


def test_model_from_checkpoint_gives_the_same_logits(model: HRMSMoE) -> None:
    rebuilt = model_from_checkpoint(
        load_checkpoint(checkpoint_bytes(model.state_dict(), TINY, 0))
    )
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator())

    with torch.no_grad():
        assert torch.equal(rebuilt(tokens).logits, model(tokens).logits)


def _good(model: HRMSMoE) -> bytes:
    return checkpoint_bytes(model.state_dict(), TINY, 1)


def _with_metadata(model: HRMSMoE, **changes: str) -> bytes:
    stored, metadata = safefile.loads(_good(model))
    metadata.update(changes)
    return safefile.dumps(stored, metadata)


def _with_tensors(
    model: HRMSMoE, edit: Callable[[dict[str, torch.Tensor]], None]
) -> bytes:
    stored, metadata = safefile.loads(_good(model))
    edit(stored)
    return safefile.dumps(stored, metadata)


def _without_metadata(model: HRMSMoE, key: str) -> bytes:
    stored, metadata = safefile.loads(_good(model))
    del metadata[key]
    return safefile.dumps(stored, metadata)


def _header_length(data: bytes, length: int) -> bytes:
    return length.to_bytes(8, "little") + data[8:]


def _config_with(**changes: object) -> str:
    fields = json.loads(TINY.to_json())
    fields.update(changes)
    return json.dumps(fields)


def _set(name: str, tensor: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensor

    return edit


def _drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[name]

    return edit


def _untie(tensors: dict[str, torch.Tensor]) -> None:
    tensors["head.weight"] = tensors["embed.weight"].clone()


MALFORMED: dict[str, Callable[[HRMSMoE], bytes]] = {
    "header-length-2**64-1": lambda m: _header_length(_good(m), 2**64 - 1),
    "header-longer-than-data": lambda m: _header_length(_good(m), len(_good(m))),
    "truncated": lambda m: _good(m)[:-4],
    "too-short": lambda m: b"\x00\x01",
    "config-not-json": lambda m: _with_metadata(m, config="{not json"),
    "config-invalid": lambda m: _with_metadata(m, config=_config_with(n_heads=3)),
    "config-unknown-field": lambda m: _with_metadata(m, config=_config_with(x=1)),
    "config-other-model": lambda m: _with_metadata(m, config=_config_with(d_model=32)),
    "config-missing": lambda m: _without_metadata(m, "config"),
    "no-format": lambda m: _with_metadata(m, format="something-else"),
    "bad-version": lambda m: _with_metadata(m, version="-1"),
    "aliases-not-json": lambda m: _with_metadata(m, aliases="[}"),
    "alias-to-missing": lambda m: _with_metadata(
        m, aliases=json.dumps({"head.weight": "nothing"})
    ),
    "tie-stored-apart": lambda m: _with_tensors(m, _untie),
    "missing-tensor": lambda m: _with_tensors(m, _drop("norm.weight")),
    "shape-mismatch": lambda m: _with_tensors(
        m, _set("norm.weight", torch.ones(TINY.d_model + 1))
    ),
    "wrong-dtype": lambda m: _with_tensors(
        m, _set("norm.weight", torch.ones(TINY.d_model, dtype=torch.float64))
    ),
    "unknown-tensor": lambda m: _with_tensors(m, _set("stowaway", torch.ones(3))),
}


@pytest.mark.parametrize("make", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_checkpoint_raises(
    make: Callable[[HRMSMoE], bytes], model: HRMSMoE, tmp_path: Path
) -> None:
    data = make(model)
    with pytest.raises(CheckpointError):
        load_checkpoint(data)

    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_missing_and_empty_files_raise(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "absent.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "empty.safetensors")


def test_saving_refuses_bad_state_and_reserved_metadata(model: HRMSMoE) -> None:
    state = dict(model.state_dict())
    with pytest.raises(CheckpointError, match="reserved"):
        checkpoint_bytes(state, TINY, 0, {"version": "9"})
    with pytest.raises(CheckpointError, match="non-negative"):
        checkpoint_bytes(state, TINY, -1)
    del state["norm.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint_bytes(state, TINY, 0)


def test_save_leaves_no_temp_file(model: HRMSMoE, tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "v1.safetensors", model.state_dict(), TINY, 1)
    save_checkpoint(tmp_path / "v1.safetensors", model.state_dict(), TINY, 2)

    assert [p.name for p in tmp_path.iterdir()] == ["v1.safetensors"]
    assert load_checkpoint(tmp_path / "v1.safetensors").version == 2


def test_failed_write_keeps_the_previous_file(model: HRMSMoE, tmp_path: Path) -> None:
    path = tmp_path / "latest.safetensors"
    save_checkpoint(path, model.state_dict(), TINY, 1)
    before = path.read_bytes()

    # A real write failure: a child process whose file-size limit is smaller
    # than the checkpoint gets EFBIG halfway through writing the temp file.
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from forge.checkpoint import save_checkpoint
        from forge.config import named_config
        from forge.model import build_model
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) // 2}, -1))
        try:
            save_checkpoint({str(path)!r}, build_model(named_config("tiny"), seed=99)
                            .state_dict(), named_config("tiny"), 2)
        except OSError as exc:
            print("failed:", exc.errno)
            sys.exit(0)
        sys.exit("the write did not fail")
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    assert child.returncode == 0, child.stderr
    assert child.stdout.startswith("failed:")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["latest.safetensors"]
    assert load_checkpoint(path).version == 1
