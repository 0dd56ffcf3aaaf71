"""Combining updates and the server optimizers, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from dragon_server.aggregation import (
    FedAdam,
    FedAvg,
    Nesterov,
    RobustRule,
    WeightedUpdate,
    apply_round,
    combine,
    krum_scores,
    make_optimizer,
    staleness_discount,
    update_weight,
    weighted_mean,
)
from dragon_server.errors import AggregationRefused, ConfigInvalid
from dragon_server.settings import RunConfig
from forge.codec import SparseTensor, SparseUpdate

SPEC = {"w": (2, 2), "b": (3,)}


def _sparse(shape: tuple[int, ...], entries: dict[int, float]) -> SparseTensor:
    indices = torch.tensor(sorted(entries), dtype=torch.int64)
    values = torch.tensor([entries[i] for i in sorted(entries)], dtype=torch.float32)
    return SparseTensor(shape, indices, values)


def _update(**tensors: dict[int, float]) -> SparseUpdate:
    return SparseUpdate({name: _sparse(SPEC[name], e) for name, e in tensors.items()})


def test_the_weighted_mean_is_exact_on_small_tensors() -> None:
    first = WeightedUpdate(_update(w={0: 1.0, 3: 2.0}, b={1: -8.0}), weight=1.0)
    second = WeightedUpdate(_update(w={3: 4.0}), weight=3.0)  # omits "b"

    combined = weighted_mean([first, second], SPEC)

    # w[0] = 1 * 1/4; w[3] = 2 * 1/4 + 4 * 3/4; b[1] = -8 * 1/4 (zero in second).
    assert combined["w"].tolist() == [[0.25, 0.0], [0.0, 3.5]]
    assert combined["b"].tolist() == [0.0, -2.0, 0.0]
    assert combined["w"].dtype == torch.float32


def test_fedavg_applies_the_mean_scaled_by_the_server_rate() -> None:
    combined = {"w": torch.tensor([[0.25, 0.0], [0.0, 3.5]]), "b": torch.zeros(3)}
    weights = {"w": torch.ones(2, 2), "b": torch.ones(3)}

    FedAvg(lr=1.0).step(weights, combined)
    assert weights["w"].tolist() == [[0.75, 1.0], [1.0, -2.5]]

    FedAvg(lr=0.5).step(weights, combined)
    assert weights["w"].tolist() == [[0.625, 1.0], [1.0, -4.25]]
    assert weights["b"].tolist() == [1.0, 1.0, 1.0]


def test_fedadam_matches_two_hand_computed_steps() -> None:
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    gradients = [[0.5, -1.0, 0.0], [0.25, 0.5, 2.0]]
    optimizer = FedAdam(lr, b1, b2, tau)
    weights = {"p": torch.tensor([1.0, 2.0, 3.0])}

    expected = [1.0, 2.0, 3.0]
    m = [0.0] * 3
    v = [0.0] * 3
    for g in gradients:
        optimizer.step(weights, {"p": torch.tensor(g)})
        for i in range(3):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            expected[i] -= lr * m[i] / (math.sqrt(v[i]) + tau)

    assert weights["p"].tolist() == pytest.approx(expected, rel=1e-6)
    # First step, first entry: m = 0.05, sqrt(v) = 0.05, so it moves by ~lr.
    assert expected[0] < 1.0 - 0.09


def test_nesterov_matches_hand_computed_steps_and_torch_sgd() -> None:
    lr, mu = 0.7, 0.9
    gradients = [[1.0, -2.0], [0.5, 0.5], [0.0, 1.0]]
    optimizer = Nesterov(lr, mu)
    weights = {"p": torch.tensor([0.0, 1.0])}
    reference = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    sgd = torch.optim.SGD([reference], lr=lr, momentum=mu, nesterov=True)

    expected = [0.0, 1.0]
    buffer = [0.0, 0.0]
    for g in gradients:
        optimizer.step(weights, {"p": torch.tensor(g)})
        reference.grad = torch.tensor(g)
        sgd.step()
        for i in range(2):
            buffer[i] = mu * buffer[i] + g[i]
            expected[i] -= lr * (g[i] + mu * buffer[i])

    assert weights["p"].tolist() == pytest.approx(expected, rel=1e-6)
    assert weights["p"].tolist() == pytest.approx(reference.detach().tolist(), rel=1e-6)
    # By hand, entry 0: buffers 1, 1.4, 1.26; steps 0.7 * (1 + 0.9), then
    # 0.7 * (0.5 + 0.9 * 1.4), then 0.7 * (0 + 0.9 * 1.26).
    assert expected[0] == pytest.approx(-1.33 - 1.232 - 0.7938)


@pytest.mark.parametrize(
    "make",
    [lambda: FedAdam(0.1), lambda: Nesterov(0.7, 0.9)],
    ids=["fedadam", "nesterov"],
)
def test_optimizer_state_survives_a_round_trip(make: object) -> None:
    assert callable(make)
    gradients = [torch.tensor([0.5, -1.0]), torch.tensor([0.25, 2.0])]
    straight = make()
    resumed = make()
    a = {"p": torch.tensor([1.0, 2.0])}
    b = {"p": torch.tensor([1.0, 2.0])}

    straight.step(a, {"p": gradients[0]})
    resumed.step(b, {"p": gradients[0]})
    fresh = make()
    fresh.load_state_dict(resumed.state_dict())
    straight.step(a, {"p": gradients[1]})
    fresh.step(b, {"p": gradients[1]})

    assert resumed.state_dict().keys() == fresh.state_dict().keys()
    assert a["p"].tolist() == b["p"].tolist()


@pytest.mark.parametrize(
    "weights",
    [[0.0, 0.0], [], [1.0, -1.0], [math.inf, 1.0]],
    ids=["all-zero", "empty", "negative", "infinite"],
)
def test_a_round_without_positive_finite_weight_is_refused(
    weights: list[float],
) -> None:
    updates = [WeightedUpdate(_update(w={0: 1.0}), weight=w) for w in weights]
    with pytest.raises(AggregationRefused):
        weighted_mean(updates, SPEC)


def test_stale_updates_are_discounted() -> None:
    assert staleness_discount(0) == 1.0
    assert staleness_discount(1) == 0.5
    assert staleness_discount(3) == 0.25
    assert update_weight(8, 0, 1.0) == 8.0
    assert update_weight(8, 1, 1.0) == 4.0
    assert update_weight(8, 3, 0.5) == 1.0
    assert update_weight(8, 0, 0.0) == 0.0
    with pytest.raises(ValueError, match="staleness"):
        staleness_discount(-1)

    fresh = WeightedUpdate(_update(b={0: 1.0}), weight=update_weight(8, 0, 1.0))
    stale = WeightedUpdate(_update(b={0: 4.0}), weight=update_weight(8, 1, 1.0))
    # (1 * 8 + 4 * 4) / 12 = 2
    assert weighted_mean([fresh, stale], SPEC)["b"].tolist() == [2.0, 0.0, 0.0]


def test_tied_tensors_are_stepped_once() -> None:
    shared = torch.tensor([1.0, 1.0])
    weights = {"embed": shared, "head": shared, "other": torch.tensor([0.0])}
    combined = {
        "embed": torch.tensor([0.5, 0.0]),
        "head": torch.tensor([0.5, 1.0]),
        "other": torch.tensor([2.0]),
    }

    apply_round(weights, combined, FedAvg(1.0))

    # The mean of the two names' updates, applied once to the one storage.
    assert weights["embed"].tolist() == [0.5, 0.5]
    assert weights["head"] is weights["embed"]
    assert weights["other"].tolist() == [-2.0]


def test_the_config_picks_the_optimizer_and_its_default_rate() -> None:
    fedavg = make_optimizer(RunConfig(optimizer="fedavg"))
    fedadam = make_optimizer(RunConfig(optimizer="fedadam"))
    nesterov = make_optimizer(RunConfig(optimizer="nesterov"))
    tuned = make_optimizer(RunConfig(optimizer="nesterov", server_learning_rate=0.3))

    assert isinstance(fedavg, FedAvg)
    assert fedavg.lr == 1.0
    assert isinstance(fedadam, FedAdam)
    assert (fedadam.beta1, fedadam.beta2, fedadam.tau) == (0.9, 0.99, 1e-3)
    assert isinstance(nesterov, Nesterov)
    assert (nesterov.lr, nesterov.momentum) == (0.7, 0.9)
    assert isinstance(tuned, Nesterov)
    assert tuned.lr == 0.3


# --- robust rules ------------------------------------------------------------


def _points(*values: float, weights: list[float] | None = None) -> list[WeightedUpdate]:
    weights = weights or [1.0] * len(values)
    return [
        WeightedUpdate(_update(b={0: v}), weight=w)
        for v, w in zip(values, weights, strict=True)
    ]


def test_the_default_rule_is_the_streaming_weighted_mean() -> None:
    updates = [
        WeightedUpdate(_update(w={0: 1.0, 3: 2.0}), weight=1.0),
        WeightedUpdate(_update(w={3: 4.0}), weight=3.0),
    ]
    assert RobustRule().streams
    assert not RobustRule(clip_norm=1.0).streams
    combined = combine(iter(updates), SPEC)
    dense = combine(updates, SPEC, RobustRule(name="mean", reject_sigma=100.0))
    assert combined["w"].tolist() == [[0.25, 0.0], [0.0, 3.5]]
    assert dense["w"].view(-1).tolist() == pytest.approx([0.25, 0.0, 0.0, 3.5])


def test_norm_clipping_scales_large_updates_down() -> None:
    updates = [
        WeightedUpdate(_update(b={0: 3.0, 1: 4.0}), weight=1.0),  # norm 5
        WeightedUpdate(_update(b={2: 0.5}), weight=1.0),  # norm 0.5, kept
    ]
    combined = combine(updates, SPEC, RobustRule(clip_norm=1.0))
    # (0.6, 0.8, 0) and (0, 0, 0.5), averaged.
    assert combined["b"].tolist() == pytest.approx([0.3, 0.4, 0.25])
    assert combined["w"].tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_an_outlying_norm_is_rejected() -> None:
    updates = _points(1.0, 1.1, 0.9, 1.0, 50.0)
    # Median norm 1.0, median absolute deviation 0.1: 3 sigmas = 0.445.
    combined = combine(updates, SPEC, RobustRule(reject_sigma=3.0))
    assert combined["b"].tolist() == pytest.approx([1.0, 0.0, 0.0])
    everything = combine(updates, SPEC, RobustRule(name="mean", clip_norm=1e9))
    assert everything["b"][0].item() == pytest.approx(54.0 / 5)


def test_trimmed_mean_and_median_work_per_coordinate() -> None:
    updates = _points(1.0, 2.0, 3.0, 100.0)
    trimmed = combine(
        updates, SPEC, RobustRule(name="trimmed_mean", trim_fraction=0.25)
    )
    assert trimmed["b"][0].item() == 2.5  # mean of 2 and 3
    assert combine(updates, SPEC, RobustRule(name="median"))["b"][0].item() == 2.5
    odd = _points(1.0, 2.0, 3.0, 100.0, -50.0)
    assert combine(odd, SPEC, RobustRule(name="median"))["b"][0].item() == 2.0


def test_krum_picks_the_most_central_update_and_multi_krum_averages() -> None:
    updates = _points(1.0, 1.2, 0.9, 1.05, 10.0, weights=[1.0, 1.0, 1.0, 3.0, 1.0])
    # f = 1: each score sums the 2 smallest squared distances to the others:
    # 1.0 -> 0.0025 + 0.01; 1.05 -> 0.0025 + 0.0225; 0.9 -> 0.01 + 0.0225; ...
    scores = krum_scores(torch.tensor([[1.0], [1.2], [0.9], [1.05], [10.0]]), 1)
    assert scores[:4].tolist() == pytest.approx([0.0125, 0.0625, 0.0325, 0.025])

    krum = combine(updates, SPEC, RobustRule(name="krum", byzantine=1))
    multi = combine(
        updates, SPEC, RobustRule(name="multi_krum", byzantine=1, selected=2)
    )

    assert krum["b"][0].item() == 1.0
    # 1.0 and 1.05, weighted 1 and 3.
    assert multi["b"][0].item() == pytest.approx((1.0 + 3 * 1.05) / 4)


def test_krum_is_refused_without_enough_updates() -> None:
    with pytest.raises(AggregationRefused, match="needs more than 4 updates"):
        combine(_points(1.0, 2.0, 3.0, 4.0), SPEC, RobustRule(name="krum", byzantine=1))
    with pytest.raises(AggregationRefused, match="positive weight"):
        combine(_points(1.0, weights=[0.0]), SPEC, RobustRule(name="median"))


def test_the_config_names_the_rule() -> None:
    config = RunConfig(
        aggregation_rule="multi_krum", byzantine_workers=2, multi_krum_selected=3
    )
    assert RobustRule.from_config(config) == RobustRule(
        name="multi_krum", byzantine=2, selected=3
    )
    with pytest.raises(ConfigInvalid, match="aggregation_rule must be one of"):
        RunConfig(aggregation_rule="vote")
