"""HRM-sMoE: shapes, causality, routing, learning, determinism and sizes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from forge.config import ConfigError, ModelConfig, named_config
from forge.model import (
    HRMSMoE,
    MixtureOfExperts,
    SequenceLengthError,
    build_model,
    lm_loss,
    parameter_count,
    state_layout,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = named_config("tiny")


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (batch, length), generator=generator)


def test_output_shapes() -> None:
    model = build_model(TINY)
    out = model(random_tokens(3, 17))

    assert out.logits.shape == (3, 17, TINY.vocab_size)
    assert out.aux_loss.shape == ()
    assert out.expert_usage.shape == (TINY.l_layers + TINY.h_layers, TINY.num_experts)
    assert out.drop_fraction.shape == (TINY.l_layers + TINY.h_layers,)


@pytest.mark.parametrize(
    "capacity_factor", [1.25, 0.25], ids=["default-capacity", "tight-capacity"]
)
def test_future_tokens_do_not_change_earlier_logits(capacity_factor: float) -> None:
    config = dataclasses.replace(TINY, capacity_factor=capacity_factor)
    model = build_model(config, seed=3)
    tokens = random_tokens(2, 32)
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 7) % config.vocab_size

    with torch.no_grad():
        before = model(tokens).logits
        after = model(changed).logits

    torch.testing.assert_close(after[:, :20], before[:, :20], rtol=0, atol=1e-5)
    assert not torch.allclose(after[:, 20:], before[:, 20:])


def test_expert_usage_rows_sum_to_one_and_aux_near_balance() -> None:
    out = build_model(TINY)(random_tokens(4, 64))

    torch.testing.assert_close(
        out.expert_usage.sum(dim=-1), torch.ones(TINY.l_layers + TINY.h_layers)
    )
    assert bool((out.expert_usage >= 0).all())
    # 1.0 is perfect balance and num_experts the worst case; init is near even.
    assert 0.9 < out.aux_loss.item() < 1.5
    assert out.aux_loss.requires_grad


def test_tight_capacity_drops_assignments() -> None:
    tight = build_model(dataclasses.replace(TINY, capacity_factor=0.25))
    roomy = build_model(dataclasses.replace(TINY, capacity_factor=4.0))
    tokens = random_tokens(2, 64)

    dropped_tight = tight(tokens).drop_fraction
    dropped_roomy = roomy(tokens).drop_fraction

    # Each expert takes at most a quarter of its fair share, so >= 75% drop.
    assert bool((dropped_tight >= 0.75).all())
    # capacity_factor = num_experts / top_k lets an expert take every token.
    assert bool((dropped_roomy == 0).all())


def test_moe_dispatch_matches_per_token_reference() -> None:
    config = dataclasses.replace(TINY, capacity_factor=4.0)
    layer = build_model(config, seed=5).low.blocks[0].moe
    assert isinstance(layer, MixtureOfExperts)
    x = torch.randn(2, 9, config.d_model, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        output, stats = layer(x)
        probs = layer.router(x).softmax(dim=-1)
        gate, expert = probs.topk(config.top_k, dim=-1)
        gate = gate / gate.sum(dim=-1, keepdim=True)
        expected = torch.zeros_like(x)
        for b in range(2):
            for t in range(9):
                for j in range(config.top_k):
                    e = int(expert[b, t, j])
                    h = x[b, t]
                    h = F.silu(h @ layer.w_gate[e]) * (h @ layer.w_up[e])
                    expected[b, t] += gate[b, t, j] * (h @ layer.w_down[e])

    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    assert stats.dropped.item() == 0
    assert stats.assignments.sum().item() == 2 * 9 * config.top_k


def test_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, seed=1)
    tokens = random_tokens(4, 33)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = lm_loss(model, tokens)
        optimizer.zero_grad()
        torch.autograd.backward(out.loss)
        optimizer.step()
        losses.append(out.lm_loss.item())

    assert losses[0] == pytest.approx(math.log(TINY.vocab_size), abs=0.3)
    assert losses[-1] < losses[0] - 0.5


def test_lm_loss_parts() -> None:
    model = build_model(TINY)
    out = lm_loss(model, random_tokens(2, 17))

    expected = out.lm_loss + TINY.aux_loss_coef * out.aux_loss
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.loss.requires_grad
    assert not out.lm_loss.requires_grad


def test_init_is_deterministic_for_a_seed() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = build_model(TINY, seed=7).state_dict()
    second = build_model(TINY, seed=7).state_dict()
    other = build_model(TINY, seed=8).state_dict()

    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["embed.weight"], other["embed.weight"])
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG untouched


def test_init_scales() -> None:
    state = build_model(named_config("small")).state_dict()

    assert state["embed.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    residual = state["low.blocks.0.moe.w_down"].std().item()
    assert 0.002 < residual < 0.01
    assert torch.equal(state["norm.weight"], torch.ones_like(state["norm.weight"]))


def test_state_is_float32_with_tied_head_and_no_rope() -> None:
    model = build_model(TINY)
    state = model.state_dict()

    assert all(t.dtype == torch.float32 for t in state.values())
    assert model.head.weight is model.embed.weight
    assert state["head.weight"].data_ptr() == state["embed.weight"].data_ptr()
    assert not any("rope" in name for name in state)
    assert state_layout(TINY).ties == (("embed.weight", "head.weight"),)


def test_untied_head_is_its_own_tensor() -> None:
    config = dataclasses.replace(TINY, tie_embeddings=False)
    model = build_model(config)

    assert model.head.weight is not model.embed.weight
    assert state_layout(config).ties == ()
    assert parameter_count(model) == parameter_count(build_model(TINY)) + (
        config.vocab_size * config.d_model
    )


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("tiny", 0.3e6, 0.6e6), ("small", 0.5e6, 2e6), ("125m", 115e6, 135e6)],
    ids=["tiny", "small", "125m"],
)
def test_parameter_count_of_named_sizes(name: str, low: float, high: float) -> None:
    with torch.device("meta"):
        model = HRMSMoE(named_config(name))

    assert low <= parameter_count(model) <= high


def test_one_step_grad_keeps_the_forward_and_trains_every_weight() -> None:
    full = build_model(TINY, seed=2)
    approx = build_model(dataclasses.replace(TINY, one_step_grad=True), seed=2)
    tokens = random_tokens(2, 17)

    out_full, out_approx = lm_loss(full, tokens), lm_loss(approx, tokens)
    torch.autograd.backward(out_approx.loss)
    torch.autograd.backward(out_full.loss)

    torch.testing.assert_close(out_approx.lm_loss, out_full.lm_loss)
    assert all(p.grad is not None for p in approx.parameters())
    grad_full = full.low.blocks[0].attn.qkv.weight.grad
    grad_approx = approx.low.blocks[0].attn.qkv.weight.grad
    assert grad_full is not None
    assert grad_approx is not None
    assert not torch.allclose(grad_full, grad_approx)


def test_sequence_longer_than_max_seq_len_is_refused() -> None:
    config = ModelConfig(max_seq_len=16)
    with pytest.raises(SequenceLengthError, match="max_seq_len 16"):
        build_model(config)(random_tokens(1, 17))


@pytest.mark.parametrize("name", ["tiny", "small", "125m"])
def test_config_json_round_trip(name: str) -> None:
    config = named_config(name)
    assert ModelConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"n_heads": 3}, "d_model / n_heads"),
        ({"top_k": 9}, "top_k"),
        ({"h_layers": 0}, "h_layers"),
        ({"d_model": 64.0}, "d_model must be int"),
        ({"tie_embeddings": 1}, "tie_embeddings must be bool"),
        ({"capacity_factor": math.nan}, "capacity_factor"),
        ({"aux_loss_coef": -0.1}, "aux_loss_coef"),
        ({"rope_base": math.inf}, "rope_base"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_invalid_configs_are_refused(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**fields)  # type: ignore[arg-type]


def test_unknown_size_and_bad_json_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown model size"):
        named_config("huge")
    with pytest.raises(ConfigError, match="bad model config"):
        ModelConfig.from_json('{"d_model": 64, "colour": "red"}')
