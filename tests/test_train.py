"""Local training of a lease: learning, the pseudo-gradient, micro-batches, OOM."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from forge.config import ModelConfig, named_config
from forge.model import HRMSMoE, ModelOutput, build_model
from forge.train import (
    NonFiniteResult,
    RecipeError,
    TrainingStopped,
    TrainRecipe,
    accumulate_gradients,
    evaluate,
    train_lease,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = named_config("tiny")
CPU = torch.device("cpu")
RECIPE = TrainRecipe(
    local_steps=4,
    batch_size=4,
    micro_batch_size=4,
    learning_rate=3e-3,
    weight_decay=0.01,
    beta1=0.9,
    beta2=0.95,
    grad_clip_norm=1.0,
    seed=0,
)


def lease_tokens(sequences: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Repetitive byte text with random offsets: quick to learn, yet not trivial."""
    text = torch.tensor(list(b"def lease(self, batch):\n    return batch\n"))
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(text), (sequences,), generator=generator)
    positions = starts[:, None] + torch.arange(length + 1)
    return text[positions % len(text)]


class OutOfMemoryAbove(HRMSMoE):
    """A CUDA stand-in: forward fails like a full GPU above a micro-batch size."""

    def __init__(self, config: ModelConfig, limit: int) -> None:
        super().__init__(config)
        self.limit = limit
        self.refused: list[int] = []

    def forward(self, tokens: torch.Tensor) -> ModelOutput:
        if tokens.shape[0] > self.limit:
            self.refused.append(tokens.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        return super().forward(tokens)


def test_training_lowers_the_loss_on_the_lease() -> None:
    model = build_model(TINY, seed=1)
    recipe = dataclasses.replace(RECIPE, local_steps=6)
    result = train_lease(model, lease_tokens(), recipe, device=CPU)

    assert result.loss_before == pytest.approx(math.log(TINY.vocab_size), abs=0.5)
    assert result.loss_after < result.loss_before - 0.5
    assert result.sample_count == 8
    assert result.token_count == 6 * 4 * 32
    assert result.micro_batch_size == 4
    assert result.seconds > 0


def test_pseudo_gradient_is_start_minus_end_exactly() -> None:
    model = build_model(TINY, seed=2)
    start = {name: t.clone() for name, t in model.state_dict().items()}

    result = train_lease(model, lease_tokens(), RECIPE, device=CPU)
    end = model.state_dict()

    assert set(result.pseudo_gradient) == set(start)
    for name, delta in result.pseudo_gradient.items():
        assert delta.dtype == torch.float32
        assert delta.device.type == "cpu"
        assert torch.equal(delta, start[name] - end[name]), name
    assert torch.equal(
        result.pseudo_gradient["head.weight"], result.pseudo_gradient["embed.weight"]
    )
    assert result.pseudo_gradient["embed.weight"].abs().max() > 0


def test_micro_batches_accumulate_to_the_full_batch_gradient() -> None:
    whole = build_model(TINY, seed=3)
    split = build_model(TINY, seed=3)
    batch = lease_tokens(sequences=8, seed=4)

    loss_whole, usage_whole = accumulate_gradients(whole, batch, 8)
    loss_split, usage_split = accumulate_gradients(split, batch, 3)  # 3 + 3 + 2

    torch.testing.assert_close(loss_split, loss_whole)
    torch.testing.assert_close(usage_split, usage_whole)
    for (name, a), b in zip(whole.named_parameters(), split.parameters(), strict=True):
        assert a.grad is not None
        assert b.grad is not None
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_micro_batch_size_does_not_change_the_first_loss() -> None:
    results = [
        train_lease(
            build_model(TINY, seed=5),
            lease_tokens(),
            dataclasses.replace(RECIPE, local_steps=1, micro_batch_size=micro),
            device=CPU,
        )
        for micro in (4, 1)
    ]

    assert results[1].loss_before == pytest.approx(results[0].loss_before, abs=1e-5)
    assert results[1].micro_batch_size == 1


def test_out_of_memory_halves_the_micro_batch_and_retries() -> None:
    reference = build_model(TINY, seed=6)
    flaky = OutOfMemoryAbove(TINY, limit=2)
    flaky.load_state_dict(reference.state_dict())
    recipe = dataclasses.replace(RECIPE, batch_size=8, micro_batch_size=8)

    result = train_lease(flaky, lease_tokens(), recipe, device=CPU)
    expected = train_lease(
        reference,
        lease_tokens(),
        dataclasses.replace(recipe, micro_batch_size=2),
        device=CPU,
    )

    assert result.micro_batch_size == 2
    assert flaky.refused == [8, 4]  # halved twice in the first step, then kept
    for name, delta in expected.pseudo_gradient.items():
        assert torch.equal(result.pseudo_gradient[name], delta), name


def test_out_of_memory_at_micro_batch_one_is_raised() -> None:
    flaky = OutOfMemoryAbove(TINY, limit=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        train_lease(flaky, lease_tokens(), RECIPE, device=CPU)
    assert flaky.refused == [4, 2, 1]


def test_should_stop_raises_training_stopped_between_steps() -> None:
    calls: list[tuple[int, int, float]] = []
    model = build_model(TINY)

    with pytest.raises(TrainingStopped, match="before step 3"):
        train_lease(
            model,
            lease_tokens(),
            RECIPE,
            device=CPU,
            progress=lambda done, total, loss: calls.append((done, total, loss)),
            should_stop=lambda: len(calls) >= 2,
        )

    assert [(done, total) for done, total, _ in calls] == [(1, 4), (2, 4)]
    assert all(math.isfinite(loss) for _, _, loss in calls)


def test_same_seed_same_update_other_seed_other_order() -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        recipe = dataclasses.replace(RECIPE, local_steps=2, batch_size=2, seed=seed)
        model = build_model(TINY, seed=7)
        return train_lease(model, lease_tokens(), recipe, device=CPU).pseudo_gradient

    first, again, other = run(1), run(1), run(2)

    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["embed.weight"], other["embed.weight"])


def test_expert_usage_is_reported_per_layer() -> None:
    result = train_lease(build_model(TINY), lease_tokens(), RECIPE, device=CPU)

    assert len(result.expert_usage) == TINY.l_layers + TINY.h_layers
    for row in result.expert_usage:
        assert len(row) == TINY.num_experts
        assert sum(row) == pytest.approx(1.0, abs=1e-5)


def test_non_finite_weights_raise_non_finite_result() -> None:
    model = build_model(TINY)
    with torch.no_grad():
        model.low.blocks[0].attn.qkv.weight[0, 0] = math.nan

    with pytest.raises(NonFiniteResult):
        train_lease(model, lease_tokens(), RECIPE, device=CPU)


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        (torch.full((2, 9), 300), "token ids"),
        (torch.zeros(2, TINY.max_seq_len + 2, dtype=torch.long), "max_seq_len"),
        (torch.zeros(0, 9, dtype=torch.long), "lease needs tokens"),
        (torch.zeros(2, 9), "integers"),
    ],
    ids=["out-of-vocab", "too-long", "no-sequences", "float-ids"],
)
def test_unusable_tokens_are_refused(tokens: torch.Tensor, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        train_lease(build_model(TINY), tokens, RECIPE, device=CPU)


def test_evaluate_is_near_log_vocab_at_init_and_batch_independent() -> None:
    model = build_model(TINY, seed=8)
    generator = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, TINY.vocab_size, (10, 33), generator=generator)
    model.eval()

    loss = evaluate(model, tokens)
    loss_small_batches = evaluate(model, tokens, batch_size=3)

    assert loss == pytest.approx(math.log(TINY.vocab_size), abs=0.15)
    assert loss_small_batches == pytest.approx(loss, abs=1e-5)
    assert not model.training  # left in the mode it was in
    model.train()
    evaluate(model, tokens)
    assert model.training


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"local_steps": 0}, "at least 1"),
        ({"learning_rate": 1e39}, "learning_rate"),
        ({"learning_rate": math.nan}, "learning_rate"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"beta2": 1.0}, "beta2"),
        ({"grad_clip_norm": math.inf}, "grad_clip_norm"),
    ],
    ids=[
        "no-steps",
        "lr-overflows-float32",
        "lr-nan",
        "negative-decay",
        "beta2-one",
        "clip-inf",
    ],
)
def test_unusable_recipes_are_refused(changes: dict[str, float], match: str) -> None:
    recipe = dataclasses.replace(RECIPE, **changes)  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match=match):
        train_lease(build_model(TINY), lease_tokens(), recipe, device=CPU)
