"""How the worker reads a lease: token ids, recipe, density; device choice."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from dragon.v1 import types_pb2

from dragon_worker import resources
from dragon_worker.daemon import (
    DEFAULT_DENSITY,
    InvalidLeaseError,
    batch_tokens,
    train_recipe,
    update_density,
)


def _batch(ids: np.ndarray, encoding: int, length: int) -> types_pb2.Batch:
    return types_pb2.Batch(
        batch_id=7,
        sequence_count=ids.shape[0],
        sequence_length=length,
        token_encoding=encoding,  # type: ignore[arg-type]
        token_ids=ids.tobytes(),
    )


@pytest.mark.parametrize(
    ("dtype", "encoding"),
    [
        pytest.param("<u2", types_pb2.TOKEN_ENCODING_UINT16_LE, id="uint16"),
        pytest.param("<u4", types_pb2.TOKEN_ENCODING_UINT32_LE, id="uint32"),
    ],
)
def test_batch_tokens_unpack_rows_of_l_plus_one(dtype: str, encoding: int) -> None:
    ids = (np.arange(3 * 9) * 37 % 257).astype(dtype).reshape(3, 9)

    tokens = batch_tokens(_batch(ids, encoding, 8))

    assert tokens.dtype == torch.int64
    assert tokens.shape == (3, 9)
    assert tokens.tolist() == ids.astype(np.int64).tolist()


def test_batch_tokens_refuse_a_wrong_size_or_encoding() -> None:
    ids = np.zeros((2, 5), dtype="<u2")
    with pytest.raises(InvalidLeaseError, match="expected 2 x 6"):
        batch_tokens(_batch(ids, types_pb2.TOKEN_ENCODING_UINT16_LE, 5))
    with pytest.raises(InvalidLeaseError, match="unknown token encoding"):
        batch_tokens(_batch(ids, types_pb2.TOKEN_ENCODING_UNSPECIFIED, 4))


def _recipe(**fields: object) -> types_pb2.Recipe:
    values: dict[str, object] = {
        "local_steps": 5,
        "batch_size": 16,
        "micro_batch_size": 8,
        "learning_rate": 0.5,
        "weight_decay": 0.25,
        "beta1": 0.75,
        "beta2": 0.875,
        "grad_clip_norm": 2.0,
        "density": 0.125,
        "value_dtype": types_pb2.VALUE_DTYPE_BF16,
        "seed": 11,
    }
    values.update(fields)
    return types_pb2.Recipe(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("micro", "cap", "expected"),
    [
        pytest.param(8, None, 8, id="recipe"),
        pytest.param(8, 3, 3, id="capped"),
        pytest.param(8, 32, 8, id="cap-above"),
        pytest.param(0, None, 16, id="unset-means-whole-batch"),
    ],
)
def test_train_recipe_applies_the_micro_batch_cap(
    micro: int, cap: int | None, expected: int
) -> None:
    recipe = train_recipe(_recipe(micro_batch_size=micro), cap)

    assert recipe.micro_batch_size == expected
    # The effective batch stays the recipe's; accumulation makes it up.
    assert recipe.batch_size == 16
    assert (recipe.local_steps, recipe.seed) == (5, 11)
    assert (recipe.learning_rate, recipe.weight_decay) == (0.5, 0.25)
    assert (recipe.beta1, recipe.beta2, recipe.grad_clip_norm) == (0.75, 0.875, 2.0)


@pytest.mark.parametrize(
    ("recipe_density", "cap", "expected"),
    [
        pytest.param(0.125, None, 0.125, id="recipe"),
        pytest.param(0.125, 0.0625, 0.0625, id="lowered"),
        pytest.param(0.125, 0.5, 0.125, id="never-raised"),
        pytest.param(0.0, None, DEFAULT_DENSITY, id="unset"),
        pytest.param(0.0, 0.25, 0.25, id="only-cap"),
    ],
)
def test_update_density(
    recipe_density: float, cap: float | None, expected: float
) -> None:
    assert update_density(_recipe(density=recipe_density), cap) == expected


# -- device choice (CUDA cannot exist here: its torch calls are stood in for) ----


@dataclass
class _Props:
    name: str
    total_memory: int


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, torch.device]]:
    limits: list[tuple[float, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(
        torch.cuda,
        "set_per_process_memory_fraction",
        lambda fraction, device: limits.append((fraction, device)),
    )
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device: _Props("NVIDIA Test GPU", 80 * 2**30),
    )
    return limits


def test_device_choice_with_gpus(two_gpus: list[tuple[float, torch.device]]) -> None:
    assert resources.select_device("auto") == torch.device("cuda:0")
    assert resources.select_device("cuda") == torch.device("cuda:0")
    assert resources.select_device("cuda:1") == torch.device("cuda:1")
    assert resources.select_device("cpu") == torch.device("cpu")
    with pytest.raises(resources.DeviceUnavailableError, match="only 2 CUDA"):
        resources.select_device("cuda:2")

    resources.limit_gpu_memory(torch.device("cuda:1"), 0.5)
    resources.limit_gpu_memory(torch.device("cuda:1"), None)
    resources.limit_gpu_memory(torch.device("cpu"), 0.5)
    assert two_gpus == [(0.5, torch.device("cuda:1"))]

    hardware = resources.describe_hardware(torch.device("cuda:0"))
    assert hardware.device_kind == types_pb2.DEVICE_KIND_CUDA
    assert hardware.device_name == "NVIDIA Test GPU"
    assert hardware.device_memory_bytes == 80 * 2**30
    assert hardware.torch_version == torch.__version__


def test_device_choice_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resources.select_device("auto") == torch.device("cpu")
    with pytest.raises(resources.DeviceUnavailableError, match="not available"):
        resources.select_device("cuda:0")

    hardware = resources.describe_hardware(torch.device("cpu"))
    assert hardware.device_kind == types_pb2.DEVICE_KIND_CPU
    assert hardware.cpu_cores >= 1
    assert hardware.host_memory_bytes > 2**20
    assert hardware.device_memory_bytes == hardware.host_memory_bytes
    assert hardware.device_name
